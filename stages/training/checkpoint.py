"""Resumable training: after every epoch, everything the next epoch needs goes to one file beside the model folder.

`artifacts/models/sherl.checkpoint.pt` holds the trainable weights, the optimizer, scheduler and gradient scaler
states, the random states (torch, CUDA, numpy, Python) and the history so far (per-epoch metrics, the best epoch
and its weights). The same command after a kill or Ctrl-C loads it and goes on with the next epoch, so it ends with the
metrics an uninterrupted run gets. The file is written under a temporary name and renamed, so a kill while it is
written leaves the previous one; it is removed once the model folder is written. A checkpoint made with other
settings (method options, schedule, seed, cache or data) is ignored, with a message. It is read with
`torch.load(weights_only=True)`, which loads tensors and plain containers only, never arbitrary objects.
"""
from __future__ import annotations

import io
import os
import random
import sys
from pathlib import Path

import numpy as np
import torch

from cachetune.cache.layout import key_sha256


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def random_states() -> dict:
    kind, keys, position, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
                      "has_gauss": int(has_gauss), "cached": float(cached)}}


def set_random_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    random.setstate(states["python"])
    if states["cuda"] and torch.cuda.is_available():
        # One state per GPU of the machine that saved it; a machine with fewer GPUs takes those it has (a run on
        # GPU k > its count was refused by --device before this), one with more keeps its own for the rest.
        for index, state in enumerate(states["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(state, index)
    numpy = states["numpy"]
    np.random.set_state(("MT19937", numpy["keys"].numpy().astype(np.uint32), numpy["position"], numpy["has_gauss"],
                         numpy["cached"]))


class Checkpoint:
    """identity: what a run must share with the one that wrote the checkpoint to resume from it."""

    def __init__(self, path: Path, identity: dict, log=_stderr):
        self.path, self.identity, self.log = Path(path), key_sha256(identity), log

    @classmethod
    def beside(cls, model_dir: Path, identity: dict, log=_stderr) -> "Checkpoint":
        model_dir = Path(model_dir)
        return cls(model_dir.with_name(model_dir.name + ".checkpoint.pt"), identity, log)

    def restore(self, modules: torch.nn.Module, stateful: dict, fresh: tuple) -> tuple:
        """The loop's progress (history, best value, best state, best epoch, seconds) after the last checkpointed
        epoch, with the weights, the random states and every object of `stateful` (optimizer, scheduler, gradient
        scaler: anything with state_dict/load_state_dict) set as they were then; `fresh` if there is none."""
        self.path.parent.mkdir(parents=True, exist_ok=True)  # here, so an unwritable place fails before epoch 1
        if not self.path.exists():
            return fresh
        try:
            saved = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as error:
            self.log(f"ignoring the unreadable checkpoint {self.path} ({type(error).__name__}); starting from epoch 1")
            return fresh
        if saved.get("identity") != self.identity:
            self.log(f"ignoring the checkpoint {self.path}: a run with other settings, cache or data wrote it; "
                     "starting from epoch 1")
            return fresh
        modules.load_state_dict(saved["model"], strict=False)
        for name, thing in stateful.items():
            if saved["states"][name]:  # a disabled gradient scaler has an empty state, and refuses one
                thing.load_state_dict(saved["states"][name])
        set_random_states(saved["random"])
        progress = saved["progress"]
        self.log(f"resuming after epoch {len(progress['history'])} from the checkpoint {self.path}")
        return progress["history"], progress["best"], progress["best_state"], progress["best_epoch"], progress["seconds"]

    def save(self, model_state: dict, stateful: dict, progress: tuple) -> None:
        history, best, best_state, best_epoch, seconds = progress
        payload = {"identity": self.identity, "model": model_state, "random": random_states(),
                   "states": {name: thing.state_dict() for name, thing in stateful.items()},
                   "progress": {"history": history, "best": best, "best_state": best_state, "best_epoch": best_epoch,
                                "seconds": seconds}}
        buffer = io.BytesIO()
        torch.save(payload, buffer)  # into memory: a full disk then raises OSError from the write below
        partial = self.path.with_name(self.path.name + ".partial")
        with open(partial, "wb") as stream:
            stream.write(buffer.getbuffer())
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(partial, self.path)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)
