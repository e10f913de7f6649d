"""The same command and seed give the same metrics and weights on the same machine, for every method.

Two processes differ in what could leak into the arithmetic: the hash seed (the order of any set of strings), the
working folder and the store's path, and glibc's allocator filling fresh memory with a byte pattern
(MALLOC_PERTURB_), which turns any read of uninitialised memory (padding that a batch did not write, say) into a
different number."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from safetensors.torch import load_file

from tests.test_fit import tiny_cache  # noqa: F401  (the fixture)
from tests.test_input_faults import REPO

METHODS = ("linear", "lst", "sherl", "synqt", "unipt", "utuning")


def fit_in_a_process(method: str, cache, out, cwd, env: dict):
    command = [sys.executable, "-m", "cachetune.pipeline.cli", "fit", "--method", method, "--cache", str(cache),
               "--epochs", "2", "--batch-size", "16", "--out", str(out)]
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": REPO, **env}
    done = subprocess.run(command, cwd=cwd, env=environment, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    metrics = json.loads((out / "metrics.json").read_text())
    return metrics, load_file(out / "model.safetensors")


def test_two_fits_of_every_method_give_equal_metrics_and_weights(tiny_cache, tmp_path):  # noqa: F811
    cache, _ = tiny_cache
    (tmp_path / "a").mkdir()
    (tmp_path / "b" / "deeper").mkdir(parents=True)
    for method in METHODS:
        first, first_weights = fit_in_a_process(method, cache, tmp_path / "a" / method, tmp_path / "a",
                                                {"PYTHONHASHSEED": "1", "MALLOC_PERTURB_": "0"})
        second, second_weights = fit_in_a_process(method, os.path.relpath(cache, tmp_path / "b" / "deeper"),
                                                  tmp_path / "b" / method, tmp_path / "b" / "deeper",
                                                  {"PYTHONHASHSEED": "2", "MALLOC_PERTURB_": "165"})
        assert first["test"] == second["test"], method
        assert [row["train_loss"] for row in first["history"]] == [row["train_loss"] for row in second["history"]], method
        assert first_weights.keys() == second_weights.keys()
        for name, tensor in first_weights.items():
            assert tensor.equal(second_weights[name]), f"{method}: {name}"
