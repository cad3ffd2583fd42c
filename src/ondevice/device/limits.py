"""Apply a device profile to the current process, before the model loads.

Meant for a child process that runs one bench configuration: the parent forks/spawns, the child calls
``apply_profile`` first, then builds the engine with ``applied.threads``.

Memory caps, in order of preference:

* ``cgroup2``: a child cgroup ``ondevice-<pid>`` under this process's cgroup v2 with ``memory.max``; the
  process is moved into it. It caps resident memory (page cache of an mmapped model included), which is
  what a phone's RAM limit is like. Going over triggers the kernel OOM killer (the process dies with
  SIGKILL) rather than a Python ``MemoryError``. Used only where the v2 hierarchy has the memory
  controller and we may write to it; the empty cgroup is left behind for the parent to remove with
  ``remove_cgroup`` after the child exits.
  Page cache is charged to the cgroup that first read a page: a model file already cached by another
  process does not count against the cap until the kernel drops it (``echo 1 > /proc/sys/vm/drop_caches``
  as root makes the capped process read, and pay for, the weights itself).
* ``cgroup1``: the same with a v1 memory hierarchy (hybrid systems, older container hosts):
  ``memory.limit_in_bytes``, and ``memory.memsw.limit_in_bytes`` where swap is accounted.
* ``rlimit_as``: ``setrlimit(RLIMIT_AS)``. It caps *virtual address space*, not RAM: an mmapped model file
  counts in full even if never paged in, and so do thread stacks (8 MiB each), glibc malloc arenas
  (up to 64 MiB reserved per thread; set ``MALLOC_ARENA_MAX=2`` to shrink them) and BLAS buffers. So the
  cap is stricter than the same RAM budget; allocations past it fail (``MemoryError`` in Python, a failed
  load in llama.cpp) instead of killing the process. Only the soft limit is lowered.
"""

from __future__ import annotations

import os
import resource
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import InvalidArgument
from .cgroup import (
    affinity_cpus,
    cap_by_quota,
    cgroup_memory,  # noqa: F401 (callers read it from here)
    cpu_quota,
    memory_limit,
)
from .cgroup import cgroup_dir as _cgroup_dir
from .profile import DeviceProfile, parse_profile


@dataclass(slots=True)
class AppliedLimits:
    """What ``apply_profile`` did, for the run's metadata."""

    profile: str
    threads: int
    cpu_affinity: list[int] | None = None
    affinity_mechanism: str = "none"  # "sched_setaffinity" | "none"
    mem_limit_bytes: int | None = None
    mem_mechanism: str = "none"  # "cgroup2" | "cgroup1" | "rlimit_as" | "none"
    cgroup_path: str | None = None
    # what binds: the smaller of the profile's cap and the container's own limit (an ancestor's cgroup limit)
    effective_mem_limit_bytes: int | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def _enter_child(here: Path, pid: int, limits: dict[str, str], what: str) -> tuple[str | None, str]:
    """Make ``here/ondevice-<pid>``, write ``limits`` (file -> value, in order; missing optional files, marked
    with a leading '?', are skipped) and move ``pid`` in; returns (path or None, why not)."""
    child = here / f"ondevice-{pid}"
    try:
        child.mkdir(exist_ok=True)
        for name, value in limits.items():
            if name.startswith("?"):
                name = name[1:]
                if not (child / name).exists():
                    continue
            (child / name).write_text(value)
        (child / "cgroup.procs").write_text(str(pid))
    except OSError as e:
        try:
            child.rmdir()
        except OSError:
            pass
        return None, f"{what} setup at {here} failed ({e.strerror or e})"
    return str(child), ""


def _try_cgroup2(limit: int, pid: int) -> tuple[str | None, str]:
    """A child cgroup with memory.max (and no swap), ``pid`` moved in; returns (path or None, why not)."""
    here = _cgroup_dir()
    if here is None:
        return None, "no cgroup v2 hierarchy for this process"
    try:
        controllers = (here / "cgroup.controllers").read_text().split()
    except OSError as e:
        return None, f"cannot read {here}/cgroup.controllers ({e.strerror})"
    if "memory" not in controllers:
        return None, f"cgroup v2 at {here} lacks the memory controller"
    if not os.access(here, os.W_OK):
        return None, f"cgroup v2 at {here} is not writable"
    try:
        if "memory" not in (here / "cgroup.subtree_control").read_text().split():
            # Fails with EBUSY when `here` holds processes (no-internal-process rule); then fall back.
            (here / "cgroup.subtree_control").write_text("+memory")
    except OSError as e:
        return None, f"cannot enable the memory controller below {here} ({e.strerror or e})"
    # a device without swap: no escape hatch
    return _enter_child(here, pid, {"memory.max": str(limit), "?memory.swap.max": "0"}, "cgroup v2")


def _try_cgroup1(limit: int, pid: int) -> tuple[str | None, str]:
    """The same in a v1 memory hierarchy (hybrid systems): memory.limit_in_bytes, and memsw (memory + swap)
    at the same value where swap accounting is on."""
    here = _cgroup_dir("memory")
    if here is None:
        return None, "no cgroup v1 memory hierarchy for this process"
    if not os.access(here, os.W_OK):
        return None, f"cgroup v1 memory at {here} is not writable"
    # the OOM killer on (a child inherits its parent's oom_kill_disable): over the cap is a kill, not a stall
    return _enter_child(here, pid, {"memory.limit_in_bytes": str(limit), "?memory.memsw.limit_in_bytes": str(limit),
                                    "?memory.oom_control": "0"}, "cgroup v1")


def remove_cgroup(path: str | None) -> bool:
    """Remove a cgroup made by ``apply_profile`` once its process has exited; True if removed."""
    if not path:
        return False
    try:
        Path(path).rmdir()
        return True
    except OSError:
        return False


def set_rlimit_as(limit: int) -> None:
    """Lower the soft RLIMIT_AS of this process to ``limit`` bytes (the hard limit is kept)."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY and limit > hard:
        raise InvalidArgument(
            f"memory cap {limit} bytes exceeds this process's hard address-space limit {hard}; lower mem="
        )
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))


def _vm_size() -> int | None:
    from .info import proc_kib_fields

    return proc_kib_fields().get("VmSize")


def apply_profile(
    profile: DeviceProfile | str | None, *, mem_mechanism: str = "auto", pid: int | None = None,
    cgroup_dirs: dict | None = None,
) -> AppliedLimits:
    """Pin CPUs and cap memory for this process per ``profile``; return what was applied.

    Args:
        profile: a ``DeviceProfile`` or a spec string (see ``parse_profile``).
        mem_mechanism: "auto" (cgroup2, else cgroup1, else rlimit_as), or one of those (an error when a
            cgroup one is unavailable).
        pid: the process to move into the cgroup (default: this one). RLIMIT_AS and affinity always apply
            to the calling process.
        cgroup_dirs: where to read the container's own limits (CPU quota, memory) from, as
            ``cgroup.memory_limit`` takes them; default this process's cgroups.
    """
    prof = parse_profile(profile)
    if mem_mechanism not in ("auto", "cgroup2", "cgroup1", "rlimit_as"):
        raise InvalidArgument(f"mem_mechanism {mem_mechanism!r} is unknown; use auto, cgroup2, cgroup1 or rlimit_as")
    out = AppliedLimits(
        profile=prof.name, threads=prof.resolved_threads(cgroup_dirs), mem_limit_bytes=prof.mem_limit_bytes
    )

    if prof.cpu_affinity is not None:
        if not hasattr(os, "sched_setaffinity"):
            out.notes.append("CPU affinity is not supported on this OS; not pinned")
        else:
            allowed = os.sched_getaffinity(0)
            bad = sorted(set(prof.cpu_affinity) - allowed)
            if bad:
                raise InvalidArgument(
                    f"profile {prof.name!r} pins CPUs {bad} but this process may only use "
                    f"{sorted(allowed)}; choose cpus= from those"
                )
            os.sched_setaffinity(0, prof.cpu_affinity)
            out.cpu_affinity = sorted(os.sched_getaffinity(0))
            out.affinity_mechanism = "sched_setaffinity"
    quota = cpu_quota(cgroup_dirs)
    usable = cap_by_quota(affinity_cpus(), quota)
    if prof.threads is not None and prof.threads > usable:
        why = f" (CPU quota {quota['cpus']:g})" if quota and int(quota["cpus"]) < affinity_cpus() else ""
        out.notes.append(f"threads={prof.threads} exceeds the {usable} usable CPUs{why}; threads will share cores")

    limit = prof.mem_limit_bytes
    own = memory_limit(cgroup_dirs)  # the container's own limit, read before a child cgroup of ours joins the walk
    out.effective_mem_limit_bytes = min(x for x in (limit, own and own["limit_bytes"]) if x is not None) \
        if limit is not None or own else None
    if limit is not None and own and own["limit_bytes"] < limit:
        out.notes.append(f"this process's cgroup already allows only {own['limit_bytes'] / 2**30:.2f} GiB "
                         f"({own['file']} at {own['path']}), below the profile's {limit / 2**30:.2f} GiB: that "
                         f"limit binds")
    if limit is not None:
        whys = []
        for mech, attempt in (("cgroup2", _try_cgroup2), ("cgroup1", _try_cgroup1)):
            if mem_mechanism not in ("auto", mech):
                continue
            path, why = attempt(limit, pid or os.getpid())
            if path is not None:
                out.mem_mechanism, out.cgroup_path = mech, path
                break
            if mem_mechanism == mech:
                raise InvalidArgument(f"cannot cap memory with {mech}: {why}; use mem_mechanism='auto'")
            whys.append(why)
        if out.mem_mechanism == "none":
            vm = _vm_size()
            if vm is not None and vm >= limit:
                raise InvalidArgument(
                    f"memory cap {limit} bytes is below this process's current address space ({vm} bytes), "
                    "which RLIMIT_AS counts; raise mem= or apply the profile earlier, before heavy imports"
                )
            set_rlimit_as(limit)
            out.mem_mechanism = "rlimit_as"
            out.notes += [f"no cgroup memory cap: {w}" for w in whys]
            out.notes.append(
                "RLIMIT_AS caps virtual address space (mmapped model files, thread stacks and malloc arenas "
                "count), so it is stricter than the same RAM budget"
            )
    return out
