"""Counting the tensor operations that make the host wait for a GPU, on any device.

On the CPU nothing waits, but the same calls on CUDA tensors would: reading a value (`item`, `bool`, `int`,
`float`, `tolist`), copying to the host (`cpu`, `numpy`), ops whose output size depends on the data (`nonzero`,
`unique`, `masked_select`), and indexing with host data (a Python list or a numpy array, copied to the device
first). `HostSyncs` counts them through a TorchFunctionMode, so a CPU test can hold a hot loop to none; a CUDA test
adds `torch.cuda.set_sync_debug_mode("error")`, which catches the rest (pageable copies).
"""
from __future__ import annotations

import numpy as np
import torch
from torch.overrides import TorchFunctionMode

SYNCING = {"item", "__bool__", "__int__", "__float__", "__index__", "tolist", "cpu", "numpy", "nonzero", "unique",
           "masked_select", "unique_consecutive", "argwhere"}


# Calls that read tensors which stay on the host in a GPU run too: AdamW's step counters (CPU tensors unless
# `capturable`; fused AdamW keeps them wherever its state is).
HOST_SIDE = {("optimizer.py", "_get_value")}


def _host_index(index) -> bool:
    parts = index if isinstance(index, tuple) else (index,)
    return any(isinstance(part, (list, np.ndarray)) for part in parts)


class HostSyncs(TorchFunctionMode):
    """with HostSyncs() as syncs: ...; syncs.seen lists the name of every syncing call (with where it came from)."""

    def __init__(self):
        super().__init__()
        self.seen: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", str(func))
        if name in SYNCING or (name == "__getitem__" and len(args) > 1 and _host_index(args[1])):
            import traceback

            frame = next((f for f in reversed(traceback.extract_stack()[:-1]) if "sync_count" not in f.filename), None)
            if frame is None or (frame.filename.split("/")[-1], frame.name) not in HOST_SIDE:
                self.seen.append(f"{name} at {frame.filename.split('/')[-1]}:{frame.lineno}" if frame else name)
        return func(*args, **(kwargs or {}))
