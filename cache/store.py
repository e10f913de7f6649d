"""A cache written by stage one, opened for reading: what it holds, and its splits as datasets or streamed batches."""
from __future__ import annotations

from .dataset import CachedSplit
from .errors import InputError
from .info import describe_store
from .reader import CacheReader, open_store


class Cache:
    """The zarr store at `path` (a folder or an fsspec URL), read-only. Raises InputError when there is no complete
    store there (the message says how to finish or make one)."""

    def __init__(self, path: str = "artifacts/features.zarr"):
        self.path = str(path)
        self.root = open_store(self.path)

    def __repr__(self) -> str:
        return f"Cache({self.path!r})"

    @property
    def attrs(self) -> dict:
        """The store's key and facts: backbone, layers, hidden size, task, label names, encoding, ..."""
        return dict(self.root.attrs)

    @property
    def splits(self) -> list[str]:
        return sorted(self.root.group_keys())

    @property
    def layers(self) -> list[int]:
        """The cached hidden_states indices (0 = embeddings)."""
        return list(self.root.attrs["layers"])

    def info(self) -> dict:
        """What `pipeline info --json` prints: backbone, data, layers, encoding, samples and bytes per split."""
        return describe_store(self.path)

    def dataset(self, split: str = "train", layers: list[int] | None = None, limit: int | None = None) -> CachedSplit:
        """The split as a torch Dataset of per-sample codes; batch it with DataLoader(..., collate_fn=d.collate),
        which gives (CachedHiddenStates [B, K, T, W], labels [B]). layers: hidden_states indices (None: all cached)."""
        return CachedSplit(self.path, split, layers, limit)

    def batches(self, split: str = "train", layers: list[int] | None = None, batch_size: int = 32,
                shuffle: bool = False, seed: int = 0, limit: int | None = None, by_length: bool = False):
        """Batches streamed block by block (the fast path `pipeline fit` trains on): yields (CachedHiddenStates
        [B, K, T, W], labels [B]); memory stays within the reader's byte budget."""
        if batch_size < 1:
            raise InputError(f"batch_size {batch_size}: give at least 1")
        reader = CacheReader(self.path, split, layers, limit=limit)
        for batch in reader.batches(batch_size, shuffle=shuffle, seed=seed, by_length=by_length):
            yield batch.hidden_states(), batch.labels
