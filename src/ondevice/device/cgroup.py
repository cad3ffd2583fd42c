"""This process's cgroup limits, read (``limits`` applies them): the tightest memory limit and CPU quota over
the process's cgroup and its ancestors, in the v2 hierarchy and in the v1 one of the controller.

* memory: v2 ``memory.max`` and ``memory.high`` (above ``high`` the kernel throttles and reclaims hard, so a
  context sized past it crawls instead of failing: it counts as a limit, and says it is ``memory.high``), v1
  ``memory.limit_in_bytes``.
* CPU: v2 ``cpu.max`` (``"max 100000"``: none), v1 ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` (quota -1:
  none): what ``docker --cpus`` and a Kubernetes CPU limit write. More threads than the quota allows spin
  while the kernel throttles them (10x slower decode was measured with 2 threads under ``--cpus=1``), so
  :func:`usable_cpus` caps every default thread count by it, rounded down (Go, the JVM and .NET round a
  quota up: their threads block or yield, where llama.cpp's spin, so a fraction of a CPU is not a thread's worth).

Every reader takes ``dirs``: the directory to start from per hierarchy (``None``: the v2 one; a controller
name: that v1 one), default this process's; tests pass fake trees.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path


def cgroup_dir(v1_controller: str | None = None) -> Path | None:
    """This process's cgroup directory: in the v2 hierarchy (None) or in the v1 hierarchy of a controller."""
    try:
        mount = root = None
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            left, _, right = line.partition(" - ")
            fstype, _source, opts = (right.split(" ") + ["", ""])[:3]
            if (fstype == "cgroup2" and v1_controller is None) or \
                    (fstype == "cgroup" and v1_controller in opts.split(",")):
                root, mount = left.split()[3:5]
                break
        if mount is None:
            return None
        for ln in Path("/proc/self/cgroup").read_text().splitlines():
            hid, ctrls, rel = ln.split(":", 2)
            if (hid == "0" and v1_controller is None) or (v1_controller in ctrls.split(",")):
                break
        else:
            return None
    except (OSError, ValueError):
        return None
    if root != "/" and (rel + "/").startswith(root.rstrip("/") + "/"):  # a mount of a sub-tree (namespaces)
        rel = rel[len(root.rstrip("/")):]
    return Path(mount) / rel.lstrip("/")


def _starts(dirs: dict[str | None, Path | None] | None, hierarchies: tuple[str | None, ...]):
    """(hierarchy, start directory) for each hierarchy: from ``dirs``, else this process's."""
    for h in hierarchies:
        yield h, (dirs.get(h) if dirs is not None else cgroup_dir(h))


def ancestors(here: Path | None, files: tuple[str, ...]) -> Iterator[Path]:
    """``here`` and its ancestors up to the hierarchy's root: every directory that is a cgroup (holds
    ``cgroup.procs``) or holds one of ``files`` (a level without the controller's files is passed over)."""
    while here is not None and any((here / f).exists() for f in ("cgroup.procs", *files)):
        yield here
        here = here.parent if here.parent != here else None


def read_int(path: Path) -> int | None:
    """A file's integer (negative too), or None: missing, unreadable, or v2's ``max`` (no limit)."""
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.lstrip("-").isdigit() else None


NO_LIMIT = 1 << 60  # cgroup v1 writes "no limit" as a page-rounded 2**63 - 1
# per hierarchy: (the limit files, the usage file, memory.stat's key for the page cache the kernel reclaims
# before it kills)
_MEMORY_FILES = {None: (("memory.max", "memory.high"), "memory.current", "file"),
                 "memory": (("memory.limit_in_bytes",), "memory.usage_in_bytes", "total_cache")}


def memory_limit(dirs: dict[str | None, Path | None] | None = None) -> dict | None:
    """The tightest memory limit on this process's cgroup and its ancestors (a container's ``--memory``, a
    systemd unit's ``MemoryMax``/``MemoryHigh``), or None where none is set: ``{"limit_bytes", "in_use_bytes",
    "file"` (which file set it: ``memory.high`` is a throttling line, not a kill), "path"}``. "In use" leaves
    out the page cache, which the kernel reclaims before it kills (a file read twice is active cache: counting
    it refused a context that fit), as MemAvailable leaves it out of "used"."""
    for v1, here in _starts(dirs, tuple(_MEMORY_FILES)):
        limit_files, usage_file, cache_key = _MEMORY_FILES[v1]
        best: tuple[int, str, Path] | None = None
        for d in ancestors(here, limit_files):
            for f in limit_files:
                lim = read_int(d / f)
                if lim is not None and 0 <= lim < NO_LIMIT and (best is None or lim < best[0]):
                    best = (lim, f, d)
        if best is None:
            continue
        used = read_int(best[2] / usage_file) or 0
        try:
            stat = dict(line.split() for line in (best[2] / "memory.stat").read_text().splitlines())
            used -= int(stat.get(cache_key, 0))
        except (OSError, ValueError):
            pass
        return {"limit_bytes": best[0], "in_use_bytes": max(0, used), "file": best[1], "path": str(best[2])}
    return None


def cgroup_memory(dirs: dict[str | None, Path | None] | None = None) -> tuple[int, int] | None:
    """``(limit, in use)`` in bytes of :func:`memory_limit` (None: no limit), for the context checks."""
    m = memory_limit(dirs)
    return (m["limit_bytes"], m["in_use_bytes"]) if m else None


def _quota_at(d: Path, v1: bool) -> tuple[float, str] | None:
    """The CPUs the quota of cgroup ``d`` allows (quota / period), and its file; None: no quota there."""
    if v1:
        quota, period, name = read_int(d / "cpu.cfs_quota_us"), read_int(d / "cpu.cfs_period_us"), "cpu.cfs_quota_us"
    else:
        try:
            parts = (d / "cpu.max").read_text().split()
        except OSError:
            return None
        if not parts or not parts[0].isdigit():  # "max 100000": no limit
            return None
        quota, name = int(parts[0]), "cpu.max"
        period = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 100_000
    if quota is None or period is None or quota <= 0 or period <= 0:  # v1's -1: no limit
        return None
    return quota / period, name


def cpu_quota(dirs: dict[str | None, Path | None] | None = None) -> dict | None:
    """The tightest CPU quota on this process's cgroup and its ancestors (``docker --cpus=1.5``: 1.5), or
    None where none is set: ``{"cpus", "file", "path"}``."""
    best: dict | None = None
    for v1, here in _starts(dirs, (None, "cpu")):
        for d in ancestors(here, ("cpu.cfs_quota_us",) if v1 else ("cpu.max",)):
            q = _quota_at(d, v1 is not None)
            if q is not None and (best is None or q[0] < best["cpus"]):
                best = {"cpus": round(q[0], 3), "file": q[1], "path": str(d)}
    return best


def affinity_cpus() -> int:
    """CPUs this process may run on (``taskset``, a cpuset)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def cap_by_quota(n: int, quota: dict | None) -> int:
    """``n`` threads capped by a CPU quota: at most floor(quota), at least 1."""
    return n if quota is None else max(1, min(n, int(quota["cpus"])))


def usable_cpus(dirs: dict[str | None, Path | None] | None = None) -> int:
    """CPUs this process can keep busy: the affinity count, capped by the cgroup CPU quota (floor, at least 1)."""
    return cap_by_quota(affinity_cpus(), cpu_quota(dirs))


# cpu.stat's count of the time the CPU quota throttled a cgroup: v2 in microseconds, v1 in nanoseconds
_THROTTLED = {None: ("throttled_usec", 1e6), "cpu": ("throttled_time", 1e9)}


def cpu_throttled(dirs: dict[str | None, Path | None] | None = None) -> dict[str, float]:
    """Seconds the CPU quota has throttled this process's cgroup and each ancestor so far, per cgroup path
    (``cpu.stat``: v2 ``throttled_usec``, v1 ``throttled_time``; each level counts the throttling of its own
    quota, summed over CPUs); {} where no cpu.stat says. Two readings give the throttling in between
    (``bench.noise.throttled_between``)."""
    out: dict[str, float] = {}
    for v1, here in _starts(dirs, tuple(_THROTTLED)):
        key, per_s = _THROTTLED[v1]
        for d in ancestors(here, ("cpu.stat",)):
            try:
                stat = dict(line.split()[:2] for line in (d / "cpu.stat").read_text().splitlines()
                            if len(line.split()) >= 2)
            except (OSError, ValueError):
                continue
            if stat.get(key, "").isdigit():
                out[f"{d}:{key}"] = int(stat[key]) / per_s
    return out
