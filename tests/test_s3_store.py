"""Stores on a real S3 API (moto's server in its own process): every command that reads or writes a store runs
against an s3:// URL given `--storage-option endpoint_url=...`, and writes the same bytes as on local disk."""
from __future__ import annotations

import json

import pytest

from tests.conftest import sentiment_rows, write_table
from tests.s3_server import s3_bucket, s3_options, s3_server  # noqa: F401  (fixtures)
from tests.test_extract import cli, crash_on_third_block

SMALL = ["--block-tokens", 128, "--chunk-tokens", 32, "--batch-size", 8, "--max-length", 24, "--sort-tokens", 256,
         "--dtype", "float16"]


def store_objects(url: str, endpoint: str | None = None) -> dict[str, bytes]:
    """Every file or object of the store at `url` by its path within the store -> its bytes; left out of the root's
    zarr.json: `extract_seconds` (a timing, different in every run) and a compact store's source path."""
    from fsspec.core import url_to_fs

    fs, root = url_to_fs(url, **({"endpoint_url": endpoint, "skip_instance_cache": True} if endpoint else {}))
    objects = {path[len(root.rstrip("/")) + 1:]: fs.cat_file(path) for path in fs.find(root)}
    metadata = json.loads(objects["zarr.json"])
    metadata["attributes"].pop("extract_seconds", None)
    metadata["attributes"].get("derived_from", {}).pop("path", None)
    objects["zarr.json"] = json.dumps(metadata).encode()
    return objects


def extract(tiny_bert, table, out, *more):
    return cli("extract", "--backbone", tiny_bert, "--data", table, "--out", out, *SMALL, *more)


@pytest.fixture()
def table(tmp_path):
    return write_table(tmp_path / "data.csv", sentiment_rows(60))


def test_every_store_command_runs_on_s3_and_the_store_equals_a_local_one(tiny_bert, table, tmp_path, s3_server, s3_bucket):
    url, options = f"{s3_bucket}/features.zarr", s3_options(s3_server)
    written = extract(tiny_bert, table, url, *options)
    assert written.exit_code == 0 and f"wrote {url}" in written.output, written.output
    assert extract(tiny_bert, table, tmp_path / "local.zarr").exit_code == 0
    remote, local = store_objects(url, s3_server), store_objects(str(tmp_path / "local.zarr"))
    assert sorted(remote) == sorted(local) and "zarr.json" in remote
    assert [name for name in local if remote[name] != local[name]] == []  # arrays and attributes, byte for byte
    assert s3_server not in json.dumps(json.loads(remote["zarr.json"]))  # the endpoint is not in the store's key

    again = extract(tiny_bert, table, url, *options)
    assert again.exit_code == 0 and "is up to date" in again.output, again.output

    info = cli("info", url, "--json", "--stats", *options)
    local_info = cli("info", tmp_path / "local.zarr", "--json", "--stats")
    assert info.exit_code == 0, info.output
    facts, local_facts = json.loads(info.stdout), json.loads(local_info.stdout)
    assert facts.pop("path") == url and local_facts.pop("path")
    for size in ("bytes_on_disk", "bytes_per_token_layer", "bytes_per_sample", "ratio_to_padded_fp32"):
        # the root's zarr.json holds a timing (extract_seconds) whose digits differ by a byte or two
        assert facts.pop(size) == pytest.approx(local_facts.pop(size), rel=1e-3)
    assert facts == local_facts
    assert cli("info", url, *options).exit_code == 0

    fitted = cli("fit", "--method", "lst", "--cache", url, "--out", tmp_path / "m", "--epochs", 1, "--device", "cpu",
                 *options)
    assert fitted.exit_code == 0, fitted.output
    evaluated = cli("evaluate", tmp_path / "m", "--device", "cpu", *options)
    assert evaluated.exit_code == 0 and f"scoring the cache at {url}" in evaluated.output, evaluated.output
    local_fit = cli("fit", "--method", "lst", "--cache", tmp_path / "local.zarr", "--out", tmp_path / "local-m",
                    "--epochs", 1, "--device", "cpu")
    assert json.loads(evaluated.stdout) == json.loads(cli("evaluate", tmp_path / "local-m", "--device", "cpu").stdout)
    assert local_fit.exit_code == 0
    predicted = cli("predict", tmp_path / "m", "--text", "a good film", "--device", "cpu")
    assert predicted.exit_code == 0 and json.loads(predicted.stdout.splitlines()[0])

    compacted = cli("compact", url, "--out", f"{s3_bucket}/fp8.zarr", *options)
    assert compacted.exit_code == 0, compacted.output
    assert cli("compact", tmp_path / "local.zarr", "--out", tmp_path / "fp8.zarr").exit_code == 0
    assert store_objects(f"{s3_bucket}/fp8.zarr", s3_server) == store_objects(str(tmp_path / "fp8.zarr"))


def test_a_crash_mid_extract_on_s3_resumes_to_the_same_store(tiny_bert, table, tmp_path, s3_server, s3_bucket,
                                                              monkeypatch):
    url, options = f"{s3_bucket}/features.zarr", s3_options(s3_server)
    restore = crash_on_third_block(monkeypatch)
    crashed = extract(tiny_bert, table, url, *options)
    assert crashed.exit_code == 130, crashed.output
    assert json.loads(store_objects(url, s3_server)["zarr.json"])["attributes"]["status"] == "incomplete"
    refused = cli("fit", "--method", "lst", "--cache", url, "--out", tmp_path / "m", *options)
    assert refused.exit_code == 2 and "incomplete" in refused.output
    restore()
    resumed = extract(tiny_bert, table, url, *options)
    assert resumed.exit_code == 0 and f"wrote {url}" in resumed.output, resumed.output
    assert extract(tiny_bert, table, tmp_path / "local.zarr").exit_code == 0
    assert store_objects(url, s3_server) == store_objects(str(tmp_path / "local.zarr"))


def test_two_worker_processes_write_the_same_store_on_s3(tiny_bert, table, tmp_path, s3_server, s3_bucket):
    url = f"{s3_bucket}/features.zarr"
    written = extract(tiny_bert, table, url, "--workers", 2, *s3_options(s3_server))
    assert written.exit_code == 0, written.output
    assert extract(tiny_bert, table, tmp_path / "local.zarr").exit_code == 0
    assert store_objects(url, s3_server) == store_objects(str(tmp_path / "local.zarr"))


def test_storage_options_are_for_urls_and_need_key_value(tiny_bert, table, tmp_path):
    local = cli("info", tmp_path / "f.zarr", "--storage-option", "endpoint_url=http://127.0.0.1:9")
    assert local.exit_code == 2 and "is local: leave the option out" in local.output
    malformed = cli("info", "s3://bucket/f.zarr", "--storage-option", "endpoint_url")
    assert malformed.exit_code == 2 and "give KEY=VALUE" in malformed.output
