"""Regression targets far from zero: the network learns them standardised by the training rows' mean and std, and
every prediction and metric a user sees is in the data's own units (stages/training/target_scale.py)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from cachetune.cache.reader import CacheReader
from cachetune.pipeline.data import load_dataset
from cachetune.stages.backbones import load_backbone
from cachetune.stages.extraction.extract import ExtractSettings, extract
from cachetune.stages.methods import config_from_options
from cachetune.stages.training.evaluate import predict_split
from cachetune.stages.training.fit import FitSettings, fit
from cachetune.stages.training.side_network import SideNetwork
from tests.conftest import sentiment_rows, write_table
from tests.test_extract import SMALL, assert_one_line_error, cli

OFFSET, SIGNAL = 1000.0, 5.0  # targets 1000 (negative texts) and 1005 (positive ones)


@pytest.fixture(scope="module")
def regression_cache(tiny_bert, tmp_path_factory):
    folder = tmp_path_factory.mktemp("regression")
    rows = [(text, OFFSET + SIGNAL * (label == "pos")) for text, label in sentiment_rows(160)]
    table = write_table(folder / "scores.csv", rows)
    dataset = load_dataset(str(table), task="regression", log=lambda _: None)
    extract(load_backbone(str(tiny_bert)), dataset, ExtractSettings(out=str(folder / "f.zarr"), **SMALL),
            log=lambda *_: None)
    return folder / "f.zarr", dataset


def split_targets(dataset, split: str) -> np.ndarray:
    return dataset.labels[dataset.rows(split)].astype(np.float64)


@pytest.fixture(scope="module")
def fitted(regression_cache, tmp_path_factory):
    """A linear side network (at the lr tests/test_fit.py trains it with): (model folder, fit's metrics)."""
    cache, _ = regression_cache
    out = tmp_path_factory.mktemp("model") / "linear"
    settings = FitSettings(epochs=10, batch_size=16, lr=3e-2, seed=0, buffer_mb=48)
    return out, fit(str(cache), config_from_options("linear", {}), settings, out, show_progress=False)


def test_fit_learns_targets_far_from_zero_and_reports_the_datas_units(regression_cache, fitted):
    _, dataset = regression_cache
    folder, metrics = fitted
    train, test = split_targets(dataset, "train"), split_targets(dataset, "test")
    assert metrics["target_scale"] == {"mean": pytest.approx(train.mean()), "std": pytest.approx(train.std())}
    assert metrics["test"]["mse"] < np.mean((test - test.mean()) ** 2)  # better than predicting the mean
    assert max(epoch["train_loss"] for epoch in metrics["history"]) < 10  # learnt on the standardised scale
    texts = [dataset.texts[row] for row in dataset.rows("test")]
    predictions = np.array([record["prediction"] for record in SideNetwork.from_pretrained(folder).predict(texts)])
    assert np.all((predictions > OFFSET - SIGNAL) & (predictions < OFFSET + 2 * SIGNAL)), predictions
    assert np.mean((predictions - test) ** 2) == pytest.approx(metrics["test"]["mse"], rel=1e-3)


def test_saved_model_evaluates_and_predicts_as_fit_and_the_python_api(regression_cache, fitted):
    cache, dataset = regression_cache
    folder, metrics = fitted
    evaluated = cli("evaluate", folder, "--cache", cache, "--split", "test")
    assert evaluated.exit_code == 0, evaluated.output
    scored = json.loads(evaluated.stdout[evaluated.stdout.index("{"):])
    assert scored["mse"] == pytest.approx(metrics["test"]["mse"], rel=1e-5)
    assert scored["pearson"] == pytest.approx(metrics["test"]["pearson"], rel=1e-5)

    texts = [dataset.texts[row] for row in dataset.rows("test")[:3]]
    predicted = cli("predict", folder, *(arg for text in texts for arg in ("--text", text)))
    assert predicted.exit_code == 0, predicted.output
    from_cli = [json.loads(line)["prediction"] for line in predicted.stdout.splitlines()]
    from_api = [record["prediction"] for record in SideNetwork.from_pretrained(folder).predict(texts)]
    assert from_cli == pytest.approx(from_api, abs=1e-3)
    assert min(from_cli) > OFFSET - SIGNAL


def test_sweep_scores_and_saves_in_the_datas_units(regression_cache, tmp_path):
    cache, dataset = regression_cache
    test = split_targets(dataset, "test")
    result = cli("sweep", "--methods", "linear", "--cache", cache, "--epochs", 10, "--batch-size", 16, "--lr", 3e-2,
                 "--out", tmp_path / "sweep")
    assert result.exit_code == 0, result.output
    [row] = json.loads((tmp_path / "sweep" / "sweep.json").read_text())["runs"]
    assert row["test_mse"] < np.mean((test - test.mean()) ** 2)
    run = SideNetwork.from_pretrained(tmp_path / "sweep" / row["folder"])
    assert run.target_scale.mean == pytest.approx(split_targets(dataset, "train").mean())


def test_model_folder_without_a_recorded_scale_predicts_its_outputs_as_they_are(regression_cache, fitted, tmp_path):
    """A folder saved before the scale was recorded: its network learnt the targets unscaled, so the identity."""
    cache, dataset = regression_cache
    folder, _ = fitted
    old = tmp_path / "old"
    old.mkdir()
    config = json.loads((folder / "config.json").read_text())
    scale = config.pop("target_scale")
    (old / "config.json").write_text(json.dumps(config))
    (old / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes())

    network = SideNetwork.from_pretrained(old)
    assert network.target_scale.is_identity
    texts = [dataset.texts[row] for row in dataset.rows("test")[:4]]
    outputs = [record["prediction"] for record in network.predict(texts)]
    restored = [record["prediction"] for record in SideNetwork.from_pretrained(folder).predict(texts)]
    assert np.array(outputs) * scale["std"] + scale["mean"] == pytest.approx(restored, abs=1e-3)
    cached, targets = predict_split(network.model, CacheReader(str(cache), "test", network.layers))
    evaluated = cli("evaluate", old, "--cache", cache, "--split", "test")
    assert evaluated.exit_code == 0, evaluated.output
    mse = json.loads(evaluated.stdout[evaluated.stdout.index("{"):])["mse"]
    assert mse == pytest.approx(np.mean((cached.reshape(-1) - targets) ** 2), rel=1e-5)


def test_an_edited_scale_is_a_one_line_error(fitted, tmp_path):
    folder, _ = fitted
    edited = tmp_path / "edited"
    edited.mkdir()
    config = json.loads((folder / "config.json").read_text())
    config["target_scale"]["std"] = 0
    (edited / "config.json").write_text(json.dumps(config))
    (edited / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
    assert_one_line_error(cli("predict", edited, "--text", "good movie"), "damaged or was edited")


def test_baseline_learns_targets_far_from_zero(regression_cache, tiny_bert, tmp_path):
    pytest.importorskip("peft")
    _, dataset = regression_cache
    test = split_targets(dataset, "test")
    table = write_table(tmp_path / "scores.csv", [(text, label) for text, label in zip(dataset.texts, dataset.labels)])
    result = cli("baseline", "--method", "full", "--backbone", tiny_bert, "--data", table, "--task", "regression",
                 "--epochs", 2, "--lr", 1e-3, "--max-length", 24, "--out", tmp_path / "full")
    assert result.exit_code == 0, result.output
    assert "targets standardised (mean 1002" in result.output
    metrics = json.loads((tmp_path / "full" / "metrics.json").read_text())
    assert metrics["test"]["mse"] < 2 * np.mean((test - test.mean()) ** 2)
