"""A sweep of N configurations against N separate `pipeline fit` runs on the same cache.

Every run is a fresh process (`python -m cachetune.pipeline.cli ...`), timed from start to exit; peak memory is what the
run itself records (metrics.json / sweep.json: peak RSS above the RSS when training began, or peak GPU memory
allocated on a GPU). Prints the ratios the issue sets goals for (sweep wall against one fit's and against all N
fits'; sweep peak against the largest fit's) and checks that each run's test metric is the same in both.

    python bench/sweep.py --cache artifacts/features.zarr --methods lst,unipt,sherl --set r=4,8 --lr 1e-3,3e-3 \\
        --max-train-samples 2000 --epochs 2
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def timed(command: list[str]) -> float:
    started = time.perf_counter()
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if result.returncode:
        sys.exit(f"failed: {' '.join(command)}\n{result.stdout}{result.stderr}")
    return time.perf_counter() - started


def memory(record: dict) -> float:
    return record.get("peak_gpu_allocated_mb", record["peak_memory_mb"])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", default="artifacts/features.zarr")
    parser.add_argument("--methods", default="lst,unipt,sherl")
    parser.add_argument("--set", dest="pairs", action="append", default=[], metavar="KEY=V1,V2")
    parser.add_argument("--lr", default="1e-3,3e-3")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--max-train-samples", type=int, default=2000)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--work", default="artifacts/bench/sweep")
    args = parser.parse_args()

    from cachetune.stages.training.sweep_grid import make_grid

    runs = make_grid({}, methods=args.methods, pairs=tuple(args.pairs or ["r=4,8"]), lrs=args.lr, seeds=args.seeds).runs()
    work = ROOT / args.work
    common = ["--cache", args.cache, "--epochs", str(args.epochs), "--max-train-samples", str(args.max_train_samples),
              "--device", args.device]
    base = [sys.executable, "-m", "cachetune.pipeline.cli"]
    print(f"{len(runs)} configurations on {args.cache}, {args.max_train_samples} training samples, {args.epochs} epochs, "
          f"{args.device}, torch threads {os.environ.get('OMP_NUM_THREADS', 'default')}")

    fits = {}
    for run in runs:
        out = work / "fits" / run.name
        options = [f"--set={key}={value}" for key, value in run.options]
        seconds = timed(base + ["fit", "--method", run.config.method, *options, "--lr", str(run.lr), "--seed",
                                str(run.seed), "--out", str(out), *common])
        fits[run.name] = {"wall": seconds, **json.loads((out / "metrics.json").read_text())}
        print(f"  fit {run.name:32s} {seconds:7.1f} s  peak {memory(fits[run.name]):6.0f} MB  "
              f"test {fits[run.name]['test']}", flush=True)

    pairs = [f"--set={pair}" for pair in (args.pairs or ["r=4,8"])]
    sweep_dir = work / "sweep"
    for stale in sweep_dir.glob("runs/*/metrics.json"):  # a rerun of the bench must train, not skip
        stale.unlink()
    seconds = timed(base + ["sweep", "--methods", args.methods, *pairs, "--lr", args.lr, "--seeds", args.seeds,
                            "--out", str(sweep_dir), *common])
    summary = json.loads((sweep_dir / "sweep.json").read_text())
    same = all(json.loads((sweep_dir / "runs" / name / "metrics.json").read_text())["test"] == fit["test"]
               for name, fit in fits.items())

    one_fit, all_fits = max(fit["wall"] for fit in fits.values()), sum(fit["wall"] for fit in fits.values())
    peak_fit = max(memory(fit) for fit in fits.values())
    print(f"\nsweep of {len(runs)}: {seconds:.1f} s, peak {memory(summary):.0f} MB; "
          f"test metrics identical to the separate fits: {same}")
    print("| figure | value |\n|---|---:|")
    print(f"| sweep wall / slowest single fit's wall (goal <= 3 on CPU, <= 2 on GPU) | {seconds / one_fit:.2f} |")
    print(f"| sweep wall / mean single fit's wall | {seconds / (all_fits / len(fits)):.2f} |")
    print(f"| sweep wall / all {len(fits)} fits' wall | {seconds / all_fits:.2f} |")
    print(f"| sweep peak memory / largest fit's (goal <= 1.5) | {memory(summary) / peak_fit:.2f} |")


if __name__ == "__main__":
    main()
