"""One writer per store on S3: a lease object beside the store, taken with a conditional write, renewed while the
writer runs, taken over once a killed writer's lease runs out; tested against moto's S3 server in its own process."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from cachetune.cache.storage_options import storage_options
from cachetune.cache.store_lock import store_lock
from tests.conftest import sentiment_rows, write_table
from tests.s3_server import s3_bucket, s3_options, s3_server  # noqa: F401  (fixtures)
from tests.test_extract import cli
from tests.test_s3_store import SMALL, store_objects


@pytest.fixture()
def table(tmp_path):
    return write_table(tmp_path / "data.csv", sentiment_rows(60))


@pytest.fixture()
def short_lease(monkeypatch):
    monkeypatch.setenv("CACHETUNE_LOCK_LEASE_SECONDS", "2")


def extract_command(tiny_bert, table, out, endpoint) -> list[str]:
    return [sys.executable, "-m", "cachetune.pipeline.cli", "extract", "--backbone", str(tiny_bert), "--data", str(table),
            "--out", out, *map(str, SMALL), *s3_options(endpoint)]


def wait_for(condition, what: str, seconds: float = 60):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.1)


def lease_object(bucket: str, endpoint: str, store: str = "features.zarr"):
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint)
    try:
        return client.head_object(Bucket=bucket.removeprefix("s3://"), Key=f"{store}.lock")
    except client.exceptions.ClientError:
        return None


def test_a_second_writer_names_the_holder_waits_and_then_writes(tiny_bert, table, tmp_path, s3_server, s3_bucket):
    url, lines = f"{s3_bucket}/features.zarr", []
    stderr = tmp_path / "second.err"
    with storage_options([url], {"endpoint_url": s3_server}), store_lock(url, log=lines.append):
        assert lease_object(s3_bucket, s3_server) is not None and lines == []
        with open(stderr, "w") as err:
            second = subprocess.Popen(extract_command(tiny_bert, table, url, s3_server), stdout=subprocess.PIPE,
                                      stderr=err, text=True)
        wait_for(lambda: "waiting" in stderr.read_text() or second.poll() is not None, "the second run waited")
        assert second.poll() is None, stderr.read_text()
    assert second.wait(120) == 0, stderr.read_text()
    waited = [line for line in stderr.read_text().splitlines() if "waiting" in line]
    assert len(waited) == 1 and f"waiting: {url} is being written by process {os.getpid()} on " in waited[0]
    assert f"wrote {url}" in second.stdout.read()
    assert lease_object(s3_bucket, s3_server) is None  # released when the run ended


KILLED_WRITER = textwrap.dedent("""
    import os, signal, sys
    from cachetune.cache import writer
    from cachetune.pipeline.cli import main

    original, done = writer.SplitWriter.write_block, []

    def killed_after_two_blocks(self, block, buffer):
        if len(done) == 2:
            os.kill(os.getpid(), signal.SIGKILL)
        original(self, block, buffer)
        done.append(block)

    writer.SplitWriter.write_block = killed_after_two_blocks
    main(sys.argv[1:])
""")


KILLED_LEASE_SECONDS = 15


def test_a_killed_writers_lease_runs_out_and_the_rerun_resumes(tiny_bert, table, tmp_path, s3_server, s3_bucket,
                                                               short_lease):
    url = f"{s3_bucket}/features.zarr"
    # The killed writer's lease is long enough that the rerun surely meets it unexpired on a loaded machine (the
    # lease's own length decides when it expires); the rerun then waits for it to run out.
    killed = subprocess.run([sys.executable, "-c", KILLED_WRITER, *extract_command(tiny_bert, table, url, s3_server)[3:]],
                            capture_output=True, text=True, timeout=120,
                            env={**os.environ, "CACHETUNE_LOCK_LEASE_SECONDS": str(KILLED_LEASE_SECONDS)})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    lease = lease_object(s3_bucket, s3_server)
    assert lease is not None  # a kill -9 leaves its lease behind
    holder = json.loads(lease["Metadata"]["owner"])
    assert holder["lease_seconds"] == KILLED_LEASE_SECONDS and "extract" in holder["command"]

    resumed = cli("extract", "--backbone", tiny_bert, "--data", table, "--out", url, *SMALL, *s3_options(s3_server))
    assert resumed.exit_code == 0 and f"wrote {url}" in resumed.output, resumed.output
    assert f"is being written by process {holder['pid']} on " in resumed.output  # it waited for the lease to run out
    assert "resuming" in resumed.output
    assert cli("extract", "--backbone", tiny_bert, "--data", table, "--out", tmp_path / "local.zarr", *SMALL).exit_code == 0
    assert store_objects(url, s3_server) == store_objects(str(tmp_path / "local.zarr"))


def test_a_held_lease_is_renewed_and_a_taken_over_lease_goes_to_one_run(s3_server, s3_bucket, short_lease):
    from cachetune.cache.lease_lock import Lease
    from cachetune.cache.writer import store_fs

    url, lines = f"{s3_bucket}/features.zarr", []
    with storage_options([url], {"endpoint_url": s3_server}):
        fs, path = store_fs(url)
        bucket, key, _ = fs.split_path(path + ".lock")
        rival = Lease(fs, bucket, key, {"pid": 1, "host": "elsewhere", "command": "rival", "started": 0})
        with store_lock(url, log=lines.append):
            for _ in range(4):  # twice the 2 s lease: it is renewed, so the rival never gets it
                assert rival.try_acquire()["pid"] == os.getpid()
                time.sleep(1)
        assert lines == []
        # a lease left by a dead writer: two successors read it, then both try to take it over; one wins
        dead = Lease(fs, bucket, key, {"pid": 2, "host": "gone", "command": "dead", "started": 0})
        assert dead.try_acquire() is None
        time.sleep(3.5)
        owner, etag, expired = rival.holder()
        assert expired and owner["pid"] == 2
        first = Lease(fs, bucket, key, {"pid": 3, "host": "a", "command": "a", "started": 0})
        assert [first._put(IfMatch=etag), rival._put(IfMatch=etag)] == [True, False]


def test_a_reader_during_a_write_sees_an_unfinished_store_without_waiting(tiny_bert, table, tmp_path, s3_server,
                                                                         s3_bucket, monkeypatch):
    from cachetune.cache import writer

    url, options = f"{s3_bucket}/features.zarr", s3_options(s3_server)
    original = writer.SplitWriter.write_block
    seen = {}

    def read_while_writing(self, block, buffer):
        if not seen:  # the writer holds the lease here, with its first blocks written
            seen["info"] = cli("info", url, "--json", *options)
            seen["fit"] = cli("fit", "--method", "lst", "--cache", url, "--out", tmp_path / "m", *options)
        original(self, block, buffer)

    monkeypatch.setattr(writer.SplitWriter, "write_block", read_while_writing)
    written = cli("extract", "--backbone", tiny_bert, "--data", table, "--out", url, *SMALL, *options)
    assert written.exit_code == 0, written.output
    assert seen["info"].exit_code == 0 and json.loads(seen["info"].stdout)["status"] == "incomplete"
    assert seen["fit"].exit_code == 2 and "incomplete; rerun the same `pipeline extract`" in seen["fit"].output
    assert "waiting" not in seen["info"].output + seen["fit"].output


def test_a_store_at_a_url_that_cannot_be_locked_says_so_in_one_line():
    lines = []
    with store_lock("memory://bucket/features.zarr", log=lines.append):
        pass
    assert len(lines) == 1 and lines[0].startswith("warning: cannot lock memory://bucket/features.zarr")
    assert "make sure this run is its only writer" in lines[0]


def test_a_stalled_writer_whose_lease_was_taken_over_stops(s3_server, s3_bucket, short_lease):
    """Another run takes the lease while this one is stalled: at its next renewal this run says so in one line and
    stops as Ctrl-C would (KeyboardInterrupt in the main thread), instead of writing beside the new holder."""
    from cachetune.cache.lease_lock import Lease
    from cachetune.cache.writer import store_fs

    url, lines = f"{s3_bucket}/features.zarr", []
    with storage_options([url], {"endpoint_url": s3_server}):
        fs, path = store_fs(url)
        bucket, key, _ = fs.split_path(path + ".lock")
        rival = Lease(fs, bucket, key, {"pid": 1, "host": "elsewhere", "command": "rival", "started": 0})
        with pytest.raises(KeyboardInterrupt):
            with store_lock(url, log=lines.append):
                assert rival._put()  # the takeover a successor makes once this run's lease looked expired
                time.sleep(10)  # renewals every 2/3 s: the first one after the takeover stops the run
        assert len(lines) == 1 and "was taken over by another run while this one was stalled" in lines[0]
        assert rival.holder()[0]["pid"] == 1  # the new holder's lease is left alone
