"""`pipeline sweep` and `fit --method auto`: shared batches give each run exactly its `fit` result; resume; grids."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from cachetune.cache.errors import InputError
from cachetune.stages.training.fit import FitSettings, fit
from cachetune.stages.methods import config_from_options
from cachetune.stages.training.sweep import RUNS_DIR, SWEEP_CSV, SWEEP_JSON, sweep
from cachetune.stages.training.sweep_grid import make_grid, read_grid_file
from tests.test_extract import assert_one_line_error, cli
from tests.test_fit import tiny_cache  # noqa: F401  (module fixture: a tiny BERT's cache of 160 texts)

SETTINGS = FitSettings(epochs=2, batch_size=16, warmup_ratio=0.0)


def grid(methods, *pairs, lrs="3e-3", seeds="0"):
    return make_grid({}, methods=methods, pairs=pairs, lrs=lrs, seeds=seeds)


@pytest.mark.parametrize("data_path", [{}, {"in_memory": True, "length_buckets": True}], ids=["streamed", "in_memory"])
def test_each_run_equals_its_fit_alone(tiny_cache, tmp_path, data_path):
    """synqt has dropout, so this holds only if each run draws from its own random stream; lst and unipt read
    different layers of the shared batches; two learning rates share one pass."""
    cache, _ = tiny_cache
    settings = FitSettings(**{**SETTINGS.__dict__, **data_path})
    runs = grid("synqt,lst,unipt", "r=2", lrs="3e-3,1e-2" if not data_path else "3e-3").runs()
    summary = sweep(str(cache), runs, settings, tmp_path / "sweep", show_progress=False)
    assert [row["name"] for row in summary["runs"]] == [run.name for run in runs]
    for run in runs:
        if run.config.method == "unipt" and run.lr == 1e-2:
            continue  # two of three methods at both rates already cover it; keep the test short
        alone = fit(str(cache), run.config, FitSettings(**{**settings.__dict__, "lr": run.lr, "seed": run.seed}),
                    tmp_path / "alone" / run.name, show_progress=False)
        folder = tmp_path / "sweep" / RUNS_DIR / run.name
        swept = json.loads((folder / "metrics.json").read_text())
        assert [row["train_loss"] for row in swept["history"]] == [row["train_loss"] for row in alone["history"]]
        assert swept["test"] == alone["test"] and swept["best_epoch"] == alone["best_epoch"]
        expected = load_file(str(tmp_path / "alone" / run.name / "model.safetensors"))
        for key, tensor in load_file(str(folder / "model.safetensors")).items():
            assert torch.equal(tensor, expected[key]), (run.name, key)


def test_tables_and_best_by_validation(tiny_cache, tmp_path):
    cache, _ = tiny_cache
    runs = grid("linear,unipt", "r=2,4", seeds="0,1").runs()
    assert [run.name for run in runs] == ["linear-lr=0.003-seed=0", "linear-lr=0.003-seed=1",
                                          "unipt-r=2-lr=0.003-seed=0", "unipt-r=2-lr=0.003-seed=1",
                                          "unipt-r=4-lr=0.003-seed=0", "unipt-r=4-lr=0.003-seed=1"]
    out = tmp_path / "models" / "sweep"
    summary = sweep(str(cache), runs, SETTINGS, out, show_progress=False)
    saved = json.loads((out / SWEEP_JSON).read_text())
    validations = {row["name"]: row["validation_accuracy"] for row in saved["runs"]}
    assert saved["best"] == max(validations, key=validations.get) == summary["best"]
    assert len((out / SWEEP_CSV).read_text().splitlines()) == 1 + len(runs)
    assert all("test_accuracy" in row for row in saved["runs"])

    from cachetune.pipeline.report import write_report

    report = write_report(tmp_path / "models", tmp_path / "reports").read_text()
    assert "## Sweep `sweep`" in report and (tmp_path / "reports" / "sweep_sweep.png").exists()
    row = next(line for line in report.splitlines() if line.startswith("| unipt-r=2-lr=0.003 |"))
    tests = [r["test_accuracy"] for r in saved["runs"] if r["group"] == "unipt-r=2-lr=0.003"]
    assert f"| 2 |" in row and f"{sum(tests) / 2:.4f} ± " in row
    assert "runs/" not in report  # the runs are the sweep's rows, not the main table's


def test_rerun_skips_finished_runs_and_resumes_the_rest(tiny_cache, tmp_path, monkeypatch):
    """A sweep killed after one epoch: the rerun skips the run that was finished before it and ends as an
    uninterrupted sweep does."""
    cache, _ = tiny_cache
    settings = FitSettings(epochs=3, batch_size=16, warmup_ratio=0.0)
    clean = sweep(str(cache), grid("lst,synqt", "r=4").runs(), settings, tmp_path / "clean", show_progress=False)

    sweep(str(cache), grid("lst", "r=4").runs(), settings, tmp_path / "killed", show_progress=False)  # finished
    finished = tmp_path / "killed" / RUNS_DIR / "lst-r=4-lr=0.003-seed=0" / "metrics.json"
    finished_bytes = finished.read_bytes()
    from cachetune.stages.training import training_loop

    calls = {"n": 0}
    original = training_loop.Learner.finish_epoch

    def dies_after_first_epoch(self, validation, seconds):
        row = original(self, validation, seconds)
        calls["n"] += 1
        if calls["n"] == 1:
            raise KeyboardInterrupt
        return row

    monkeypatch.setattr(training_loop.Learner, "finish_epoch", dies_after_first_epoch)
    with pytest.raises(KeyboardInterrupt):
        sweep(str(cache), grid("lst,synqt", "r=4").runs(), settings, tmp_path / "killed", show_progress=False)
    monkeypatch.setattr(training_loop.Learner, "finish_epoch", original)
    assert (tmp_path / "killed" / RUNS_DIR / "synqt-lr=0.003-seed=0.checkpoint.pt").exists()
    resumed = sweep(str(cache), grid("lst,synqt", "r=4").runs(), settings, tmp_path / "killed", show_progress=False)
    assert finished.read_bytes() == finished_bytes  # skipped, not retrained
    assert resumed["trained_now"] == 1
    for ours, theirs in zip(resumed["runs"], clean["runs"]):
        assert ours["test_accuracy"] == theirs["test_accuracy"] and ours["best_epoch"] == theirs["best_epoch"]
    assert not list((tmp_path / "killed" / RUNS_DIR).glob("*.checkpoint.pt"))


def test_grid_file_and_command_line(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("fit: {epochs: 5}\nsweep:\n  methods: {lst: {r: [4, 8]}, linear: {}}\n  lr: [1.0e-3]\n"
                      "  seeds: [0, 1]\n")
    runs = make_grid(read_grid_file(str(params))).runs()
    assert [run.name for run in runs] == ["lst-r=4-lr=0.001-seed=0", "lst-r=4-lr=0.001-seed=1",
                                          "lst-r=8-lr=0.001-seed=0", "lst-r=8-lr=0.001-seed=1",
                                          "linear-lr=0.001-seed=0", "linear-lr=0.001-seed=1"]
    overridden = make_grid(read_grid_file(str(params)), lrs="1e-2", seeds="3").runs()
    assert [run.name for run in overridden][-1] == "linear-lr=0.01-seed=3"


@pytest.mark.parametrize("methods, pairs, message", [
    ("lst,nope", (), "unknown method"),
    ("linear", ("r=4",), "no method in the sweep .* has option"),
    ("lst", ("r=four",), "option r='four'"),
    ("lst", ("r=4,4",), "same configuration twice"),
])
def test_bad_grids_are_refused(methods, pairs, message):
    with pytest.raises(InputError, match=message):
        grid(methods, *pairs).runs()


def test_sweep_cli_and_fit_auto(tiny_cache, tmp_path):
    cache, _ = tiny_cache
    result = cli(*["sweep", "--cache", str(cache), "--methods", "linear,unipt", "--set", "r=2", "--lr", "3e-3,1e-2",
                  "--epochs", "1", "--batch-size", "16", "--out", str(tmp_path / "s")])
    assert result.exit_code == 0, result.output
    assert "best by validation" in result.output
    assert len(json.loads((tmp_path / "s" / SWEEP_JSON).read_text())["runs"]) == 4

    result = cli(*["fit", "--method", "auto", "--cache", str(cache), "--epochs", "1", "--batch-size", "16",
                  "--out", str(tmp_path / "auto")])
    assert result.exit_code == 0, result.output
    auto = tmp_path / "auto"
    table = json.loads((auto / SWEEP_JSON).read_text())
    metrics = json.loads((auto / "metrics.json").read_text())
    assert metrics["sweep_run"] == table["best"]
    assert {row["method"] for row in table["runs"]} == {"linear", "lst", "sherl", "synqt", "unipt", "utuning"}

    assert_one_line_error(cli(*["sweep", "--cache", str(cache), "--methods", "linear", "--lr", "fast",
                               "--out", str(tmp_path / "bad")]), "lr")
    assert_one_line_error(cli(*["sweep", "--cache", str(cache), "--grid", str(tmp_path / "missing.yaml"),
                               "--out", str(tmp_path / "bad")]), "file not found")


def test_fit_auto_leaves_out_the_methods_whose_layers_the_cache_lacks(tiny_bert, tmp_path):
    """A cache of the last layer only: `fit --method auto` trains the probe and names the others and the fix (it
    failed on the first method that needed a layer the cache lacks)."""
    from tests.conftest import sentiment_rows, write_table
    from tests.test_extract import run_extract

    table = write_table(tmp_path / "data.csv", sentiment_rows(80))
    cache = tmp_path / "last.zarr"
    run_extract(tiny_bert, table, cache, layers="for:linear")  # the last hidden state only
    result = cli(*["fit", "--method", "auto", "--cache", str(cache), "--epochs", "1", "--batch-size", "16",
                   "--out", str(tmp_path / "auto")])
    assert result.exit_code == 0, result.output
    assert "leaving out lst, sherl, synqt, unipt, utuning: the cache lacks layers they need" in result.output
    assert "extract with --layers all" in result.output
    table_ = json.loads((tmp_path / "auto" / SWEEP_JSON).read_text())
    assert {row["method"] for row in table_["runs"]} == {"linear"}
