"""`pipeline info` tells the truth about a store: the encoding's error when values pass float16's range, statistics
of the decoded values (not an 8-bit store's codes), and whether the store holds a sample of the data."""
from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
import zarr

from cachetune.cache.compact import compact
from cachetune.cache.info import FLOAT16_MAX, describe_store, layer_stats
from cachetune.pipeline.data import SPLITS, load_dataset
from tests.conftest import sentiment_rows, write_table, write_tiny_bert
from tests.test_extract import SMALL, assert_one_line_error, cli, direct_hidden_states, run_extract


@pytest.fixture(scope="module")
def loud_bert(tmp_path_factory):
    """A tiny random BERT whose LayerNorms scale by 1e5: its hidden states pass float16's 65504, as a real Gemma 3
    residual stream (~1e5) does."""
    from transformers import BertModel

    folder = write_tiny_bert(tmp_path_factory.mktemp("loud-bert"))
    model = BertModel.from_pretrained(folder)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.mul_(1e5)
    model.save_pretrained(folder)
    return folder


def info_without_runtime_warnings(*args):
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        result = cli("info", *args)
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.parametrize("route", ["extract fp8", "extract int8", "compact fp8 from float32"])
def test_the_encoding_error_of_values_beyond_float16_is_measured_not_nan(route, loud_bert, tiny_table, tmp_path):
    store = tmp_path / "store.zarr"
    if route.startswith("compact"):
        run_extract(loud_bert, tiny_table, tmp_path / "f32.zarr", dtype="float32")
        assert np.abs(zarr.open_group(str(tmp_path / "f32.zarr"))["train"]["layer_02"][:]).max() > FLOAT16_MAX
        compact(str(tmp_path / "f32.zarr"), str(store), dtype="fp8", log=lambda *_: None)
    else:
        run_extract(loud_bert, tiny_table, store, dtype=route.split()[1])
    facts = describe_store(str(store))
    assert 0 < facts["relative_error"] < (0.02 if "int8" in route else 0.05)
    assert facts["relative_error_note"] is None
    output = info_without_runtime_warnings(store)
    assert "nan" not in output and f"relative error {facts['relative_error']:.4f}" in output


def test_a_store_whose_recorded_error_overflowed_says_so_instead_of_nan(tiny_bert, tiny_table, tmp_path):
    """Stores written before the fix hold inf in `encode_error` (their float16 reference overflowed)."""
    run_extract(tiny_bert, tiny_table, tmp_path / "fp8.zarr", dtype="fp8")
    zarr.open_group(str(tmp_path / "fp8.zarr"))["train"]["encode_error"][0] = [np.inf, np.inf]
    output = info_without_runtime_warnings(tmp_path / "fp8.zarr")
    assert "nan" not in output and "relative error not measured: values beyond float16's range" in output
    facts = json.loads(info_without_runtime_warnings("--json", tmp_path / "fp8.zarr"))
    assert facts["relative_error"] is None and "extract or compact it again" in facts["relative_error_note"]


def direct_stats(model_folder, table) -> list[dict]:
    """Per hidden state, mean, std, max |x| of a float32 forward over every real token of the table."""
    hidden, mask = direct_hidden_states(model_folder, load_dataset(str(table)).texts, SMALL["max_length"])
    stats = []
    for layer in range(hidden.shape[1]):
        values = hidden[:, layer][mask].double()
        stats.append({"tokens": int(mask.sum()), "mean": float(values.mean()), "std": float(values.std(correction=0)),
                      "max_abs": float(values.abs().max())})
    return stats


def test_stats_are_of_the_decoded_values_on_every_encoding(tiny_bert, tiny_table, tmp_path):
    expected = direct_stats(tiny_bert, tiny_table)
    for dtype, tolerance in (("float16", 1e-3), ("int8", 5e-3), ("fp8", 0.015)):
        run_extract(tiny_bert, tiny_table, tmp_path / f"{dtype}.zarr", dtype=dtype)
        rows = layer_stats(str(tmp_path / f"{dtype}.zarr"))
        assert [row["layer"] for row in rows] == list(range(len(expected)))
        for row, direct in zip(rows, expected):
            assert row["tokens"] == direct["tokens"]
            assert abs(row["mean"] - direct["mean"]) < tolerance * direct["std"], (dtype, row, direct)
            assert row["std"] == pytest.approx(direct["std"], rel=tolerance), (dtype, row, direct)
            assert row["max_abs"] == pytest.approx(direct["max_abs"], rel=tolerance), (dtype, row, direct)
            assert row["fp16_overflow_fraction"] == 0
    output = info_without_runtime_warnings("--stats", tmp_path / "fp8.zarr")
    assert f"{rows[-1]['max_abs']:.4g}" in output.splitlines()[-1]  # rows: the fp8 store's


def test_stats_of_a_loud_fp8_store_count_the_values_beyond_float16(loud_bert, tiny_table, tmp_path):
    run_extract(loud_bert, tiny_table, tmp_path / "fp8.zarr", dtype="fp8")
    expected = direct_stats(loud_bert, tiny_table)
    for row, direct in zip(layer_stats(str(tmp_path / "fp8.zarr")), expected):
        assert row["max_abs"] == pytest.approx(direct["max_abs"], rel=0.01) and row["max_abs"] > FLOAT16_MAX
        assert 0.1 < row["fp16_overflow_fraction"] < 0.9


SAMPLE_ARGS = ["--block-tokens", 128, "--chunk-tokens", 32, "--batch-size", 8, "--max-length", 24, "--sort-tokens", 256,
               "--dtype", "float16"]


@pytest.fixture()
def split_table(tmp_path):
    """1,000 rows, two classes, given splits 700 / 200 / 100."""
    rows = sentiment_rows(1000)
    splits = ["train"] * 700 + ["validation"] * 200 + ["test"] * 100
    return write_table(tmp_path / "big.csv", [(text, label, split) for (text, label), split in zip(rows, splits)],
                       columns=("text", "label", "split"))


def extract_sample(model, table, out, *extra):
    return cli("extract", "--backbone", model, "--data", table, "--out", out, *SAMPLE_ARGS, *extra)


def test_extract_max_samples_keeps_split_and_label_shares_and_marks_the_store(tiny_bert, split_table, tmp_path):
    store = tmp_path / "sample.zarr"
    result = extract_sample(tiny_bert, split_table, store, "--max-samples", 100)
    assert result.exit_code == 0, result.output
    assert [line for line in result.output.splitlines() if "took" in line] == [
        "note: big: took 100 of 1,000 rows, seed 0 (--max-samples, --split-seed; stratified by split and label)"]
    root = zarr.open_group(str(store), mode="r")
    assert root.attrs["key"]["sample"] == {"rows": 100, "of": 1000, "seed": 0}
    whole = load_dataset(str(split_table))
    for split in SPLITS:
        rows = root[split]["row"][:]  # rows of the whole table, so a sample's samples can be traced to it
        assert len(set(rows.tolist())) == len(rows) and (whole.split[rows] == SPLITS.index(split)).all()
        np.testing.assert_array_equal(root[split]["label"][:], whole.labels[rows])
    counts = {split: np.bincount(root[split]["label"][:], minlength=2).tolist() for split in SPLITS}
    assert counts == {"train": [35, 35], "validation": [10, 10], "test": [5, 5]}
    info = cli("info", store)
    assert "sample     100 of the data's 1,000 rows (extract --max-samples, seed 0); not the whole data" in info.output
    assert json.loads(cli("info", "--json", store).output)["sample"] == {"rows": 100, "of": 1000, "seed": 0}
    # the same command finds its store; the whole data, or another seed, is another store
    assert "is up to date" in extract_sample(tiny_bert, split_table, store, "--max-samples", 100).output
    refused = extract_sample(tiny_bert, split_table, store)
    assert refused.exit_code == 2 and "differs in: data_fingerprint, sample" in refused.output
    other = extract_sample(tiny_bert, split_table, tmp_path / "seed1.zarr", "--max-samples", 100, "--split-seed", 1)
    assert other.exit_code == 0, other.output
    assert "took 100 of 1,000 rows, seed 1" in other.output
    rows = {seed: set(zarr.open_group(str(path), mode="r")["train"]["row"][:].tolist())
            for seed, path in ((0, store), (1, tmp_path / "seed1.zarr"))}
    assert rows[0] != rows[1]


def test_extract_max_samples_refusals_and_the_whole_data(tiny_bert, split_table, tmp_path):
    assert_one_line_error(extract_sample(tiny_bert, split_table, tmp_path / "a.zarr", "--max-samples", 0),
                          "--max-samples 0: give at least 1")
    assert_one_line_error(extract_sample(tiny_bert, split_table, tmp_path / "b.zarr", "--max-samples", 3),
                          "raise --max-samples")
    assert not (tmp_path / "a.zarr").exists() and not (tmp_path / "b.zarr").exists()
    result = extract_sample(tiny_bert, split_table, tmp_path / "all.zarr", "--max-samples", 5000)
    assert result.exit_code == 0, result.output
    assert "--max-samples 5,000 is not fewer than its 1,000 rows; extracting them all" in result.output
    assert "sample" not in zarr.open_group(str(tmp_path / "all.zarr"), mode="r").attrs["key"]
    assert "is up to date" in extract_sample(tiny_bert, split_table, tmp_path / "all.zarr").output


def test_a_sample_that_drops_a_class_is_refused_from_train_and_said_from_validation(tiny_bert, tmp_path):
    rows = [(text, label, "train") for text, label in sentiment_rows(700)] + [("fine film", "meh", "train")] * 20
    rows += [(text, label, "validation") for text, label in sentiment_rows(200, seed=1)] + [("fine plot", "meh", "validation")] * 2
    table = write_table(tmp_path / "rare.csv", rows, columns=("text", "label", "split"))
    assert_one_line_error(extract_sample(tiny_bert, table, tmp_path / "a.zarr", "--max-samples", 20),
                          "--max-samples 20: the sample of rare has no training row of class 'meh'; raise --max-samples")
    result = extract_sample(tiny_bert, table, tmp_path / "b.zarr", "--max-samples", 100)
    assert result.exit_code == 0, result.output
    assert ("warning: rare: the --max-samples 100 sample has no validation row of class 'meh'; validation metrics never "
            "score it; raise --max-samples") in result.output


def test_the_python_api_takes_max_samples(tiny_bert, split_table, tmp_path):
    import cachetune

    options = {name.lstrip("-").replace("-", "_"): value for name, value in zip(SAMPLE_ARGS[::2], SAMPLE_ARGS[1::2])}
    lines = []
    cache = cachetune.extract(str(tiny_bert), str(split_table), str(tmp_path / "s.zarr"), log=lines.append,
                              max_samples=50, **options)
    assert "note: big: took 50 of 1,000 rows, seed 0 (--max-samples, --split-seed; stratified by split and label)" in lines
    assert cache.info()["sample"] == {"rows": 50, "of": 1000, "seed": 0}
    assert [len(cache.dataset(split)) for split in SPLITS] == [35, 10, 5]
