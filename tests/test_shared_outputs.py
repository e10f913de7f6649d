"""Commands that share an output: two writers of one model folder, a store replaced while it is read (or read while
it is written), SIGTERM, and `predict --out` into a folder that does not exist yet.

The command under test is a real `pipeline` process; the other side of each collision holds its lock from this
test process, so what the command finds does not depend on timing.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket

import pytest
import zarr

from cachetune.cache.store_lock import model_folder_lock, readers_excluded, store_lock, store_reading
from tests.conftest import sentiment_rows, write_table
from tests.test_faults import INTERRUPTED, extraction, last_line, run, start, wait_for  # noqa: F401

EXIT_TERMINATED = 143


@pytest.fixture(scope="module")
def model(extraction, tmp_path_factory):  # noqa: F811
    _, store = extraction
    folder = tmp_path_factory.mktemp("shared") / "lst"
    fitted = run("fit", "--method", "lst", "--set", "r=4", "--cache", store, "--epochs", 1, "--out", folder)
    assert fitted.returncode == 0, fitted.stderr
    return folder


@pytest.fixture
def store(extraction, tmp_path):  # noqa: F811
    """A complete store of this test's own (a copy of the clean one)."""
    copy = tmp_path / "f.zarr"
    shutil.copytree(extraction[1], copy)
    return copy


def me() -> str:
    return f"process {os.getpid()} on {socket.gethostname()} (`pipeline "


def assert_refused(result, fragment: str) -> str:
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0] == last_line(result.stderr) and fragment in errors[0], result.stderr
    return errors[0]


def key_of(store) -> str:
    root = zarr.open_group(str(store), mode="r")
    assert root.attrs["status"] == "complete"
    return root.attrs["key_sha256"]


@pytest.mark.parametrize("command", ["fit", "fit-auto", "sweep", "baseline"])
def test_a_second_writer_of_a_model_folder_is_refused_naming_the_first(command, extraction, tmp_path):  # noqa: F811
    args, store = extraction
    out = tmp_path / "models" / "m"
    commands = {
        "fit": ["fit", "--method", "lst", "--cache", store, "--epochs", 1],
        "fit-auto": ["fit", "--method", "auto", "--cache", store, "--epochs", 1],
        "sweep": ["sweep", "--methods", "lst", "--cache", store, "--epochs", 1],
        "baseline": ["baseline", "--method", "full", "--backbone", args[2], "--data", args[4], "--max-length", 24,
                     "--epochs", 1],
    }
    with model_folder_lock(out):
        second = run(*commands[command], "--out", out)
    assert_refused(second, f"error: {out} is being written by {me()}")
    assert "wait for that run to end, or give --out another folder" in second.stderr
    assert not out.exists() and not out.with_name("m.checkpoint.pt").exists()  # nothing trained, nothing replaced
    assert not out.with_name("m.lock.owner").exists()  # this test's record went with its lock


def test_extract_overwrite_is_refused_while_a_run_reads_the_store(extraction, store):  # noqa: F811
    args, _ = extraction
    before = key_of(store)
    with store_reading(store):
        replacing = run(*args, "--max-length", 16, "--overwrite", "--out", store)
        same = run(*args, "--out", store)  # changes nothing: not refused, and it does not wait
    line = assert_refused(replacing, f"error: {store} is being read by {me()}")
    assert "replacing it now would break that run: wait for it to end, or give --out a new store" in line
    assert key_of(store) == before  # the reader's store is untouched
    assert same.returncode == 0 and "up to date" in same.stdout, same.stderr
    assert not list(store.parent.glob("f.zarr.read.lock.*"))  # the reader's record went with its lock


def test_compact_overwrite_is_refused_while_a_run_reads_the_store(extraction, store, tmp_path):  # noqa: F811
    args, _ = extraction
    source = tmp_path / "float16.zarr"
    small = write_table(tmp_path / "small.csv", sentiment_rows(40))
    made = run(*args[:4], small, *args[5:], "--dtype", "float16", "--out", source)
    assert made.returncode == 0, made.stderr
    before = key_of(store)
    with store_reading(store):
        replacing = run("compact", source, "--dtype", "int8", "--overwrite", "--out", store)
    assert_refused(replacing, f"error: {store} is being read by {me()}")
    assert key_of(store) == before


@pytest.mark.parametrize("command", ["fit", "sweep", "evaluate", "info", "compact"])
def test_a_reader_of_a_store_being_replaced_is_refused_naming_the_writer(command, model, store, tmp_path):
    commands = {
        "fit": ["fit", "--method", "lst", "--cache", store, "--epochs", 1, "--out", tmp_path / "m"],
        "sweep": ["sweep", "--methods", "lst", "--cache", store, "--epochs", 1, "--out", tmp_path / "s"],
        "evaluate": ["evaluate", model, "--cache", store],
        "info": ["info", store],
        "compact": ["compact", store, "--out", tmp_path / "c.zarr"],
    }
    with store_lock(store), readers_excluded(store):  # an `extract --overwrite` between removing and recreating
        reader = run(*commands[command])
    line = assert_refused(reader, f"error: {store} is being replaced by {me()}")
    assert line.endswith("wait for that run to end, then rerun")


def test_fit_on_a_store_still_being_written_names_the_writer(store, tmp_path):
    zarr.open_group(str(store), mode="r+").attrs["status"] = "incomplete"
    with store_lock(store):
        fit = run("fit", "--method", "lst", "--cache", store, "--epochs", 1, "--out", tmp_path / "m")
    line = assert_refused(fit, f"error: the cache at {store} is being written by {me()}")
    assert "rerun the same `pipeline extract`" not in line  # that run is still going


def test_sigterm_ends_fit_as_ctrl_c_does_and_releases_its_locks(store, tmp_path):
    out = tmp_path / "lst"
    fit = ["fit", "--method", "lst", "--set", "r=4", "--cache", store, "--epochs", 3, "--out", out]
    victim = start(*fit)
    wait_for(out.with_name("lst.checkpoint.pt").exists, victim, "the first epoch's checkpoint was written")
    victim.send_signal(signal.SIGTERM)
    _, stderr = victim.communicate(timeout=60)
    assert victim.returncode == EXIT_TERMINATED, stderr
    assert "Traceback" not in stderr and last_line(stderr) == INTERRUPTED, stderr
    assert not out.with_name("lst.lock.owner").exists() and not list(tmp_path.glob("f.zarr.read.lock.*"))
    resumed = run(*fit)
    assert resumed.returncode == 0, resumed.stderr
    assert re.search(r"resuming after epoch \d from the checkpoint", resumed.stderr), resumed.stderr


def test_predict_out_into_a_folder_that_does_not_exist_makes_it(model, tmp_path):
    out = tmp_path / "new" / "deeper" / "predictions.jsonl"
    predicted = run("predict", model, "--text", "a fine film", "--text", "dull", "--out", out)
    assert predicted.returncode == 0, predicted.stderr
    assert [set(json.loads(line)) >= {"text", "label"} for line in out.read_text().splitlines()] == [True, True]
