"""Device profiles: the budget (threads, cores, memory, power) a run pretends to have.

A profile is applied to a fresh child process before the model loads (see ``limits.apply_profile``), so
one machine can emulate a smaller one. Specs are a built-in name (``host``, ``phone-4g``, ``edge-1g``) or
``key=value`` pairs: ``threads=2,mem=2G,cpus=0-1,watts=3.5,name=mine``; a spec may start from a built-in
(``phone-4g,threads=1``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from ..errors import InvalidArgument

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*$", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class DeviceProfile:
    """What a run may use.

    Attributes:
        name: label stored with every record.
        threads: compute threads for the engine; None (or 0, -1) means the default, one per physical
            performance core of the allowed CPUs (``cores.default_threads``).
        cpu_affinity: CPUs the process may run on (``os.sched_setaffinity``); None leaves it alone.
        mem_limit_bytes: memory cap for the whole process; None means no cap.
        watts_per_core: power of one busy core, for the energy estimate when RAPL is unreadable;
            None uses ``ONDEVICE_CPU_WATTS_PER_CORE`` or the default in ``energy``.
    """

    name: str = "host"
    threads: int | None = None
    cpu_affinity: tuple[int, ...] | None = None
    mem_limit_bytes: int | None = None
    watts_per_core: float | None = None

    def __post_init__(self) -> None:
        from .cores import resolve_threads

        object.__setattr__(self, "threads", resolve_threads(self.threads))  # 0 and -1: the default (None)
        if self.cpu_affinity is not None:
            cpus = tuple(sorted({int(c) for c in self.cpu_affinity}))  # accept any iterable, e.g. a list
            if not cpus or cpus[0] < 0:
                raise InvalidArgument(
                    f"cpus={self.cpu_affinity!r} must name at least one CPU >= 0; e.g. cpus=0-1"
                )
            object.__setattr__(self, "cpu_affinity", cpus)
        if self.mem_limit_bytes is not None and self.mem_limit_bytes < (16 << 20):
            raise InvalidArgument(
                f"mem={self.mem_limit_bytes} bytes is below 16 MiB, too small to start Python; use e.g. mem=1G"
            )
        if self.watts_per_core is not None and not (0 < self.watts_per_core < 1000):
            raise InvalidArgument(
                f"watts={self.watts_per_core!r} must be in (0, 1000) W per core; e.g. watts=5"
            )

    def resolved_threads(self, cgroup_dirs: dict | None = None) -> int:
        """Threads to give the engine: explicit, else one per physical performance core of the allowed CPUs
        (the profile's ``cpus``, else this process's affinity), capped by the container's CPU quota
        (``cores.default_threads``; ``cgroup_dirs``: where to read it, default this process's cgroups)."""
        from .cores import default_threads

        if self.threads is not None:
            return self.threads
        return default_threads(self.cpu_affinity, cgroup_dirs)

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "threads": self.threads,
            "cpu_affinity": list(self.cpu_affinity) if self.cpu_affinity is not None else None,
            "mem_limit_bytes": self.mem_limit_bytes,
            "watts_per_core": self.watts_per_core,
        }


BUILTIN_PROFILES: dict[str, DeviceProfile] = {
    "host": DeviceProfile("host"),
    # A mid-range phone: two big cores free for the app, about 4 GiB it may use.
    "phone-4g": DeviceProfile("phone-4g", threads=2, mem_limit_bytes=4 << 30),
    # A single-board computer / edge box: one core, 1 GiB.
    "edge-1g": DeviceProfile("edge-1g", threads=1, mem_limit_bytes=1 << 30),
}


def parse_size(text: str) -> int:
    """Parse a byte size: ``4G``, ``512M``, ``1.5GiB``, ``1048576`` (units are powers of 1024)."""
    m = _SIZE_RE.match(text)
    if not m:
        raise InvalidArgument(
            f"cannot read size {text!r}; write a number with an optional unit K/M/G/T, e.g. 2G"
        )
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def parse_cpus(text: str) -> tuple[int, ...]:
    """Parse a CPU list in ``taskset`` style: ``0-3``, ``0,2``, ``0-1;4``."""
    cpus: list[int] = []
    for part in re.split(r"[;,\s]+", text.strip()):
        if not part:
            continue
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not m:
            raise InvalidArgument(f"cannot read CPU list {text!r}; write ranges, e.g. cpus=0-1 or cpus=0;2")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if hi < lo:
            raise InvalidArgument(f"CPU range {part!r} runs backwards; write it low-high, e.g. 0-3")
        cpus.extend(range(lo, hi + 1))
    if not cpus:
        raise InvalidArgument("empty CPU list; write CPUs, e.g. cpus=0-1")
    return tuple(cpus)


_KEYS = {"name", "threads", "cpus", "mem", "watts"}


def parse_profile(spec: str | DeviceProfile | None) -> DeviceProfile:
    """Turn a profile spec into a ``DeviceProfile`` (None or '' gives ``host``)."""
    if isinstance(spec, DeviceProfile):
        return spec
    if spec is None or not spec.strip():
        return BUILTIN_PROFILES["host"]
    parts = [p.strip() for p in spec.split(",") if p.strip()]
    base = BUILTIN_PROFILES["host"]
    custom = False
    if "=" not in parts[0]:
        if parts[0] not in BUILTIN_PROFILES:
            raise InvalidArgument(
                f"unknown device profile {parts[0]!r}; use one of {', '.join(BUILTIN_PROFILES)} "
                "or key=value pairs like threads=2,mem=2G"
            )
        base = BUILTIN_PROFILES[parts.pop(0)]
    # "cpus=0,2" arrives split at the comma: glue bare CPU numbers back onto the cpus item before them.
    items: list[str] = []
    for part in parts:
        if (
            items
            and "=" not in part
            and re.fullmatch(r"\d+(-\d+)?", part)
            and items[-1].lower().startswith("cpus=")
        ):
            items[-1] += ";" + part
        else:
            items.append(part)
    fields: dict = {}
    for part in items:
        key, sep, value = part.partition("=")
        key, value = key.strip().lower(), value.strip()
        if not sep or not value:
            raise InvalidArgument(f"profile item {part!r} needs key=value; keys: {', '.join(sorted(_KEYS))}")
        if key not in _KEYS:
            raise InvalidArgument(f"unknown profile key {key!r}; keys: {', '.join(sorted(_KEYS))}")
        custom = custom or key != "name"
        if key == "name":
            fields["name"] = value
        elif key == "threads":
            from .cores import resolve_threads

            fields["threads"] = resolve_threads(value)
        elif key == "cpus":
            fields["cpu_affinity"] = parse_cpus(value)
        elif key == "mem":
            fields["mem_limit_bytes"] = None if value.lower() in ("none", "0", "off") else parse_size(value)
        elif key == "watts":
            try:
                fields["watts_per_core"] = float(value)
            except ValueError:
                raise InvalidArgument(
                    f"watts={value!r} must be a number of watts per core; e.g. watts=5"
                ) from None
    if custom and "name" not in fields:
        fields["name"] = spec.strip()  # a custom budget is named by its spec so records stay distinguishable
    return replace(base, **fields)
