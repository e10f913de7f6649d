"""Stage-two peak memory at N and at 4N training samples: streaming keeps it flat.

Each fit runs in a fresh process for one epoch; peak memory is the fit's own peak RSS (VmHWM,
reset when training begins) minus the RSS at that moment, as metrics.json reports it.

    python bench/memory_scaling.py --cache artifacts/bench/minilm/features.zarr --samples 2000
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", default="artifacts/bench/minilm/features.zarr")
    parser.add_argument("--samples", type=int, default=2000, help="N; the second run uses 4N")
    parser.add_argument("--methods", default="lst,sherl")
    parser.add_argument("--set", dest="options", action="append", default=["r=4"])
    parser.add_argument("--work", default="artifacts/bench/memory")
    args = parser.parse_args()
    print(f"cache {args.cache}; one epoch per run; peak memory = peak RSS during fit minus RSS when fit began")
    print("| method | N | peak MB at N | peak MB at 4N | change |")
    print("|---|---|---|---|---|")
    for method in args.methods.split(","):
        peaks = []
        for count in (args.samples, 4 * args.samples):
            out = ROOT / args.work / f"{method}-{count}"
            command = [sys.executable, "-m", "cachetune.pipeline.cli", "fit", "--method", method, "--cache", args.cache,
                       "--out", str(out), "--epochs", "1", "--max-train-samples", str(count)]
            command += [f"--set={o}" for o in args.options if method in ("lst", "sherl")]
            subprocess.run(command, cwd=ROOT, check=True, capture_output=True)
            metrics = json.loads((out / "metrics.json").read_text())
            peaks.append(metrics["peak_memory_mb"])
            if metrics["train_samples"] != count:
                sys.exit(f"the split has only {metrics['train_samples']} training samples; lower --samples")
        print(f"| {method} | {args.samples} | {peaks[0]:.0f} | {peaks[1]:.0f} | {100 * (peaks[1] / peaks[0] - 1):+.1f}% |")


if __name__ == "__main__":
    main()
