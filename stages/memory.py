"""Process memory as the benchmarks report it: resident set size (RSS), current and peak, in MB."""
from __future__ import annotations

import os
import resource

PAGE_MB = os.sysconf("SC_PAGE_SIZE") / 1e6


def current_rss_mb() -> float:
    with open("/proc/self/statm") as stream:
        return int(stream.read().split()[1]) * PAGE_MB


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3  # Linux reports KiB-ish kilobytes
