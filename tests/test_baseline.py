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

    from cachetune.stages.training.baseline import training_order

    rows = np.arange(1000, 1640)
    lengths = np.random.default_rng(3).integers(5, 80, len(rows))
    plain = training_order(rows, None, 32, seed=7)
    assert np.array_equal(np.concatenate(plain), np.random.default_rng(7).permutation(rows))  # the order before buckets
    bucketed = training_order(rows, lengths, 32, seed=7)
    assert sorted(np.concatenate(bucketed).tolist()) == rows.tolist()

    def padded(batches):  # tokens computed: each batch padded to its longest
        return sum(len(b) * lengths[b - 1000].max() for b in batches)

    assert padded(bucketed) < 0.75 * padded(plain)


def test_gradient_checkpointing_measures_a_smaller_step_on_the_same_batch(tiny_bert, tiny_table, tmp_path):
    """`--measure-step`: one step's memory on the largest batch, no training; checkpointing keeps fewer activations."""
    steps = {}
    for name, flags in (("plain", []), ("checkpointing", ["--gradient-checkpointing"])):
        result = cli("baseline", "--backbone", tiny_bert, "--data", tiny_table, "--max-length", 64, "--measure-step",
                     *flags, "--out", tmp_path / name)
        assert result.exit_code == 0 and "one step measured, no training" in result.output, result.output
        metrics = json.loads((tmp_path / name / "metrics.json").read_text())
        assert metrics["measured_step_only"] and metrics["history"] == [] and metrics["test"] == {}
        assert metrics["gradient_checkpointing"] == (name == "checkpointing")
        steps[name] = metrics["training_memory_parts_mb"]
    assert steps["checkpointing"]["resident"] == pytest.approx(steps["plain"]["resident"])  # same weights and batch
    assert steps["checkpointing"]["step_peak"] < steps["plain"]["step_peak"]


def test_gradient_checkpointing_computes_what_lora_computes(tiny_bert):
    """The same LoRA gradients with and without checkpointing (transformers recomputes the layers in backward)."""
    import torch

    from cachetune.stages.backbones import load_backbone
    from cachetune.stages.training.baseline import BackboneClassifier, BaselineSettings, _wrap_lora, enable_checkpointing

    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        backbone = load_backbone(str(tiny_bert))
        encoder = backbone.model.requires_grad_(False)
        if checkpointing:
            enable_checkpointing(encoder)
        model = BackboneClassifier(_wrap_lora(encoder, BaselineSettings(lora_dropout=0.0)), 2, "cls").train()
        batch = backbone.tokenizer(["a fine film", "dull and long, far too long"], padding=True, return_tensors="pt")
        model(dict(batch)).square().sum().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 2
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-6)
