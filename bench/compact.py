"""Compact caches against float16: bytes per real token-layer, and every method's test accuracy over seeds.

From one float16 store (made by `pipeline extract`), `pipeline compact` makes each encoding (int8, fp8, pca:D/4,
pca:D/4 + int8, ...); each store then gets one `pipeline sweep --seeds ...` of the same methods, training subset
and epochs. Prints, per encoding: bytes on disk per real token-layer and its ratio to float16's, compaction
seconds, the sweep's wall seconds and peak memory (decoding and dequantizing included; relative to float16's), and
per method the mean ± std of test accuracy over the seeds with its difference to float16's, against the goals:
8-bit <= 0.52 of float16's bytes and every method within max(0.3 points, float16's std); a projection <= 0.15 of
the bytes and the best method within 0.5 points.

    python bench/compact.py --cache artifacts/features.zarr --methods linear,lst,unipt,sherl,utuning,synqt \\
        --seeds 0,1,2                                   # the issue's full grid for one backbone
    python bench/compact.py --cache artifacts/minilm_f16.zarr --methods linear,lst --max-train-samples 2000
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cachetune.cache.info import describe_store  # noqa: E402

GOALS = {"8-bit": (0.52, 0.3), "projection": (0.15, 0.5)}


def run(command: list[str]) -> float:
    started = time.perf_counter()
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if result.returncode:
        sys.exit(f"failed: {' '.join(command)}\n{result.stdout[-2000:]}{result.stderr[-2000:]}")
    return time.perf_counter() - started


def encodings(width: int, names: list[str]) -> dict[str, list[str]]:
    """name -> `pipeline compact` options; D/4 components for the projections."""
    k = width // 4
    known = {"int8": ["--dtype", "int8"], "fp8": ["--dtype", "fp8"], f"pca:{k}": ["--dtype", "float16", "--reduce", f"pca:{k}"],
             f"pca:{k}+int8": ["--dtype", "int8", "--reduce", f"pca:{k}"], f"pca:{k}+fp8": ["--dtype", "fp8", "--reduce", f"pca:{k}"]}
    chosen = [name.replace("D/4", str(k)) for name in names]
    return {name: known[name] for name in chosen}


def sweep(cache: str, out: Path, args) -> dict:
    command = [sys.executable, "-m", "cachetune.pipeline.cli", "sweep", "--cache", cache, "--methods", args.methods,
               "--seeds", args.seeds, "--epochs", str(args.epochs), "--out", str(out), "--device", "cpu"]
    if args.max_train_samples:
        command += ["--max-train-samples", str(args.max_train_samples)]
    run(command)
    return json.loads((out / "sweep.json").read_text())


def accuracy_by_method(summary: dict) -> dict[str, list[float]]:
    scores: dict[str, list[float]] = {}
    for row in summary["runs"]:
        scores.setdefault(row["method"], []).append(100 * row["test_accuracy"])
    return scores


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", default="artifacts/features.zarr", help="A complete float16 store.")
    parser.add_argument("--encodings", default="float16,int8,fp8,pca:D/4,pca:D/4+int8",
                        help="float16 (the reference sweep) and the compact encodings; several invocations with parts of "
                             "the list may share --work: each prints the table over every result there")
    parser.add_argument("--methods", default="linear,lst,unipt,sherl,utuning,synqt")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--max-train-samples", type=int, default=None)
    parser.add_argument("--work", default="artifacts/bench_compact")
    parser.add_argument("--table", action="store_true", help="print the table of the results in --work; run nothing")
    args = parser.parse_args()
    work = Path(args.work)
    base = describe_store(args.cache)
    if base["dtype"] != "float16":
        sys.exit(f"{args.cache} is {base['dtype']}; give a float16 store")
    names = args.encodings.split(",")
    stores = {"float16": (args.cache, [])} if "float16" in names else {}
    stores.update({name: (str(work / f"{slug(name)}.zarr"), options)
                   for name, options in encodings(base["hidden_size"], [n for n in names if n != "float16"]).items()})
    work.mkdir(parents=True, exist_ok=True)
    for name, (path, options) in ({} if args.table else stores).items():  # compact, then sweep, one encoding at a time: each result is kept
        seconds = run([sys.executable, "-m", "cachetune.pipeline.cli", "compact", args.cache, *options, "--out", path]) if options else 0.0
        facts = describe_store(path)
        summary = sweep(path, work / f"sweep-{slug(name)}", args)
        result = {"bytes": facts["bytes_per_token_layer"], "error": facts["relative_error"],
                  "compact_seconds": seconds, "sweep_seconds": summary["wall_seconds"],
                  "peak_mb": summary["peak_memory_mb"], "accuracy": accuracy_by_method(summary)}
        (work / f"result-{slug(name)}.json").write_text(json.dumps({"name": name, **result}, indent=2))
        print(f"{name}: {json.dumps(result)}", flush=True)
    results = {r["name"]: r for r in (json.loads(p.read_text()) for p in sorted(work.glob("result-*.json")))}
    if "float16" not in results:
        print("no float16 result yet in", work, "(run with --encodings float16); no table")
        return
    results = {"float16": results.pop("float16"), **results}
    reference = results["float16"]
    print(f"\n{base['model_type']} ({base['num_layers']} layers x {base['hidden_size']}), {args.cache}; methods {args.methods}; "
          f"seeds {args.seeds}; {args.epochs} epochs; train subset {args.max_train_samples or 'all'}")
    train = args.max_train_samples or base["splits"]["train"]["samples"]
    seeds = len(args.seeds.split(","))
    per_sweep = train * args.epochs * seeds  # training samples through every method
    print(f"stage-two samples/s: {train} training samples x {args.epochs} epochs x {seeds} seeds "
          f"through all {len(reference['accuracy'])} methods (one `pipeline sweep`, validation and test included) / sweep s")
    print("| encoding | bytes / token-layer | vs float16 | rel. error vs float16 | compact s | sweep s (vs f16) | samples/s | "
          "peak MB (vs f16) | " + " | ".join(f"{m} test acc (Δ)" for m in reference["accuracy"]) + " | goal |")
    print("|---" * (9 + len(reference["accuracy"])) + "|")
    for name, row in results.items():
        ratio = row["bytes"] / reference["bytes"]
        cells, deltas = [], {}
        for method, scores in reference["accuracy"].items():
            mine = row["accuracy"][method]
            mean, std = statistics.mean(mine), statistics.stdev(mine) if len(mine) > 1 else 0.0
            deltas[method] = mean - statistics.mean(scores)
            cells.append(f"{mean:.2f} ± {std:.2f} ({deltas[method]:+.2f})")
        goal = ""
        if name != "float16":
            kind = "projection" if "pca" in name else "8-bit"
            bytes_goal, points = GOALS[kind]
            if kind == "8-bit":
                tolerance = {m: max(points, statistics.stdev(s) if len(s) > 1 else 0) for m, s in reference["accuracy"].items()}
                broken = [m for m, d in deltas.items() if -d > tolerance[m]]
            else:
                best = max(reference["accuracy"], key=lambda m: statistics.mean(reference["accuracy"][m]))
                broken = [best] if deltas[best] < -points else []
            broken += ["bytes"] if ratio > bytes_goal else []
            goal = f"{kind}: " + (f"missed ({', '.join(broken)})" if broken else "met")
        error = f"{row['error']:.4f}" if row["error"] is not None else "-"
        print(f"| {name} | {row['bytes']:.1f} | {ratio:.3f} | {error} | {row['compact_seconds']:.0f} | "
              f"{row['sweep_seconds']:.0f} ({row['sweep_seconds'] / reference['sweep_seconds']:.2f}x) | "
              f"{per_sweep / row['sweep_seconds']:.1f} | "
              f"{row['peak_mb']:.0f} ({row['peak_mb'] / reference['peak_mb']:.2f}x) | " + " | ".join(cells) + f" | {goal} |")


def slug(name: str) -> str:
    return name.replace(":", "").replace("+", "_")


if __name__ == "__main__":
    main()
