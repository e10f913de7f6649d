"""Every GPU goal of cachetune measured in one command, in under eight minutes, for a GPU lent for minutes.

On the lent machine (see ../shared/gpu/README.md: `.device` travels with the tree):

    source .device/setup.sh && python bench/gpu_check.py --out $OUT

Here, on the CPU, a tiny random BERT and a small table run every part that does not need CUDA (no figure means
anything then; it checks that the script runs):

    python bench/gpu_check.py --tiny

It runs, each against its baseline measured in the same invocation, in this order (a deadline skips what is left
and says so; every goal is printed, met or missed):
  1. the CUDA tests (tests/test_gpu_path.py, test_runtime.py, test_extract.py: skipped without CUDA);
  2. extraction (`extract`, writing the store) against a bare length-sorted forward pass with all hidden states,
     without and with naive host copies of the real tokens (MiniLM and a BERT-base-sized random backbone);
  3. every method's fit on the MiniLM cache (batch 32 eager first; batch 256 and compiled after 4-6): streaming and resident (--in-memory), batch 32 and 256, eager and
     compiled (--compile --static-shapes), against LoRA r=8 (PEFT) in fp32 and bf16 at the same batch size:
     samples/s of the second epoch (the first one compiles), peak GPU memory (the fit's, the cache apart);
  4. host syncs per training step (torch.cuda.set_sync_debug_mode("warn"), counted per method);
  5. a sweep of 12 networks (one seed: shared batches) against one fit of the same data path;
  6. test accuracy of two methods on the GPU against the same fit on the CPU.
It prints one table of ratios and writes it (gpu_check.md, gpu_check.json) to --out, for BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from cachetune.stages.methods import config_from_options, method_names  # noqa: E402

METHOD_OPTIONS = {"lst": {"r": "4"}}  # the others at their defaults; LST at MiniLM's reference width (D / 4)
GOALS = {  # name -> (comparison, goal) for the table
    "extract_vs_bare_with_copies": (">=", 0.8),
    "memory_vs_lora_fp32": ("<=", 0.15), "memory_vs_lora_fp32_sherl_synqt": ("<=", 0.25),
    "speed_vs_lora_b32": (">=", 5.0), "sweep12_vs_one_fit": ("<=", 2.0), "accuracy_gap_points": ("<=", 0.3),
    "syncs_per_step": ("<=", 0.0),
}


class Table:
    """Rows of (section, name, value, baseline, ratio, goal, met); printed and written at the end, whatever ran."""

    def __init__(self):
        self.rows: list[dict] = []

    def add(self, section, name, value, baseline=None, unit="", goal=None, ratio=None, note=""):
        if ratio is None and baseline not in (None, 0) and value is not None:
            ratio = value / baseline
        met = None
        if goal is not None and ratio is not None:
            comparison, target = GOALS[goal]
            met = ratio >= target if comparison == ">=" else ratio <= target
        row = {"section": section, "name": name, "value": value, "baseline": baseline, "unit": unit, "ratio": ratio,
               "goal": f"{GOALS[goal][0]} {GOALS[goal][1]}" if goal else "", "met": met, "note": note}
        self.rows.append(row)
        print(_line(row), flush=True)

    def markdown(self, header: str) -> str:
        lines = [header, "", "| section | measure | value | baseline | ratio | goal | met | note |",
                 "|---|---|---:|---:|---:|---|---|---|"]
        for r in self.rows:
            lines.append(f"| {r['section']} | {r['name']} | {_num(r['value'])} {r['unit']} | {_num(r['baseline'])} | "
                         f"{_num(r['ratio'])} | {r['goal']} | {'' if r['met'] is None else ('yes' if r['met'] else 'MISSED')} "
                         f"| {r['note']} |")
        return "\n".join(lines) + "\n"


def _num(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"


def _line(r) -> str:
    met = "" if r["met"] is None else ("  met" if r["met"] else "  MISSED")
    return (f"{r['section']:<10} {r['name']:<44} {_num(r['value']):>10} {r['unit']:<10} base {_num(r['baseline']):>10}"
            f"  ratio {_num(r['ratio']):>7} {r['goal']:<7}{met} {r['note']}")


class Clock:
    """The invocation's deadline: each part asks before it starts, and is skipped (and listed) when time is short."""

    def __init__(self, seconds: float):
        self.start, self.seconds, self.skipped = time.perf_counter(), seconds, []

    def left(self) -> float:
        return self.seconds - (time.perf_counter() - self.start)

    def allows(self, what: str, needs: float) -> bool:
        if self.left() >= needs:
            return True
        self.skipped.append(what)
        print(f"skipped (time): {what}", flush=True)
        return False


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------- 1. CUDA tests

def cuda_tests(table: Table, clock: Clock, tiny: bool):
    if tiny or not torch.cuda.is_available():
        table.add("tests", "CUDA tests", "not run", note="no GPU here")
        return
    command = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "tests/test_gpu_path.py",
               "tests/test_runtime.py", "tests/test_extract.py", "-k",
               "cuda or gpu_fit or gpu_extraction or on_the_gpu"]
    try:
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=min(150, clock.left() - 300))
        last = (done.stdout.strip().splitlines() or ["(no output)"])[-1]
        print(done.stdout[-3000:], done.stderr[-2000:], flush=True)
        table.add("tests", "CUDA tests (sync debug mode)", "pass" if done.returncode == 0 else "FAIL", note=last)
    except subprocess.TimeoutExpired:
        table.add("tests", "CUDA tests", "timeout", note="ran past 150 s")


# ---------------------------------------------------------------- 2. extraction

def bare_forward(model, tokenizer, texts, batch_size, max_length, device, copies: bool) -> float:
    """samples/s of length-sorted batches through the model with all hidden states; copies: the real tokens of
    every layer to the host in float16, synchronously (the naive way)."""
    encoded = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
    order = np.argsort([-len(ids) for ids in encoded], kind="stable")
    batches = []
    for first in range(0, len(order), batch_size):
        chunk = [encoded[i] for i in order[first:first + batch_size]]
        batches.append(tokenizer.pad({"input_ids": chunk}, return_tensors="pt"))
    with torch.inference_mode():
        model(**{k: v.to(device) for k, v in batches[0].items()}, output_hidden_states=True)  # warm-up
        sync(device)
        started = time.perf_counter()
        for batch in batches:
            inputs = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            hidden = model(**inputs, output_hidden_states=True).hidden_states
            if copies:
                mask = inputs["attention_mask"].bool()
                for layer in hidden:
                    layer[mask].half().cpu()
        sync(device)
    return len(texts) / (time.perf_counter() - started)


def extraction(table: Table, clock: Clock, backbones: dict, data: str, work: Path, device, limit: int, tiny: bool):
    from cachetune.pipeline.data import load_dataset
    from cachetune.stages.backbones import load_backbone
    from cachetune.stages.extraction.extract import ExtractSettings, extract

    dataset = load_dataset(data)
    texts = [dataset.texts[i] for i in range(min(limit, len(dataset)))]
    stores = {}
    for name, path in backbones.items():
        if not clock.allows(f"extraction {name}", 60 if not tiny else 5):
            continue
        backbone = load_backbone(path)
        model = backbone.model.to(device).eval()
        batch = 128 if device.type == "cuda" else 32
        bare_forward(model, backbone.tokenizer, texts[:4 * batch], batch, 128, device, copies=False)  # warm-up
        bare = bare_forward(model, backbone.tokenizer, texts, batch, 128, device, copies=False)
        copied = bare_forward(model, backbone.tokenizer, texts, batch, 128, device, copies=True)
        store = work / f"{name}.zarr"
        settings = ExtractSettings(out=str(store), device=str(device), batch_size=batch, overwrite=True)
        sync(device)
        started = time.perf_counter()
        extract(backbone, dataset, settings, log=lambda *_: None)
        sync(device)
        ours = len(dataset) / (time.perf_counter() - started)
        stores[name] = store
        table.add("extract", f"{name}: bare sorted forward, no copies", bare, unit="samples/s")
        table.add("extract", f"{name}: bare forward + naive host copies", copied, bare, unit="samples/s")
        table.add("extract", f"{name}: extract (store written)", ours, copied, unit="samples/s",
                  goal="extract_vs_bare_with_copies", note=f"{len(dataset)} samples, batch {batch}; vs the bare forward: "
                                                           f"{ours / bare:.2f}x")
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return stores


# ---------------------------------------------------------------- 3. fits against LoRA

def one_fit(store, method, work, device, batch_size, in_memory, compiled, epochs=2, max_train=None,
            precision=None, seed=0):
    from cachetune.stages.training.fit import FitSettings, fit

    torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    settings = FitSettings(epochs=epochs, batch_size=batch_size, in_memory=in_memory, device=str(device),
                           precision=precision, static_shapes=compiled, compile=compiled, max_train_samples=max_train,
                           warmup_ratio=0.1, lr=1e-3, seed=seed)
    out = work / "models" / f"{method}-{batch_size}-{in_memory}-{compiled}-{precision}"
    shutil.rmtree(out, ignore_errors=True)
    metrics = fit(str(store), config_from_options(method, METHOD_OPTIONS.get(method, {})), settings, out,
                  show_progress=False)
    seconds = metrics["history"][-1]["seconds"]  # the last epoch: compilation (first epoch) left out
    return metrics["train_samples"] / seconds, metrics


def lora(backbone_path, data, work, device, batch_size, precision, max_train, epochs=1):
    from cachetune.pipeline.data import load_dataset
    from cachetune.stages.training.baseline import BaselineSettings, train_baseline

    if device.type == "cuda":
        torch.cuda.empty_cache()
    settings = BaselineSettings(method="lora", epochs=epochs, batch_size=batch_size, max_train_samples=max_train,
                                device=str(device), precision=precision)
    metrics = train_baseline(backbone_path, load_dataset(data), settings, work / "models" / f"lora-{batch_size}-{precision}",
                             show_progress=False)
    return metrics["train_samples"] / metrics["history"][-1]["seconds"], metrics


def gpu_mb(metrics) -> float | None:
    return metrics.get("peak_gpu_allocated_mb")


def fits(table: Table, clock: Clock, store, backbone_path, data, work, device, max_train, rows, baselines: dict):
    """The fits of `rows` ((batch, method, resident, compiled), ...), against LoRA fp32 at batch 32 (measured first,
    once, into `baselines`)."""
    for precision in ("fp32", "bf16"):
        if precision in baselines or (precision == "bf16" and device.type == "cpu"):
            continue
        if not clock.allows(f"LoRA {precision}", 30):
            continue
        speed, metrics = lora(backbone_path, data, work, device, 32, precision, max_train)
        baselines[precision] = (speed, gpu_mb(metrics))
        table.add("lora", f"LoRA r=8 {precision}, batch 32", speed, unit="samples/s",
                  note=f"peak GPU {_num(gpu_mb(metrics))} MB")
    lora_speed, lora_mb = baselines.get("fp32", (None, None))
    for batch, method, resident, compiled in rows:
        what = f"{method} b{batch} {'resident' if resident else 'streaming'} {'compiled' if compiled else 'eager'}"
        if not clock.allows(what, 45 if compiled else 15):
            continue
        try:
            speed, metrics = one_fit(store, method, work, device, batch, resident, compiled, max_train=max_train)
        except Exception as error:  # one failing row must not lose the table
            table.add("fit", what, "error", note=f"{type(error).__name__}: {str(error)[:120]}")
            continue
        goal = "speed_vs_lora_b32" if batch == 32 else None
        table.add("fit", f"{what}: samples/s", speed, lora_speed if batch == 32 else None, unit="samples/s", goal=goal,
                  note=metrics.get("data_path", ""))
        if not compiled and batch == 32:
            memory_goal = "memory_vs_lora_fp32_sherl_synqt" if method in ("sherl", "synqt") else "memory_vs_lora_fp32"
            table.add("fit", f"{what}: peak GPU MB", gpu_mb(metrics), lora_mb, unit="MB", goal=memory_goal,
                      note=f"resident cache {_num(metrics.get('resident_cache_gpu_mb'))} MB apart")


def fit_rows(first: bool):
    """The goals' rows first (batch 32 eager, both data paths); then batch 256 and compiled (resident only)."""
    methods = method_names()
    if first:
        return [(32, m, resident, False) for resident in (True, False) for m in methods]
    return ([(256, m, resident, False) for resident in (True, False) for m in methods]
            + [(b, m, True, True) for b in (32, 256) for m in methods])


# ---------------------------------------------------------------- 4. syncs per step

def syncs_per_step(table: Table, clock: Clock, store, device):
    if device.type != "cuda":
        table.add("syncs", "host syncs per step", "not run", note="counted on a GPU only (CPU: tests/test_gpu_path.py)")
        return
    from tests.test_gpu_path import learner_and_batches

    for method in method_names():
        if not clock.allows(f"syncs {method}", 10):
            continue
        from cachetune.stages.runtime import Runtime

        learner, batches = learner_and_batches(store, method, Runtime.resolve(str(device), None), True, True)
        learner.start_epoch()
        inputs, labels, rows = next(batches)
        learner.step(inputs, labels, rows)
        torch.cuda.synchronize()
        steps = 5
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                for _ in range(steps):
                    inputs, labels, rows = next(batches)
                    learner.step(inputs, labels, rows)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        count = sum("synchroniz" in str(w.message) for w in caught)
        table.add("syncs", f"{method}: host syncs per step (resident, static)", count / steps, goal="syncs_per_step",
                  ratio=count / steps)


# ---------------------------------------------------------------- 5. sweep of 12

def sweep_of_twelve(table: Table, clock: Clock, store, work, device, max_train):
    from cachetune.stages.training.fit import FitSettings
    from cachetune.stages.training.sweep import sweep
    from cachetune.stages.training.sweep_grid import make_grid

    if not clock.allows("sweep of 12", 60):
        return
    settings = FitSettings(epochs=2, batch_size=32, in_memory=True, device=str(device), max_train_samples=max_train)
    grid = make_grid({}, methods="lst,unipt", pairs=(), lrs="3e-4,1e-3,3e-3", weight_decays="0,0.01", seeds="0")
    runs = grid.runs()
    assert len(runs) == 12, len(runs)
    started = time.perf_counter()
    _, one = one_fit(store, "lst", work, device, 32, True, False, max_train=max_train)
    one_seconds = time.perf_counter() - started
    out = work / "sweep12"
    shutil.rmtree(out, ignore_errors=True)
    started = time.perf_counter()
    summary = sweep(str(store), runs, settings, out, show_progress=False)
    seconds = time.perf_counter() - started
    table.add("sweep", "sweep of 12 (lst, unipt x 3 lr x 2 wd), wall s", seconds, one_seconds, unit="s",
              goal="sweep12_vs_one_fit", note=f"peak GPU {_num(summary.get('peak_gpu_allocated_mb'))} MB for the invocation")


# ---------------------------------------------------------------- 6. accuracy against the CPU

def accuracy(table: Table, clock: Clock, store, work, device, max_train):
    for method in ("linear", "lst"):
        if not clock.allows(f"accuracy {method}", 60):
            continue
        _, gpu = one_fit(store, method, work, device, 32, True, False, epochs=3, max_train=max_train)
        threads = torch.get_num_threads()
        _, cpu = one_fit(store, method, work / "cpu", torch.device("cpu"), 32, False, False, epochs=3,
                         max_train=max_train, precision="fp32")
        torch.set_num_threads(threads)
        gap = abs(gpu["test"]["accuracy"] - cpu["test"]["accuracy"]) * 100
        table.add("accuracy", f"{method}: test accuracy {gpu['precision']} GPU vs fp32 CPU, points",
                  gpu["test"]["accuracy"] * 100, cpu["test"]["accuracy"] * 100, unit="%", goal="accuracy_gap_points",
                  ratio=gap)


def tiny_inputs(work: Path):
    """A tiny random BERT and a 240-row table (the test suite's helpers): every CPU-possible part runs in seconds."""
    from tests.conftest import sentiment_rows, write_table, write_tiny_bert

    return write_tiny_bert(work / "tiny-bert"), write_table(work / "data.csv", sentiment_rows(240))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.environ.get("OUT") or "artifacts/gpu_check",
                        help="where gpu_check.md and gpu_check.json go [default: $OUT, else artifacts/gpu_check]")
    parser.add_argument("--minutes", type=float, default=7.5, help="the deadline; parts that would pass it are skipped")
    parser.add_argument("--tiny", action="store_true", help="a tiny random BERT on the CPU: checks the script runs")
    parser.add_argument("--data", default=os.environ.get("MOVIES", "movies"))
    parser.add_argument("--minilm", default="/tmp/minilm")
    parser.add_argument("--bert-base", default="/tmp/bert-base")
    parser.add_argument("--max-train-samples", type=int, default=4096)
    parser.add_argument("--extract-limit", type=int, default=8192, help="texts in the bare forward passes")
    parser.add_argument("--skip", default="", help="comma list of parts to leave out: tests,extract,fits,syncs,sweep,accuracy")
    args = parser.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    clock = Clock(args.minutes * 60)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gpu_check-"))
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    if args.tiny:
        minilm, data = tiny_inputs(work)
        backbones, max_train, limit = {"tiny": str(minilm)}, 128, 200
        torch.set_num_threads(min(2, torch.get_num_threads()))
    else:
        backbones = {"minilm": args.minilm, "bert-base": args.bert_base}
        data, max_train, limit = args.data, args.max_train_samples, args.extract_limit
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    header = (f"gpu_check on {name}, torch {torch.__version__}, {os.cpu_count()} CPUs; "
              f"{'TINY CPU MODE: no figure means anything' if args.tiny else f'train subset {max_train}'}")
    print(header, flush=True)
    table = Table()
    try:
        if "tests" not in skip:
            cuda_tests(table, clock, args.tiny)
        stores = extraction(table, clock, backbones, str(data), work, device, limit, args.tiny) if "extract" not in skip else {}
        store = stores.get("tiny" if args.tiny else "minilm")
        lora_backbone = backbones["tiny" if args.tiny else "minilm"]
        if store is not None:  # the goals' measurements first, then the rest while time allows
            baselines = {}
            if "fits" not in skip:
                fits(table, clock, store, lora_backbone, str(data), work, device, max_train, fit_rows(True), baselines)
            if "syncs" not in skip:
                syncs_per_step(table, clock, store, device)
            if "sweep" not in skip:
                sweep_of_twelve(table, clock, store, work, device, max_train)
            if "accuracy" not in skip:
                accuracy(table, clock, store, work, device, max_train)
            if "fits" not in skip:
                fits(table, clock, store, lora_backbone, str(data), work, device, max_train, fit_rows(False), baselines)
    finally:
        footer = (f"\n{(time.perf_counter() - clock.start) / 60:.1f} minutes; skipped for time: "
                  f"{', '.join(clock.skipped) or 'nothing'}\n")
        markdown = table.markdown(f"### gpu_check: {header}\n\n`python bench/gpu_check.py{' --tiny' if args.tiny else ''}`")
        (out / "gpu_check.md").write_text(markdown + footer)
        (out / "gpu_check.json").write_text(json.dumps({"header": header, "rows": table.rows,
                                                         "skipped": clock.skipped}, indent=2))
        print("\n" + markdown + footer, flush=True)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
