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

from cache.errors import InputError

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
    """The memory figure a run is judged by: peak GPU memory allocated on a GPU, else peak RSS above start."""
    return metrics.get("peak_gpu_allocated_mb", metrics.get("peak_memory_mb"))


def measured_on(metrics: dict) -> str:
    """Where a run trained: "cpu, fp32", "NVIDIA H100 80GB HBM3, bf16" (older metrics.json: "cpu, fp32")."""
    return f"{metrics.get('device_name', 'cpu')}, {metrics.get('precision', 'fp32')}"


def markdown_report(models: list[dict], models_dir: Path) -> str:
    tests = [m["metrics"].get("test") or {} for m in models]
    columns = [c for c in CLASSIFICATION_COLUMNS + REGRESSION_COLUMNS if any(c[0] in t for t in tests)]
    columns = columns or list(CLASSIFICATION_COLUMNS)
    header = ["model", "method", "kind", *[title for _, title in columns], "trainable parameters",
              "peak memory MB", "seconds / epoch", "best epoch", "device, precision"]
    lines = ["# cachetune report", "",
             f"{len(models)} model folder(s) under `{models_dir}`. Test metrics at the epoch with the best validation "
             "metric; peak memory is `torch.cuda.max_memory_allocated` during training for a run on a GPU, else the "
             "process's peak RSS above its RSS when the fit began.", "",
             "| " + " | ".join(header) + " |", "|" + "|".join(["---"] * 3 + ["---:"] * (len(header) - 3)) + "|"]
    for model, test in zip(models, tests):
        m = model["metrics"]
        parameters = m.get("trainable_parameters")
        row = [model["name"], m["method"], "baseline" if is_baseline(m) else "side network",
               *[_number(test.get(key), 4) for key, _ in columns],
               f"{parameters:,}" if isinstance(parameters, int) else "–",
               _number(peak_memory(m), 0), _number(m.get("seconds_per_epoch"), 2),
               str(m.get("best_epoch", "–")), measured_on(m)]
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", f"![test metric against peak memory]({SCATTER_NAME})", "",
              f"![training loss and validation metric per epoch]({CURVES_NAME})", "",
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
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(6.5, 4.5))
    metric_names = set()
    for model in models:
        m = model["metrics"]
        metric, value = primary_test_metric(m)
        memory = peak_memory(m)
        if value is None or memory is None:
            continue
        metric_names.add(metric)
        baseline = is_baseline(m)
        axes.scatter([memory], [value], marker="s" if baseline else "o", color="tab:gray" if baseline else "tab:blue")
        axes.annotate(model["name"], (memory, value), textcoords="offset points", xytext=(5, 4), fontsize=9)
    on_gpu = [("peak_gpu_allocated_mb" in model["metrics"]) for model in models]
    axes.set_xlabel("peak GPU memory allocated (MB)" if all(on_gpu) else "peak memory above start (MB)" if not any(on_gpu)
                    else "peak memory (MB): GPU allocated where trained on a GPU, else RSS above start")
    axes.set_ylabel("test " + (" / ".join(sorted(metric_names)) or "accuracy"))
    baselines = any(is_baseline(model["metrics"]) for model in models)
    axes.set_title("test metric against peak memory" + (" (squares: baselines)" if baselines else ""))
    _finish(plt, figure, [axes], path, legend=False)


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
