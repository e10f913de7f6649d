"""Extraction's block buffers against the machine's free memory, checked before the store is made.

Extraction fills host buffers of [K cached layers, block_tokens, D] (float16 or float32 as stored; bfloat16 for
fp8 and float32 for int8, whose codes the writer encodes: `extract.CACHE_DTYPES`): one sort group's blocks being
computed, the previous group's still being written, and one more per writer thread (`extract.Writes`). That grows
as layers x width; at the defaults on a CPU (9 buffers of 8,192 tokens) with `--layers all`: MiniLM (7 x 384) 0.4 GB,
SmolLM2-135M (31 x 576) 2.6 GB at float16 or fp8 and 5.3 GB at int8, a Llama-3-8B (33 x 4096) 20 GB at fp8 (a GPU
run's extra writer threads add up to three buffers). A machine with less would be ended by the kernel's OOM killer:
no message and a half-written store. Checked for extraction in this process and for a `--workers N` LocalCluster
on this machine, whose every worker holds a copy of the backbone and one sort group's buffers; not for
`--scheduler` (its workers' memory is elsewhere: a worker that runs out is reported as dying).
"""
from __future__ import annotations

import itertools

import psutil

from cachetune.cache.errors import InputError
from cachetune.cache.writer import writer_threads

from .extract import CACHE_DTYPES, SPLITS, ExtractSettings
from .layer_selection import parse_layers


def group_blocks(settings: ExtractSettings, split_tokens: int | None = None) -> int:
    """Blocks in one sort group. split_tokens: an upper bound on the largest split's tokens, when known; a group
    never spans more blocks than that split has (a block wastes under --max-length tokens, since samples are not
    cut across blocks)."""
    group = max(1, settings.sort_tokens // settings.block_tokens)
    if split_tokens is not None:
        group = min(group, -(-split_tokens // (settings.block_tokens - settings.max_length + 1)))
    return max(1, group)


def buffer_count(settings: ExtractSettings, device, split_tokens: int | None = None) -> int:
    """Block buffers extraction in one process may hold at once: two sort groups of blocks plus one per writer
    thread (a dask worker writes its group before computing the next: one group)."""
    return 2 * group_blocks(settings, split_tokens) + writer_threads(str(device))


def weight_bytes(backbone) -> int:
    """Bytes of the backbone's parameters and buffers, as loaded (each local dask worker loads its own copy)."""
    tensors = itertools.chain(backbone.model.parameters(), backbone.model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


# A worker process's own memory beside the weights and buffers: measured 0.38 GiB for MiniLM (Python, torch,
# transformers and dask imported, tokenizer and model loaded, less the weights), plus room for forward activations.
WORKER_PROCESS_BYTES = 2**29


def block_buffer_bytes(settings: ExtractSettings, num_layers: int, hidden_size: int) -> int:
    """Bytes of one block buffer [num_layers, block_tokens, hidden_size] in the dtype extraction fills."""
    return num_layers * settings.block_tokens * hidden_size * CACHE_DTYPES[settings.dtype].itemsize


def available_memory() -> int:
    """Bytes of memory available now without swapping (psutil: free plus reclaimable page cache)."""
    return psutil.virtual_memory().available


def check_host_memory(settings: ExtractSettings, backbone, dataset, device, workers: int | None = None) -> None:
    """Raises InputError (one line naming the fix) when the block buffers, count x [cached layers, block_tokens,
    hidden size] in the buffer dtype, would not fit in the memory available now. The --sort-tokens it names keeps
    them within half of that, leaving the rest to the backbone, its activations and other work.

    workers: extraction runs on a LocalCluster of this many worker processes here; each holds one sort group's
    buffers, a copy of the backbone's weights and its own process, and the fix may be fewer workers."""
    num_layers = len(parse_layers(settings.layers, backbone.num_layers, backbone.hidden_size))
    hidden_size = backbone.hidden_size
    split_tokens = (max(len(dataset.rows(split)) for split in SPLITS) * settings.max_length
                    if backbone.modality == "text" else None)  # an image's token count is known only after a forward
    per_block = block_buffer_bytes(settings, num_layers, hidden_size)
    available = available_memory()
    shape = (f"[{num_layers} layers, {settings.block_tokens} tokens, {hidden_size}] "
             f"{str(CACHE_DTYPES[settings.dtype]).removeprefix('torch.')}")
    if workers is not None:
        weights = weight_bytes(backbone)
        _check_local_workers(workers, group_blocks(settings, split_tokens) * per_block + weights + WORKER_PROCESS_BYTES,
                             available, shape, weights)
        return
    count = buffer_count(settings, device, split_tokens)
    if count * per_block <= available:
        return
    fits = (available // 2 // per_block - writer_threads(str(device))) // 2  # blocks per sort group
    fix = (f"lower --sort-tokens to {fits * settings.block_tokens} (now {settings.sort_tokens}; batches are then "
           "length-sorted over fewer tokens) or cache fewer layers (--layers every:4)" if fits >= 1 else
           f"cache fewer layers (--layers every:4, or --layers for:METHOD) or lower --block-tokens (now {settings.block_tokens})")
    raise InputError(f"extraction would hold up to {count * per_block / 2**30:.1f} GiB of block buffers ({count} x "
                     f"{shape}) but {available / 2**30:.1f} GiB of memory is available; {fix}")


def _check_local_workers(workers: int, per_worker: int, available: int, shape: str, weights: int) -> None:
    """A LocalCluster of `workers` processes, each needing `per_worker` bytes, must fit in the memory available
    and in dask's per-worker limit (system memory / workers; a worker pauses at the `distributed.worker.memory.pause`
    fraction of it and is killed at `terminate`)."""
    import dask
    from distributed.system import MEMORY_LIMIT

    from .distributed_extract import available_cpus

    pause = dask.config.get("distributed.worker.memory.pause")
    if workers * per_worker <= available and per_worker <= pause * MEMORY_LIMIT / workers:
        return
    fits = min(available // 2 // per_worker, int(pause * MEMORY_LIMIT // per_worker), available_cpus())
    fix = (f"lower --workers to {fits}" if fits >= 1 else
           "lower --sort-tokens, cache fewer layers (--layers every:4) or run without --workers")
    raise InputError(f"{workers} dask workers would each hold the backbone ({weights / 2**30:.1f} GiB), a sort group of "
                     f"block buffers ({shape}) and their own process ({WORKER_PROCESS_BYTES / 2**30:.1f} GiB), "
                     f"{per_worker / 2**30:.1f} GiB each, but {available / 2**30:.1f} GiB of memory is available and "
                     f"dask pauses each of {workers} workers at {pause:.0%} of its {MEMORY_LIMIT / workers / 2**30:.1f} GiB share; {fix}")
