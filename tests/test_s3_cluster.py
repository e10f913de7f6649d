"""`pipeline extract --scheduler` on a cluster of separate processes, as on separate machines: a `dask scheduler`
and two `dask worker` processes started by hand with their own environment (credentials, no storage options), a
store on S3 (moto's server), and a worker killed with SIGKILL in the middle of a task."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import sentiment_rows, write_table
from tests.s3_server import CREDENTIALS, free_port, s3_bucket, s3_options, s3_server  # noqa: F401  (fixtures)
from cachetune.cache.errors import InputError
from cachetune.stages.extraction.distributed_extract import BackboneSpec, available_cpus, worker_backbone
from tests.test_extract import cli
from tests.test_s3_store import store_objects

pytest.importorskip("distributed.cli.dask_worker", reason="the dask scheduler and worker commands need distributed")

REPO = Path(__file__).resolve().parents[1]
SMALL = ["--block-tokens", 128, "--chunk-tokens", 32, "--batch-size", 8, "--max-length", 24, "--sort-tokens", 256,
         "--dtype", "float16"]
HOLD_MARKER = "CACHETUNE_TEST_HOLD_MARKER"  # a worker whose environment names a file may hold a block (dask_setup)
START_TIMEOUT_S = 60


def machine_environment(credentials: bool = True, **more) -> dict[str, str]:
    """What a process on another machine would have: this checkout importable, offline models, S3 credentials (or
    none, and no instance metadata to look them up in), and none of the storage options the `pipeline` command was
    given."""
    keep = ("PATH", "HOME", "LANG", "TMPDIR")
    return {**{name: os.environ[name] for name in keep if name in os.environ},
            **(CREDENTIALS if credentials else {"AWS_EC2_METADATA_DISABLED": "true"}),
            "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", **more}


def start(command: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    """A process in its own session (so it and its children can be killed together), its output in `log`."""
    with open(log, "wb") as stream:
        return subprocess.Popen(command, env=env, cwd=REPO, stdout=stream, stderr=subprocess.STDOUT,
                                start_new_session=True)


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(process.pid, signal.SIGKILL)  # the worker processes a nanny started, if any are left
    except ProcessLookupError:
        pass
    process.wait()


@contextmanager
def dask_cluster(folder: Path, hold_marker: Path | None = None, credentials: bool = True):
    """tcp://127.0.0.1:PORT of a `dask scheduler` with two `dask worker` processes (one thread each) attached;
    hold_marker: see dask_setup; credentials: whether the workers have S3 credentials."""
    from distributed import Client

    address = f"tcp://127.0.0.1:{free_port()}"
    processes = []
    try:
        processes.append(start([sys.executable, "-m", "dask", "scheduler", "--host", "127.0.0.1", "--port",
                                address.rsplit(":", 1)[1], "--no-dashboard"], machine_environment(), folder / "scheduler.log"))
        worker_env = machine_environment(credentials, **({HOLD_MARKER: str(hold_marker)} if hold_marker else {}))
        for name in ("a", "b"):
            processes.append(start([sys.executable, "-m", "dask", "worker", address, "--nthreads", "1", "--nworkers", "1",
                                    "--name", name, "--no-dashboard", "--local-directory", str(folder / name),
                                    "--preload", "tests.test_s3_cluster"], worker_env, folder / f"worker-{name}.log"))
        with Client(address, timeout=START_TIMEOUT_S) as client:
            client.wait_for_workers(2, timeout=START_TIMEOUT_S)
        yield address
    finally:
        for process in reversed(processes):
            stop(process)


def dask_setup(worker) -> None:
    """Run by `dask worker --preload tests.test_s3_cluster`: when the worker's environment names a marker file, the
    first worker to write its second block claims the marker, writes garbage into that block's first layer (a
    write cut short), records its process id in `<marker>.pid` and waits there to be killed."""
    marker = os.environ.get(HOLD_MARKER)
    if not marker:
        return
    from cachetune.cache import writer

    original, written = writer.SplitWriter.write_block, []

    def write_block_or_hold(self, block, buffer):
        written.append(block)
        if len(written) == 2:
            try:
                os.close(os.open(marker, os.O_CREAT | os.O_EXCL))
            except FileExistsError:  # another worker was held already
                pass
            else:
                self.arrays[0][block * self.plan.block_tokens:(block + 1) * self.plan.block_tokens] = 7.0
                Path(marker + ".tmp").write_text(str(os.getpid()))
                os.replace(marker + ".tmp", marker + ".pid")
                time.sleep(300)
        original(self, block, buffer)

    writer.SplitWriter.write_block = write_block_or_hold


def pipeline(*args) -> list[str]:
    return [sys.executable, "-m", "cachetune.pipeline.cli", *map(str, args)]


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    return write_table(tmp_path_factory.mktemp("data") / "data.csv", sentiment_rows(240))


@pytest.fixture(scope="module")
def reference(tiny_bert, table, tmp_path_factory):
    """Objects of the store one process writes on local disk with as many torch threads as each worker uses (the
    CPUs shared by the two workers on this host: CPU matrix products may round differently with another count)."""
    out = tmp_path_factory.mktemp("reference") / "f.zarr"
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, available_cpus() // 2))
    try:
        done = cli("extract", "--backbone", tiny_bert, "--data", table, "--out", out, *SMALL)
    finally:
        torch.set_num_threads(threads)
    assert done.exit_code == 0, done.output
    return store_objects(str(out))


def extract_on(scheduler: str, tiny_bert, table, url: str, endpoint: str) -> list[str]:
    return pipeline("extract", "--backbone", tiny_bert, "--data", table, "--out", url, *SMALL,
                    "--scheduler", scheduler, *s3_options(endpoint))


def test_separate_worker_processes_write_the_same_store_on_s3(tiny_bert, table, reference, s3_server, s3_bucket,
                                                              tmp_path):
    url = f"{s3_bucket}/features.zarr"
    with dask_cluster(tmp_path) as scheduler:
        done = subprocess.run(extract_on(scheduler, tiny_bert, table, url, s3_server), env=machine_environment(),
                              cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert f"wrote {url}" in done.stdout + done.stderr
    assert store_objects(url, s3_server) == reference


def test_a_worker_killed_mid_task_loses_and_duplicates_nothing(tiny_bert, table, reference, s3_server, s3_bucket,
                                                               tmp_path):
    url, marker = f"{s3_bucket}/features.zarr", tmp_path / "held"
    with dask_cluster(tmp_path, hold_marker=marker) as scheduler:
        run = subprocess.Popen(extract_on(scheduler, tiny_bert, table, url, s3_server), env=machine_environment(),
                               cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            pid_file = Path(f"{marker}.pid")
            deadline = time.monotonic() + START_TIMEOUT_S
            while not pid_file.exists() and run.poll() is None and time.monotonic() < deadline:
                time.sleep(0.02)
            assert pid_file.exists(), f"no worker reached its second block (rc {run.poll()})"
            os.kill(int(pid_file.read_text()), signal.SIGKILL)
            output, errors = run.communicate(timeout=120)
        finally:
            if run.poll() is None:
                run.kill()
                run.wait()
    assert run.returncode == 0, errors
    assert f"wrote {url}" in output + errors
    assert store_objects(url, s3_server) == reference


def test_a_worker_without_access_to_the_store_says_so_in_one_line(tiny_bert, table, s3_server, s3_bucket, tmp_path):
    url = f"{s3_bucket}/features.zarr"
    with dask_cluster(tmp_path, credentials=False) as scheduler:
        done = subprocess.run(extract_on(scheduler, tiny_bert, table, url, s3_server), env=machine_environment(),
                              cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in done.stderr, done.stderr
    assert "the dask worker at tcp://127.0.0.1:" in errors[0] and "no credentials found" in errors[0], errors[0]


def test_a_worker_without_the_backbone_folder_names_it(tmp_path):
    missing = tmp_path / "model"
    with pytest.raises(InputError, match=f"has no backbone at {missing}; put the same model folder"):
        worker_backbone(BackboneSpec(str(missing), False, "cpu", "0" * 64), {})


def test_the_reader_requests_the_layers_of_a_piece_at_once(tiny_bert, table, tmp_path, monkeypatch):
    """On an object store each layer's rows are a request of their own: one round trip per piece, not per layer."""
    from cachetune.cache import reader as reader_module

    out = tmp_path / "f.zarr"
    assert cli("extract", "--backbone", tiny_bert, "--data", table, "--out", out, *SMALL).exit_code == 0
    reader = reader_module.CacheReader(str(out), "train")
    assert len(reader.arrays) == 3
    assert not reader.remote  # on local disk one layer after another (a thread each would cost a malloc arena)
    reader.remote = True  # as for an s3:// store
    started = threading.Barrier(len(reader.arrays), timeout=5)
    original = reader_module.read_checked

    def read_with_the_others(array, rows):
        started.wait()  # BrokenBarrierError unless every layer's read has begun before any one returns
        return original(array, rows)

    monkeypatch.setattr(reader_module, "read_checked", read_with_the_others)
    served = np.concatenate([batch.index for batch in reader.batches(16)])
    assert sorted(served) == list(range(len(reader)))
