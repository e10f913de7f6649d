"""A store on S3 that cannot be reached: a wrong endpoint, missing credentials or a missing bucket is one line
naming the URL and what failed (exit 2), within seconds: never a hang, a traceback, or a misleading "no cache"."""
from __future__ import annotations

import time

import pytest

from tests.conftest import sentiment_rows, write_table
from tests.s3_server import free_port, s3_bucket, s3_options, s3_server  # noqa: F401  (fixtures)
from tests.test_extract import assert_one_line_error, cli
from tests.test_s3_store import SMALL


@pytest.fixture()
def no_credentials(monkeypatch, tmp_path):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


def test_a_wrong_endpoint_is_one_line_naming_the_url_and_endpoint(tiny_bert, tmp_path, s3_server, s3_bucket):
    table = write_table(tmp_path / "data.csv", sentiment_rows(20))
    url, nowhere = f"{s3_bucket}/features.zarr", f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    for command in (["info", url], ["fit", "--cache", url], ["extract", "--backbone", tiny_bert, "--data", table,
                                                             "--out", url, *SMALL]):
        result = cli(*command, "--storage-option", f"endpoint_url={nowhere}")
        assert_one_line_error(result, f"cannot open {url} (endpoint {nowhere}): the endpoint did not answer")
    assert time.monotonic() - started < 90


def test_missing_credentials_are_one_line_naming_the_fix(s3_server, s3_bucket, no_credentials):
    url = f"{s3_bucket}/features.zarr"
    result = cli("info", url, *s3_options(s3_server))
    assert_one_line_error(result, f"cannot open {url} (endpoint {s3_server}): no credentials found; set AWS_ACCESS_KEY_ID")


def test_a_missing_bucket_is_one_line(s3_server):
    result = cli("fit", "--cache", "s3://no-such-bucket-here/features.zarr", *s3_options(s3_server))
    assert_one_line_error(result, "there is no bucket 'no-such-bucket-here' there")
