"""Extraction's block buffers against the machine's free memory, checked before the store is made.

Extraction fills host buffers of [K cached layers, block_tokens, D] (float16 or float32 as stored; bfloat16 for
fp8 and float32 for int8, whose codes the writer encodes: `extract.CACHE_DTYPES`): one sort group's blocks being
computed, the previous group's still being written, and one more per writer thread (`extract.Writes`). That grows
as layers x width; at the defaults on a CPU (9 buffers of 8,192 tokens) with `--layers all`: MiniLM (7 x 384) 0.4 GB,
SmolLM2-135M (31 x 576) 2.6 GB at float16 or fp8 and 5.3 GB at int8, a Llama-3-8B (33 x 4096) 20 GB at fp8 (a GPU
run's extra writer threads add up to three buffers). A machine with less would be ended by the kernel's OOM killer:
no message and a half-written store. Checked for extraction in this process; a dask worker holds one group.
"""
from __future__ import annotations

import psutil

from cache.errors import InputError
from cache.writer import writer_threads

from .extract import CACHE_DTYPES, SPLITS, ExtractSettings
from .layer_selection import parse_layers


def buffer_count(settings: ExtractSettings, device, split_tokens: int | None = None) -> int:
    """Block buffers extraction may hold at once: two sort groups of blocks plus one per writer thread.

    split_tokens: an upper bound on the largest split's tokens, when known; a sort group never spans more blocks
    than that split has (a block wastes under --max-length tokens, since samples are not cut across blocks)."""
    group = max(1, settings.sort_tokens // settings.block_tokens)
    if split_tokens is not None:
        group = min(group, -(-split_tokens // (settings.block_tokens - settings.max_length + 1)))
    return 2 * max(1, group) + writer_threads(str(device))


def block_buffer_bytes(settings: ExtractSettings, num_layers: int, hidden_size: int) -> int:
    """Bytes of one block buffer [num_layers, block_tokens, hidden_size] in the dtype extraction fills."""
    return num_layers * settings.block_tokens * hidden_size * CACHE_DTYPES[settings.dtype].itemsize


def available_memory() -> int:
    """Bytes of memory available now without swapping (psutil: free plus reclaimable page cache)."""
    return psutil.virtual_memory().available


def check_host_memory(settings: ExtractSettings, backbone, dataset, device) -> None:
    """Raises InputError (one line naming the fix) when the block buffers, count x [cached layers, block_tokens,
    hidden size] in the buffer dtype, would not fit in the memory available now. The --sort-tokens it names keeps
    them within half of that, leaving the rest to the backbone, its activations and other work."""
    num_layers = len(parse_layers(settings.layers, backbone.num_layers, backbone.hidden_size))
    hidden_size = backbone.hidden_size
    split_tokens = (max(len(dataset.rows(split)) for split in SPLITS) * settings.max_length
                    if backbone.modality == "text" else None)  # an image's token count is known only after a forward
    count = buffer_count(settings, device, split_tokens)
    per_block = block_buffer_bytes(settings, num_layers, hidden_size)
    available = available_memory()
    if count * per_block <= available:
        return
    fits = (available // 2 // per_block - writer_threads(str(device))) // 2  # blocks per sort group
    fix = (f"lower --sort-tokens to {fits * settings.block_tokens} (now {settings.sort_tokens}; batches are then "
           "length-sorted over fewer tokens) or cache fewer layers (--layers every:4)" if fits >= 1 else
           f"cache fewer layers (--layers every:4, or --layers for:METHOD) or lower --block-tokens (now {settings.block_tokens})")
    raise InputError(f"extraction would hold up to {count * per_block / 2**30:.1f} GiB of block buffers ({count} x "
                     f"[{num_layers} layers, {settings.block_tokens} tokens, {hidden_size}] "
                     f"{str(CACHE_DTYPES[settings.dtype]).removeprefix('torch.')}) but {available / 2**30:.1f} GiB of "
                     f"memory is available; {fix}")
