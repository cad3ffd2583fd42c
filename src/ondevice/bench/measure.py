"""Small measurement helpers: statistics, percentiles, and this process's memory from /proc."""

from __future__ import annotations

import math
import os
import resource
from collections.abc import Sequence

_STATUS_KEYS = {"VmHWM": "peak_rss", "VmRSS": "rss", "RssAnon": "rss_anon", "RssFile": "rss_file",
                "RssShmem": "rss_shmem", "VmSize": "vm_size"}


def mean_std(xs: Sequence[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (n-1, as llama-bench); std is 0.0 for one sample."""
    xs = [x for x in xs if x is not None]
    if not xs:
        return None, None
    m = sum(xs) / len(xs)
    if len(xs) < 2:
        return m, 0.0
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def percentile(xs: Sequence[float], q: float) -> float | None:
    """``q``-th percentile (0-100) with linear interpolation between order statistics (numpy's default)."""
    if not xs:
        return None
    s = sorted(xs)
    pos = (len(s) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def proc_status() -> dict[str, int]:
    """Memory figures of this process in bytes (peak_rss, rss, rss_anon, rss_file, ...); {} off Linux."""
    from ..device.info import proc_kib_fields

    return {_STATUS_KEYS[k]: v for k, v in proc_kib_fields().items() if k in _STATUS_KEYS}


def mapped_rss_bytes(path: str) -> int | None:
    """Resident bytes of this process's mappings of ``path`` (the mmapped model), from /proc/self/smaps.

    RssFile also counts every shared library (llama.cpp, numpy, Python's own): this is the model alone.
    """
    target = os.path.realpath(path)
    total, mine = 0, False
    try:
        with open("/proc/self/smaps") as f:
            for line in f:
                head = line.split(None, 5)
                if len(head) >= 5 and "-" in head[0] and not head[0].endswith(":"):  # a mapping's header line
                    mine = len(head) == 6 and head[5].rstrip("\n") == target
                elif mine and head and head[0] == "Rss:":
                    total += int(head[1]) * 1024
    except (OSError, ValueError):
        return None
    return total


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) of this process; False where /proc/self/clear_refs refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # 5: reset the peak RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def cpu_seconds() -> tuple[float, float]:
    """(user, system) CPU seconds of this process, all threads."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime, r.ru_stime


def max_rss_bytes() -> int:
    """Lifetime peak RSS from getrusage (what /usr/bin/time reports; KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
