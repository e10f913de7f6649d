"""bench/compact.py end to end on a tiny store: it compacts, sweeps each encoding and prints the goals table."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.test_extract import run_extract

ROOT = Path(__file__).resolve().parents[1]


def test_bench_compact_prints_the_table_against_float16(tiny_bert, tiny_table, tmp_path):
    run_extract(tiny_bert, tiny_table, tmp_path / "f16.zarr", dtype="float16")
    command = [sys.executable, "bench/compact.py", "--cache", str(tmp_path / "f16.zarr"), "--encodings", "float16,int8",
               "--methods", "linear", "--seeds", "0,1", "--epochs", "1", "--work", str(tmp_path / "work")]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = {line.split("|")[1].strip(): line for line in result.stdout.splitlines() if line.startswith("| ")}
    assert set(rows) == {"encoding", "float16", "int8"}
    assert "8-bit: " in rows["int8"] and "linear test acc" in rows["encoding"]
    ratio = float(rows["int8"].split("|")[3])
    assert 0.3 < ratio < 1.0  # 8-bit codes plus scales: well under float16's bytes even on a tiny store
    again = subprocess.run(command + ["--table"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and rows["int8"] in again.stdout  # reprinted from the saved results, nothing rerun
