"""Energy meters: RAPL counters when the kernel exposes them, else an estimate that says it is one.

``method="rapl"`` reads ``/sys/class/powercap/intel-rapl:N/energy_uj`` (also used by AMD's RAPL driver) for
each top-level domain named ``package-*``, plus each ``dram`` subdomain (``intel-rapl:N:M`` named ``dram``, on
servers): DRAM is a RAPL domain of its own, *not* inside the package figure. The ``core`` (PP0) and
``uncore`` (PP1) subdomains are inside the package, so they are not added, and neither is ``psys`` (the
whole platform on Intel laptops since Skylake, which already contains the package). Where the kernel exposes
no ``dram`` domain (client CPUs, AMD), the figure excludes DRAM energy. It is a *measurement* of the whole
package, including other processes; the result's ``domains`` lists the counters summed.

``method="estimated"`` is ``CPU seconds × watts per busy core``: CPU seconds are this process's user+system
time plus that of children it has waited for (``resource.getrusage``), so a child run by a bench must be
reaped inside the ``with`` block. The watts per core come from, in order: the ``watts_per_core`` argument
(the device profile), ``ONDEVICE_CPU_WATTS_PER_CORE``, then ``DEFAULT_WATTS_PER_CORE``. It ignores idle,
uncore and DRAM power, so it is a rough, labelled figure, never reported as measured.
"""

from __future__ import annotations

import os
import resource
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from ..errors import InvalidArgument, OndeviceError

# A server core under full load: e.g. a 64-core 280 W EPYC 7763 gives ~4.4 W/core, a 16-core 125 W desktop
# part ~7.8 W/core, a phone big core 1-3 W. 5 W sits in the middle of the x86 figures; override it for
# other hardware with the env var or the profile.
DEFAULT_WATTS_PER_CORE = 5.0
WATTS_ENV = "ONDEVICE_CPU_WATTS_PER_CORE"
POWERCAP = Path("/sys/class/powercap")


@dataclass(frozen=True, slots=True)
class _RaplDomain:
    name: str
    energy_path: Path
    max_range_uj: int


def _summed(zone: str, name: str) -> bool:
    """Whether a RAPL zone's counter is added: top-level ``package-*`` (not ``psys``, which contains the
    packages) and ``dram`` subdomains (outside the package); core/uncore subdomains are inside the package."""
    top = zone.count(":") == 1
    return name.startswith("package") if top else name == "dram"


def rapl_domains(root: Path = POWERCAP) -> list[_RaplDomain]:
    """Readable RAPL domains to sum (``package-*`` and ``dram``; empty when there are none or they are
    root-only), each named ``zone/name`` (``intel-rapl:0/package-0``)."""
    out = []
    for d in sorted(root.glob("intel-rapl:*")):
        energy = d / "energy_uj"
        try:
            name = (d / "name").read_text().strip() if (d / "name").exists() else d.name
            if not _summed(d.name, name):
                continue
            int(energy.read_text())
            max_range = int((d / "max_energy_range_uj").read_text())
        except (OSError, ValueError):
            continue  # unreadable (kernels since 5.10 make energy_uj root-only) or malformed
        out.append(_RaplDomain(name=f"{d.name}/{name}", energy_path=energy, max_range_uj=max_range))
    return out


def rapl_root_only(root: Path = POWERCAP) -> list[Path]:
    """The ``energy_uj`` counters that exist but this process may not read (kernels since 5.10 make them
    root-only, against the PLATYPUS power side channel)."""
    out = []
    for f in sorted(root.glob("intel-rapl:*/energy_uj")):
        try:
            with open(f, "rb"):
                pass
        except PermissionError:
            out.append(f)
        except OSError:
            continue
    return out


def rapl_unavailable(root: Path = POWERCAP, until: str = "; energy is estimated until then") -> str:
    """Why energy is estimated where no RAPL domain is readable: the counters are root-only (how to open them,
    then ``until``), or there are none."""
    if rapl_root_only(root):
        return (f"RAPL counters exist ({root}/intel-rapl:*/energy_uj) but are root-only (kernels since 5.10): "
                f"run as root, or `sudo chmod o+r {root}/intel-rapl:*/energy_uj` (undone at every boot){until}")
    return "no readable RAPL counters"


def counter_delta(start: int, end: int, max_range: int) -> int:
    """Counter increase from ``start`` to ``end`` allowing one wrap at ``max_range`` (undetectable beyond)."""
    return end - start if end >= start else end + max_range - start


def resolve_watts(watts_per_core: float | None = None) -> tuple[float, str]:
    """Watts per busy core and where they came from: the argument ("profile": the device profile's
    ``watts=``), else ``ONDEVICE_CPU_WATTS_PER_CORE`` ("env"), else ``DEFAULT_WATTS_PER_CORE`` ("default")."""
    if watts_per_core is not None:
        value, source, said = watts_per_core, "profile", "the argument"
    elif os.environ.get(WATTS_ENV):
        try:
            value, source, said = float(os.environ[WATTS_ENV]), "env", WATTS_ENV
        except ValueError:
            raise InvalidArgument(
                f"{WATTS_ENV}={os.environ[WATTS_ENV]!r} is not a number; set it to watts per busy core, e.g. 5"
            ) from None
    else:
        return DEFAULT_WATTS_PER_CORE, "default"
    if not (0 < value < 1000):
        raise InvalidArgument(f"watts per core from {said} is {value}; it must be in (0, 1000), e.g. 5")
    return value, source


def resolve_watts_per_core(watts_per_core: float | None = None) -> float:
    """Watts per busy core: the argument, else ``ONDEVICE_CPU_WATTS_PER_CORE``, else the default."""
    return resolve_watts(watts_per_core)[0]


def _cpu_seconds() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


class EnergyMeter:
    """Context manager measuring (RAPL) or estimating (CPU time) the energy of the block it wraps.

    Example:
        with EnergyMeter(watts_per_core=profile.watts_per_core) as meter:
            run()
        meter.result  # {"joules": ..., "method": "rapl"|"estimated", ...}

    Args:
        watts_per_core: power of a busy core for the estimate (see module docstring for the fallbacks).
        method: "auto" (RAPL when readable), "rapl" (error if unreadable) or "estimated".
        powercap: where the RAPL zones are (tests pass a fake tree).
    """

    def __init__(self, watts_per_core: float | None = None, method: str = "auto", powercap: Path = POWERCAP):
        if method not in ("auto", "rapl", "estimated"):
            raise InvalidArgument(f"energy method {method!r} is unknown; use auto, rapl or estimated")
        self.watts_per_core, self.watts_source = resolve_watts(watts_per_core)
        self._domains = rapl_domains(powercap) if method in ("auto", "rapl") else []
        if method == "rapl" and not self._domains:
            why = rapl_unavailable(powercap, until="")
            raise OndeviceError(f"RAPL energy counters are not readable here: {why}; or use method='estimated'"
                                if rapl_root_only(powercap) else
                                f"RAPL energy counters are not readable here (no readable {powercap}/intel-rapl:*/"
                                f"energy_uj); use method='estimated'")
        self.method = "rapl" if self._domains else "estimated"
        self.result: dict | None = None

    def __enter__(self) -> EnergyMeter:
        self._t0 = time.perf_counter()
        self._cpu0 = _cpu_seconds()
        self._e0 = [int(d.energy_path.read_text()) for d in self._domains]
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        e1 = [int(d.energy_path.read_text()) for d in self._domains]
        seconds = time.perf_counter() - self._t0
        cpu_seconds = _cpu_seconds() - self._cpu0
        result: dict = {"method": self.method, "seconds": seconds, "cpu_seconds": cpu_seconds}
        if self.method == "rapl":
            uj = sum(counter_delta(a, b, d.max_range_uj) for a, b, d in zip(self._e0, e1, self._domains))
            result.update(
                joules=uj / 1e6,
                watts_per_core=None,
                scope=("cpu packages and DRAM" if any(d.name.endswith("/dram") for d in self._domains)
                       else "cpu packages, DRAM excluded") + " (whole machine, all processes)",
                domains=[d.name for d in self._domains],
            )
        else:
            result.update(
                joules=cpu_seconds * self.watts_per_core,
                watts_per_core=self.watts_per_core,
                watts_source=self.watts_source,  # profile | env | default
                scope="this process and its reaped children (estimate: CPU seconds x watts per core)",
            )
        result["avg_watts"] = result["joules"] / seconds if seconds > 0 else None
        self.result = result

    @property
    def joules(self) -> float:
        if self.result is None:
            raise RuntimeError("EnergyMeter.joules is only known after the with-block ends")
        return self.result["joules"]
