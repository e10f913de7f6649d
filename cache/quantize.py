"""8-bit stores: int8 or float8 (e4m3) codes with one float16 scale per token and group of GROUP channels.

Why per-token scales over channel groups (measured on real activations, `python bench/compact.py scales`;
figures in BENCHMARKS.md, "Compact caches"):
- SmolLM2-135M's hidden states 12-28 carry massive activations (|x| up to ~24,500) on a few channels of a few
  tokens, while most values are below 10. One absmax scale per token then rounds almost every ordinary value of
  that token to zero (int8 step = 24,500 / 127 = 193).
- One scale per channel fitted on the training split fails on the same channels the other way round: the
  massive channel's scale is set by its few huge values, so its ordinary values (on every other token) vanish,
  and it needs a fitting pass that `compact` and extraction (block by block) would have to run first.
- Keeping outlier channels in float16 (LLM.int8()) needs a per-layer channel list fitted on the training split
  and a mixed-width layout; it was no better than groups of 64 on the measured layers.
- Groups of GROUP = 64 channels per token confine a massive value to its own group of its own token; every other
  group keeps a scale that fits its values. Cost: one float16 per 64 codes (0.031 bytes per value), no fitting,
  and every block is encoded on its own (extraction and `compact` stay streaming and resumable).

fp8 e4m3 (torch.float8_e4m3fn: 1 sign, 4 exponent, 3 mantissa bits, max 448) has a relative step instead of an
absolute one, so it keeps small values of a group beside large ones better than int8, and rounds large ones
coarser (3 mantissa bits: up to 6.25% relative error per value). zarr has no float8 dtype: its bytes are stored
as uint8 (the store's attributes say so: `encoding.storage`).

Decoding (codes x scale) runs on the training device: the 8-bit codes and the small scales are what cross to it.
"""
from __future__ import annotations

import math

import numpy as np
import torch

GROUP = 64  # channels per scale
DTYPES = ("float16", "float32", "int8", "fp8")
EIGHT_BIT = ("int8", "fp8")
STORAGE = {"float16": "float16", "float32": "float32", "int8": "int8", "fp8": "uint8"}  # zarr dtype of the codes
CODE_MAX = {"int8": 127.0, "fp8": 448.0}  # the largest code; a group's absmax maps onto it
SCALE_TINY = 2.0 ** -24  # float16's smallest subnormal: a group of zeros keeps a non-zero scale


def groups(width: int) -> int:
    """Scales per token for `width` channels: ceil(width / GROUP) (the last group may be narrower)."""
    return math.ceil(width / GROUP)


def _grouped_absmax(x: torch.Tensor) -> torch.Tensor:
    """[N, W] -> [N, G] absmax of each group of GROUP channels (a narrower last group is padded with zeros)."""
    n, width = x.shape
    padded = torch.nn.functional.pad(x.abs(), (0, groups(width) * GROUP - width))
    return padded.view(n, -1, GROUP).amax(-1)


def encode(x: torch.Tensor, dtype: str) -> tuple[torch.Tensor, torch.Tensor]:
    """x [N, W] float -> (codes [N, W] int8 (int8) or uint8 (fp8's bytes), scales [N, ceil(W/64)] float16).

    scale_g = absmax_g / CODE_MAX, rounded to float16 first so decoding uses exactly the stored scale;
    int8: q = clamp(round(x / scale_g), -127, 127); fp8: q = e4m3(x / scale_g) (round to nearest, |x/scale| <= 448).
    Raises ValueError for a non-finite x or a scale beyond float16's range (|x| > 65504 * CODE_MAX).
    """
    x = x.float()
    if not torch.isfinite(x).all():
        raise ValueError("features are not finite (inf or nan); they cannot be encoded")
    top = CODE_MAX[dtype]
    scales = (_grouped_absmax(x) / top).clamp_min(SCALE_TINY).to(torch.float16)
    if not torch.isfinite(scales).all():
        raise ValueError(f"a value beyond {65504 * top:.3g} does not fit a float16 scale")
    wide = scales.float().repeat_interleave(GROUP, -1)[:, :x.shape[1]]
    scaled = x / wide
    if dtype == "int8":
        codes = scaled.round().clamp_(-127, 127).to(torch.int8)
    else:
        codes = scaled.clamp_(-448, 448).to(torch.float8_e4m3fn).view(torch.uint8)
    return codes, scales


def decode(codes: torch.Tensor, scales: torch.Tensor, dtype: str) -> torch.Tensor:
    """codes [..., W] (int8, or uint8 holding e4m3 bytes), scales [..., ceil(W/64)] -> float32 [..., W] on
    codes' device: x = code * scale_g."""
    values = codes.view(torch.float8_e4m3fn).float() if dtype == "fp8" else codes.float()
    wide = scales.float().repeat_interleave(GROUP, -1)[..., :codes.shape[-1]]
    return values * wide


def encode_numpy(x: np.ndarray, dtype: str) -> tuple[np.ndarray, np.ndarray | None]:
    """encode() for host arrays: (codes, scales); float16/float32 are a plain cast with no scales."""
    if dtype not in EIGHT_BIT:
        return x.astype(STORAGE[dtype]), None
    codes, scales = encode(torch.from_numpy(np.ascontiguousarray(x)), dtype)
    return codes.numpy(), scales.numpy()


def relative_error(x: torch.Tensor, y: torch.Tensor) -> float:
    """||x - y||_F / ||x||_F over all values (float64)."""
    x, y = x.double(), y.double()
    return float((x - y).norm() / x.norm().clamp_min(1e-30))
