"""Compact caches: 8-bit codes with per-token group scales, PCA projections, `pipeline compact`, layer choice."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner

from cachetune.cache.compact import compact
from cachetune.cache.errors import InputError
from cachetune.cache.info import describe_store
from cachetune.cache.quantize import GROUP, decode, encode, relative_error
from cachetune.cache.reader import CacheReader
from cachetune.pipeline.cli import main
from cachetune.stages.extraction.layer_selection import parse_layers
from tests.test_extract import run_extract


def decoded_batches(path, split="train", layers=None, in_memory=False):
    """sample -> (features [K, n, D] float32 as the training device sees them)."""
    reader = CacheReader(str(path), split, layers, in_memory=in_memory)
    out = {}
    for batch in reader.batches(7):
        features = batch.hidden_states().dense()
        for row, sample in enumerate(batch.index):
            n = int(batch.mask[row].sum())
            assert not features[row, :, n:].any()  # padding stays zero after decoding
            out[int(sample)] = features[row, :, :n]
    return out


def test_group_scales_survive_massive_activations():
    """One channel at 24,500 on a token (SmolLM2's massive activations) must not zero the token's other groups."""
    torch.manual_seed(0)
    x = torch.randn(16, 4 * GROUP) * 2
    x[0, 5] = 24500.0
    for dtype, tolerance in (("int8", 0.01), ("fp8", 0.04)):
        codes, scales = encode(x, dtype)
        assert codes.dtype == (torch.int8 if dtype == "int8" else torch.uint8) and scales.shape == (16, 4)
        y = decode(codes, scales, dtype)
        ordinary = x[0, GROUP:]  # the massive token's other groups keep their own scale
        assert relative_error(ordinary, y[0, GROUP:]) < tolerance
        assert relative_error(x[1:], y[1:]) < tolerance
    # the trap this avoids: one absmax scale per token rounds that token's ordinary values to zero
    row_scale = x[0].abs().max() / 127
    assert ((x[0, GROUP:] / row_scale).round() == 0).float().mean() > 0.9


def test_int8_and_fp8_extraction_decode_close_to_float16(tiny_bert, tiny_table, tmp_path):
    run_extract(tiny_bert, tiny_table, tmp_path / "f16.zarr")
    reference = decoded_batches(tmp_path / "f16.zarr")
    for dtype, tolerance in (("int8", 0.02), ("fp8", 0.05)):
        run_extract(tiny_bert, tiny_table, tmp_path / f"{dtype}.zarr", dtype=dtype)
        root = zarr.open_group(str(tmp_path / f"{dtype}.zarr"), mode="r")
        assert root["train"]["layer_01"].dtype == (np.int8 if dtype == "int8" else np.uint8)
        assert root.attrs["encoding"]["storage"] == ("int8" if dtype == "int8" else "uint8")
        assert root.attrs["key"]["dtype"] == dtype and root.attrs["key"]["scale_group"] == GROUP
        got = decoded_batches(tmp_path / f"{dtype}.zarr")
        in_memory = decoded_batches(tmp_path / f"{dtype}.zarr", in_memory=True)
        for sample, values in reference.items():
            assert relative_error(values, got[sample]) < tolerance
            torch.testing.assert_close(in_memory[sample], got[sample])
        facts = describe_store(str(tmp_path / f"{dtype}.zarr"))
        assert 0 < facts["relative_error"] < tolerance
        assert facts["bytes_per_token_layer"] < describe_store(str(tmp_path / "f16.zarr"))["bytes_per_token_layer"]
    assert describe_store(str(tmp_path / "f16.zarr"))["codecs"] == ["blosc lz4 (shuffle, level 5)", "crc32c checksum"]


def test_compact_equals_extraction_and_resumes(tiny_bert, tiny_table, tmp_path, monkeypatch):
    run_extract(tiny_bert, tiny_table, tmp_path / "f16.zarr", dtype="float32")  # the values int8 extraction encodes
    run_extract(tiny_bert, tiny_table, tmp_path / "direct.zarr", dtype="int8")
    # a crash after the first block, then the same command: the result equals an uninterrupted run
    from cachetune.cache import writer

    original, calls = writer.SplitWriter.write_block, []

    def crash_after_one(self, block, buffer):
        if calls:
            raise KeyboardInterrupt
        calls.append(block)
        original(self, block, buffer)

    monkeypatch.setattr(writer.SplitWriter, "write_block", crash_after_one)
    with pytest.raises(KeyboardInterrupt):
        compact(str(tmp_path / "f16.zarr"), str(tmp_path / "c.zarr"), "int8", log=lambda *_: None)
    monkeypatch.setattr(writer.SplitWriter, "write_block", original)
    with pytest.raises(InputError, match="incomplete"):
        CacheReader(str(tmp_path / "c.zarr"), "train")
    info = CliRunner().invoke(main, ["info", str(tmp_path / "c.zarr")])
    assert "[incomplete]" in info.output and "relative error" in info.output
    assert "per real token and layer" not in info.output  # its unwritten blocks would count as free
    assert "" not in info.output.splitlines(), info.output
    assert compact(str(tmp_path / "f16.zarr"), str(tmp_path / "c.zarr"), "int8", log=lambda *_: None) == "written"
    assert compact(str(tmp_path / "f16.zarr"), str(tmp_path / "c.zarr"), "int8", log=lambda *_: None) == "complete"
    made, direct = zarr.open_group(str(tmp_path / "c.zarr"), mode="r"), zarr.open_group(str(tmp_path / "direct.zarr"), mode="r")
    source = zarr.open_group(str(tmp_path / "f16.zarr"), mode="r")
    assert made.attrs["key"]["derived_from"] == source.attrs["key_sha256"]
    for split in ("train", "validation", "test"):
        for name in ("layer_02", "layer_02_scale", "length", "token_start", "label"):
            np.testing.assert_array_equal(made[split][name][:], direct[split][name][:])  # compact = direct int8


def test_pca_store_reconstructs_through_the_basis(tiny_bert, tiny_table, tmp_path):
    run_extract(tiny_bert, tiny_table, tmp_path / "f16.zarr", dtype="float32")
    reference = decoded_batches(tmp_path / "f16.zarr")
    errors = {}
    for components in (4, 16, 31):
        out = tmp_path / f"pca{components}.zarr"
        compact(str(tmp_path / "f16.zarr"), str(out), "float16", f"pca:{components}", log=lambda *_: None)
        root = zarr.open_group(str(out), mode="r")
        basis = root["projection"]["layer_02_basis"][:]
        assert root["train"]["layer_02"].shape[1] == components and basis.shape == (components, 32)
        np.testing.assert_allclose(basis @ basis.T, np.eye(components), atol=1e-4)  # orthonormal rows
        got = decoded_batches(out)
        errors[components] = np.mean([relative_error(reference[s][1:], got[s][1:]) for s in reference])
    assert errors[4] > errors[16] > errors[31]  # more components, less error; the basis is a real fit
    compact(str(tmp_path / "f16.zarr"), str(tmp_path / "q.zarr"), "int8", "pca:16", log=lambda *_: None)
    quantized = decoded_batches(tmp_path / "q.zarr")
    assert np.mean([relative_error(reference[s][1:], quantized[s][1:]) for s in reference]) < errors[16] + 0.02


def test_bad_input_is_one_line_exit_2(tiny_bert, tiny_table, tmp_path):
    run_extract(tiny_bert, tiny_table, tmp_path / "f16.zarr")
    runner = CliRunner()
    cases = [
        (["compact", str(tmp_path / "f16.zarr"), "--out", str(tmp_path / "f16.zarr")], "its own source"),
        (["compact", str(tmp_path / "f16.zarr"), "--reduce", "pca:32", "--out", str(tmp_path / "p.zarr")],
         "below the hidden size 32"),
        (["compact", str(tmp_path / "f16.zarr"), "--reduce", "svd:3", "--out", str(tmp_path / "p.zarr")], "pca:K"),
        (["compact", str(tmp_path / "f16.zarr"), "--dtype", "int4", "--out", str(tmp_path / "p.zarr")], "int4"),
        (["extract", "--dtype", "int7", "--out", str(tmp_path / "x.zarr")], "int7"),
        (["compact", str(tmp_path / "f16.zarr"), "--lossy", "bitround:7", "--out", str(tmp_path / "p.zarr")],
         "use --dtype int8 or --dtype fp8"),
        (["fit", "--method", "linear", "--cache", str(tmp_path / "f16.zarr"), "--max-train-samples", "0",
          "--out", str(tmp_path / "m")], "--max-train-samples 0: give at least 1"),
    ]
    for args, expected in cases:
        result = runner.invoke(main, args)
        assert result.exit_code == 2, result.output
        assert expected in result.output and "Traceback" not in result.output
        assert len(result.output.strip().splitlines()) == 1, result.output  # click's usage errors too
    assert not list(tmp_path.glob("p.zarr*")), "a refused compact must leave nothing at --out, not even its lock file"
    # damaged scales (rewritten with a valid checksum, so only the values are wrong): refused, not decoded
    compact(str(tmp_path / "f16.zarr"), str(tmp_path / "c.zarr"), "int8", log=lambda *_: None)
    scales = zarr.open_group(str(tmp_path / "c.zarr"), mode="r+")["train"]["layer_01_scale"]
    scales[:5] = np.inf
    with pytest.raises(InputError, match="layer_01_scale holds damaged scales"):
        decoded_batches(tmp_path / "c.zarr")


def test_layers_every_and_for_methods():
    assert parse_layers("every:2", 5) == [0, 2, 4, 5]
    assert parse_layers("every:3", 6) == [0, 3, 6]
    # lst at its defaults on 6 layers reads H_0, H_2,3,4,6; sherl H_0..H_5
    assert parse_layers("for:lst", 6, hidden_size=32) == [0, 2, 3, 4, 6]
    assert parse_layers("for:lst,sherl", 6, hidden_size=32) == [0, 1, 2, 3, 4, 5, 6]
    assert parse_layers("for:linear", 6, hidden_size=32) == [6]
    for bad in ("every:0", "every:x", "for:nosuch", "for:"):
        with pytest.raises(InputError):
            parse_layers(bad, 6, hidden_size=32)


def test_layer_lists_with_an_empty_item_or_a_repeat_are_refused():
    assert parse_layers(" 3, 0 ", 6) == [0, 3]
    with pytest.raises(InputError, match="use all, last:K"):
        parse_layers("0,,3", 6)  # was read as 0,3
    with pytest.raises(InputError, match="layer 3 is listed twice"):
        parse_layers("3,0,3", 6)  # was read as 0,3
    with pytest.raises(InputError, match="whole number"):
        parse_layers("every:x", 6)


def test_fit_on_a_cache_without_its_layers_names_the_fix(tiny_bert, tiny_table, tmp_path):
    run_extract(tiny_bert, tiny_table, tmp_path / "f.zarr", layers="last:1")
    result = CliRunner().invoke(main, ["fit", "--method", "lst", "--cache", str(tmp_path / "f.zarr"),
                                       "--out", str(tmp_path / "m"), "--epochs", "1"])
    assert result.exit_code == 2
    line = result.output.strip().splitlines()[-1]
    assert "lacks [0]" in line and "--layers for:lst (= 0,2)" in line


def test_fit_runs_unchanged_on_a_compact_store(tiny_bert, tiny_table, tmp_path):
    run_extract(tiny_bert, tiny_table, tmp_path / "f16.zarr")
    compact(str(tmp_path / "f16.zarr"), str(tmp_path / "c.zarr"), "fp8", "pca:8", log=lambda *_: None)
    result = CliRunner().invoke(main, ["fit", "--method", "lst", "--cache", str(tmp_path / "c.zarr"),
                                       "--out", str(tmp_path / "m"), "--epochs", "1", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    info = CliRunner().invoke(main, ["info", str(tmp_path / "c.zarr")])
    assert "relative error" in info.output and "per real token and layer" in info.output
    predicted = CliRunner().invoke(main, ["predict", str(tmp_path / "m"), "--text", "a good film", "--device", "cpu"])
    assert predicted.exit_code == 2 and "projected cache (pca:8)" in predicted.output  # not unprojected features



def test_predict_on_raw_text_matches_evaluate_on_an_int8_cache(tiny_bert, tiny_table, tmp_path):
    """predict rounds the backbone's features through the same int8 codes the side network was trained on."""
    from cachetune.pipeline.data import load_dataset
    from cachetune.stages.training.evaluate import predict_split
    from cachetune.stages.training.predict import load_matching_backbone, predict_texts
    from cachetune.stages.training.side_model import load_side_model

    run_extract(tiny_bert, tiny_table, tmp_path / "c.zarr", dtype="int8")
    result = CliRunner().invoke(main, ["fit", "--method", "linear", "--cache", str(tmp_path / "c.zarr"),
                                       "--out", str(tmp_path / "m"), "--epochs", "1", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    side = load_side_model(tmp_path / "m")
    reader = CacheReader(str(tmp_path / "c.zarr"), "test", side.layers)
    cached, _ = predict_split(side.model, reader)
    dataset = load_dataset(str(tiny_table))
    texts = [dataset.texts[row] for row in reader.group["row"][:]]
    raw = predict_texts(side, load_matching_backbone(side), texts, batch_size=5)
    np.testing.assert_allclose(raw, cached, atol=1e-4)


def test_extract_defaults_to_fp8_close_to_float16(tiny_bert, tiny_table, tmp_path):
    run_extract(tiny_bert, tiny_table, tmp_path / "f16.zarr")  # the test helper asks for float16 explicitly
    out = tmp_path / "default.zarr"
    result = CliRunner().invoke(main, ["extract", "--backbone", str(tiny_bert), "--data", str(tiny_table), "--out", str(out),
                                       "--block-tokens", "128", "--chunk-tokens", "32", "--batch-size", "8",
                                       "--max-length", "24", "--sort-tokens", "256"])
    assert result.exit_code == 0, result.output
    assert zarr.open_group(str(out), mode="r").attrs["key"]["dtype"] == "fp8"
    reference, got = decoded_batches(tmp_path / "f16.zarr"), decoded_batches(out)
    assert reference.keys() == got.keys()
    assert all(relative_error(values, got[sample]) < 0.05 for sample, values in reference.items())
    facts = describe_store(str(out))
    # fewer bytes (0.515 of float16's at real sizes, BENCHMARKS.md; this 32-wide store is dominated by its scales)
    assert facts["bytes_per_token_layer"] < 0.8 * describe_store(str(tmp_path / "f16.zarr"))["bytes_per_token_layer"]
