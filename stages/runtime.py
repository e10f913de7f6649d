"""Where both stages run and in what precision: the one place that decides, in the spirit of Lightning Fabric.

`Runtime.resolve("auto", None)` picks a GPU when there is one, and bf16 autocast on a GPU that computes bf16 natively
(compute capability 8.0 or newer: A100, H100, RTX 30xx on; a T4 or V100 only emulates it, slowly, so auto picks fp32
there and an explicit bf16 is refused). Every question is asked of the chosen device, never of the current one.
Methods stay device-agnostic: the loop moves batches with `to_device` and wraps forward passes in `autocast()`;
fp16 adds a gradient scaler, since fp16 gradients underflow without one. Stage one (`extract`) resolves its
`--device` here too; its precision stays fp32 unless asked, since the precision is part of the store's key.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

from cachetune.cache.errors import InputError

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def auto_device() -> torch.device:
    """What `--device auto` means: the first GPU when torch sees one, else the CPU (tests/conftest.py pins it to the CPU)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def device_kind(text: str) -> str:
    """"cuda" or "cpu": the kind of device `--device text` names (auto asks `auto_device`), without checking it."""
    return auto_device().type if text == "auto" else "cuda" if str(text).startswith("cuda") else "cpu"


def native_bf16(device: torch.device) -> bool:
    """Does `device` compute bf16 natively? CPUs: autocast supports it. CUDA: compute capability >= 8.0, asked of
    that device (torch.cuda.is_bf16_supported asks the current device and counts emulation, true on a T4)."""
    if device.type != "cuda":
        return True
    if torch.version.hip:  # ROCm: every GPU torch supports there has bf16 units
        return True
    return torch.cuda.get_device_capability(device)[0] >= 8


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    precision: str  # fp32 | bf16 | fp16
    memory: "DeviceMemory" = field(default=None, compare=False, repr=False)

    def __post_init__(self):
        if self.memory is None:
            object.__setattr__(self, "memory", DeviceMemory(self.device))

    @classmethod
    def resolve(cls, device: str = "auto", precision: str | None = None) -> "Runtime":
        chosen = resolve_device(device)
        if precision in (None, "auto"):
            precision = "bf16" if chosen.type == "cuda" and native_bf16(chosen) else "fp32"
        if precision not in PRECISIONS:
            raise InputError(f"--precision {precision!r} is not one of {', '.join(PRECISIONS)}")
        if precision == "bf16" and not native_bf16(chosen):
            raise InputError(f"{torch.cuda.get_device_name(chosen)} ({chosen}) has no native bf16 (compute capability "
                             f"{'.'.join(map(str, torch.cuda.get_device_capability(chosen)))}, 8.0 needed); "
                             "use --precision fp16 or fp32")
        if precision == "fp16" and chosen.type == "cpu":
            raise InputError("--precision fp16 needs a GPU (CPU autocast supports bf16); use --precision bf16 or fp32")
        return cls(chosen, precision)

    @property
    def name(self) -> str:
        """The device's own name: the GPU model, or "cpu"."""
        return torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def pin_memory(self) -> bool:
        return self.is_cuda

    def autocast(self):
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=PRECISIONS[self.precision])

    def grad_scaler(self) -> torch.amp.GradScaler:
        return torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")

    def to_device(self, tensor: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Copy to the device, then cast there, where the cast is cheap. On a GPU the copy never makes the host
        wait: a pageable tensor is pinned first (a host-side copy), then copied without blocking."""
        if self.is_cuda and tensor.device.type == "cpu":
            if not tensor.is_pinned():
                tensor = tensor.pin_memory()
            tensor = tensor.to(self.device, non_blocking=True)
        else:
            tensor = tensor.to(self.device)
        return tensor if dtype is None else tensor.to(dtype)

    def synchronize(self) -> None:
        if self.is_cuda:
            torch.cuda.synchronize(self.device)

    def reset_peak_memory(self) -> None:
        """Start the invocation's peak-memory window (see `DeviceMemory`)."""
        self.memory.start()

    def peak_memory(self, resident_bytes: int = 0) -> dict:
        """Peak GPU memory of the invocation so far, in MB (allocated and reserved), with `resident_bytes` (a cache
        held on the device for the whole run) counted apart from it; {} on the CPU."""
        return self.memory.report(resident_bytes)

    def describe(self) -> dict:
        return {"device": str(self.device), "device_name": self.name, "precision": self.precision}


class DeviceMemory:
    """Peak GPU bytes allocated, over the invocation and over windows within it (one network's step).

    torch keeps one peak per device, and measuring a window means resetting it; so every reset first folds the
    peak so far into `invocation` here, and the invocation's figure stays whole however many windows ran. Reading
    and resetting the allocator's counters are host-side calls: they never wait for the device. On the CPU every
    method does nothing.
    """

    def __init__(self, device: torch.device):
        self.device, self.cuda = device, device.type == "cuda"
        self.invocation = self.invocation_reserved = 0

    def start(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
            self.invocation = torch.cuda.memory_allocated(self.device)
            self.invocation_reserved = torch.cuda.memory_reserved(self.device)

    def _fold(self) -> None:
        self.invocation = max(self.invocation, torch.cuda.max_memory_allocated(self.device))
        self.invocation_reserved = max(self.invocation_reserved, torch.cuda.max_memory_reserved(self.device))

    @contextlib.contextmanager
    def window(self, into: list):
        """Adds to into[0] the max over calls of (peak allocated inside the window - allocated at its start)."""
        if not self.cuda:
            yield
            return
        self._fold()
        before = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        try:
            yield
        finally:
            into[0] = max(into[0], torch.cuda.max_memory_allocated(self.device) - before)
            self._fold()

    def report(self, resident_bytes: int = 0) -> dict:
        if not self.cuda:
            return {}
        self._fold()
        return {"peak_gpu_allocated_mb": (self.invocation - resident_bytes) / 2**20,
                "peak_gpu_reserved_mb": (self.invocation_reserved - resident_bytes) / 2**20,
                "resident_cache_gpu_mb": resident_bytes / 2**20}


CPU = Runtime(torch.device("cpu"), "fp32")  # the default wherever no runtime is passed


def resolve_device(text: str) -> torch.device:
    """`--device` text -> a torch device with its index (cuda -> cuda:0); InputError, one line, for anything else."""
    if text == "auto":
        text = str(auto_device())
    try:
        device = torch.device(text)
    except RuntimeError:
        raise InputError(f"--device {text} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise InputError(f"--device {text}: only cpu and cuda are supported; use auto, cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"--device {text} but no CUDA GPU is visible to torch here; use --device cpu (or auto)")
        index = device.index or 0
        if index >= torch.cuda.device_count():
            raise InputError(f"--device {text}: this machine has {torch.cuda.device_count()} GPU(s), numbered from 0; "
                             "pick one of them or --device cpu")
        device = torch.device("cuda", index)
    return device


def spread_device(device: str, rank: int) -> str:
    """The device of worker `rank` among several on one host: a bare `cuda` spreads workers over every GPU
    (rank modulo the GPU count); `cuda:N` and `cpu` stay as they are."""
    if device != "cuda":
        return device
    count = torch.cuda.device_count()
    return f"cuda:{rank % count}" if count else device
