"""What a batch costs a side network's training step, per cached value: the store's encoding against float32.

For each cache and method, real training batches of several sizes (batch size x padded length) are taken from the
store, and one training step (forward, backward, AdamW) is measured by torch's own allocation tracking
(stages.memory.peak_allocated_mb) plus the batch's own tensors, twice on the same batch and weights:
- `codes`: the batch as cachetune serves it (CachedHiddenStates: 8-bit codes and scales, decoded per layer, the
  first projections fused with the decoding);
- `float32`: the same batch widened to float32 before the step (every layer at once), the input stage two gave its
  methods before (the decoding's own temporaries, which came before the step, are not counted).
Reported per cached value (B x K x T x D values of K cached layers of width D): what the batch itself holds (codes
and scales, against the peak of widening it to float32), and the slope of a least-squares line through (cached
values, step MB) over the batch sizes: the whole step's marginal cost, the network's own activations included.

    python bench/batch_bytes.py --caches artifacts/features.zarr --methods linear,lst,unipt,sherl,utuning,synqt
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from cachetune.cache.reader import CacheReader, open_store  # noqa: E402
from cachetune.stages.memory import peak_allocated_mb, tensor_mb  # noqa: E402
from cachetune.stages.methods import build_model, config_from_options  # noqa: E402
from cachetune.stages.training.fit import required_layers, spec_from_store  # noqa: E402
from cachetune.stages.training.training_loop import batch_tensors, loss_of  # noqa: E402


def batches_of(reader: CacheReader, sizes: list[int]) -> list:
    """For each batch size, the longest full real batch (length-bucketed) of that size from one pass."""
    chosen = []
    for size in sizes:
        full = [batch for batch in reader.batches(size, shuffle=True, seed=0, by_length=True) if len(batch.labels) == size]
        chosen.append(max(full, key=lambda batch: batch.mask.shape[1]))
    return chosen


def batch_mb(states) -> tuple[float, float]:
    """(MB the batch holds as codes, MB its float32 widening takes at its peak: the dense copy and the decoding's
    temporaries, by torch's allocation tracking)."""
    return tensor_mb(batch_tensors((states, states.mask))), peak_allocated_mb(states.dense)


def step_mb(model, inputs, labels, task: str) -> float:
    """MB of one AdamW step: the batch's tensors plus the step's peak above them (weights and state excluded)."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)

    def step():
        loss = loss_of(model(*inputs), labels, task)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    step()  # optimizer state allocated before the measured step, as in training
    return tensor_mb(batch_tensors(inputs)) + peak_allocated_mb(step)


def slope(points: list[tuple[int, float]]) -> tuple[float, float]:
    """(bytes per value, intercept MB) of the least-squares line MB = a * values + b."""
    values, mb = np.array([p[0] for p in points], float), np.array([p[1] for p in points], float)
    a, b = np.polyfit(values, mb, 1)
    return a * 2**20, b


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--caches", default="artifacts/features.zarr", help="comma list of stores")
    parser.add_argument("--methods", default="linear,lst,unipt,sherl,utuning,synqt")
    parser.add_argument("--batch-sizes", default="8,16,32,64")
    parser.add_argument("--max-train-samples", type=int, default=2000, help="rows the batches are drawn from")
    args = parser.parse_args()
    torch.set_num_threads(2)
    sizes = [int(s) for s in args.batch_sizes.split(",")]
    print("| cache | encoding | method | batches (B x T) | batch bytes per cached value: codes | float32 (peak of "
          "widening) | step bytes per cached value: codes | float32 | step MB at the largest batch: codes | float32 |")
    print("|---|---|---|---|---:|---:|---:|---:|---:|---:|")
    for cache in args.caches.split(","):
        root = open_store(cache)
        spec = spec_from_store(root)
        task, encoding = root.attrs["task"], (root.attrs.get("encoding") or {}).get("dtype", root.attrs.get("dtype"))
        for method in args.methods.split(","):
            config = config_from_options(method, {})
            layers = required_layers(config, spec, cache)
            reader = CacheReader(cache, "train", layers, limit=args.max_train_samples)
            torch.manual_seed(0)
            model = build_model(config, spec).train()
            ours, dense, chosen = [], [], batches_of(reader, sizes)
            for batch in chosen:
                states = batch.hidden_states()
                values = states.codes.shape[0] * states.codes.shape[1] * states.codes.shape[2] * spec.hidden_size
                ours.append((values, step_mb(model, (states, states.mask), batch.labels, task)))
                dense.append((values, step_mb(model, (states.dense(), states.mask), batch.labels, task)))
            (a, _), (b, _) = slope(ours), slope(dense)
            codes_mb, widened_mb = batch_mb(chosen[-1].hidden_states())
            values = ours[-1][0] / 2**20
            shapes = ", ".join(f"{batch.mask.shape[0]}x{batch.mask.shape[1]}" for batch in chosen)
            print(f"| {Path(cache).parent.name}/{Path(cache).name} | {encoding} | {method} | {shapes} | "
                  f"{codes_mb / values:.2f} | {widened_mb / values:.2f} | {a:.2f} | {b:.2f} | {ours[-1][1]:.0f} | "
                  f"{dense[-1][1]:.0f} |", flush=True)


if __name__ == "__main__":
    main()
