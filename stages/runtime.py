"""Where stage two runs and in what precision: the one place that decides, in the spirit of Lightning Fabric.

`Runtime.resolve("auto", None)` picks a GPU when there is one, and bf16 autocast on a GPU that supports it (fp32
on the CPU). Methods stay device-agnostic: the loop moves batches with `to_device` and wraps forward passes in
`autocast()`; fp16 adds a gradient scaler, since fp16 gradients underflow without one.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from cache.errors import InputError

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    precision: str  # fp32 | bf16 | fp16

    @classmethod
    def resolve(cls, device: str = "auto", precision: str | None = None) -> "Runtime":
        chosen = _device(device)
        if precision in (None, "auto"):
            precision = "bf16" if chosen.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
        if precision not in PRECISIONS:
            raise InputError(f"--precision {precision!r} is not one of {', '.join(PRECISIONS)}")
        if precision == "bf16" and chosen.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise InputError(f"{torch.cuda.get_device_name(chosen)} does not support bf16; use --precision fp16 or fp32")
        if precision == "fp16" and chosen.type == "cpu":
            raise InputError("--precision fp16 needs a GPU (CPU autocast supports bf16); use --precision bf16 or fp32")
        return cls(chosen, precision)

    @property
    def name(self) -> str:
        """The device's own name: the GPU model, or "cpu"."""
        return torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"

    @property
    def pin_memory(self) -> bool:
        return self.device.type == "cuda"

    def autocast(self):
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=PRECISIONS[self.precision])

    def grad_scaler(self) -> torch.amp.GradScaler:
        return torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")

    def to_device(self, tensor: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Copy to the device (non-blocking from pinned memory), then cast there, where the cast is cheap."""
        tensor = tensor.to(self.device, non_blocking=self.pin_memory)
        return tensor if dtype is None else tensor.to(dtype)

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def reset_peak_memory(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_memory(self) -> dict:
        """Peak GPU memory since the last reset, in MB (allocated and reserved); {} on the CPU."""
        if self.device.type != "cuda":
            return {}
        return {"peak_gpu_allocated_mb": torch.cuda.max_memory_allocated(self.device) / 2**20,
                "peak_gpu_reserved_mb": torch.cuda.max_memory_reserved(self.device) / 2**20}

    def describe(self) -> dict:
        return {"device": str(self.device), "device_name": self.name, "precision": self.precision}


CPU = Runtime(torch.device("cpu"), "fp32")  # the default wherever no runtime is passed


def _device(text: str) -> torch.device:
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except RuntimeError:
        raise InputError(f"--device {text!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise InputError(f"--device {text!r}: only cpu and cuda are supported; use auto, cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"--device {text} but no CUDA GPU is visible to torch here; use --device cpu (or auto)")
        index = device.index or 0
        if index >= torch.cuda.device_count():
            raise InputError(f"--device {text}: this machine has {torch.cuda.device_count()} GPU(s), numbered from 0")
        device = torch.device("cuda", index)
    return device
