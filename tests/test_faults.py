"""Faults end in one line and lose nothing: a full disk, Ctrl-C and two runs at once during `extract`.

Real signals (SIGINT, SIGKILL) to real `pipeline` processes, and a real full disk: a small tmpfs, mounted
when the tests run as root (skipped otherwise).
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import zarr

from tests.conftest import sentiment_rows, write_table
from tests.test_extract import store_arrays

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
       "PYTHONPATH": os.pathsep.join([str(REPO)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []))}
INTERRUPTED = "interrupted; rerun the same command to resume"


def pipeline(*args) -> list[str]:
    return [sys.executable, "-m", "cachetune.pipeline.cli", *map(str, args)]


def run(*args) -> subprocess.CompletedProcess:
    return subprocess.run(pipeline(*args), capture_output=True, text=True, env=ENV)


def ctrl_c_as_in_a_terminal() -> None:
    """A test runner started in the background (nohup, `cmd &` without job control) ignores SIGINT, and its
    children inherit that; Python then never turns SIGINT into KeyboardInterrupt. Restore the default, as a
    terminal has it, so a signal sent by the test is the user's Ctrl-C."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start(*args) -> subprocess.Popen:
    return subprocess.Popen(pipeline(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
                            preexec_fn=ctrl_c_as_in_a_terminal)


def last_line(text: str) -> str:
    lines = [line for line in text.replace("\r", "\n").splitlines() if line.strip()]
    return lines[-1] if lines else ""


def wait_for(condition, process: subprocess.Popen, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        if condition():
            return
        time.sleep(0.005)
    raise AssertionError(f"the process ended (rc {process.poll()}) or timed out before {what}; use more data")


def done_blocks(store: Path) -> int:
    flags = store / "train" / "done" / "c"
    return len(list(flags.iterdir())) if flags.exists() else 0


def assert_same_store(expected: Path, actual: Path) -> None:
    assert zarr.open_group(str(actual), mode="r").attrs["status"] == "complete"
    clean, other = store_arrays(expected), store_arrays(actual)
    assert clean.keys() == other.keys()
    for name in clean:
        np.testing.assert_array_equal(clean[name], other[name], err_msg=name)


@pytest.fixture(scope="module")
def extraction(tiny_bert, tmp_path_factory):
    """(extract arguments without --out, a clean store made by an uninterrupted run)."""
    folder = tmp_path_factory.mktemp("faults")
    table = write_table(folder / "data.csv", sentiment_rows(1500))
    args = ["extract", "--backbone", tiny_bert, "--data", table, "--block-tokens", 128, "--chunk-tokens", 32,
            "--batch-size", 8, "--max-length", 24]
    clean = run(*args, "--out", folder / "clean.zarr")
    assert clean.returncode == 0, clean.stderr
    return args, folder / "clean.zarr"


@contextmanager
def tmpfs(folder: Path, size: int):
    """A real filesystem of `size` bytes at folder (root only)."""
    if os.geteuid() != 0:
        pytest.skip("a full disk is simulated with a tmpfs, which needs root")
    folder.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=True)


def test_full_disk_is_one_line_with_the_room_needed_and_the_same_command_resumes(extraction, tmp_path):
    args, clean = extraction
    disk = tmp_path / "disk"
    with tmpfs(disk, 1 << 20):
        store = disk / "f.zarr"
        full = run(*args, "--out", store)
        assert full.returncode == 3, full.stderr
        assert "Traceback" not in full.stderr
        line = last_line(full.stderr)
        assert line.startswith(f"error: writing the store at {store} failed: No space left on device"), line
        assert "rerun the same command: it resumes" in line
        assert zarr.open_group(str(store), mode="r").attrs["status"] != "complete"
        needed = float(re.search(r"the rest needs up to ([\d.]+) MB", line).group(1)) * 1e6
        # exactly the room the message asks for is enough
        used = os.statvfs(disk).f_frsize * (os.statvfs(disk).f_blocks - os.statvfs(disk).f_bfree)
        subprocess.run(["mount", "-o", f"remount,size={used + int(needed)}", str(disk)], check=True)
        resumed = run(*args, "--out", store)
        assert resumed.returncode == 0, resumed.stderr
        assert "resuming" in resumed.stdout + resumed.stderr
        assert_same_store(clean, store)


@pytest.mark.parametrize("stop, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_or_sigterm_during_extract_is_one_line_and_resumes(stop, code, extraction, tmp_path):
    """SIGTERM (docker stop, Kubernetes, Slurm) ends a run as Ctrl-C does, with 128 + 15 as schedulers report it."""
    args, clean = extraction
    store = tmp_path / "f.zarr"
    victim = start(*args, "--out", store)
    wait_for(lambda: done_blocks(store) >= 3, victim, "three blocks were written")
    victim.send_signal(stop)
    _, stderr = victim.communicate(timeout=60)
    assert victim.returncode == code, stderr
    assert "Traceback" not in stderr and last_line(stderr) == INTERRUPTED, stderr
    assert not (tmp_path / "f.zarr.lock.owner").exists()
    assert zarr.open_group(str(store), mode="r").attrs["status"] == "incomplete"
    resumed = run(*args, "--out", store)
    assert resumed.returncode == 0 and "resuming" in resumed.stdout + resumed.stderr, resumed.stderr
    assert_same_store(clean, store)


def test_a_second_extract_into_the_same_store_waits_for_the_first_and_names_it(extraction, tmp_path):
    args, clean = extraction
    store = tmp_path / "f.zarr"
    first = start(*args, "--out", store)
    wait_for(lambda: done_blocks(store) >= 1, first, "the first run wrote a block")
    first.send_signal(signal.SIGSTOP)  # held mid-run, lock and all, until the second run is seen waiting
    try:
        with open(tmp_path / "second.err", "w+") as second_err:
            second = subprocess.Popen(pipeline(*args, "--out", store), stdout=subprocess.PIPE, stderr=second_err,
                                      text=True, env=ENV)
            wait_for(lambda: "waiting" in (tmp_path / "second.err").read_text(), second, "the second run waited")
            blocks = done_blocks(store)
            time.sleep(2)
            assert done_blocks(store) == blocks and second.poll() is None  # it waits; it does not write
    finally:
        first.send_signal(signal.SIGCONT)
    first_out, first_err = first.communicate(timeout=300)
    second_out, _ = second.communicate(timeout=300)
    waited = (tmp_path / "second.err").read_text()
    assert first.returncode == 0 and second.returncode == 0, first_err + waited
    assert f"waiting: {store} is being written by process {first.pid} on " in waited
    assert "(`pipeline extract --backbone" in waited
    assert "up to date" in second_out  # it went on only after the first had finished the store
    assert_same_store(clean, store)
    assert not (tmp_path / "f.zarr.lock.owner").exists()


def test_a_lock_left_by_a_killed_run_does_not_block_the_next(extraction, tmp_path):
    args, clean = extraction
    store = tmp_path / "f.zarr"
    victim = start(*args, "--out", store)
    wait_for(lambda: done_blocks(store) >= 1, victim, "a block was written")
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    resumed = run(*args, "--out", store)
    assert resumed.returncode == 0 and "waiting" not in resumed.stderr, resumed.stderr
    assert_same_store(clean, store)


def same_numbers(metrics: dict) -> dict:
    """What an interrupted and resumed run must reproduce: per-epoch loss and validation metrics, best epoch, test."""
    history = [{k: v for k, v in epoch.items() if k != "seconds"} for epoch in metrics["history"]]
    return {"history": history, "best_epoch": metrics["best_epoch"], "test": metrics["test"]}


def interrupt_after_the_first_checkpoint(command: list, out: Path, how: signal.Signals) -> None:
    checkpoint = out.with_name(out.name + ".checkpoint.pt")
    victim = start(*command)
    wait_for(checkpoint.exists, victim, "the first epoch's checkpoint was written")
    victim.send_signal(how)
    _, stderr = victim.communicate(timeout=60)
    assert checkpoint.exists() and not out.exists()  # no model folder that loads as finished
    if how == signal.SIGINT:
        assert victim.returncode == 130 and "Traceback" not in stderr and last_line(stderr) == INTERRUPTED, stderr
    else:
        assert victim.returncode == -signal.SIGKILL


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGINT])
def test_fit_interrupted_after_an_epoch_resumes_to_the_same_metrics(how, extraction, tmp_path):
    import json

    _, store = extraction
    fit = ["fit", "--method", "lst", "--set", "r=4", "--cache", store, "--epochs", 6, "--batch-size", 16, "--seed", 1]
    clean = run(*fit, "--out", tmp_path / "clean")
    assert clean.returncode == 0, clean.stderr
    out = tmp_path / "lst"
    interrupt_after_the_first_checkpoint(fit + ["--out", out], out, how)
    resumed = run(*fit, "--out", out)
    assert resumed.returncode == 0, resumed.stderr
    done = int(re.search(r"resuming after epoch (\d) from the checkpoint", resumed.stderr).group(1))
    assert 1 <= done < 6
    expected = json.loads((tmp_path / "clean" / "metrics.json").read_text())
    assert same_numbers(json.loads((out / "metrics.json").read_text())) == same_numbers(expected)
    assert not out.with_name("lst.checkpoint.pt").exists()


def test_baseline_killed_after_an_epoch_resumes_to_the_same_metrics(extraction, tmp_path):
    import json

    pytest.importorskip("peft")
    args, _ = extraction
    baseline = ["baseline", "--method", "lora", "--backbone", args[2], "--data", args[4], "--max-length", 24,
                "--epochs", 3, "--lr", 1e-3, "--seed", 1]
    clean = run(*baseline, "--out", tmp_path / "clean")
    assert clean.returncode == 0, clean.stderr
    out = tmp_path / "lora"
    interrupt_after_the_first_checkpoint(baseline + ["--out", out], out, signal.SIGKILL)
    resumed = run(*baseline, "--out", out)
    assert resumed.returncode == 0, resumed.stderr
    assert re.search(r"resuming after epoch [12] from the checkpoint", resumed.stderr), resumed.stderr
    expected = json.loads((tmp_path / "clean" / "metrics.json").read_text())
    assert same_numbers(json.loads((out / "metrics.json").read_text())) == same_numbers(expected)


def test_full_disk_under_the_model_folder_is_one_line_and_the_rerun_finishes(extraction, tmp_path):
    _, store = extraction
    disk = tmp_path / "disk"
    fit = ["fit", "--method", "lst", "--set", "r=4", "--cache", store, "--epochs", 2, "--out", disk / "models" / "lst"]
    with tmpfs(disk, 4096):
        full = run(*fit)
        assert full.returncode == 3 and "Traceback" not in full.stderr, full.stderr
        line = last_line(full.stderr)
        assert line.startswith(f"error: No space left on device (ENOSPC) writing {disk / 'models' / 'lst'} or its "
                               f"checkpoint {disk / 'models' / 'lst.checkpoint.pt'}; "), line
        assert line.endswith("free room, then rerun the same command: it resumes after the last finished epoch")
        subprocess.run(["mount", "-o", "remount,size=16m", str(disk)], check=True)
        assert run(*fit).returncode == 0
        assert (disk / "models" / "lst" / "metrics.json").exists()
