"""Extraction on a dask cluster, stores at fsspec URLs, and `info --stats`."""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from cachetune.cache.info import describe_store
from cachetune.cache.layout import layer_array_name
from cachetune.cache.reader import CacheReader
from cachetune.pipeline.data import load_dataset
from cachetune.stages.extraction import distributed_extract
from cachetune.stages.backbones import load_backbone
from cachetune.stages.extraction.extract import ExtractSettings, extract
from tests.conftest import sentiment_rows, write_table
from tests.test_extract import assert_one_line_error, cli

SMALL = dict(block_tokens=128, chunk_tokens=32, batch_size=8, max_length=24, sort_tokens=256)
CLI_SMALL = ["--block-tokens", 128, "--chunk-tokens", 32, "--batch-size", 8, "--max-length", 24, "--sort-tokens", 256]


def settings(out, **overrides) -> ExtractSettings:
    return ExtractSettings(out=str(out), **{**SMALL, **overrides})


def run_local(model_folder, table, out, **overrides) -> str:
    return extract(load_backbone(str(model_folder)), load_dataset(str(table)), settings(out, **overrides), log=lambda *_: None)


def run_cluster(model_folder, table, out, scheduler, blocks_per_task=None, before_write=None, **overrides) -> str:
    return distributed_extract.extract_distributed(
        load_backbone(str(model_folder)), load_dataset(str(table)), settings(out, **overrides), scheduler=scheduler,
        log=lambda *_: None, blocks_per_task=blocks_per_task, before_write=before_write)


def store_contents(path) -> tuple[dict, dict[str, np.ndarray]]:
    root = zarr.open_group(str(path), mode="r")
    timing = ("extract_seconds",)  # how long this run took: not the store's content
    attrs = {"": {k: v for k, v in root.attrs.items() if k not in timing},
             **{split: dict(root[split].attrs) for split in root.group_keys()}}
    arrays = {f"{split}/{name}": root[split][name][:] for split in root.group_keys() for name in root[split].array_keys()}
    return attrs, arrays


def assert_same_store(expected, actual):
    expected_attrs, expected_arrays = store_contents(expected)
    actual_attrs, actual_arrays = store_contents(actual)
    assert expected_attrs == actual_attrs
    assert expected_arrays.keys() == actual_arrays.keys()
    for name, values in expected_arrays.items():
        assert values.dtype == actual_arrays[name].dtype, name
        np.testing.assert_array_equal(values, actual_arrays[name], err_msg=name)
    for split in expected_attrs:
        if split:
            assert actual_arrays[f"{split}/done"].all(), split


@pytest.fixture(scope="module", autouse=True)
def threads_like_a_worker(one_thread):
    """This process uses as many torch threads as each of two workers on this machine does: CPU matrix products
    may round differently with another thread count, and the stores are compared byte for byte."""
    torch.set_num_threads(max(1, distributed_extract.available_cpus() // 2))
    yield


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    return write_table(tmp_path_factory.mktemp("data") / "data.csv", sentiment_rows(240))


@pytest.fixture(scope="module")
def reference(tiny_bert, table, tmp_path_factory):
    """The single-process store every distributed one must equal."""
    out = tmp_path_factory.mktemp("reference") / "f.zarr"
    assert run_local(tiny_bert, table, out) == "written"
    return out


@pytest.fixture(scope="module")
def scheduler():
    """A two-worker cluster shared by the tests that pass --scheduler."""
    from distributed import LocalCluster

    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None)
    try:
        yield cluster.scheduler_address
    finally:
        cluster.close()


def test_two_workers_write_the_same_store_as_one_process(tiny_bert, table, reference, tmp_path):
    out = tmp_path / "f.zarr"
    result = cli("extract", "--backbone", tiny_bert, "--data", table, "--out", out, *CLI_SMALL, "--workers", 2)
    assert result.exit_code == 0, result.output
    assert "wrote" in result.output
    assert_same_store(reference, out)
    # The same bytes on disk too: the same shards, compressed the same way.
    files = sorted(p.relative_to(reference) for p in reference.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    for name in files:
        if name.name != "zarr.json":
            assert (reference / name).read_bytes() == (out / name).read_bytes(), name
    again = cli("extract", "--backbone", tiny_bert, "--data", table, "--out", out, *CLI_SMALL, "--workers", 2)
    assert again.exit_code == 0 and "up to date" in again.output, again.output


def kill_worker_once(marker: str, split: str, target: int, store: str, block_split: str, block: int) -> None:
    """Runs on a worker before a block is written: the first time it meets `target`, it writes half the block
    (garbage in one layer's shard, no done flag) and kills its own process."""
    if block_split != split or block != target or os.path.exists(marker):
        return
    Path(marker).write_text(str(os.getpid()))
    group = zarr.open_group(store, mode="r+")[split]
    rows = slice(block * SMALL["block_tokens"], (block + 1) * SMALL["block_tokens"])
    group[layer_array_name(0)][rows] = 7.0
    os._exit(1)


def test_a_worker_killed_mid_task_loses_and_duplicates_nothing(tiny_bert, table, reference, scheduler, tmp_path):
    out = tmp_path / "f.zarr"
    marker = tmp_path / "killed-once"
    # Tasks of 3 blocks: block 4 is the second of its task, so the first attempt dies after writing block 3.
    hook = functools.partial(kill_worker_once, str(marker), "train", 4, str(out))
    assert run_cluster(tiny_bert, table, out, scheduler, blocks_per_task=3, before_write=hook) == "written"
    assert marker.exists(), "the worker was never killed"
    assert_same_store(reference, out)


def test_a_crashed_single_process_run_resumes_on_a_cluster(tiny_bert, table, reference, scheduler, tmp_path, monkeypatch):
    from cachetune.cache import writer

    original, calls = writer.SplitWriter.write_block, []

    def crash_on_third_block(self, block, buffer):
        calls.append(block)
        if len(calls) == 3:
            raise KeyboardInterrupt("simulated kill")
        original(self, block, buffer)

    monkeypatch.setattr(writer.SplitWriter, "write_block", crash_on_third_block)
    with pytest.raises(KeyboardInterrupt):
        run_local(tiny_bert, table, tmp_path / "f.zarr")
    monkeypatch.setattr(writer.SplitWriter, "write_block", original)
    assert zarr.open_group(str(tmp_path / "f.zarr")).attrs["status"] == "incomplete"
    assert run_cluster(tiny_bert, table, tmp_path / "f.zarr", scheduler) == "written"
    assert_same_store(reference, tmp_path / "f.zarr")


def test_a_file_url_store_works_for_extract_info_and_the_reader(tiny_bert, table, reference, scheduler, tmp_path):
    url = (tmp_path / "f.zarr").as_uri()
    assert url.startswith("file:///")
    assert run_cluster(tiny_bert, table, url, scheduler) == "written"
    assert_same_store(reference, url)
    facts = describe_store(url)
    assert facts["status"] == "complete"
    assert facts["bytes_on_disk"] == sum(p.stat().st_size for p in (tmp_path / "f.zarr").rglob("*") if p.is_file())
    result = cli("info", url)
    assert result.exit_code == 0 and "[complete]" in result.output, result.output
    local, remote = CacheReader(str(reference), "train"), CacheReader(url, "train")
    for a, b in zip(local.batches(16), remote.batches(16)):
        assert np.array_equal(a.features.numpy(), b.features.numpy()) and np.array_equal(a.index, b.index)
    # Single-process extraction into a URL, and --overwrite removing a URL store made with other settings.
    assert run_local(tiny_bert, table, url) == "complete"
    assert run_local(tiny_bert, table, url, max_length=16, overwrite=True) == "written"
    assert describe_store(url)["max_length"] == 16


def real_token_rows(group, layer: int) -> np.ndarray:
    values = group[layer_array_name(layer)][:]
    starts, lengths = group["token_start"][:], group["length"][:]
    return np.concatenate([values[s:s + n] for s, n in zip(starts, lengths)])


def test_info_stats_equal_numpy_over_real_tokens_of_a_float32_store(tiny_bert, table, tmp_path):
    out = tmp_path / "f.zarr"
    run_local(tiny_bert, table, out, dtype="float32", layers="0,2")
    root = zarr.open_group(str(out), mode="r+")
    train = root["train"]
    # Values beyond float16 in two real tokens, and in the padding gap of a block (which must not count).
    starts, lengths = train["token_start"][:], train["length"][:]
    first = int(starts[0])
    train[layer_array_name(2)][first:first + 2] = 1e5
    block = first // SMALL["block_tokens"]
    used = lengths[starts // SMALL["block_tokens"] == block].sum()
    gap = block * SMALL["block_tokens"] + int(used)
    assert gap < (block + 1) * SMALL["block_tokens"], "the block has no padding gap"
    train[layer_array_name(2)][gap:(block + 1) * SMALL["block_tokens"]] = -9e5

    result = cli("info", out, "--stats", "--json")
    assert result.exit_code == 0, result.output
    stats = {row["layer"]: row for row in json.loads(result.output)["stats"]}
    assert sorted(stats) == [0, 2]
    for layer, row in stats.items():
        values = np.concatenate([real_token_rows(root[s], layer) for s in sorted(root.group_keys())]).astype(np.float64)
        assert row["tokens"] == len(values)
        np.testing.assert_allclose(row["mean"], values.mean(), rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(row["std"], values.std(), rtol=1e-9)
        assert row["max_abs"] == np.abs(values).max()
        assert row["fp16_overflow_fraction"] == np.count_nonzero(np.abs(values) > 65504) / values.size
    assert stats[2]["max_abs"] == 1e5 and stats[2]["fp16_overflow_fraction"] > 0
    assert stats[0]["fp16_overflow_fraction"] == 0
    table_output = cli("info", out, "--stats")
    assert table_output.exit_code == 0 and "max |x|" in table_output.output, table_output.output


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.parametrize("options, fragment", [
    (["--workers", 0], "at least 1 worker"),
    (["--workers", 2, "--scheduler", "tcp://127.0.0.1:1"], "not both"),
    (["--scheduler", "unreachable"], "cannot reach the dask scheduler"),
])
def test_bad_cluster_options_exit_2_with_one_line(options, fragment, tiny_bert, table, tmp_path, monkeypatch):
    monkeypatch.setattr(distributed_extract, "SCHEDULER_TIMEOUT_S", 1)
    options = [f"tcp://127.0.0.1:{free_port()}" if o == "unreachable" else o for o in options]
    out = tmp_path / "f.zarr"
    assert_one_line_error(cli("extract", "--backbone", tiny_bert, "--data", table, "--out", out, *CLI_SMALL, *options),
                          fragment)
    assert not out.exists()


def saved_image_backbone(family: str, tmp_path) -> Path:
    """A tiny random image backbone of `family` saved with its processor, and tmp_path/pets: 8 PNGs per class."""
    from tests.test_vision import make_backbone, write_pngs

    torch.manual_seed(0)
    model, processor = make_backbone(family)
    folder = tmp_path / family
    model.eval().save_pretrained(folder)
    processor.save_pretrained(folder)
    write_pngs(tmp_path / "pets", per_class=8)
    return folder


def test_images_on_a_cluster_equal_one_process(scheduler, tmp_path):
    """Images travel per task as only the rows of its blocks (file paths here)."""
    folder = saved_image_backbone("vit", tmp_path)
    options = dict(block_tokens=64, chunk_tokens=32, max_length=17)
    assert run_local(folder, tmp_path / "pets", tmp_path / "local.zarr", **options) == "written"
    assert run_cluster(folder, tmp_path / "pets", tmp_path / "cluster.zarr", scheduler, **options) == "written"
    assert_same_store(tmp_path / "local.zarr", tmp_path / "cluster.zarr")


def test_image_size_reaches_the_workers(scheduler, tmp_path):
    """--image-size 48 on a DINOv2 (patch 8): 36 patches + CLS per image on the cluster as in one process."""
    folder = saved_image_backbone("dinov2", tmp_path)
    options = settings(tmp_path / "local.zarr", block_tokens=128, chunk_tokens=32, max_length=37)
    dataset = load_dataset(str(tmp_path / "pets"))
    assert extract(load_backbone(str(folder), image_size=48), dataset, options, log=lambda *_: None) == "written"
    assert distributed_extract.extract_distributed(
        load_backbone(str(folder), image_size=48), dataset, dataclasses.replace(options, out=str(tmp_path / "cluster.zarr")),
        scheduler=scheduler, log=lambda *_: None) == "written"
    assert zarr.open_group(str(tmp_path / "cluster.zarr"), mode="r").attrs["max_length"] == 37
    assert_same_store(tmp_path / "local.zarr", tmp_path / "cluster.zarr")
