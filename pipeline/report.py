"""`pipeline report`: one table and a few plots comparing every fitted model folder.

A model folder is any folder under the models directory holding a metrics.json written by
`pipeline fit` (or by a baseline run, same format, method "lora" or "full"). The report goes to
OUT/report.md, with OUT/accuracy_vs_memory.png, OUT/training_curves.png and one per-epoch
OUT/history/NAME.csv per model (the files `dvc plots show` draws). A sweep (a folder with a sweep.json)
gets a section of its own, with OUT/sweep_NAME.png; its runs are not rows of the main table.
"""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

from cachetune.cache.errors import InputError

BASELINE_METHODS = ("lora", "full")
REPORT_NAME = "report.md"
SCATTER_NAME = "accuracy_vs_memory.png"
CURVES_NAME = "training_curves.png"
HISTORY_DIR = "history"
SWEEP_JSON = "sweep.json"  # as stages/training/sweep.py writes it (not imported: the report stays free of torch)
# Test metrics shown in the table, by task: (metrics.json key, column title).
CLASSIFICATION_COLUMNS = (("accuracy", "test accuracy"), ("macro_f1", "macro-F1"))
REGRESSION_COLUMNS = (("pearson", "test Pearson r"), ("mse", "test MSE"))


def find_models(models_dir: Path, required: bool = True) -> list[dict]:
    """Every model folder under models_dir (at any depth), as {name, folder, metrics}, sorted by name."""
    models_dir = Path(models_dir)
    if not models_dir.is_dir():
        raise InputError(f"no models folder at {models_dir}; fit a method first (pipeline fit --method NAME)")
    models = []
    for path in sorted(models_dir.rglob("metrics.json")):
        if any(part.startswith(".") for part in path.relative_to(models_dir).parts):
            continue  # a model folder still being written (.NAME.partial) or being replaced (.NAME.old)
        try:
            metrics = json.loads(path.read_text())
        except (OSError, ValueError) as error:
            raise InputError(f"{path}: cannot read it as JSON ({str(error).splitlines()[0]}); re-run the fit that wrote it") from None
        if not isinstance(metrics, dict) or "method" not in metrics or "test" not in metrics:
            raise InputError(f"{path}: not a metrics.json written by `pipeline fit` (needs 'method' and 'test')")
        folder = path.parent
        if any((above / SWEEP_JSON).exists() for above in folder.parents if above.is_relative_to(models_dir)):
            continue  # one run of a sweep: the sweep's own section shows it
        name = folder.relative_to(models_dir).as_posix() if folder != models_dir else folder.name
        models.append({"name": name, "folder": folder, "metrics": metrics})
    if not models and required:
        raise InputError(f"no model folders (folders with a metrics.json) under {models_dir}; "
                         "fit a method first (pipeline fit --method NAME)")
    return models


def is_baseline(metrics: dict) -> bool:
    return bool(metrics.get("baseline")) or metrics.get("method") in BASELINE_METHODS


def primary_test_metric(metrics: dict) -> tuple[str, float | None]:
    """(name, value) of the headline test metric: accuracy for classification, Pearson r for regression."""
    test = metrics.get("test") or {}
    for key in ("accuracy", "pearson"):
        if key in test:
            return key, test[key]
    return "accuracy", None


def primary_history_metric(history: list[dict]) -> str | None:
    keys = set().union(*(row.keys() for row in history)) if history else set()
    for key in ("validation_accuracy", "validation_pearson"):
        if key in keys:
            return key
    return next((k for k in sorted(keys) if k.startswith("validation_")), None)


def write_report(models_dir: Path, out_dir: Path) -> Path:
    """Read every model folder under models_dir; write the table, the plots and per-epoch history files to out_dir."""
    sweeps = find_sweeps(Path(models_dir)) if Path(models_dir).is_dir() else []
    models = find_models(Path(models_dir), required=not sweeps)
    models.sort(key=lambda m: (is_baseline(m["metrics"]), m["name"]))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_histories(models, out_dir / HISTORY_DIR)
    plot_accuracy_vs_memory(models, out_dir / SCATTER_NAME)
    plot_training_curves(models, out_dir / CURVES_NAME)
    report = out_dir / REPORT_NAME
    text = markdown_report(models, Path(models_dir))
    for stale in out_dir.glob("sweep_*.png"):
        stale.unlink()
    for sweep in sweeps:
        plot_sweep(sweep, out_dir / sweep_plot_name(sweep["name"]))
        text += sweep_section(sweep)
    report.write_text(text)
    return report


def find_sweeps(models_dir: Path) -> list[dict]:
    """Every sweep.json under models_dir (`pipeline sweep`, `fit --method auto`), as {name, summary}."""
    sweeps = []
    for path in sorted(models_dir.rglob(SWEEP_JSON)):
        if any(part.startswith(".") for part in path.relative_to(models_dir).parts):
            continue
        try:
            summary = json.loads(path.read_text())
            summary["runs"], summary["metric"]
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise InputError(f"{path}: not a sweep.json written by `pipeline sweep` ({type(error).__name__}); "
                             "rerun the sweep") from None
        name = path.parent.relative_to(models_dir).as_posix() if path.parent != models_dir else path.parent.name
        sweeps.append({"name": name, "summary": summary})
    return sweeps


def mean_and_spread(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    mean = sum(values) / len(values)
    return mean, (math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0)


def sweep_section(sweep: dict) -> str:
    """One row per configuration (its runs over seeds averaged), best validation first."""
    summary, metric = sweep["summary"], sweep["summary"]["metric"]
    groups = {}
    for row in summary["runs"]:
        groups.setdefault(row["group"], []).append(row)

    def cell(rows, key):
        values = [row[key] for row in rows if row.get(key) is not None]
        if not values:
            return "–"
        mean, spread = mean_and_spread(values)
        return f"{mean:.4f} ± {spread:.4f}" if len(values) > 1 else f"{mean:.4f}"

    order = sorted(groups, key=lambda g: -mean_and_spread([r[f"validation_{metric}"] for r in groups[g]])[0])
    lines = ["", f"## Sweep `{sweep['name']}`", "",
             f"{len(summary['runs'])} runs trained on shared batches; mean ± standard deviation over seeds. Best run by "
             f"validation (never test): `{summary['best']}`. Last invocation: {summary.get('trained_now', '?')} runs "
             f"trained in {_number(summary.get('wall_seconds'), 0)} s, peak memory {_number(peak_memory(summary), 0)} MB "
             f"({measured_on(summary)}).", "",
             f"| configuration | seeds | validation {metric} | test {metric} | trainable parameters |",
             "|---|---:|---:|---:|---:|"]
    for group in order:
        rows = groups[group]
        lines.append(f"| {group} | {len(rows)} | {cell(rows, f'validation_{metric}')} | {cell(rows, f'test_{metric}')} "
                     f"| {rows[0]['trainable_parameters']:,} |")
    lines += ["", f"![validation against test per run]({sweep_plot_name(sweep['name'])})", ""]
    return "\n".join(lines)


def sweep_plot_name(name: str) -> str:
    return "sweep_" + name.replace("/", "__") + ".png"


def plot_sweep(sweep: dict, path: Path) -> None:
    """Validation against test, one point per run, one colour per method: how far validation ranks runs right."""
    plt = _pyplot()
    summary, metric = sweep["summary"], sweep["summary"]["metric"]
    figure, axes = plt.subplots(figsize=(6.5, 4.5))
    for method in sorted({row["method"] for row in summary["runs"]}):
        rows = [row for row in summary["runs"] if row["method"] == method and f"test_{metric}" in row]
        axes.scatter([row[f"validation_{metric}"] for row in rows], [row[f"test_{metric}"] for row in rows], label=method)
    axes.set_xlabel(f"validation {metric} (best epoch)")
    axes.set_ylabel(f"test {metric}")
    axes.set_title(f"sweep {sweep['name']}: validation against test per run")
    _finish(plt, figure, [axes], path)


def _number(value, digits: int) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.{digits}f}"


def peak_memory(metrics: dict) -> float | None:
    """The memory figure a run is judged by alone: peak GPU memory allocated on a GPU, else training memory by
    torch's allocation tracking, else peak RSS above start (older metrics.json). Tables of several runs use
    `memory_measure`, one measure for every row."""
    return metrics.get("peak_gpu_allocated_mb", metrics.get("training_memory_mb", metrics.get("peak_memory_mb")))


# Memory measures, preferred first: (metrics.json key, what it is, axis label).
MEMORY_MEASURES = (
    ("peak_gpu_allocated_mb", "peak GPU memory allocated during training (`torch.cuda.max_memory_allocated`)",
     "peak GPU memory allocated (MB)"),
    ("training_memory_mb", "training memory by torch's own allocation tracking (torch.profiler, profile_memory): "
     "the peak of one training step on the run's largest batch, plus the tensors alive before it (weights, frozen "
     "ones included; optimizer state; the batch), plus the decoded cache blocks a side network's reader holds. "
     "Not RSS: the allocator's slack and Python objects are left out", "training memory, torch allocations (MB)"),
    ("peak_memory_mb", "the process's peak RSS above its RSS when the run began (it includes the allocator's slack)",
     "peak RSS above start (MB)"),
)


def memory_measure(models: list[dict]) -> tuple[str, str, str]:
    """The first of MEMORY_MEASURES that every model has (key, description, axis label), so that rows compare."""
    for measure in MEMORY_MEASURES:
        if all(model["metrics"].get(measure[0]) is not None for model in models):
            return measure
    return MEMORY_MEASURES[-1]


def reference_model(models: list[dict], checkpointing: bool = False) -> dict | None:
    """The LoRA run the ratios are taken against (the first by name), or None; checkpointing: the LoRA run with
    gradient checkpointing (`pipeline baseline --gradient-checkpointing`) instead of the plain one."""
    return next((model for model in models if model["metrics"].get("method") == "lora"
                 and bool(model["metrics"].get("gradient_checkpointing")) == checkpointing), None)


def _ratio(value, reference) -> str:
    if value is None or not reference:
        return "–"
    return f"{value / reference:.2f}"


def _signed(difference: float | None, metric: str) -> str:
    if difference is None:
        return "–"
    return f"{difference * 100:+.2f}" if metric == "accuracy" else f"{difference:+.4f}"


def comparison_section(models: list[dict]) -> str:
    """The report's opening: every run beside LoRA (accuracy, memory, time, parameters, and their ratios), the
    amortised cost, and sentences generated from the numbers."""
    lora, checkpointed = reference_model(models), reference_model(models, checkpointing=True)
    key, description, _ = memory_measure(models)
    metric = primary_test_metric((lora or models[0])["metrics"])[0]
    title = "accuracy" if metric == "accuracy" else "Pearson r"
    unit = " (points)" if metric == "accuracy" else ""
    ref = lora["metrics"] if lora else {}
    ref_value, ref_memory, ref_time = primary_test_metric(ref)[1] if lora else None, ref.get(key), ref.get("seconds_per_epoch")
    order = sorted(models, key=lambda m: (is_baseline(m["metrics"]), -(primary_test_metric(m["metrics"])[1] or -math.inf)))
    lines = ["## Side networks against LoRA", ""]
    if lora is None:
        lines += ["No LoRA run under the models folder, so no ratios: run `pipeline baseline --method lora` on the "
                  "same data (`dvc repro` does).", ""]
    checkpointed_memory = checkpointed["metrics"].get(key) if checkpointed else None
    header = ["model", f"test {title}", f"{title} − LoRA{unit}", "memory MB", "memory / LoRA",
              *(["memory / LoRA (checkpointing)"] if checkpointed else []), "s / epoch", "time / LoRA",
              "trainable parameters"]
    lines += ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for model in order:
        m = model["metrics"]
        value = primary_test_metric(m)[1]
        parameters = m.get("trainable_parameters")
        name = f"**{model['name']}**" if model is lora else model["name"]
        row = [name, _number(value, 4), _signed(value - ref_value if value is not None and ref_value is not None
                                                else None, metric),
               _number(m.get(key), 0), _ratio(m.get(key), ref_memory),
               *([_ratio(m.get(key), checkpointed_memory)] if checkpointed else []),
               _number(m.get("seconds_per_epoch"), 1), _ratio(m.get("seconds_per_epoch"), ref_time),
               f"{parameters:,}" if isinstance(parameters, int) else "–"]
        if m.get("measured_step_only"):  # memory of one step only: the same arithmetic as LoRA, so LoRA's accuracy
            row[1:3] = ["(LoRA's)", "(same)"]
        lines.append("| " + " | ".join(row) + " |")
    samples = sorted({m["metrics"].get("train_samples") for m in models if m["metrics"].get("train_samples")})
    note = (f" {checkpointed['name']}: LoRA with gradient checkpointing (transformers' `gradient_checkpointing_enable`), "
            "the baseline a memory-conscious user runs; its memory is one measured step on the largest batch, and its "
            "accuracy is LoRA's (the same arithmetic, recomputed)." if checkpointed and
            checkpointed["metrics"].get("measured_step_only") else "")
    lines += ["", f"Test {title} at the epoch with the best validation {title}. Memory: {description}.{note} Time: seconds "
              "per training epoch (validation excluded)"
              + (f"; every run trained on {samples[0]:,} samples" if len(samples) == 1 else "")
              + f"; {', '.join(sorted({measured_on(m['metrics']) for m in models}))}.", ""]
    amortised = amortised_cost(models, lora)
    if amortised:
        lines += [amortised, ""]
    lines += [summary_sentences(order, lora, key, metric), ""]
    if checkpointed_memory:
        shares = [m["metrics"][key] / checkpointed_memory for m in order
                  if not is_baseline(m["metrics"]) and m["metrics"].get(key) is not None]
        if shares:
            lines += [f"Against LoRA with gradient checkpointing ({checkpointed_memory:.0f} MB), the side networks "
                      f"hold {min(shares):.2f}–{max(shares):.2f} of its memory.", ""]
    return "\n".join(lines)


def amortised_cost(models: list[dict], lora: dict | None) -> str | None:
    """One extraction plus every side network's fit, against one LoRA run per side network (wall seconds)."""
    sides = [m["metrics"] for m in models if not is_baseline(m["metrics"])]
    if lora is None or not sides or lora["metrics"].get("wall_seconds") is None:
        return None
    if any(m.get("wall_seconds") is None for m in sides):
        return None
    fits = sum(m["wall_seconds"] for m in sides)
    extract = next((m["extract_seconds"] for m in sides if m.get("extract_seconds") is not None), None)
    runs = len(sides) * lora["metrics"]["wall_seconds"]
    cached = fits + (extract or 0.0)
    extraction = (f"one extraction ({extract:.0f} s) plus " if extract is not None
                  else "every fit (the extraction's time was not recorded in the cache) — ")
    return (f"Amortised cost: {extraction}all {len(sides)} side-network fits ({fits:.0f} s) = {cached:.0f} s of wall "
            f"time, against one LoRA run per method ({len(sides)} x {lora['metrics']['wall_seconds']:.0f} s = "
            f"{runs:.0f} s): **{cached / runs:.2f}** of the time. Each further seed or setting costs a fit, not an "
            "extraction.")


def summary_sentences(order: list[dict], lora: dict | None, key: str, metric: str) -> str:
    """Two or three sentences from the numbers: who matches LoRA within a point, at what share of its memory and
    time; the best side network; the linear probe as the floor."""
    sides = [m for m in order if not is_baseline(m["metrics"]) and primary_test_metric(m["metrics"])[1] is not None]
    if lora is None or not sides:
        return ""
    ref = lora["metrics"]
    ref_value = primary_test_metric(ref)[1]
    point = 0.01 if metric == "accuracy" else 0.01  # one accuracy point; 0.01 of Pearson r

    def share(m, field):
        return m["metrics"].get(field) / ref[field] if m["metrics"].get(field) is not None and ref.get(field) else None

    def span(values):
        values = [v for v in values if v is not None]
        if not values:
            return "–"
        return f"{min(values):.2f}" if len(values) == 1 else f"{min(values):.2f}–{max(values):.2f}"

    close = [m for m in sides if primary_test_metric(m["metrics"])[1] >= ref_value - point]
    sentences = []
    if close:
        names = ", ".join(f"{m['name']} ({_signed(primary_test_metric(m['metrics'])[1] - ref_value, metric)})"
                          for m in close)
        sentences.append(f"{len(close)} of {len(sides)} side networks match LoRA within a point or beat it — {names} — "
                         f"at {span([share(m, key) for m in close])} of its memory and "
                         f"{span([share(m, 'seconds_per_epoch') for m in close])} of its time per epoch.")
    else:
        nearest = sides[0]
        sentences.append(f"No side network comes within a point of LoRA; the closest, {nearest['name']}, is "
                         f"{_signed(primary_test_metric(nearest['metrics'])[1] - ref_value, metric)} "
                         f"at {span([share(nearest, key)])} of its memory.")
    best = sides[0]
    sentences.append(f"The best, {best['name']}, reaches {primary_test_metric(best['metrics'])[1]:.4f} against LoRA's "
                     f"{ref_value:.4f} with {_number(best['metrics'].get(key), 0)} MB against {_number(ref.get(key), 0)} "
                     f"MB and {_number(best['metrics'].get('seconds_per_epoch'), 1)} s per epoch against "
                     f"{_number(ref.get('seconds_per_epoch'), 1)} s.")
    probe = next((m for m in sides if m["metrics"].get("method") == "linear"), None)
    if probe is not None:
        floor = primary_test_metric(probe["metrics"])[1]
        below = [m["name"] for m in sides if m is not probe and primary_test_metric(m["metrics"])[1] <= floor]
        sentences.append(f"Every other side network is above the linear probe ({floor:.4f})." if not below else
                         f"Not above the linear probe ({floor:.4f}): {', '.join(below)}.")
    return " ".join(sentences)


def measured_on(metrics: dict) -> str:
    """Where a run trained: "cpu, fp32", "NVIDIA H100 80GB HBM3, bf16" (older metrics.json: "cpu, fp32")."""
    return f"{metrics.get('device_name', 'cpu')}, {metrics.get('precision', 'fp32')}"


def markdown_report(models: list[dict], models_dir: Path) -> str:
    tests = [m["metrics"].get("test") or {} for m in models]
    columns = [c for c in CLASSIFICATION_COLUMNS + REGRESSION_COLUMNS if any(c[0] in t for t in tests)]
    columns = columns or list(CLASSIFICATION_COLUMNS)
    key, description, _ = memory_measure(models)
    header = ["model", "method", "kind", *[title for _, title in columns], "trainable parameters",
              "memory MB", "peak RSS above start MB", "seconds / epoch", "epochs", "best epoch", "device, precision"]
    lines = ["# cachetune report", "", comparison_section(models) if models else "",
             f"![test metric against memory, LoRA as the reference]({SCATTER_NAME})", "",
             "## Every run", "",
             f"{len(models)} model folder(s) under `{models_dir}`. Test metrics at the epoch with the best validation "
             f"metric. Memory MB: {description}. Peak RSS above start, for comparison: what the process held, "
             "allocator slack included.", "",
             "| " + " | ".join(header) + " |", "|" + "|".join(["---"] * 3 + ["---:"] * (len(header) - 3)) + "|"]
    for model, test in zip(models, tests):
        m = model["metrics"]
        parameters = m.get("trainable_parameters")
        row = [model["name"], m["method"], "baseline" if is_baseline(m) else "side network",
               *[_number(test.get(key), 4) for key, _ in columns],
               f"{parameters:,}" if isinstance(parameters, int) else "–",
               _number(m.get(key), 0), _number(m.get("peak_memory_mb"), 0), _number(m.get("seconds_per_epoch"), 2),
               str(len(m.get("history") or []) or "–"), str(m.get("best_epoch", "–")), measured_on(m)]
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", f"![training loss and validation metric per epoch]({CURVES_NAME})", "",
              f"Per-epoch histories: `{HISTORY_DIR}/NAME.csv` (drawn by `dvc plots show`).", ""]
    return "\n".join(lines)


def history_file_name(name: str) -> str:
    return name.replace("/", "__") + ".csv"


def write_histories(models: list[dict], folder: Path) -> None:
    """One CSV per model: epoch, train_loss, validation_* ... as in metrics.json's history (stale files are removed)."""
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.csv"):
        old.unlink()
    for model in models:
        history = model["metrics"].get("history") or []
        if not history:
            continue
        fields = list(dict.fromkeys(key for row in history for key in row))
        with open(folder / history_file_name(model["name"]), "w", newline="") as stream:
            writer = csv.DictWriter(stream, fieldnames=fields)
            writer.writeheader()
            writer.writerows(history)


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise InputError("the report's plots need matplotlib: pip install 'cachetune[report]'") from None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _finish(plt, figure, axes_list, path: Path, legend: bool = True) -> None:
    for axes in axes_list:
        axes.grid(True, alpha=0.3)
        if legend and axes.get_legend_handles_labels()[0]:
            axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_accuracy_vs_memory(models: list[dict], path: Path) -> None:
    """Test metric against one memory measure (`memory_measure`) for every run; LoRA is a star with dashed lines
    through it, the reference the side networks are read against; other baselines are squares."""
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(7, 4.8))
    key, _, label = memory_measure(models)
    lora = reference_model(models)
    metric_names = set()
    for model in models:
        m = model["metrics"]
        metric, value = primary_test_metric(m)
        memory = m.get(key)
        if value is None or memory is None:
            continue
        metric_names.add(metric)
        if model is lora:
            axes.scatter([memory], [value], marker="*", s=220, color="tab:red", zorder=3, label="LoRA (reference)")
            axes.axhline(value, color="tab:red", linestyle="--", linewidth=0.8)
            axes.axvline(memory, color="tab:red", linestyle="--", linewidth=0.8)
        elif is_baseline(m):
            axes.scatter([memory], [value], marker="s", s=60, color="tab:gray", zorder=3)
        else:
            axes.scatter([memory], [value], marker="o", color="tab:blue", zorder=3)
        axes.annotate(model["name"], (memory, value), textcoords="offset points", xytext=(5, 4), fontsize=9)
    if any(m["metrics"].get(key) for m in models):
        from matplotlib.ticker import FuncFormatter

        axes.set_xscale("log")
        plain = FuncFormatter(lambda value, _: f"{value:g}")  # 30, 200, not 3 x 10^1
        axes.xaxis.set_major_formatter(plain)
        axes.xaxis.set_minor_formatter(plain)
    axes.set_xlabel(label + ", log scale")
    axes.set_ylabel("test " + (" / ".join(sorted(metric_names)) or "accuracy"))
    axes.set_title("test metric against memory" + (": up and left of the red lines beats LoRA on both" if lora else ""))
    _finish(plt, figure, [axes], path, legend=lora is not None)


def plot_training_curves(models: list[dict], path: Path) -> None:
    plt = _pyplot()
    figure, (loss_axes, validation_axes) = plt.subplots(1, 2, figsize=(11, 4.2))
    validation_names = set()
    for model in models:
        history = model["metrics"].get("history") or []
        if not history:
            continue
        epochs = [row.get("epoch", i + 1) for i, row in enumerate(history)]
        style = "--" if is_baseline(model["metrics"]) else "-"
        loss_axes.plot(epochs, [row.get("train_loss") for row in history], style, marker="o", label=model["name"])
        key = primary_history_metric(history)
        if key:
            validation_names.add(key)
            validation_axes.plot(epochs, [row.get(key) for row in history], style, marker="o", label=model["name"])
    loss_axes.set_title("training loss")
    validation_axes.set_title(" / ".join(sorted(validation_names)) or "validation")
    from matplotlib.ticker import MaxNLocator

    for axes in (loss_axes, validation_axes):
        axes.set_xlabel("epoch")
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    _finish(plt, figure, [loss_axes, validation_axes], path)
