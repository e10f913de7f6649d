"""Do a decoder's massive activations hurt the side networks that read raw cached layers? Each method with and
without `rms_norm` (a parameter-free RMS norm of every cached layer before the side network), on one cache: one
`pipeline sweep --in-memory` per method (its two settings share batches and seeds), the methods' sweeps run as
parallel processes. Prints test accuracy and macro-F1 per (method, rms_norm) and the difference, mean over seeds,
plus the cache's largest and median |x| per layer (the massive activations themselves).

    python bench/decoder.py ...   # or any: pipeline extract --backbone smollm2 --layers all --data FOLDER --out CACHE
    python bench/rms_norm.py --cache artifacts/smol/features.zarr --methods linear,unipt,utuning,lst,sherl --epochs 3
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def largest_values(cache: str, samples: int = 64) -> list[tuple[int, float, float]]:
    """(layer, max |x|, median |x|) over the first `samples` training samples' real tokens."""
    import numpy as np

    from cachetune.cache.reader import CacheReader

    reader = CacheReader(cache, "train")
    batch = next(iter(reader.batches(batch_size=samples)))
    rows = []
    for slot, layer in enumerate(reader.layers):
        values = batch.features[:, slot][batch.mask].abs().float().numpy()
        rows.append((int(layer), float(values.max()), float(np.median(values))))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", required=True)
    parser.add_argument("--methods", default="linear,unipt,utuning,lst,sherl")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--lr", default="1e-3")
    parser.add_argument("--out", default="artifacts/bench/rms_norm")
    args = parser.parse_args()

    for layer, biggest, median in largest_values(args.cache):
        print(f"H_{layer:<3d} max |x| {biggest:10.1f}   median |x| {median:7.3f}")
    running = []
    for method in args.methods.split(","):
        command = [sys.executable, "-m", "cachetune.pipeline.cli", "sweep", "--cache", args.cache, "--methods", method,
                   "--set", "rms_norm=false,true", "--lr", args.lr, "--seeds", args.seeds, "--epochs", str(args.epochs),
                   "--in-memory", "--out", f"{args.out}/{method}"]
        print("$", " ".join(command), flush=True)
        running.append(subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL))
    if any(process.wait() for process in running):
        sys.exit("a sweep failed")
    import json

    results: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for method in args.methods.split(","):
        for row in json.loads(Path(ROOT, args.out, method, "sweep.json").read_text())["runs"]:
            normed = str(row["options"].get("rms_norm", False)).lower()
            results.setdefault((row["method"], normed), []).append((row["test_accuracy"], row["test_macro_f1"]))
    print(f"\n{'method':8s} {'acc raw':>8s} {'acc rms':>8s} {'diff':>7s}   {'F1 raw':>7s} {'F1 rms':>7s}   (mean over seeds)")
    for method in args.methods.split(","):
        raw, normed = results.get((method, "false"), []), results.get((method, "true"), [])
        if not raw or not normed:
            continue
        acc_raw, acc_rms = statistics.mean(a for a, _ in raw), statistics.mean(a for a, _ in normed)
        f1_raw, f1_rms = statistics.mean(f for _, f in raw), statistics.mean(f for _, f in normed)
        print(f"{method:8s} {acc_raw:8.4f} {acc_rms:8.4f} {acc_rms - acc_raw:+7.4f}   {f1_raw:7.4f} {f1_rms:7.4f}")


if __name__ == "__main__":
    main()
