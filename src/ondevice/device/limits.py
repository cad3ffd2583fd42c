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
from .profile import DeviceProfile, parse_profile


@dataclass(slots=True)
class AppliedLimits:
    """What ``apply_profile`` did, for the run's metadata."""

    profile: str
    threads: int
    cpu_affinity: list[int] | None = None
    affinity_mechanism: str = "none"  # "sched_setaffinity" | "none"
    mem_limit_bytes: int | None = None
    mem_mechanism: str = "none"  # "cgroup2" | "rlimit_as" | "none"
    cgroup_path: str | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def _cgroup2_dir() -> Path | None:
    """This process's cgroup v2 directory, or None when there is no v2 mount (or we are v1-only)."""
    mount = None
    try:
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            left, _, right = line.partition(" - ")
            if right.split(" ", 1)[0] == "cgroup2":
                mount = left.split()[4]
                break
        rel = next(
            ln[3:] for ln in Path("/proc/self/cgroup").read_text().splitlines() if ln.startswith("0::")
        )
    except (OSError, StopIteration):
        return None
    if mount is None:
        return None
    return Path(mount) / rel.lstrip("/")


def _try_cgroup2(limit: int, pid: int) -> tuple[str | None, str]:
    """Create ``ondevice-<pid>`` with memory.max and move ``pid`` in; returns (path or None, why not)."""
    here = _cgroup2_dir()
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
    child = here / f"ondevice-{pid}"
    try:
        subtree = (here / "cgroup.subtree_control").read_text().split()
        if "memory" not in subtree:
            # Fails with EBUSY when `here` holds processes (no-internal-process rule); then fall back.
            (here / "cgroup.subtree_control").write_text("+memory")
        child.mkdir(exist_ok=True)
        (child / "memory.max").write_text(str(limit))
        if (child / "memory.swap.max").exists():
            (child / "memory.swap.max").write_text("0")  # a device without swap: no escape hatch
        (child / "cgroup.procs").write_text(str(pid))
    except OSError as e:
        try:
            child.rmdir()
        except OSError:
            pass
        return None, f"cgroup v2 setup at {here} failed ({e.strerror or e})"
    return str(child), ""


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
    profile: DeviceProfile | str | None, *, mem_mechanism: str = "auto", pid: int | None = None
) -> AppliedLimits:
    """Pin CPUs and cap memory for this process per ``profile``; return what was applied.

    Args:
        profile: a ``DeviceProfile`` or a spec string (see ``parse_profile``).
        mem_mechanism: "auto" (cgroup2, else rlimit_as), "cgroup2" (error if unavailable) or "rlimit_as".
        pid: the process to move into the cgroup (default: this one). RLIMIT_AS and affinity always apply
            to the calling process.
    """
    prof = parse_profile(profile)
    if mem_mechanism not in ("auto", "cgroup2", "rlimit_as"):
        raise InvalidArgument(f"mem_mechanism {mem_mechanism!r} is unknown; use auto, cgroup2 or rlimit_as")
    out = AppliedLimits(
        profile=prof.name, threads=prof.resolved_threads(), mem_limit_bytes=prof.mem_limit_bytes
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
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if prof.threads is not None and prof.threads > usable:
        out.notes.append(f"threads={prof.threads} exceeds the {usable} usable CPUs; threads will share cores")

    limit = prof.mem_limit_bytes
    if limit is not None:
        why = ""
        if mem_mechanism in ("auto", "cgroup2"):
            path, why = _try_cgroup2(limit, pid or os.getpid())
            if path is not None:
                out.mem_mechanism, out.cgroup_path = "cgroup2", path
            elif mem_mechanism == "cgroup2":
                raise InvalidArgument(
                    f"cannot cap memory with cgroup v2: {why}; use mem_mechanism='rlimit_as'"
                )
        if out.mem_mechanism == "none":
            vm = _vm_size()
            if vm is not None and vm >= limit:
                raise InvalidArgument(
                    f"memory cap {limit} bytes is below this process's current address space ({vm} bytes), "
                    "which RLIMIT_AS counts; raise mem= or apply the profile earlier, before heavy imports"
                )
            set_rlimit_as(limit)
            out.mem_mechanism = "rlimit_as"
            if why:
                out.notes.append(f"cgroup2 unavailable: {why}")
            out.notes.append(
                "RLIMIT_AS caps virtual address space (mmapped model files, thread stacks and malloc arenas "
                "count), so it is stricter than the same RAM budget"
            )
    return out
