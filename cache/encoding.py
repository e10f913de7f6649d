"""How a store holds each layer's values: a dtype (float16, float32, int8, fp8) and an optional projection.

Arrays per layer and split: `layer_XX` [rows, W] holds the codes (W = D, or K with `--reduce pca:K`), in float16,
float32, int8, or uint8 holding float8 e4m3 bytes; 8-bit stores add `layer_XX_scale` [rows, ceil(W/64)] float16
(cache/quantize.py). A projected store has `projection/layer_XX_basis` and `_mean` (cache/projection.py). The
root attribute `encoding` says all of this; stores without it are plain float16/float32 (`dtype`).

Encoding runs on the host, per block (extraction's writer threads, `compact`); decoding runs per batch on the
training device (`Decoder`).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .errors import InputError
from .layout import layer_array_name
from .projection import parse_reduce, project, reconstruct
from .quantize import DTYPES, EIGHT_BIT, GROUP, STORAGE, decode, encode_numpy, groups


def scale_array_name(index: int) -> str:
    return f"{layer_array_name(index)}_scale"


@dataclass(frozen=True)
class Encoding:
    dtype: str = "float16"
    reduce: str | None = None  # "pca:K"

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise InputError(f"--dtype {self.dtype}: use one of {', '.join(DTYPES)}")
        parse_reduce(self.reduce)

    @property
    def components(self) -> int | None:
        return parse_reduce(self.reduce)

    @property
    def eight_bit(self) -> bool:
        return self.dtype in EIGHT_BIT

    @property
    def plain(self) -> bool:
        """float16/float32 without a projection: read as before, widened on the device."""
        return not self.eight_bit and self.reduce is None

    def width(self, hidden_size: int) -> int:
        return self.components or hidden_size

    def attrs(self, hidden_size: int) -> dict:
        return {"dtype": self.dtype, "reduce": self.reduce, "storage": STORAGE[self.dtype],
                "group": GROUP if self.eight_bit else None, "width": self.width(hidden_size),
                "note": "fp8 codes are float8_e4m3fn bytes stored as uint8" if self.dtype == "fp8" else None}

    def key_fields(self) -> dict:
        """What the store's key adds for this encoding (nothing for plain stores, so their keys stay as they were)."""
        fields = {}
        if self.eight_bit:
            fields["scale_group"] = GROUP
        if self.reduce:
            fields["reduce"] = self.reduce
        return fields

    @classmethod
    def of_store(cls, attrs) -> "Encoding":
        encoding = attrs.get("encoding") or {}
        return cls(encoding.get("dtype", attrs.get("dtype", "float16")), encoding.get("reduce"))


class BlockEncoder:
    """Encodes a block's [K, rows, D] float values into the arrays' codes (and scales) for the layers given."""

    def __init__(self, encoding: Encoding, projections: dict | None = None):
        self.encoding, self.projections = encoding, projections or {}

    def __call__(self, layer: int, values: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """values [rows, D] -> (codes [rows, W], scales [rows, G] or None)."""
        if self.encoding.reduce:
            basis, mean = self.projections[layer]
            values = project(values, basis, mean)
        return encode_numpy(values, self.encoding.dtype)


def read_projections(root, layers: list[int]) -> dict:
    """layer -> (basis [K, D], mean [D]) float32 from a projected store; a missing one is an InputError."""
    from .reader import read_checked

    try:
        group = root["projection"]
        return {i: (read_checked(group[f"{layer_array_name(i)}_basis"], slice(None)),
                    read_checked(group[f"{layer_array_name(i)}_mean"], slice(None))) for i in layers}
    except KeyError:
        raise InputError("the store's projection basis is missing; re-create it with `pipeline compact` "
                         "(or --overwrite)") from None


class Decoder:
    """Turns a batch's codes into float32 features [B, L, T, D] on the training device: codes x scales
    (8-bit), then x_hat = c P + mu (projection), zero at padded positions as a float16 batch has them."""

    def __init__(self, encoding: Encoding, projections: dict, layers: list[int]):
        self.encoding = encoding
        self.basis = torch.from_numpy(np.stack([projections[i][0] for i in layers])) if encoding.reduce else None
        self.mean = torch.from_numpy(np.stack([projections[i][1] for i in layers])) if encoding.reduce else None
        self.on_device: dict = {}

    def _projection(self, device: torch.device):
        if device not in self.on_device:
            self.on_device[device] = (self.basis.to(device), self.mean.to(device))
        return self.on_device[device]

    def decode(self, codes: torch.Tensor, scales: torch.Tensor | None, mask: torch.Tensor,
               subset: list[int] | None = None) -> torch.Tensor:
        """codes [B, L, T, W], scales [B, L, T, G] or None, mask [B, T] bool, all on one device -> [B, L, T, D]
        float32 there. subset: positions of the reader's layers that codes holds (None: all)."""
        values = decode(codes, scales, self.encoding.dtype) if self.encoding.eight_bit else codes.float()
        if self.encoding.reduce:
            basis, mean = self._projection(codes.device)
            if subset is not None:
                basis, mean = basis[subset], mean[subset]
            values = reconstruct(values, basis, mean)
        return values * mask[:, None, :, None]


def check_scales(scales: np.ndarray, name: str) -> None:
    """A damaged scale (not finite, or not > 0) would decode to garbage silently: refuse it."""
    if not (np.isfinite(scales).all() and (scales > 0).all()):
        raise InputError(f"cache array {name} holds damaged scales (not finite or not positive); "
                         "re-create the store (`pipeline compact` or `pipeline extract --overwrite`)")


__all__ = ["Encoding", "BlockEncoder", "Decoder", "read_projections", "check_scales", "scale_array_name", "groups"]
