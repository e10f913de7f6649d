"""Cached side networks against LoRA (PEFT) and full fine-tuning on the same backbone, data,
split, batch size and max length. Every run is a fresh process (`pipeline fit` / `pipeline baseline`).

Memory both ways: training memory by torch's own allocation tracking (the report's measure: one step on the largest
batch plus what is alive beside it; on a GPU, peak allocated), and peak RSS (Linux VmHWM, reset when training begins)
minus the peak RSS of a bare `python -c "import torch, transformers"`, the same way for every row. Each is a ratio
against LoRA and against LoRA with gradient checkpointing (row lora_ckpt: `pipeline baseline --gradient-checkpointing
--measure-step`, one measured step on LoRA's largest batch; its accuracy is LoRA's, so it has none). Seconds per epoch
exclude validation. The amortised line compares one extraction plus fitting every cached method
against one LoRA run per method.

    python bench/compare.py --backbone minilm
    python bench/compare.py --backbone mpnet --max-train-samples 2000
    python bench/compare.py --backbone minilm --device cuda      # on a GPU: memory is peak GPU allocated
    python bench/compare.py --backbone smollm2 --data FOLDER --baselines lora   # see bench/decoder.py
    python bench/compare.py --backbone gemma3-270m.Q4_K_M.gguf --data FOLDER --baselines lora
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
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from cachetune.stages.methods import method_names  # noqa: E402

REDUCTION = {"minilm": 4, "mpnet": 8, "smollm2": 8}  # LST's reference side widths: h = D / r
OPTIONS = {"lst": ["r"]}  # sherl, unipt, utuning, synqt: their defaults (see each method's docstring)


def bare_import_peak_mb() -> float:
    code = "import torch, transformers; from stages.memory import peak_rss_mb; print(peak_rss_mb())"
    return float(subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout)


def run(command: list[str], log: Path) -> float:
    started = time.perf_counter()
    with open(log, "w") as stream:
        done = subprocess.run(command, cwd=ROOT, stdout=stream, stderr=subprocess.STDOUT)
    if done.returncode:
        sys.exit(f"failed ({done.returncode}): {' '.join(command)}; see {log}")
    return time.perf_counter() - started


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="minilm",
                        help=f"built-in name ({', '.join(sorted(REDUCTION))}) or a .gguf file (LST's r then 8)")
    parser.add_argument("--data", default="movies", help="for extract and every baseline (a built-in name, file or folder)")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-train-samples", type=int, default=None)
    parser.add_argument("--epochs", type=int, default=5, help="for cached methods (baselines use 2)")
    parser.add_argument("--methods", default="all",
                        help="comma list of cached methods to run, all, or none to reuse results already in --work")
    parser.add_argument("--baselines", default="lora,full",
                        help="comma list of lora,full to run, or none to reuse baseline results already in --work")
    parser.add_argument("--work", default="artifacts/bench")
    parser.add_argument("--block-tokens", type=int, default=None,
                        help="extract's --block-tokens (a fit's shuffle buffer holds 2 blocks x layers x width) [default: extract's]")
    parser.add_argument("--baseline-step-only", action="store_true",
                        help="LoRA too is one measured step on its largest batch (`--measure-step`): memory ratios "
                             "without LoRA's training time (no accuracy or time ratios then)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:N], for every fit and baseline")
    parser.add_argument("--precision", default="auto",
                        help="autocast precision of every fit and baseline; on a GPU LoRA also runs in fp32 (row lora_fp32)")
    args = parser.parse_args()

    work = ROOT / args.work / Path(args.backbone).stem  # a .gguf file's results under its name
    work.mkdir(parents=True, exist_ok=True)
    cache = work / "features.zarr"
    pipeline = [sys.executable, "-m", "cachetune.pipeline.cli"]
    subset = ["--max-train-samples", str(args.max_train_samples)] if args.max_train_samples else []
    runtime = ["--device", args.device, "--precision", args.precision]
    bare = bare_import_peak_mb()
    extract_seconds = run(pipeline + ["extract", "--backbone", args.backbone, "--data", args.data, "--layers", "all", "--max-length",
                                      str(args.max_length), "--batch-size", str(args.batch_size), "--out", str(cache)]
                          + (["--block-tokens", str(args.block_tokens)] if args.block_tokens else []),
                          work / "extract.log")
    methods = method_names() if args.methods == "all" else [m for m in args.methods.split(",") if m and m != "none"]
    rows, wall = {}, {}
    for method in methods:
        options = [f"--set={key}={REDUCTION.get(args.backbone, 8)}" for key in OPTIONS.get(method, [])]
        wall[method] = run(pipeline + ["fit", "--method", method, "--cache", str(cache), "--out", str(work / method),
                                       "--epochs", str(args.epochs), "--batch-size", str(args.batch_size)] + options + subset
                           + runtime,
                           work / f"{method}.log")
        rows[method] = json.loads((work / method / "metrics.json").read_text())
    step_only = ["--measure-step"] if args.baseline_step_only else []
    baselines = [(b, b, runtime + step_only) for b in args.baselines.split(",") if b and b != "none"]
    if "lora" in args.baselines and args.device.startswith("cuda") and args.precision != "fp32":
        baselines.append(("lora_fp32", "lora", ["--device", args.device, "--precision", "fp32"]))
    if "lora" in args.baselines:
        baselines.append(("lora_ckpt", "lora", runtime + ["--gradient-checkpointing", "--measure-step"]))
    for name, method, options in baselines:
        wall[name] = run(pipeline + ["baseline", "--method", method, "--backbone", args.backbone, "--data", args.data, "--max-length",
                                     str(args.max_length), "--batch-size", str(args.batch_size), "--out", str(work / name)]
                         + subset + options, work / f"{name}.log")
        rows[name] = json.loads((work / name / "metrics.json").read_text())

    walls = work / "wall_seconds.json"  # wall times of every run so far, so a partial rerun keeps the others
    wall = {**(json.loads(walls.read_text()) if walls.exists() else {}), **wall}
    walls.write_text(json.dumps(wall, indent=2))
    for name in method_names() + ["lora", "lora_fp32", "lora_ckpt", "full"]:
        if name not in rows and (work / name / "metrics.json").exists() and name in wall:
            rows[name] = json.loads((work / name / "metrics.json").read_text())  # measured by an earlier run
    methods = [m for m in method_names() if m in rows]
    lora, checkpointed = rows.get("lora"), rows.get("lora_ckpt")
    lora_trained = lora is not None and not lora.get("measured_step_only")
    header = ("| method | test acc | trainable params | training MB (torch) | / LoRA | / LoRA ckpt | peak RSS MB | / LoRA "
              "| / LoRA ckpt | s/epoch | time / LoRA | acc − LoRA | device, precision |")
    lines = [header, "|" + "---|" * 13]

    def training_mb(m):  # GPU: peak allocated during training; CPU: torch's allocation tracking
        return m.get("peak_gpu_allocated_mb", m.get("training_memory_mb"))

    def rss_of(m):  # peak RSS above a bare import
        return m["peak_rss_mb"] - bare

    def ratio(ours, reference, of):
        return f"{of(ours) / of(reference):.3f}" if reference and of(ours) is not None and of(reference) else "–"

    for name, m in rows.items():
        where = f"{m.get('device_name', 'cpu')}, {m.get('precision', 'fp32')}"
        trained = not m.get("measured_step_only")
        accuracy = f"{100 * m['test']['accuracy']:.2f}%" if trained else (
            "(LoRA's)" if m.get("gradient_checkpointing") else "(one step, untrained)")
        lines.append(" | ".join([
            f"| {name}", accuracy, f"{m['trainable_parameters']:,}", f"{training_mb(m):.0f}",
            ratio(m, lora, training_mb), ratio(m, checkpointed, training_mb), f"{rss_of(m):.0f}", ratio(m, lora, rss_of),
            ratio(m, checkpointed, rss_of), f"{m['seconds_per_epoch']:.1f}" if trained else "–",
            f"{m['seconds_per_epoch'] / lora['seconds_per_epoch']:.3f}" if lora_trained and trained else "–",
            f"{100 * (m['test']['accuracy'] - lora['test']['accuracy']):+.2f}" if lora_trained and trained else "–",
            f"{where} |"]))
    train = next(iter(rows.values()))["train_samples"]
    summary = [f"backbone {args.backbone}, {train} training samples, batch {args.batch_size}, max length {args.max_length}; "
               f"bare import peak RSS {bare:.0f} MB (subtracted)",
               f"extraction (all layers, all splits, this run; 0 if the store was already complete): {extract_seconds:.0f} s"]
    cached = [m for m in methods]
    if lora_trained:
        total_cached = extract_seconds + sum(wall[m] for m in cached)
        summary.append(f"amortised: one extraction + fitting {len(cached)} cached methods = {total_cached:.0f} s wall; "
                       f"one LoRA run per method = {len(cached)} x {wall['lora']:.0f} s = {len(cached) * wall['lora']:.0f} s "
                       f"(ratio {total_cached / (len(cached) * wall['lora']):.3f})")
    text = "\n".join(summary + ["", *lines])
    print(text)
    (work / "compare.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
