"""Writing a store: refuse mismatched settings, pre-allocate arrays, write whole blocks, resume.

Crash safety: a block's shards are written whole, then its `done` flag (one chunk per block);
`status: complete` is written last. A rerun rewrites every block whose flag is not set.

The store may be a local path or an fsspec URL (s3://bucket/features.zarr, file:///shared/f.zarr).
"""
from __future__ import annotations

import os
import queue
import threading

import numpy as np
import torch
import zarr

from .encoding import BlockEncoder, Encoding, scale_array_name
from .errors import OtherStoreError
from .layout import BlockPlan, key_sha256, layer_array_name
from .quantize import decode, groups
from .remote_access import check_reachable
from .store_lock import readers_excluded

ERROR_SAMPLE_EVERY = 16  # the recorded encoding error covers every 16th real token of each block


def store_fs(path: str, storage_options: dict | None = None):
    """(fsspec filesystem, path within it) for a local path or an fsspec URL (with these options added to fsspec's
    configuration)."""
    from fsspec.core import url_to_fs

    return url_to_fs(str(path), **(storage_options or {}))


def open_group(path: str, mode: str, storage_options: dict | None = None) -> zarr.Group:
    """The root group of a store at a local path or an fsspec URL; `storage_options` (a URL's only) add to fsspec's
    configuration. A local file:// URL gets `auto_mkdir` (object stores such as s3 have no folders to make)."""
    path = str(path)
    options = dict(storage_options or {})
    if "://" in path:
        protocol = store_fs(path)[0].protocol
        if {"file", "local"} & set(protocol if isinstance(protocol, tuple) else (protocol,)):
            options["auto_mkdir"] = True
    return zarr.open_group(path, mode=mode, zarr_format=3, **({"storage_options": options} if options else {}))


def open_store_for_write(path: str, key: dict, overwrite: bool) -> tuple[zarr.Group, str]:
    """Returns (root group, state) with state 'complete', 'resume' or 'new'."""
    sha = key_sha256(key)
    check_reachable(path)
    fs, fs_path = store_fs(path)
    if fs.exists(fs_path):
        try:
            root = open_group(path, mode="r+")
            existing = root.attrs.get("key_sha256")
        except Exception:
            existing, root = None, None
        if existing == sha:
            return root, "complete" if root.attrs.get("status") == "complete" else "resume"
        if not overwrite:
            differing = _differing_settings(root.attrs.get("key", {}) if root is not None else {}, key)
            raise OtherStoreError(f"{path} holds a cache made with other settings ({differing}); "
                             "pass --overwrite to replace it, or --out for a new store")
        with readers_excluded(path):  # from here on, a reader finds an incomplete store and who writes it
            fs.rm(fs_path, recursive=True)
            return _new_store(path, key, sha), "new"
    return _new_store(path, key, sha), "new"


def _new_store(path: str, key: dict, sha: str) -> zarr.Group:
    root = open_group(path, mode="w")
    root.attrs.update({"key": key, "key_sha256": sha, "status": "incomplete"})
    return root


def _differing_settings(old: dict, new: dict) -> str:
    names = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    return "differs in: " + ", ".join(names) if old else "not a cachetune store"


class SplitWriter:
    def __init__(self, group: zarr.Group, plan: BlockPlan, layers: list[int], encoder: BlockEncoder | None = None):
        """encoder: how a block's float values become codes; by default the split's recorded encoding (a
        projected store needs its basis: pass the encoder)."""
        self.group, self.plan, self.layers = group, plan, layers
        self.encoder = encoder or BlockEncoder(Encoding(**group.attrs.get("encoding", {})))
        self.arrays = [group[layer_array_name(i)] for i in layers]
        if self.encoder.encoding.eight_bit:
            self.arrays += [group[scale_array_name(i)] for i in layers]
        # Blocks are dense: zarr's scan of every chunk for its fill value (to leave empty chunks out) only costs
        # time, except in a split's last block, whose whole empty chunks are worth leaving out.
        self.dense_arrays = [array.with_config({"write_empty_chunks": True}) for array in self.arrays]
        self.done = group["done"]

    @classmethod
    def for_existing(cls, group: zarr.Group, layers: list[int]) -> "SplitWriter":
        """A writer for some blocks of a split made by `prepare_split` elsewhere (a distributed worker): it
        needs only the block size, which the split's attributes hold."""
        return cls(group, BlockPlan(int(group.attrs["block_tokens"]), np.zeros(0, np.int64), []), layers)

    def _encoded(self, block: int, buffer: np.ndarray) -> list[np.ndarray]:
        """buffer [K, block_tokens, D] float16, float32 or ml_dtypes.bfloat16 -> the block's arrays in `self.arrays`
        order: codes per layer, then scales per layer (8-bit). Records the block's squared error and squared norm
        against the values it encoded (in float32), over a sample of its real tokens, in `encode_error` (for
        `pipeline info`)."""
        encoding = self.encoder.encoding
        if encoding.plain:
            return list(buffer)
        codes, scales, error = [], [], np.zeros(2)
        used = np.flatnonzero(np.abs(buffer[0]).max(1) > 0)  # real tokens (the block's unused tail is zeros)
        sample = used[::ERROR_SAMPLE_EVERY]
        for layer, values in zip(self.layers, buffer):
            values = np.asarray(values, np.float32)  # a bfloat16 buffer (fp8 extraction) widened one layer at a time
            code, scale = self.encoder(layer, values)
            codes.append(code)
            scales.append(scale)
            # float32, not float16: a residual stream beyond 65504 (Gemma 3 reaches ~1e5) would make it inf, the error nan
            reference = torch.from_numpy(values[sample])
            decoded = _decoded(self.encoder, layer, code[sample], None if scale is None else scale[sample])
            error += [float(torch.sum(torch.square(decoded - reference), dtype=torch.float64)),
                      float(torch.sum(torch.square(reference), dtype=torch.float64))]
        self.group["encode_error"][block] = error
        return codes + (scales if encoding.eight_bit else [])

    def is_done(self, block: int) -> bool:
        return bool(self.done[block])

    def pending_blocks(self) -> list[int]:
        return [b for b, flag in enumerate(self.done[:]) if not flag]

    def write_block(self, block: int, buffer: np.ndarray) -> None:
        """buffer: [K, block_tokens, D], the whole block, zeros in the unused tail."""
        rows = slice(block * self.plan.block_tokens, (block + 1) * self.plan.block_tokens)
        last_chunk = buffer[:, -self.arrays[0].chunks[0]:] if self.arrays else buffer
        for array, data in zip(self.dense_arrays if last_chunk.any() else self.arrays, self._encoded(block, buffer)):
            array[rows] = data
        self.done[block] = 1


def _decoded(encoder: BlockEncoder, layer: int, codes: np.ndarray, scales: np.ndarray | None) -> torch.Tensor:
    """codes [rows, W] back to float32 values [rows, D] on the host (for the recorded error)."""
    values = torch.from_numpy(codes)
    values = decode(values, torch.from_numpy(scales), encoder.encoding.dtype) if scales is not None else values.float()
    if encoder.encoding.reduce:
        basis, mean = encoder.projections[layer]
        values = values @ torch.from_numpy(basis) + torch.from_numpy(mean)
    return values


def prepare_split(root: zarr.Group, name: str, plan: BlockPlan, meta: dict[str, np.ndarray], layers: list[int],
                  hidden_size: int, dtype: str, chunk_tokens: int, filters, compressors,
                  encoder: BlockEncoder | None = None) -> SplitWriter:
    """Create a split's arrays once; a split whose creation did not finish is made again. encoder: how the
    values are stored (default: `dtype` as is); 8-bit and projected stores add scales and `encode_error`."""
    encoder = encoder or BlockEncoder(Encoding(dtype))
    encoding = encoder.encoding
    if name in root and root[name].attrs.get("ready"):
        return SplitWriter(root[name], plan, layers, encoder)
    group = root.create_group(name, overwrite=True)
    group.attrs["encoding"] = {"dtype": encoding.dtype, "reduce": encoding.reduce}
    for field, values in meta.items():
        group.create_array(field, data=values, chunks=(max(len(values), 1),), compressors=compressors[-1:])
    group.create_array("token_start", data=plan.token_start, chunks=(max(len(plan.token_start), 1),))
    group.create_array("done", shape=(plan.num_blocks,), dtype="uint8", chunks=(1,), fill_value=0)
    rows = max(plan.num_blocks, 1) * plan.block_tokens
    width = encoding.width(hidden_size)
    storage = encoding.attrs(hidden_size)["storage"]
    for index in layers:
        group.create_array(layer_array_name(index), shape=(rows, width), dtype=storage,
                           chunks=(chunk_tokens, width), shards=(plan.block_tokens, width),
                           filters=filters, compressors=compressors, fill_value=0)
        if encoding.eight_bit:
            group.create_array(scale_array_name(index), shape=(rows, groups(width)), dtype="float16",
                               chunks=(chunk_tokens, groups(width)), shards=(plan.block_tokens, groups(width)),
                               compressors=compressors, fill_value=0)
    if not encoding.plain:  # per block: squared error against the unencoded values and their squared norm, over its layers
        group.create_array("encode_error", shape=(plan.num_blocks, 2), dtype="float64", chunks=(1, 2), fill_value=0)
    group.attrs.update({"num_samples": len(plan.token_start), "num_blocks": plan.num_blocks,
                        "block_tokens": plan.block_tokens, "ready": True})
    return SplitWriter(group, plan, layers, encoder)


def writer_threads(device: str = "cpu") -> int:
    """Writer threads: with a GPU, enough to compress, checksum and write blocks as fast as it makes them (up
    to 4, at most the CPUs); on a CPU one, since every thread it takes slows the forward pass, which needs the
    cores, and one keeps up with a CPU forward pass many times over."""
    if not str(device).startswith("cuda"):
        return 1
    return max(1, min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


class BackgroundWriter:
    """Runs writes on `threads` threads so compression and I/O overlap the next forward passes. Blocks own
    whole shards, so writes of different blocks never touch the same file. The first error stops the rest and
    is re-raised on the caller's thread."""

    def __init__(self, threads: int = 1, depth: int = 2):
        self.threads, self.depth = threads, depth
        self.tasks: queue.Queue = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.workers = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]
        for worker in self.workers:
            worker.start()

    def _run(self):
        while (task := self.tasks.get()) is not None:
            if self.error is None:
                try:
                    task[0](*task[1:])
                except BaseException as error:  # re-raised on the caller's thread
                    self.error = self.error or error

    def _raise(self) -> None:
        if self.error is not None:
            raise self.error

    def submit(self, function, *args) -> None:
        self._raise()
        self.tasks.put((function, *args))

    def wait_for(self, items: queue.Queue):
        """The next item of `items` (e.g. a free buffer that a finished write gives back); raises a write's
        error instead of waiting for an item that a skipped write will never give back."""
        while True:
            self._raise()
            try:
                return items.get(timeout=0.05)
            except queue.Empty:
                pass

    def close(self) -> None:
        for _ in self.workers:
            self.tasks.put(None)
        for worker in self.workers:
            worker.join()
        self._raise()
