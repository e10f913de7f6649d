"""Reading a split for stage two: padded batches of selected layers, streamed block by block.

Memory is bounded by `buffer_blocks` blocks of the selected layers plus one batch, not by the
store's size. Shuffling is chunk-aligned: block order is shuffled, then samples are shuffled
within a buffer of blocks; more buffer blocks mean more randomness and more memory.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import zarr

from .errors import InputError
from .layout import layer_array_name


@dataclass
class Batch:
    features: torch.Tensor  # [B, K, T, D] float32
    mask: torch.Tensor  # [B, T] bool
    labels: torch.Tensor  # [B] int64 or float32
    index: np.ndarray  # [B] sample positions within the split


def open_store(path: str) -> zarr.Group:
    try:
        root = zarr.open_group(path, mode="r", zarr_format=3)
    except Exception:
        raise InputError(f"no cache at {path}; run `pipeline extract` first or pass --cache PATH") from None
    if root.attrs.get("status") != "complete":
        raise InputError(f"the cache at {path} is incomplete; rerun the same `pipeline extract` command to finish it")
    return root


class CacheReader:
    def __init__(self, path: str, split: str, layers: list[int] | None = None, in_memory: bool = False):
        self.root = open_store(path)
        if split not in self.root:
            raise InputError(f"the cache at {path} has no {split!r} split; it has: {', '.join(sorted(self.root.group_keys()))}")
        self.group = self.root[split]
        cached = list(self.root.attrs["layers"])
        self.layers = cached if layers is None else list(layers)
        missing = [i for i in self.layers if i not in cached]
        if missing:
            raise InputError(f"the cache at {path} lacks layers {missing} (it has {cached}); "
                             "re-extract with --layers all or a list that includes them")
        self.arrays = [self.group[layer_array_name(i)] for i in self.layers]
        self.block_tokens = int(self.group.attrs["block_tokens"])
        self.lengths = self.group["length"][:].astype(np.int64)
        self.token_start = self.group["token_start"][:]
        self.labels = self.group["label"][:]
        block_of = self.token_start // self.block_tokens
        self.block_samples = [np.flatnonzero(block_of == b) for b in range(int(self.group.attrs["num_blocks"]))]
        self.memory = [array[:] for array in self.arrays] if in_memory else None

    def __len__(self) -> int:
        return len(self.lengths)

    def _read_block(self, block: int) -> tuple[np.ndarray, int]:
        """[K, used tokens, D] for one block, and the block's first token row."""
        samples = self.block_samples[block]
        first = block * self.block_tokens
        used = int((self.token_start[samples] + self.lengths[samples]).max() - first)
        rows = slice(first, first + used)
        if self.memory is not None:
            return np.stack([m[rows] for m in self.memory]), first
        return np.stack([array[rows] for array in self.arrays]), first

    def batches(self, batch_size: int, shuffle: bool = False, seed: int = 0, buffer_blocks: int = 4):
        rng = np.random.default_rng(seed)
        order = rng.permutation(len(self.block_samples)) if shuffle else np.arange(len(self.block_samples))
        for group_start in range(0, len(order), buffer_blocks):
            blocks = order[group_start:group_start + buffer_blocks]
            data = {}
            for block in blocks:
                data[block] = self._read_block(block)
            samples = np.concatenate([self.block_samples[b] for b in blocks])
            samples = rng.permutation(samples) if shuffle else np.sort(samples)
            for first in range(0, len(samples), batch_size):
                yield self._collate(samples[first:first + batch_size], data)

    def _collate(self, samples: np.ndarray, data: dict) -> Batch:
        lengths = self.lengths[samples]
        features = np.zeros((len(samples), len(self.layers), int(lengths.max()), self.arrays[0].shape[1]), np.float32)
        for row, sample in enumerate(samples):
            block = int(self.token_start[sample] // self.block_tokens)
            tokens, first = data[block]
            start = int(self.token_start[sample] - first)
            features[row, :, :lengths[row]] = tokens[:, start:start + lengths[row]]
        mask = torch.arange(features.shape[2])[None, :] < torch.from_numpy(lengths)[:, None]
        return Batch(torch.from_numpy(features), mask, torch.from_numpy(self.labels[samples]), samples)
