"""LoRA and full fine-tuning baselines write the same metrics.json as `fit`."""
from __future__ import annotations

import json

import pytest

from tests.test_extract import assert_one_line_error, cli

pytest.importorskip("peft")


@pytest.mark.parametrize("method, trainable", [("lora", "lora_"), ("full", "encoder.")])
def test_baseline_trains_and_reports_like_fit(method, trainable, tiny_bert, tiny_table, tmp_path):
    result = cli("baseline", "--method", method, "--backbone", tiny_bert, "--data", tiny_table, "--epochs", 2,
                 "--lr", 1e-3, "--out", tmp_path / method)
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / method / "metrics.json").read_text())
    assert metrics["method"] == method and metrics["baseline"] is True
    assert {"test", "history", "trainable_parameters", "peak_memory_mb", "seconds_per_epoch"} <= set(metrics)
    assert len(metrics["history"]) == 2 and "accuracy" in metrics["test"]
    parts = metrics["training_memory_parts_mb"]  # the backbone's weights are resident: more than the head alone
    assert parts["resident"] > 0 and parts["step_peak"] > 0 and parts["data"] == 0
    from safetensors import safe_open

    with safe_open(str(tmp_path / method / "model.safetensors"), "pt") as handle:
        keys = list(handle.keys())
    assert any(trainable in key for key in keys) and any(key.startswith("head.") for key in keys)


def test_lora_with_unknown_target_modules_is_a_one_line_error(tiny_bert, tiny_table, tmp_path):
    result = cli("baseline", "--backbone", tiny_bert, "--data", tiny_table, "--lora-targets", "q_proj", "--out", tmp_path / "m")
    assert_one_line_error(result, "LoRA targets")


def test_length_buckets_serve_every_row_once_in_batches_of_similar_length():
    import numpy as np

    from stages.training.baseline import training_order

    rows = np.arange(1000, 1640)
    lengths = np.random.default_rng(3).integers(5, 80, len(rows))
    plain = training_order(rows, None, 32, seed=7)
    assert np.array_equal(np.concatenate(plain), np.random.default_rng(7).permutation(rows))  # the order before buckets
    bucketed = training_order(rows, lengths, 32, seed=7)
    assert sorted(np.concatenate(bucketed).tolist()) == rows.tolist()

    def padded(batches):  # tokens computed: each batch padded to its longest
        return sum(len(b) * lengths[b - 1000].max() for b in batches)

    assert padded(bucketed) < 0.75 * padded(plain)
