"""Causal decoders (tiny random llama, gemma3_text, gpt2) and the T5 encoder as backbones: loading, positions and
masks, pooling, the one-line errors, fit / baseline / predict; and SmolLM2-135M (real weights, marked `real`)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import zarr

from cachetune.cache.reader import CacheReader
from cachetune.pipeline.data import load_dataset
from cachetune.stages.backbones import load_backbone
from cachetune.stages.extraction.extract import ExtractSettings, extract

from .conftest import sentiment_rows, write_table
from .decoder_folders import write_tiny_decoder
from .test_extract import assert_one_line_error, cli

FAMILIES = ("llama", "gemma3_text", "gpt2", "t5")
SMALL = dict(block_tokens=128, chunk_tokens=32, max_length=24, sort_tokens=256, dtype="float32")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("decoders")
    return {family: write_tiny_decoder(root / family, family) for family in FAMILIES}


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    return write_table(tmp_path_factory.mktemp("data") / "data.csv", sentiment_rows(80))


def _extract(folder, table, out, batch_size, padding_side=None, **overrides):
    backbone = load_backbone(str(folder))
    if padding_side:
        backbone.tokenizer.padding_side = padding_side
    settings = ExtractSettings(out=str(out), batch_size=batch_size, **{**SMALL, **overrides})
    extract(backbone, load_dataset(str(table)), settings, log=lambda *_: None)
    return backbone


def _features(store, split="train") -> dict[int, np.ndarray]:
    """row -> [layers, tokens, D] cached features of each sample."""
    reader = CacheReader(str(store), split)
    rows = reader.group["row"][:]
    out = {}
    for batch in reader.batches(batch_size=16):
        for position, sample in enumerate(batch.index):
            n = int(batch.mask[position].sum())
            out[int(rows[sample])] = batch.features[position, :, :n].numpy()
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_every_sample_gets_its_own_hidden_states_whatever_batch_and_padding_side(family, folders, table, tmp_path):
    """Batch 1 vs 32, right vs left padding (length-sorted batches mix lengths): the same cached features, equal to
    the sample run alone through transformers without any padding."""
    stores = {}
    for batch_size in (1, 32):
        for side in ("right", "left"):
            stores[batch_size, side] = tmp_path / f"b{batch_size}-{side}.zarr"
            backbone = _extract(folders[family], table, stores[batch_size, side], batch_size, side)
    reference = _features(stores[1, "right"])
    for name, store in stores.items():
        features = _features(store)
        assert features.keys() == reference.keys()
        for row, values in features.items():
            np.testing.assert_allclose(values, reference[row], atol=2e-5, rtol=1e-4, err_msg=f"{name} row {row}")
    dataset = load_dataset(str(table))
    for row in list(reference)[:12]:
        alone = backbone.tokenizer([dataset.texts[row]], truncation=True, max_length=SMALL["max_length"], return_tensors="pt")
        with torch.inference_mode():
            hidden = torch.stack(backbone.model(**alone, output_hidden_states=True).hidden_states)[:, 0]
        np.testing.assert_allclose(reference[row], hidden.numpy(), atol=2e-5, rtol=1e-4, err_msg=f"row {row}")


def test_left_padding_without_position_ids_would_differ(folders, table):
    """The check above can fail: GPT-2 (absolute positions) run left-padded without position ids gives other states."""
    backbone = load_backbone(str(folders["gpt2"]))
    backbone.tokenizer.padding_side = "left"
    texts = load_dataset(str(table)).texts[:8]
    batch = backbone.tokenizer(list(texts), padding=True, return_tensors="pt")
    row = int(np.argmin(batch["attention_mask"].sum(1).numpy()))  # the shortest: the most left padding
    with torch.inference_mode():
        plain = backbone.model(**batch).last_hidden_state
        alone = backbone.model(**backbone.tokenizer([texts[row]], return_tensors="pt")).last_hidden_state[0, -1]
    assert not torch.allclose(plain[row, -1], alone, atol=1e-3)


@pytest.mark.parametrize("family,model_class,pooling", [("llama", "LlamaModel", "last"), ("gemma3_text", "Gemma3TextModel", "last"),
                                                         ("gpt2", "GPT2Model", "last"), ("t5", "T5EncoderModel", "mean")])
def test_families_load_their_base_model_and_pooling(family, model_class, pooling, folders):
    backbone = load_backbone(str(folders[family]))
    assert type(backbone.model).__name__ == model_class and backbone.pooling == pooling
    assert backbone.tokenizer.pad_token is not None  # llama and gpt2 have none of their own: EOS pads


def test_pooling_is_recorded_in_the_store_and_shown_by_info(folders, table, tmp_path):
    store = tmp_path / "f.zarr"
    result = cli("extract", "--backbone", folders["llama"], "--data", table, "--max-length", 16, "--out", store)
    assert result.exit_code == 0, result.output
    attrs = zarr.open_group(str(store), mode="r").attrs
    assert attrs["pooling"] == "last" and attrs["key"]["pooling"] == "last"
    assert "pooling last" in cli("info", store).output
    result = cli("extract", "--backbone", folders["llama"], "--data", table, "--max-length", 16, "--pooling", "mean",
                 "--out", store)
    assert result.exit_code == 2 and "--overwrite" in result.output  # another pooling is another store
    result = cli("extract", "--backbone", folders["llama"], "--data", table, "--max-length", 16, "--pooling", "mean",
                 "--out", tmp_path / "mean.zarr")
    assert result.exit_code == 0, result.output
    assert "pooling mean" in cli("info", tmp_path / "mean.zarr").output


def test_cls_pooling_on_a_causal_decoder_is_a_one_line_error(folders, table, tmp_path):
    result = cli("extract", "--backbone", folders["gpt2"], "--data", table, "--pooling", "cls", "--out", tmp_path / "f.zarr")
    assert_one_line_error(result, "has seen only itself")


def test_a_causal_lm_without_pad_and_eos_is_a_one_line_error(table, tmp_path):
    folder = write_tiny_decoder(tmp_path / "no-eos", "llama", eos=False)
    result = cli("extract", "--backbone", folder, "--data", table, "--out", tmp_path / "f.zarr")
    assert_one_line_error(result, "neither a pad nor an EOS token")


def test_an_unsupported_family_is_a_one_line_error_naming_the_supported(table, tmp_path):
    from transformers import Qwen3Config

    Qwen3Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64).save_pretrained(tmp_path / "qwen3")
    result = cli("extract", "--backbone", tmp_path / "qwen3", "--data", table, "--out", tmp_path / "f.zarr")
    assert_one_line_error(result, "'qwen3' is not supported; decoders: llama, mistral, qwen2, gemma3_text, gpt2")


def test_a_gguf_without_the_gguf_package_is_a_one_line_error(table, tmp_path, monkeypatch):
    from cachetune.stages import gguf_backbone

    monkeypatch.setenv("CACHETUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(gguf_backbone, "installed", lambda name: name != "gguf")
    (tmp_path / "model.gguf").write_bytes(b"GGUF" + bytes(60))
    result = cli("extract", "--backbone", tmp_path / "model.gguf", "--data", table, "--out", tmp_path / "f.zarr")
    assert_one_line_error(result, "needs the `gguf` package: run `pip install gguf`")
    assert not list((tmp_path / "cache").rglob("config.json"))


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_fit_and_predict_on_a_decoder_cache(family, folders, table, tmp_path):
    store, model = tmp_path / "f.zarr", tmp_path / "linear"
    assert cli("extract", "--backbone", folders[family], "--data", table, "--max-length", 16, "--out", store).exit_code == 0
    result = cli("fit", "--method", "linear", "--cache", store, "--epochs", 2, "--out", model)
    assert result.exit_code == 0, result.output
    result = cli("predict", model, "--text", "good great movie", "--text", "the plot was awful and dull")
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in result.output.splitlines()]
    assert len(records) == 2 and all(r["label"] in ("neg", "pos") for r in records)
    # predict's features equal the cache's: the test split predicted from raw text gives `evaluate`'s accuracy
    dataset = load_dataset(str(table))
    rows = dataset.rows("test")
    result = cli("predict", model, *[arg for i in rows for arg in ("--text", dataset.texts[i])])
    predicted = [json.loads(line)["label"] for line in result.output.splitlines()]
    accuracy = np.mean([p == dataset.label_names[dataset.labels[i]] for p, i in zip(predicted, rows)])
    evaluated = json.loads(cli("evaluate", model, "--cache", store).output)
    assert accuracy == pytest.approx(evaluated["accuracy"])


def test_predict_with_an_encoder_folder_for_a_decoder_model_is_a_one_line_error(folders, tiny_bert, table, tmp_path):
    store, model = tmp_path / "f.zarr", tmp_path / "linear"
    cli("extract", "--backbone", folders["llama"], "--data", table, "--max-length", 16, "--out", store)
    assert cli("fit", "--method", "linear", "--cache", store, "--epochs", 1, "--out", model).exit_code == 0
    result = cli("predict", model, "--text", "good", "--backbone", tiny_bert)
    assert_one_line_error(result, "is a bert model, but this side network was trained on features of a llama backbone")


@pytest.mark.parametrize("family,adapted", [("llama", "q_proj"), ("gpt2", "c_attn"), ("t5", ".q.")])
def test_lora_baseline_on_decoders_and_t5(family, adapted, folders, table, tmp_path):
    result = cli("baseline", "--method", "lora", "--backbone", folders[family], "--data", table, "--epochs", 1,
                 "--max-length", 16, "--out", tmp_path / "lora")
    assert result.exit_code == 0, result.output
    from safetensors.torch import load_file

    names = list(load_file(tmp_path / "lora" / "model.safetensors"))
    assert any(adapted in name and "lora_A" in name for name in names), names[:5]
    assert json.loads((tmp_path / "lora" / "metrics.json").read_text())["settings"]["pooling"] is None


@pytest.mark.real
def test_smollm2_real_weights_on_real_movie_snippets(tmp_path):
    """SmolLM2-135M-Instruct (GGUF Q4_1, dequantized once into ~/.cache/cachetune) on 40 real movie snippets: the
    cache equals transformers' own forward pass of each snippet alone; pooling is the last real token."""
    from cachetune.pipeline.data import load_dataset as load

    movies = load("movies")
    rows = movies.rows("train")[:40]
    table = write_table(tmp_path / "movies.csv", [(movies.texts[i], movies.label_names[movies.labels[i]]) for i in rows])
    backbone = _extract("smollm2", table, tmp_path / "f.zarr", 8, layers="0,12,29,30", max_length=48,
                        dtype="float32", block_tokens=1024, chunk_tokens=256, sort_tokens=2048)
    assert backbone.model.config.model_type == "llama" and backbone.num_layers == 30 and backbone.hidden_size == 576
    assert zarr.open_group(str(tmp_path / "f.zarr"), mode="r").attrs["pooling"] == "last"
    features = _features(tmp_path / "f.zarr")
    dataset = load_dataset(str(table))
    for row in list(features)[:6]:
        alone = backbone.tokenizer([dataset.texts[row]], truncation=True, max_length=48, return_tensors="pt")
        with torch.inference_mode():
            hidden = backbone.model(**alone, output_hidden_states=True).hidden_states
        expected = torch.stack([hidden[i][0] for i in (0, 12, 29, 30)]).numpy()
        scale = np.abs(expected).max(axis=(1, 2), keepdims=True)  # hidden state 12 holds massive activations
        np.testing.assert_allclose(features[row] / scale, expected / scale, atol=1e-4)
