"""Process memory as the benchmarks report it: resident set size (RSS), current and peak, in MB.

The peak is Linux's VmHWM, which `reset_peak()` sets back to the current RSS (writing 5 to
/proc/self/clear_refs), so a measurement covers one phase, not everything the process did before.
"""
from __future__ import annotations

import os
import resource
from contextlib import contextmanager


def _status_mb(field: str) -> float | None:
    try:
        with open("/proc/self/status") as stream:
            for line in stream:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024  # kB -> MB (MiB-based, as the kernel counts)
    except OSError:
        pass
    return None


def current_rss_mb() -> float:
    return _status_mb("VmRSS") or 0.0


def reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as stream:
            stream.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    """The high-water mark, and never below the current RSS: the kernel folds per-thread RSS counters into VmHWM
    lazily, so just after `reset_peak` VmHWM can read a little under VmRSS."""
    peak = _status_mb("VmHWM")
    if peak is None:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return max(peak, current_rss_mb())


def limit_allocator_slack() -> bool:
    """Fixed glibc thresholds (64 MB mmap and trim, two arenas) for every training run, baselines included, so
    their peaks compare fairly and do not depend on glibc's dynamic threshold.

    Why 64 MB and not lower: with 1 MB thresholds (used until 2026-11-25) every activation-sized block was
    mmapped and unmapped per step, and each step paid for fresh zeroed pages. Measured on MiniLM's cache, 1,600
    samples, two torch threads (SHERL): 1 MB: 70 samples/s, peak 343 MB above start; glibc's defaults: 127
    samples/s, 481 MB; 64 MB: 142 samples/s, 521 MB. Half the speed was not worth a third of the CPU memory figure.

    Revisited once batches stayed 8-bit (2026-12-07, `python bench/allocator.py --method sherl --threshold-mb N`, the
    main job's store, 1,600 samples, quiet): 64 MB 206-210 samples/s, 334-346 MB; 16 MB 212, 322 MB; 8 MB 187-196,
    296-306 MB; 4 MB 160, 278 MB; glibc's defaults 214, 348 MB; lst at 8 MB gained nothing (304 against 297 MB). No
    threshold saves more than a tenth of the RSS without costing speed, so 64 MB stays.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        m_trim_threshold, m_mmap_threshold, m_arena_max = -1, -3, -8
        return all(libc.mallopt(option, value) == 1 for option, value in
                   ((m_mmap_threshold, 64 << 20), (m_trim_threshold, 64 << 20), (m_arena_max, 2)))
    except (OSError, AttributeError):  # not glibc
        return False


def tensor_mb(tensors) -> float:
    """MB held by the distinct storages of `tensors` (a shared storage is counted once; None entries skipped)."""
    storages = {}
    for tensor in tensors:
        if tensor is not None:
            storage = tensor.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values()) / 2**20


def peak_allocated_mb(work) -> float:
    """Peak MB that torch's CPU allocator held for `work()` above what was allocated before it: the running sum of
    the allocations and frees the profiler records (torch.profiler, profile_memory=True), at its highest. Counts
    tensors only (not Python objects, numpy arrays, or the allocator's slack), so it measures the computation,
    not the process. Freeing a block allocated before `work` began is not counted (the profiler cannot size it)."""
    from torch.profiler import ProfilerActivity, profile

    os.environ.setdefault("KINETO_LOG_LEVEL", "6")  # above USDT: no profiler_start/stop lines on stderr per fit
    with _without_stderr_line(b"Memory block of unknown size"), \
            profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        work()
    events = sorted((event for event in profiler.profiler.kineto_results.events() if event.name() == "[memory]"
                     and event.device_type().name == "CPU"), key=lambda event: event.start_ns())
    running = peak = 0
    for event in events:
        running += event.nbytes()
        peak = max(peak, running)
    return peak / 2**20


@contextmanager
def _without_stderr_line(fragment: bytes):
    """Runs the block with file descriptor 2 in a temporary file, then writes back every line but those holding
    `fragment`: c10's allocator logs (C++, not Python's warnings) that freeing a block made before profiling
    began goes uncounted, once per fit; that is the limitation `peak_allocated_mb` states, not news to a user."""
    import sys
    import tempfile

    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as caught:
        os.dup2(caught.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            caught.seek(0)
            kept = [line for line in caught.read().splitlines(keepends=True) if fragment not in line]
            if kept:
                os.write(2, b"".join(kept))
