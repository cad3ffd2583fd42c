"""Which cores are worth a compute thread: one per physical *performance* core, as llama.cpp's
``common_cpu_get_num_math()`` picks its default (common/common.cpp: on hybrid x86 Linux it pins itself to each
CPU in turn and skips those CPUID leaf 0x1a calls Atom, i.e. Intel E-cores, and SMT siblings: "efficiency cores
harm lockstep threading"). A thread on a slow core holds every fast one up at each matmul's barrier.

Read from sysfs, no root, no pinning:

* Intel hybrid (Alder Lake on): ``/sys/devices/cpu_core/cpus`` lists the P-cores' CPUs and
  ``/sys/devices/cpu_atom/cpus`` the E-cores' (the perf PMUs of each core type).
* ARM big.LITTLE / DynamIQ: ``/sys/devices/system/cpu/cpuN/cpu_capacity`` (the max, 1024, for the fastest
  core). Performance cores are those of at least ``PERF_CAPACITY`` x the max: in-order little cores
  (Cortex-A53/A55/A510/A520) sit at about 1/4-1/3 of the prime core's capacity and out-of-order big/mid cores
  (A7x) at 0.5-0.9, so a phone with 1 prime + 3 big + 4 little gets the 4 prime+big cores, the count
  llama.cpp users there pick by hand (only the max capacity would give 1 thread, a poor default).
* Anything else (equal capacities, no such files: this x86 server, a VM) is not hybrid: every core counts.

Physical cores are told apart by ``topology/core_cpus_list`` (older kernels: ``thread_siblings_list``): SMT
siblings share one. The count is over the CPUs this process may run on (``sched_getaffinity``) and is capped
by a container's CPU quota (``cgroup.cap_by_quota``).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

SYS_DEVICES = Path("/sys/devices")
PERF_CAPACITY = 0.5  # ARM: a performance core has at least this share of the fastest core's cpu_capacity


def parse_cpulist(text: str) -> set[int]:
    """The CPUs of a kernel CPU list (``0-3,8,10-11``); empty for an empty list."""
    out: set[int] = set()
    for part in text.strip().split(","):
        if not part.strip():
            continue
        lo, _, hi = part.partition("-")
        out.update(range(int(lo), int(hi or lo) + 1))
    return out


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _cpu_dirs(root: Path | None) -> dict[int, Path]:
    base = (root or SYS_DEVICES) / "system" / "cpu"
    out = {}
    for d in base.glob("cpu[0-9]*"):
        if d.name[3:].isdigit():
            out[int(d.name[3:])] = d
    return out


def core_kinds(root: Path | None = None) -> dict | None:
    """``{"performance": CPUs, "efficiency": CPUs, "source": how it was told}`` on a hybrid CPU; None on one
    whose cores are all alike (or where sysfs does not say)."""
    root = root or SYS_DEVICES
    p, e = _read(root / "cpu_core" / "cpus"), _read(root / "cpu_atom" / "cpus")
    if p and e:
        try:
            return {"performance": parse_cpulist(p), "efficiency": parse_cpulist(e),
                    "source": "/sys/devices/cpu_core, cpu_atom"}
        except ValueError:
            return None
    caps = {}
    for n, d in _cpu_dirs(root).items():
        c = _read(d / "cpu_capacity")
        if c and c.isdigit():
            caps[n] = int(c)
    if not caps or len(set(caps.values())) < 2:
        return None
    top = max(caps.values())
    perf = {n for n, c in caps.items() if c >= PERF_CAPACITY * top}
    if perf == set(caps):  # big and mid cores only, nothing little: count them all
        return None
    return {"performance": perf, "efficiency": set(caps) - perf,
            "source": f"cpu_capacity >= {PERF_CAPACITY:g} x the max {top}"}


def physical_cores_of(cpus: Iterable[int], root: Path | None = None) -> int | None:
    """Physical cores among ``cpus`` (SMT siblings count once; an offline CPU, which has no topology, not at
    all); None where sysfs has the topology of none of them (not Linux)."""
    dirs = _cpu_dirs(root)
    cores = set()
    for n in cpus:
        d = dirs.get(n)
        sib = d and (_read(d / "topology" / "core_cpus_list") or _read(d / "topology" / "thread_siblings_list"))
        if sib:
            cores.add(sib)
    return len(cores) or None


def allowed_cpus() -> set[int]:
    """The CPUs this process may run on (``taskset``, a cpuset)."""
    import os

    if hasattr(os, "sched_getaffinity"):
        return set(os.sched_getaffinity(0))
    return set(range(os.cpu_count() or 1))


def core_split(cpus: Iterable[int] | None = None, root: Path | None = None) -> dict:
    """Physical cores among ``cpus`` (default: the allowed ones; ``"all"``: the machine's) by kind: ``{"cores",
    "performance", "efficiency", "hybrid", "source"}``; off hybrid CPUs every core is a performance core.
    ``cores`` is None where sysfs has no topology (not Linux)."""
    kinds = core_kinds(root)
    cpus = set(_cpu_dirs(root) if cpus == "all" else allowed_cpus() if cpus is None else cpus)
    total = physical_cores_of(cpus, root)
    if kinds is None or total is None:
        return {"cores": total, "performance": total, "efficiency": 0, "hybrid": False, "source": None}
    perf = physical_cores_of(cpus & kinds["performance"], root) or 0
    return {"cores": total, "performance": perf, "efficiency": total - perf, "hybrid": True,
            "source": kinds["source"]}


def default_threads(cpus: Iterable[int] | None = None, cgroup_dirs: dict | None = None,
                    root: Path | None = None) -> int:
    """The default compute threads: one per physical performance core this process may run on (``cpus``:
    a profile's pinned CPUs instead), capped by a container's CPU quota; at least 1. Only efficiency cores
    allowed (pinned to them): one per such core. No sysfs topology: psutil's physical cores, capped by the
    allowed CPUs (what it was before)."""
    from .cgroup import cap_by_quota, cpu_quota

    cpus = set(allowed_cpus() if cpus is None else cpus)
    split = core_split(cpus, root)
    n = split["performance"] or split["cores"]
    if not n:
        try:
            import psutil

            n = min(psutil.cpu_count(logical=False) or len(cpus), len(cpus))
        except Exception:  # psutil missing or unable to tell
            n = len(cpus)
    return cap_by_quota(max(1, n), cpu_quota(cgroup_dirs))


def minus_one_is_zero(value):
    """A pydantic ``BeforeValidator`` for a thread count whose 0 means the default: llama.cpp's -1 too."""
    return 0 if value in (-1, "-1") and not isinstance(value, bool) else value


def resolve_threads(value, flag: str = "threads") -> int | None:
    """A thread count as given: None, 0 and -1 (llama.cpp's "default") give None (the default); a whole
    number >= 1 is kept; anything else is an error naming ``flag``."""
    from ..errors import InvalidArgument

    def bad(v) -> InvalidArgument:
        return InvalidArgument(f"{flag}={v!r} must be a whole number: >= 1, or 0 / -1 for the default (one per "
                               f"physical performance core); e.g. {flag}=2")

    if value is None:
        return None
    if isinstance(value, str):
        if not value.strip().lstrip("-").isdigit():
            raise bad(value)
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < -1:
        raise bad(value)
    return None if value in (0, -1) else value
