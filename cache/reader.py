"""Reading a split for stage two: padded batches of selected layers, streamed piece by piece.

Memory is bounded in bytes: `buffer_bytes` of served rows (codes and scales of the selected layers: the buffer
served and the one read ahead, half each) plus one batch, not by the store's size (on object storage, while a piece
is read, its layers' spans are fetched at once, one request each, and held until copied into place). Only the rows of the samples
served are kept (a `--max-train-samples` subset keeps its own rows, not whole blocks). Shuffling is chunk-aligned:
block order is shuffled, each block's served samples are cut into pieces of at most half the budget, and samples are
shuffled within a buffer of consecutive pieces; a larger budget means more randomness and more memory.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
import zarr

from .encoding import Decoder, Encoding, check_scales, read_projections, scale_array_name
from .errors import InputError
from .remote_access import check_reachable
from .storage_options import url_protocol
from .hidden_states import CachedHiddenStates
from .layout import layer_array_name
from .store_lock import writer_of


@dataclass
class Batch:
    features: torch.Tensor  # [B, K, T, W] in the store's dtype (float16 by default; codes of an 8-bit or projected
    # store, W = D or K): zeros at padded positions
    mask: torch.Tensor  # [B, T] bool
    labels: torch.Tensor  # [B] int64 or float32
    index: np.ndarray  # [B] sample indices within the split
    scales: torch.Tensor | None = None  # [B, K, T, ceil(W/64)] float16, 8-bit stores only
    decoder: Decoder | None = None  # None: features are float16/float32 values as they are

    def hidden_states(self, to_device=lambda tensor: tensor) -> CachedHiddenStates:
        """The batch on the device `to_device` copies to, still in the store's encoding (the codes are what cross);
        each layer is decoded there when a method uses it (cache/hidden_states.py)."""
        scales = None if self.scales is None else to_device(self.scales)
        return CachedHiddenStates(to_device(self.features), to_device(self.mask), scales, self.decoder)


def open_store(path: str) -> zarr.Group:
    check_reachable(path)
    try:
        root = zarr.open_group(path, mode="r", zarr_format=3)
    except Exception:
        raise InputError(f"no cache at {path}; run `pipeline extract` first, or give the path of an existing store") from None
    if root.attrs.get("status") != "complete":
        writer = writer_of(path)
        if writer:
            raise InputError(f"the cache at {path} is being written by {writer}; wait for that run to end, then rerun")
        stopped_by = root.attrs.get("stopped_by")  # written by `pipeline extract` when a check or the model failed
        if stopped_by:
            raise InputError(f"the cache at {path} is unfinished: its `pipeline extract` stopped with: {stopped_by} "
                             "(fix that, then extract again)")
        raise InputError(f"the cache at {path} is incomplete; rerun the same `pipeline extract` command to finish it")
    return root


def subset_positions(count: int, limit: int | None) -> np.ndarray:
    """Sorted positions of a seeded random subset of `limit` out of `count` (all when limit is None). InputError when
    limit < 1 (`--max-train-samples 0` would train on nothing and still save a model)."""
    if limit is not None and limit < 1:
        raise InputError(f"--max-train-samples {limit}: give at least 1 (or leave it out to train on every sample)")
    if limit is None or limit >= count:
        return np.arange(count)
    return np.sort(np.random.default_rng(0).permutation(count)[:limit])


def read_checked(array: zarr.Array, rows: slice) -> np.ndarray:
    """Read rows; a chunk whose checksum fails raises an error that names the array."""
    try:
        return array[rows]
    except ValueError as error:
        if "checksum" not in str(error).lower():
            raise
        raise InputError(f"cache array {array.path} is corrupt (crc32c checksum mismatch near rows "
                         f"{rows.start}..{rows.stop}); re-extract with --overwrite") from None


def read_scales(array: zarr.Array, rows: slice) -> np.ndarray:
    """Scales read like features (checksummed), then checked: a damaged scale is an InputError naming the array."""
    scales = read_checked(array, rows)
    check_scales(scales, array.path)
    return scales


def read_each(arrays: list[zarr.Array], read, rows: slice, at_once: bool) -> list[np.ndarray]:
    """`read(array, rows)` of every array, all at once when `at_once` (stores on object storage): there each is a
    request of its own, and one round trip per piece instead of one per layer keeps a far bucket's link busy
    (bench/remote_read.py); the arrays' rows are then held at once until gathered. On local disk one after another:
    each extra reading thread costs a malloc arena (~35 MB of RSS here) and gains nothing."""
    if len(arrays) < 2 or not at_once:
        return [read(array, rows) for array in arrays]
    with ThreadPoolExecutor(min(len(arrays), MAX_REQUESTS), thread_name_prefix="cache-read") as pool:
        return list(pool.map(lambda array: read(array, rows), arrays))


MAX_REQUESTS = 16  # arrays read at once (zarr decodes on its own single thread; these threads wait on requests)
BUFFER_BYTES = 48 << 20  # the default read-ahead budget's cap: served rows held, the buffer served and the one ahead


class CacheReader:
    def __init__(self, path: str, split: str, layers: list[int] | None = None, in_memory: bool = False,
                 limit: int | None = None, device: str | torch.device = "cpu"):
        """limit: serve only a seeded random subset of this many samples (for quick or scaled runs).
        in_memory: pack the needed layers once on `device` (a GPU's memory, or RAM) and gather batches there."""
        # One decode thread: zarr's default pool keeps a malloc arena per thread (~35 MB each here)
        # and gains nothing for shard-at-a-time reads.
        zarr.config.set({"threading.max_workers": 1})
        self.root = open_store(path)
        self.remote = url_protocol(path) is not None  # layers read at once: see read_each
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
        self.encoding = Encoding.of_store(self.root.attrs)
        self.scale_arrays = [self.group[scale_array_name(i)] for i in self.layers] if self.encoding.eight_bit else []
        self.decoder = None if self.encoding.plain else Decoder(
            self.encoding, read_projections(self.root, self.layers) if self.encoding.reduce else {}, self.layers)
        self.dtype = torch.from_numpy(np.empty(0, self.arrays[0].dtype)).dtype  # the cache's, as torch names it
        self.block_tokens = int(self.group.attrs["block_tokens"])
        self.lengths = self.group["length"][:].astype(np.int64)
        self.token_start = self.group["token_start"][:]
        self.labels = self.group["label"][:]
        self.samples = subset_positions(len(self.lengths), limit)
        in_token_order = self.samples[np.argsort(self.token_start[self.samples], kind="stable")]
        block_of = self.token_start[in_token_order] // self.block_tokens
        blocks = [in_token_order[block_of == b] for b in range(int(self.group.attrs["num_blocks"]))]
        self.block_samples = [samples for samples in blocks if len(samples)]
        self.memory = self._load(torch.device(device)) if in_memory else None
        self.buffer_peak_bytes = 0  # the most served rows (codes and scales) a `batches` pass holds at once

    def _load(self, device: torch.device) -> torch.Tensor:
        """The needed layers packed [K, tokens, D] in the cache's dtype on `device` (real tokens plus the few
        rows that round each block up to whole chunks)."""
        shape = (len(self.arrays), *self.arrays[0].shape)
        needed = int(np.prod(shape)) * self.arrays[0].dtype.itemsize
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            if needed > 0.8 * free:  # leave room for the side network and its activations
                raise InputError(f"--in-memory needs {needed / 1e9:.2f} GB on {device} for {len(self.arrays)} layers of "
                                 f"the {self.group.basename!r} split, but {free / 1e9:.2f} GB is free; drop --in-memory "
                                 "to stream batches")
        memory = torch.empty(shape, dtype=self.dtype, device=device)
        for k, array in enumerate(self.arrays):
            memory[k] = torch.from_numpy(read_checked(array, slice(None))).to(device)
        if self.scale_arrays:  # checked on the real tokens' rows (a block's unused tail holds zeros)
            real = np.concatenate([np.arange(s, s + n) for s, n in zip(self.token_start, self.lengths)])
            scales = [read_checked(array, slice(None)) for array in self.scale_arrays]
            for array, values in zip(self.scale_arrays, scales):
                check_scales(values[real], array.path)
            self.scale_memory = torch.from_numpy(np.stack(scales)).to(device)
        # Per-sample facts beside the features, so a batch is gathered from one small index copy (_gather).
        self.facts = {name: torch.from_numpy(np.ascontiguousarray(values)).to(device) for name, values in
                      (("length", self.lengths), ("start", self.token_start.astype(np.int64)), ("label", self.labels))}
        return memory

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def token_bytes(self) -> int:
        """Bytes one served token holds in a buffer: its codes and scales over the selected layers."""
        codes = len(self.arrays) * self.arrays[0].shape[1] * self.arrays[0].dtype.itemsize
        return codes + sum(array.shape[1] * array.dtype.itemsize for array in self.scale_arrays)

    @property
    def default_buffer_bytes(self) -> int:
        """The default budget: what the reader held before it was bounded in bytes (two buffers of two whole blocks
        of the selected layers), at most BUFFER_BYTES (48 MB, the smallest budget that read as fast: BENCHMARKS.md).
        A reader of few layers keeps that little; one of many layers is capped."""
        return min(BUFFER_BYTES, 4 * self.block_tokens * self.token_bytes)

    def _pieces(self, buffer_bytes: int) -> list[list[np.ndarray]]:
        """Per block, its served samples (in token order) cut into pieces of at most buffer_bytes / 2 of rows
        (at least one sample each)."""
        budget = max(1, buffer_bytes // 2 // self.token_bytes)  # tokens per piece
        blocks = []
        for samples in self.block_samples:
            pieces, start, tokens = [], 0, 0
            for i, length in enumerate(self.lengths[samples]):
                if tokens and tokens + length > budget:
                    pieces.append(samples[start:i])
                    start, tokens = i, 0
                tokens += length
            blocks.append(pieces + [samples[start:]])
        return blocks

    def read_rows(self, samples: np.ndarray) -> tuple[np.ndarray, dict, np.ndarray | None]:
        """The served rows of `samples` (one block's, in token order) only: codes [K, tokens, W], each sample's first
        row among them, and the scales [K, tokens, G] (8-bit stores; else None). The span between the first and last
        sample is read one layer at a time and the rows of samples not served are dropped at once."""
        starts, lengths = self.token_start[samples], self.lengths[samples]
        first = int(starts.min())
        span = slice(first, int((starts + lengths).max()))
        offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        rows = None if int(lengths.sum()) == span.stop - span.start else \
            np.concatenate([np.arange(s - first, s - first + n) for s, n in zip(starts, lengths)])
        if rows is None:  # every row of the span is served: positions are the rows' own
            offsets = starts - first
        count = span.stop - span.start if rows is None else len(rows)

        def gather(arrays, read):  # [K, count, width], each layer's served rows copied once into place
            out = np.empty((len(arrays), count, arrays[0].shape[1]), arrays[0].dtype)
            for k, values in enumerate(read_each(arrays, read, span, self.remote)):
                if rows is None:
                    out[k] = values
                else:
                    np.take(values, rows, axis=0, out=out[k])
            return out

        tokens = gather(self.arrays, read_checked)
        scales = gather(self.scale_arrays, read_scales) if self.scale_arrays else None
        return tokens, dict(zip(samples.tolist(), offsets.tolist())), scales

    def _read_group(self, pieces: list[np.ndarray]) -> dict:
        data = {}
        for samples in pieces:
            tokens, offsets, scales = self.read_rows(samples)
            data.update({sample: (tokens, offset, scales) for sample, offset in offsets.items()})
        return data

    def _batch_samples(self, pieces: list[np.ndarray], batch_size: int, shuffle: bool, rng, by_length: bool):
        """The buffer's samples cut into batches: shuffled (or in order); with by_length, batches of similar
        length (sorted within the buffer), served in shuffled order, so less padding is computed."""
        samples = np.concatenate(pieces)
        samples = rng.permutation(samples) if shuffle else np.sort(samples)
        if by_length:
            samples = samples[np.argsort(self.lengths[samples], kind="stable")]
        batches = [samples[first:first + batch_size] for first in range(0, len(samples), batch_size)]
        return [batches[i] for i in rng.permutation(len(batches))] if by_length and shuffle else batches

    def batches(self, batch_size: int, shuffle: bool = False, seed: int = 0, buffer_bytes: int | None = None,
                pin_memory: bool = False, by_length: bool = False):
        """Batches of `batch_size`; the next buffer (at most buffer_bytes / 2 of served rows; None: the default
        budget) is read on a background thread while the current one is served. pin_memory: collate into
        page-locked memory, for non-blocking GPU copies. by_length: length-bucketed batches within each buffer (see
        `_batch_samples`)."""
        buffer_bytes = buffer_bytes or self.default_buffer_bytes
        rng = np.random.default_rng(seed)
        order = rng.permutation(len(self.block_samples)) if shuffle else np.arange(len(self.block_samples))
        pieces = self._pieces(buffer_bytes)
        groups, sizes, half = [], [], buffer_bytes // 2
        for piece in (piece for block in order for piece in pieces[block]):
            size = int(self.lengths[piece].sum()) * self.token_bytes
            if not groups or sizes[-1] + size > half:
                groups.append([])
                sizes.append(0)
            groups[-1].append(piece)
            sizes[-1] += size
        held = max((a + b for a, b in zip(sizes, sizes[1:] + [0])), default=0)  # the group served + the one read ahead
        self.buffer_peak_bytes = max(self.buffer_peak_bytes, held)
        if self.memory is not None:  # same order as streaming; nothing to read
            for blocks in groups:
                for samples in self._batch_samples(blocks, batch_size, shuffle, rng, by_length):
                    yield self._gather(samples)
            return
        with ThreadPoolExecutor(1, thread_name_prefix="cache-reader") as pool:
            pending = pool.submit(self._read_group, groups[0]) if groups else None
            for index, blocks in enumerate(groups):
                data = pending.result()
                pending = pool.submit(self._read_group, groups[index + 1]) if index + 1 < len(groups) else None
                for samples in self._batch_samples(blocks, batch_size, shuffle, rng, by_length):
                    yield self._collate(samples, data, pin_memory)
                del data

    def _gather(self, samples: np.ndarray) -> Batch:
        """A padded batch gathered from the packed in-memory layers, on their device (labels too). The samples
        cross once, pinned and without blocking; lengths, starts and labels are looked up on the device."""
        device = self.memory.device
        index = torch.from_numpy(np.ascontiguousarray(samples, dtype=np.int64))
        index = index.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else index
        steps = torch.arange(int(self.lengths[samples].max()), device=device)  # the length from the host's copy
        mask = steps[None, :] < self.facts["length"][index][:, None]
        rows = torch.where(mask, self.facts["start"][index][:, None] + steps[None, :], 0)
        features = self.memory[:, rows].transpose(0, 1)  # [B, K, T, W]
        features = features.masked_fill(~mask[:, None, :, None], 0)
        scales = self.scale_memory[:, rows].transpose(0, 1) if self.scale_arrays else None
        return Batch(features, mask, self.facts["label"][index], samples, scales, self.decoder)

    def _collate(self, samples: np.ndarray, data: dict, pin_memory: bool = False) -> Batch:
        """Padded [B, K, T, D] in the cache's dtype (half the bytes of float32 for a float16 cache)."""
        lengths = self.lengths[samples]
        shape = (len(samples), len(self.layers), int(lengths.max()), self.arrays[0].shape[1])
        features = torch.zeros(shape, dtype=self.dtype, pin_memory=pin_memory)
        padded = features.numpy()
        scales = torch.zeros((*shape[:3], self.scale_arrays[0].shape[1]), dtype=torch.float16,
                             pin_memory=pin_memory) if self.scale_arrays else None
        for row, sample in enumerate(samples):
            tokens, start, token_scales = data[int(sample)]
            padded[row, :, :lengths[row]] = tokens[:, start:start + lengths[row]]
            if scales is not None:
                scales.numpy()[row, :, :lengths[row]] = token_scales[:, start:start + lengths[row]]
        mask = torch.arange(shape[2])[None, :] < torch.from_numpy(lengths)[:, None]
        return Batch(features, mask, torch.from_numpy(self.labels[samples]), samples, scales, self.decoder)
