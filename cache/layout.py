"""The store's layout: one group per split, packed real tokens per layer, block = one shard.

Per-sample arrays (row, length, label, token_start) keep the split's original order. A block is
a group of samples whose tokens fit in `block_tokens`, taken from a seeded permutation of the
split, so every block is a random subset: real files are often sorted by label, and a reader that
shuffles whole blocks then still sees mixed batches. A block owns exactly one shard of every layer
array, so its write never touches another block's data. Inside a block, samples are laid out
longest first (the order forward batches run in), so each batch's tokens land as one contiguous
slice. Where a sample's tokens are is in `token_start`/`length`.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import numpy as np

FORMAT_VERSION = 2
CODECS = ("lz4", "zstd", "none")


def canonical_json(value) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def key_sha256(key: dict) -> str:
    return hashlib.sha256(canonical_json(key).encode()).hexdigest()


def layer_array_name(index: int) -> str:
    return f"layer_{index:02d}"


@dataclass
class BlockPlan:
    """Where each sample of a split goes: its block, its token start, and the samples of each block."""

    block_tokens: int
    token_start: np.ndarray  # [N] int64
    block_samples: list[np.ndarray]  # per block: sample indices, longest first (the write order)

    @property
    def num_blocks(self) -> int:
        return len(self.block_samples)


def plan_blocks(lengths: np.ndarray, block_tokens: int, seed: int = 0) -> BlockPlan:
    if len(lengths) and lengths.max() > block_tokens:
        raise ValueError(f"a sample of {lengths.max()} tokens does not fit a block of {block_tokens}")
    token_start = np.zeros(len(lengths), dtype=np.int64)
    order = np.random.default_rng(seed).permutation(len(lengths))
    blocks, first, used = [], 0, 0
    for position, sample in enumerate(order):
        if used + lengths[sample] > block_tokens:
            blocks.append(order[first:position])
            first, used = position, 0
        used += lengths[sample]
    if len(lengths):
        blocks.append(order[first:])
    ordered = []
    for b, samples in enumerate(blocks):
        samples = samples[np.argsort(-lengths[samples], kind="stable")]
        starts = np.concatenate([[0], np.cumsum(lengths[samples])[:-1]]) + b * block_tokens
        token_start[samples] = starts
        ordered.append(samples)
    return BlockPlan(block_tokens, token_start, ordered)


LOSSY_REMOVED = ("--lossy was removed (bitround:7 saved 0.0% of float16's bytes under lz4, measured on MiniLM); use "
                 "--dtype int8 or --dtype fp8 (0.51 of float16's bytes), or `pipeline compact` for an existing store")


def codec_pipeline(codec: str, lossy: str | None = None):
    """(filters, compressors) for the layer arrays. Every chunk carries a crc32c checksum."""
    from zarr.codecs import BloscCodec, Crc32cCodec

    if codec not in CODECS:
        raise ValueError(f"unknown codec {codec!r}; choose one of {', '.join(CODECS)}")
    if lossy:
        raise ValueError(LOSSY_REMOVED)
    compressors = {
        "lz4": [BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")],
        "zstd": [BloscCodec(cname="zstd", clevel=1, shuffle="shuffle")],
        "none": [],
    }[codec] + [Crc32cCodec()]
    return [], compressors
