"""How much more room an unfinished store needs, from its block plan: the figure a full-disk error gives."""
from __future__ import annotations

import math

import numpy as np

from cachetune.cache.layout import plan_blocks
from cachetune.cache.quantize import EIGHT_BIT, STORAGE, groups
from cachetune.cache.writer import open_group

from .extract import SPLITS, ExtractSettings, tokenize
from .layer_selection import parse_layers

FS_BLOCK = 4096  # a file takes whole filesystem blocks


def bytes_still_needed(backbone, dataset, settings: ExtractSettings) -> tuple[int, int] | None:
    """(bytes, blocks): an upper bound on the room the unfinished part of the store at settings.out takes, or None.

    A split already laid out counts its blocks whose done flag is unset; a split not yet laid out is planned
    as `extract` plans it, plus its small per-sample arrays and metadata. A block's shards are counted
    uncompressed (lossless codecs save only ~5-10% on float16 activations) with each chunk's header,
    checksum and index entry and each file rounded up to a whole 4 KiB filesystem block.
    """
    try:
        root = open_group(settings.out, mode="r")
    except Exception:
        root = None
    layers = parse_layers(settings.layers, backbone.num_layers, backbone.hidden_size)
    def shard_file(values_per_token: int, itemsize: int) -> int:
        shard = settings.block_tokens * values_per_token * itemsize
        return -(-(shard + 64 * (settings.block_tokens // settings.chunk_tokens)) // FS_BLOCK) * FS_BLOCK

    codes = shard_file(backbone.hidden_size, np.dtype(STORAGE[settings.dtype]).itemsize)
    scales = shard_file(groups(backbone.hidden_size), 2) if settings.dtype in EIGHT_BIT else 0  # float16 per 64 channels
    block_bytes = len(layers) * (codes + scales) + FS_BLOCK  # + its done flag
    blocks, extra = 0, 0
    for split in SPLITS:
        rows = dataset.rows(split)
        if len(rows) == 0:
            continue
        if root is not None and split in root and root[split].attrs.get("ready"):
            blocks += int((root[split]["done"][:] == 0).sum())
            continue
        if backbone.modality == "text":
            lengths = np.array([len(ids) for ids in tokenize(backbone.tokenizer, dataset, rows, settings.max_length)[0]["input_ids"]])
        elif root is not None and "max_length" in root.attrs:  # tokens per image, known once the store's attributes exist
            lengths = np.full(len(rows), int(root.attrs["max_length"]))
        else:
            return None
        blocks += plan_blocks(lengths, settings.block_tokens).num_blocks
        extra += 32 * len(rows) + (len(layers) + 8) * 2 * FS_BLOCK  # row, length, label, token_start; metadata files
    return blocks * block_bytes + extra, blocks


def describe_room(backbone, dataset, settings: ExtractSettings) -> str:
    """'up to 3.2 MB (130 unfinished blocks, uncompressed)', or '' when that cannot be worked out."""
    try:
        needed = bytes_still_needed(backbone, dataset, settings)
    except Exception:  # the error being reported matters more than this figure
        return ""
    if needed is None:
        return ""
    size, blocks = needed
    return f"up to {_megabytes(size)} ({blocks} unfinished blocks, uncompressed)"


def _megabytes(size: int) -> str:
    """Rounded up: the figure is a bound."""
    return f"{math.ceil(size / 1e5) / 10:.1f} MB" if size < 1e9 else f"{math.ceil(size / 1e7) / 100:.2f} GB"
