"""`pipeline report`: the table, the PNG plots and per-epoch histories from a folder of model folders."""
from __future__ import annotations

import csv
import json
import shutil

import pytest
from click.testing import CliRunner

from cachetune.cache.errors import InputError
from cachetune.pipeline.report import write_report
from cachetune.pipeline.report_cli import report

pytest.importorskip("matplotlib")

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def fit_tiny_models(tiny_bert, tiny_table, folder, methods=(("linear", {}), ("sherl", {"r": "4"}))):
    """A tiny cache made with the shared fixtures, then each method fitted for one epoch into folder/METHOD."""
    import torch

    from cachetune.pipeline.data import load_dataset
    from cachetune.stages.backbones import load_backbone
    from cachetune.stages.extraction.extract import ExtractSettings, extract
    from cachetune.stages.training.fit import FitSettings, fit
    from cachetune.stages.methods import config_from_options

    store = folder.parent / "f.zarr"
    settings = ExtractSettings(out=str(store), block_tokens=128, chunk_tokens=32, batch_size=8, max_length=24)
    extract(load_backbone(str(tiny_bert)), load_dataset(str(tiny_table)), settings, log=lambda *_: None)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for name, options in methods:
            fit(str(store), config_from_options(name, options), FitSettings(epochs=1, batch_size=16, in_memory=True),
                folder / name, show_progress=False)
    finally:
        torch.set_num_threads(threads)
    return folder


def write_metrics(folder, method, test, history=None, **extra):
    folder.mkdir(parents=True, exist_ok=True)
    metrics = {"method": method, "test": test, "best_epoch": 1, "trainable_parameters": 1000, "seconds_per_epoch": 0.5,
               "peak_memory_mb": 50.0, "history": history or [], **extra}
    (folder / "metrics.json").write_text(json.dumps(metrics))
    return folder


def table_rows(report_text, section="## Every run"):
    """(header, rows as dicts) of the first table after the line `section`."""
    lines = report_text.splitlines()
    lines = lines[lines.index(section):]
    first = next(i for i, line in enumerate(lines) if line.startswith("| "))
    rows = []
    for line in lines[first:]:
        if not line.startswith("|"):
            break
        if line.startswith("| "):  # not the |---| line
            rows.append(line)
    header = [cell.strip() for cell in rows[0].strip("|").split("|")]
    return header, [dict(zip(header, (cell.strip() for cell in row.strip("|").split("|")))) for row in rows[1:]]


def test_report_of_fitted_models_writes_table_plots_and_histories(tiny_bert, tiny_table, tmp_path):
    models = fit_tiny_models(tiny_bert, tiny_table, tmp_path / "models")
    # A baseline folder (same metrics.json format, method "lora") sits beside the side networks.
    baseline = json.loads((models / "linear" / "metrics.json").read_text())
    write_metrics(models / "baselines" / "lora", "lora", baseline["test"], baseline["history"],
                  trainable_parameters=123456, peak_memory_mb=900.0)

    result = CliRunner().invoke(report, ["--models", str(models), "--out", str(tmp_path / "reports")])
    assert result.exit_code == 0, result.output
    out = tmp_path / "reports"
    text = (out / "report.md").read_text()
    header, rows = table_rows(text)
    for column in ("method", "test accuracy", "macro-F1", "trainable parameters", "memory MB", "seconds / epoch"):
        assert column in header
    assert [row["model"] for row in rows] == ["linear", "sherl", "baselines/lora"]  # baselines last
    assert rows[2]["kind"] == "baseline" and rows[0]["kind"] == "side network"
    for row, name in zip(rows, ("linear", "sherl")):
        metrics = json.loads((models / name / "metrics.json").read_text())
        assert row["test accuracy"] == f"{metrics['test']['accuracy']:.4f}"
        assert row["macro-F1"] == f"{metrics['test']['macro_f1']:.4f}"
        assert row["trainable parameters"] == f"{metrics['trainable_parameters']:,}"
        # the hand-written LoRA metrics lack training_memory_mb: every row falls back to the one measure all have
        assert row["memory MB"] == row["peak RSS above start MB"] == f"{metrics['peak_memory_mb']:.0f}"
        assert metrics["training_memory_mb"] > 0
    for png in ("accuracy_vs_memory.png", "training_curves.png"):
        assert (out / png).read_bytes().startswith(PNG_MAGIC) and f"]({png})" in text
    with open(out / "history" / "sherl.csv") as stream:
        history = list(csv.DictReader(stream))
    assert len(history) == 1 and {"epoch", "train_loss", "validation_accuracy"} <= set(history[0])
    assert (out / "history" / "baselines__lora.csv").exists()

    # A model that is gone loses its history file on the next report.
    shutil.rmtree(models / "baselines")
    write_report(models, out)
    assert sorted(p.name for p in (out / "history").iterdir()) == ["linear.csv", "sherl.csv"]


def test_regression_models_get_regression_columns(tmp_path):
    history = [{"epoch": 1, "train_loss": 1.0, "validation_mse": 0.9, "validation_pearson": 0.2},
               {"epoch": 2, "train_loss": 0.5, "validation_mse": 0.6, "validation_pearson": 0.5}]
    write_metrics(tmp_path / "models" / "unipt", "unipt", {"mse": 0.55, "pearson": 0.61}, history)
    path = write_report(tmp_path / "models", tmp_path / "out")
    header, rows = table_rows(path.read_text())
    assert "test Pearson r" in header and "test MSE" in header and "test accuracy" not in header
    assert rows[0]["test Pearson r"] == "0.6100" and rows[0]["test MSE"] == "0.5500"
    assert (tmp_path / "out" / "training_curves.png").read_bytes().startswith(PNG_MAGIC)


def test_every_row_uses_one_memory_measure_gpu_only_when_every_run_had_one(tmp_path):
    gpu = {"device": "cuda:0", "device_name": "NVIDIA H100", "precision": "bf16"}
    write_metrics(tmp_path / "models" / "lst", "lst", {"accuracy": 0.9, "macro_f1": 0.9}, **gpu, peak_gpu_allocated_mb=123.0)
    write_metrics(tmp_path / "models" / "unipt", "unipt", {"accuracy": 0.8, "macro_f1": 0.8}, **gpu, peak_gpu_allocated_mb=45.0)
    text = write_report(tmp_path / "models", tmp_path / "out").read_text()
    by_name = {row["model"]: row for row in table_rows(text)[1]}
    assert by_name["lst"]["memory MB"] == "123" and by_name["lst"]["device, precision"] == "NVIDIA H100, bf16"
    assert "max_memory_allocated" in text
    # a CPU run joins: the GPU figure would not compare with it, so every row shows peak RSS above start
    write_metrics(tmp_path / "models" / "linear", "linear", {"accuracy": 0.7, "macro_f1": 0.7})
    text = write_report(tmp_path / "models", tmp_path / "out").read_text()
    by_name = {row["model"]: row for row in table_rows(text)[1]}
    assert by_name["lst"]["memory MB"] == by_name["linear"]["memory MB"] == "50"
    assert by_name["linear"]["device, precision"] == "cpu, fp32" and "peak RSS above its RSS" in text


def write_comparison(models):
    """LoRA and three side networks with round numbers (CPU: training_memory_mb)."""
    def run(name, accuracy, memory, seconds, wall, **extra):
        return write_metrics(models / name, name, {"accuracy": accuracy, "macro_f1": accuracy},
                             training_memory_mb=memory, peak_memory_mb=memory * 3, seconds_per_epoch=seconds,
                             wall_seconds=wall, train_samples=4000, **extra)

    run("lora", 0.84, 1000.0, 100.0, 250.0, baseline=True, trainable_parameters=74498)
    run("lst", 0.85, 100.0, 20.0, 110.0, extract_seconds=60.0)
    run("sherl", 0.835, 250.0, 30.0, 160.0, extract_seconds=60.0)
    run("linear", 0.76, 50.0, 1.0, 10.0, extract_seconds=60.0)


def test_the_report_opens_with_every_side_network_beside_lora(tmp_path):
    write_comparison(tmp_path / "models")
    text = write_report(tmp_path / "models", tmp_path / "out").read_text()
    assert text.index("## Side networks against LoRA") < text.index("## Every run")
    header, rows = table_rows(text, "## Side networks against LoRA")
    assert header == ["model", "test accuracy", "accuracy − LoRA (points)", "memory MB", "memory / LoRA", "s / epoch",
                      "time / LoRA", "trainable parameters"]
    assert [row["model"] for row in rows] == ["lst", "sherl", "linear", "**lora**"]  # best first, LoRA last
    lst, sherl, linear, lora = rows
    assert (lst["accuracy − LoRA (points)"], lst["memory / LoRA"], lst["time / LoRA"]) == ("+1.00", "0.10", "0.20")
    assert (sherl["accuracy − LoRA (points)"], sherl["memory / LoRA"], sherl["time / LoRA"]) == ("-0.50", "0.25", "0.30")
    assert linear["accuracy − LoRA (points)"] == "-8.00" and lora["memory / LoRA"] == lora["time / LoRA"] == "1.00"
    assert lora["trainable parameters"] == "74,498" and "torch's own allocation tracking" in text
    assert "every run trained on 4,000 samples" in text
    # one extraction (60 s) + fits (110 + 160 + 10 s) = 340 s against 3 LoRA runs of 250 s = 750 s
    assert "= 340 s of wall time" in text and "(3 x 250 s = 750 s): **0.45**" in text
    assert ("2 of 3 side networks match LoRA within a point or beat it — lst (+1.00), sherl (-0.50) — at "
            "0.10–0.25 of its memory and 0.20–0.30 of its time per epoch.") in text
    assert "Every other side network is above the linear probe (0.7600)." in text
    assert (tmp_path / "out" / "accuracy_vs_memory.png").read_bytes().startswith(PNG_MAGIC)


def test_without_lora_the_report_says_how_to_get_ratios(tmp_path):
    write_metrics(tmp_path / "models" / "lst", "lst", {"accuracy": 0.9, "macro_f1": 0.9})
    text = write_report(tmp_path / "models", tmp_path / "out").read_text()
    assert "pipeline baseline --method lora" in text
    _, rows = table_rows(text, "## Side networks against LoRA")
    assert rows[0]["memory / LoRA"] == "–" and rows[0]["memory MB"] == "50"


@pytest.mark.parametrize("case", ["empty", "missing", "no_metrics"])
def test_no_model_folders_is_a_one_line_error(case, tmp_path):
    models = tmp_path / "models"
    if case != "missing":
        models.mkdir()
    if case == "no_metrics":
        (models / "sherl").mkdir()
        (models / "sherl" / "config.json").write_text("{}")
    with pytest.raises(InputError, match="model folder|models folder"):
        write_report(models, tmp_path / "out")
    result = CliRunner().invoke(report, ["--models", str(models), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and str(models) in lines[0], result.output
    assert not (tmp_path / "out" / "report.md").exists()


def test_unreadable_metrics_names_the_file(tmp_path):
    (tmp_path / "models" / "lst").mkdir(parents=True)
    (tmp_path / "models" / "lst" / "metrics.json").write_text("{not json")
    with pytest.raises(InputError, match="lst/metrics.json"):
        write_report(tmp_path / "models", tmp_path / "out")


def test_report_is_a_pipeline_command():
    from cachetune.pipeline.cli import main

    assert "report" in main.commands, "add `main.add_command(report)` (from pipeline.report_cli) to pipeline/cli.py"
