"""Process memory as the benchmarks report it: resident set size (RSS), current and peak, in MB.

The peak is Linux's VmHWM, which `reset_peak()` sets back to the current RSS (writing 5 to
/proc/self/clear_refs), so a measurement covers one phase, not everything the process did before.
"""
from __future__ import annotations

import resource


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
    peak = _status_mb("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
