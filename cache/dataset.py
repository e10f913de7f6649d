"""A cached split as a `torch.utils.data.Dataset`: one sample's codes per item, collated into CachedHiddenStates.

For a user's own training loop with a `DataLoader` (any `num_workers`: the store is opened lazily in each worker,
so the dataset pickles as a path). Items stay in the store's encoding (8-bit codes and scales, or float16 values);
`collate` pads them into one `CachedHiddenStates` batch, which a side network decodes a layer at a time.
Each item reads its own rows (one compressed chunk per layer): `CacheReader.batches` streams whole blocks and is
the faster path for full epochs; this one is the standard PyTorch interface.
"""
from __future__ import annotations

import numpy as np
import torch

from .hidden_states import CachedHiddenStates


class CachedSplit(torch.utils.data.Dataset):
    """Samples of one split of the store at `path`, with `layers` (hidden_states indices; None: every cached layer).

    dataset[i] -> {"codes": [K, n, W] tensor, "scales": [K, n, G] float16 tensor or None, "label": int64 or float32
    scalar, "index": int}, n the sample's real tokens. Raises InputError (cachetune.InputError) for a missing store,
    split or layer. limit: a seeded random subset of that many samples (as --max-train-samples).
    """

    def __init__(self, path: str, split: str = "train", layers: list[int] | None = None, limit: int | None = None):
        self.path, self.split, self.limit = path, split, limit
        self.layers = None if layers is None else list(layers)
        self._reader = None
        self._open()  # fail now, in the caller's process, for a bad path, split or layer

    def _open(self):
        if self._reader is None:
            from .reader import CacheReader

            self._reader = CacheReader(self.path, self.split, self.layers, limit=self.limit)
            self.layers = self._reader.layers
        return self._reader

    def __getstate__(self) -> dict:  # a DataLoader worker reopens the store itself
        return {**self.__dict__, "_reader": None}

    def __len__(self) -> int:
        return len(self._open())

    def __getitem__(self, i: int) -> dict:
        reader = self._open()
        sample = int(reader.samples[i])
        tokens, _, scales = reader.read_rows(np.array([sample]))
        return {"codes": torch.from_numpy(tokens), "label": torch.as_tensor(reader.labels[sample]), "index": sample,
                "scales": None if scales is None else torch.from_numpy(scales)}

    @property
    def decoder(self):
        """How the codes decode (cache/encoding.py's Decoder), or None for float16/float32 values."""
        return self._open().decoder

    def collate(self, items: list[dict]) -> tuple[CachedHiddenStates, torch.Tensor]:
        """A list of items -> (CachedHiddenStates [B, K, T, W], padded with zeros, mask inside; labels [B]).
        Pass as `DataLoader(dataset, collate_fn=dataset.collate)`."""
        lengths = [item["codes"].shape[1] for item in items]
        first = items[0]["codes"]
        codes = first.new_zeros((len(items), first.shape[0], max(lengths), first.shape[2]))
        scales = None if items[0]["scales"] is None else \
            items[0]["scales"].new_zeros((len(items), first.shape[0], max(lengths), items[0]["scales"].shape[2]))
        for row, item in enumerate(items):
            codes[row, :, :lengths[row]] = item["codes"]
            if scales is not None:
                scales[row, :, :lengths[row]] = item["scales"]
        mask = torch.arange(max(lengths))[None, :] < torch.tensor(lengths)[:, None]
        labels = torch.stack([item["label"] for item in items])
        return CachedHiddenStates(codes, mask, scales, self.decoder), labels
