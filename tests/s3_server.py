"""A real S3 API for the tests: moto's standalone server in its own process on 127.0.0.1, and a fresh bucket per test.

Commands reach it with `--storage-option endpoint_url=...` (S3_OPTIONS) and the dummy credentials that the
`s3_server` fixture puts in the environment. Tests that use it are skipped when moto[server] or s3fs is missing.
"""
from __future__ import annotations

import itertools
import socket
import subprocess
import sys
import time

import pytest

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
_buckets = itertools.count()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(timeout_s: float = 60) -> tuple[subprocess.Popen, str]:
    """(process, endpoint URL) of a moto S3 server started on a free port of 127.0.0.1 (also used by
    bench/remote_read.py); RuntimeError when it does not answer within timeout_s. The caller stops the process."""
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return process, f"http://127.0.0.1:{port}"
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                raise RuntimeError(f"moto's S3 server did not start on port {port}") from None
            time.sleep(0.1)


@pytest.fixture(scope="session")
def s3_server():
    """The endpoint URL of a moto S3 server (a separate process), with dummy credentials in the environment."""
    pytest.importorskip("s3fs")
    pytest.importorskip("flask", reason="moto's server needs moto[server]")
    pytest.importorskip("moto.server")
    try:
        process, endpoint = start_server()
    except RuntimeError as error:
        pytest.fail(str(error))
    with pytest.MonkeyPatch.context() as patch:
        for name, value in CREDENTIALS.items():
            patch.setenv(name, value)
        for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
            patch.delenv(name, raising=False)
        yield endpoint
    process.terminate()
    process.wait(10)


@pytest.fixture()
def s3_bucket(s3_server) -> str:
    """s3://NAME of a new empty bucket on the server."""
    import boto3

    name = f"cachetune-test-{next(_buckets)}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    return f"s3://{name}"


def s3_options(endpoint: str) -> list[str]:
    """The command-line options that point a command at the server."""
    return ["--storage-option", f"endpoint_url={endpoint}"]
