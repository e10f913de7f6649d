"""8-bit stores: int8 or float8 (e4m3) codes with one float16 scale per token and group of GROUP channels.

Why per-token scales over channel groups (measured on real activations, `python bench/compact_scales.py`; the
tables are in BENCHMARKS.md, "Compact caches"; "ordinary error" is the relative error over every channel but the
1% with the largest max |x|):
- One absmax scale per token (the trap): SmolLM2-135M's hidden states 12-28 reach |x| ~27,000 on a few channels;
  int8 then zeroes 12% of the ordinary values (ordinary error 0.38 mean, 0.67 worst layer).
- One scale per channel fitted on the training split: ordinary error 0.024 on SmolLM2 but 0.018 on MiniLM, where it
  is the worst int8 choice (1.7x per-token groups' error), and it needs a fitting pass before any block is
  written, so extraction and `compact` could not encode block by block as they stream.
- The top 1% channels kept in float16, per-token int8 for the rest (LLM.int8()): the best on SmolLM2 (ordinary
  error 0.015) and close on MiniLM (0.010 vs 0.009), but it too needs a fitted per-layer channel list, and a
  second, mixed-width array per layer.
- Groups of GROUP = 64 channels per token (chosen): no fitting, every block encoded on its own, one float16 per 64
  codes (0.031 bytes per value). MiniLM: ordinary error 0.009, the best int8 choice but groups of 32 (0.007, at
  twice the scale bytes, which breaks the 0.52 bytes goal). SmolLM2: a massive value only coarsens its own group
  of its own token (2% of ordinary values zeroed, against 12% per token), but the ordinary error stays 0.12 in
  int8: its middle layers' ordinary values are themselves heavy-tailed within a token's group. For such decoders
  use fp8 with the same groups: ordinary error 0.024 on both backbones, none zeroed.

fp8 e4m3 (torch.float8_e4m3fn: 1 sign, 4 exponent, 3 mantissa bits, max 448) has a relative step instead of an
absolute one, so it keeps small values of a group beside large ones better than int8, and rounds large ones
coarser (3 mantissa bits: up to 6.25% relative error per value). zarr has no float8 dtype: its bytes are stored
as uint8 (the store's attributes say so: `encoding.storage`).

Decoding (codes x scale) runs on the training device: the 8-bit codes and the small scales are what cross to it.
"""
from __future__ import annotations

import math
from contextlib import contextmanager

import ml_dtypes
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


def encode(x: torch.Tensor, dtype: str) -> tuple[torch.Tensor, torch.Tensor]:
    """x [N, W] float -> (codes [N, W] int8 (int8) or uint8 (fp8's bytes), scales [N, ceil(W/64)] float16).

    scale_g = absmax_g / CODE_MAX, rounded to float16 first so decoding uses exactly the stored scale;
    int8: q = clamp(round(x / scale_g), -127, 127); fp8: q = e4m3(x / scale_g) (round to nearest, |x/scale| <= 448).
    Raises ValueError for a non-finite x or a scale beyond float16's range (|x| > 65504 * CODE_MAX).
    """
    n, width = x.shape
    grouped = torch.nn.functional.pad(x.float(), (0, groups(width) * GROUP - width)).view(n, -1, GROUP)  # [N, G, 64]
    absmax = grouped.abs().amax(-1)
    if not torch.isfinite(absmax).all():
        raise ValueError("features are not finite (inf or nan); they cannot be encoded")
    top = CODE_MAX[dtype]
    scales = (absmax / top).clamp_min_(SCALE_TINY).to(torch.float16)
    if not torch.isfinite(scales).all():
        raise ValueError(f"a value beyond {65504 * top:.3g} does not fit a float16 scale")
    scaled = grouped.div_(scales.float().unsqueeze(-1)).view(n, -1)[:, :width]
    if dtype == "int8":
        codes = scaled.round_().clamp_(-127, 127).to(torch.int8)
    else:
        codes = scaled.clamp_(-448, 448).to(torch.float8_e4m3fn).view(torch.uint8)
    return codes, scales


def decode(codes: torch.Tensor, scales: torch.Tensor, dtype: str) -> torch.Tensor:
    """codes [..., W] (int8, or uint8 holding e4m3 bytes), scales [..., ceil(W/64)] -> float32 [..., W] on
    codes' device: x = code * scale_g."""
    values = codes.view(torch.float8_e4m3fn).float() if dtype == "fp8" else codes.float()
    width = codes.shape[-1]
    if width % GROUP == 0:  # the common case: a view, no copy of the scales
        return (values.view(*codes.shape[:-1], -1, GROUP) * scales.float().unsqueeze(-1)).view(codes.shape)
    wide = scales.float().repeat_interleave(GROUP, -1)[..., :width]
    return values * wide


def host_array(x: torch.Tensor) -> np.ndarray:
    """A CPU tensor as a numpy array sharing its memory; bfloat16, which numpy lacks, as ml_dtypes.bfloat16
    (extraction's fp8 block buffers)."""
    if x.dtype == torch.bfloat16:
        return x.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return x.numpy()


def encode_numpy(x: np.ndarray, dtype: str) -> tuple[np.ndarray, np.ndarray | None]:
    """encode() for host arrays: (codes, scales); float16/float32 are a plain cast with no scales."""
    if dtype not in EIGHT_BIT:
        return x.astype(STORAGE[dtype]), None
    with one_thread():
        codes, scales = encode(torch.from_numpy(np.ascontiguousarray(x)), dtype)
    return codes.numpy(), scales.numpy()


@contextmanager
def one_thread():
    """Small CPU ops (one block's element-wise encoding; extraction's gather, cast and min/max of a batch) run far
    slower split over threads when the cores are busy (each op waits at a barrier for a descheduled thread: 100x
    measured on 2 shared cores), so they run on one; the forward pass keeps every thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def relative_error(x: torch.Tensor, y: torch.Tensor) -> float:
    """||x - y||_F / ||x||_F over all values (float64)."""
    x, y = x.double(), y.double()
    return float((x - y).norm() / x.norm().clamp_min(1e-30))
