"""Energy meters: a real sensor where Linux exposes one, else an estimate that says it is one.

``method="auto"`` takes the first of these that is readable here, each also selectable by name: ``rapl``, then
``hwmon-energy`` (hwmon ``energy*_input`` counters: AMD ``amd_energy``/``zenergy``, some PMICs), ``hwmon-power``
(hwmon ``power*_input`` sensors sampled during the block: INA2xx/INA3221 rails on Jetson and other boards),
``battery`` (the system battery while it discharges, sampled: the whole device), then ``estimated``; the
``ONDEVICE_ENERGY_METHOD`` env var picks one where no method is passed. Which hwmon sensors and batteries are
used is ``sensors``' rule. Every result says its ``method``, ``scope`` (what was measured: ``cpu packages ...``,
``system (...)`` for a board input or battery, ``rail: ...``, or this process for the estimate) and
``resolution``; sampled ones add ``samples``, ``interval_s`` and ``max_gap_s``. ``describe`` says which source
is used and why each better one is not (``unavailable``, one function for every source).

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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from ..errors import InvalidArgument, OndeviceError
from . import sensors
from .sensors import SAMPLE_INTERVAL_S, Sampler, batteries, hwmon_sensors, hwmon_unavailable, scope_of

# A server core under full load: e.g. a 64-core 280 W EPYC 7763 gives ~4.4 W/core, a 16-core 125 W desktop
# part ~7.8 W/core, a phone big core 1-3 W. 5 W sits in the middle of the x86 figures; override it for
# other hardware with the env var or the profile.
DEFAULT_WATTS_PER_CORE = 5.0
WATTS_ENV = "ONDEVICE_CPU_WATTS_PER_CORE"
POWERCAP = Path("/sys/class/powercap")
METHOD_ENV = "ONDEVICE_ENERGY_METHOD"
METHODS = ("rapl", "hwmon-energy", "hwmon-power", "battery", "estimated")  # auto's order, best first


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


def _roots(powercap: Path | None, hwmon: Path | None, power_supply: Path | None) -> tuple[Path, Path, Path]:
    """The sysfs roots to read (tests pass fake trees; None: the real ones, looked up at call time)."""
    return powercap or POWERCAP, hwmon or sensors.HWMON, power_supply or sensors.POWER_SUPPLY


def unavailable(method: str, powercap: Path | None = None, hwmon: Path | None = None,
                power_supply: Path | None = None) -> str:
    """Why ``method`` cannot measure here; the empty string when it can (the estimate always can)."""
    powercap, hwmon, power_supply = _roots(powercap, hwmon, power_supply)
    if method == "rapl":
        return "" if rapl_domains(powercap) else rapl_unavailable(powercap, until="")
    if method in ("hwmon-energy", "hwmon-power"):
        return hwmon_unavailable(method.removeprefix("hwmon-"), hwmon)
    if method == "battery":
        found, why = batteries(power_supply)
        return "" if found else why
    return ""


def resolve_method(method: str | None = None) -> str:
    """The method asked for: the argument, else ``ONDEVICE_ENERGY_METHOD``, else "auto"; checked."""
    said = "the argument" if method is not None else METHOD_ENV
    method = method if method is not None else (os.environ.get(METHOD_ENV) or "auto")
    if method not in ("auto", *METHODS):
        raise InvalidArgument(f"energy method {method!r} (from {said}) is unknown; use auto, {', '.join(METHODS)}")
    return method


def choose(method: str | None = None, powercap: Path | None = None, hwmon: Path | None = None,
           power_supply: Path | None = None) -> tuple[str, list[tuple[str, str]]]:
    """The method used here and, for each better one passed over, why (auto); a named one that cannot measure
    raises, saying why."""
    method = resolve_method(method)
    skipped = []
    for m in METHODS if method == "auto" else (method,):
        why = unavailable(m, powercap, hwmon, power_supply)
        if not why:
            return m, skipped
        skipped.append((m, why))
    m, why = skipped[-1]
    if m == "rapl":
        root = powercap or POWERCAP
        raise OndeviceError(f"RAPL energy counters are not readable here: {why}; or use method='estimated'"
                            if rapl_root_only(root) else
                            f"RAPL energy counters are not readable here (no readable {root}/intel-rapl:*/"
                            f"energy_uj); use method='estimated'")
    raise OndeviceError(f"energy method {m!r} cannot measure here: {why}; use method='auto' (the next readable "
                        f"source) or method='estimated'")


@dataclass(slots=True)
class _Source:
    """What a meter reads: cumulative µJ ``counters`` (path, wrap range or None) read at the start and end, or a
    power ``read`` (watts) sampled in between, or neither (the estimate)."""

    method: str
    scope: str
    resolution: str
    domains: list[str] | None = None
    counters: list[tuple[Path, int | None]] | None = None
    read: Callable[[], float | None] | None = None


def _sum_watts(parts: list[Callable[[], float | None]]) -> Callable[[], float | None]:
    def read() -> float | None:
        values = [p() for p in parts]
        return None if any(v is None for v in values) else sum(values)
    return read


def _source(method: str, powercap: Path, hwmon: Path, power_supply: Path, interval_s: float) -> _Source:
    sampled = f"sampled every {interval_s:g} s and integrated (trapezoids)"
    if method == "rapl":
        doms = rapl_domains(powercap)
        scope = ("cpu packages and DRAM" if any(d.name.endswith("/dram") for d in doms)
                 else "cpu packages, DRAM excluded") + " (whole machine, all processes)"
        return _Source(method, scope, "µJ counters read at the start and end (updated about every 1 ms)",
                       [d.name for d in doms], [(d.energy_path, d.max_range_uj) for d in doms])
    if method == "hwmon-energy":
        chosen = hwmon_sensors("energy", hwmon)[0]
        return _Source(method, scope_of(chosen, "hwmon energy counters"), "µJ counters read at the start and end",
                       [s.name for s in chosen], [(s.path, None) for s in chosen])
    if method == "hwmon-power":
        chosen = hwmon_sensors("power", hwmon)[0]
        return _Source(method, scope_of(chosen, "hwmon power sensors"), f"power readings {sampled}",
                       [s.name for s in chosen], read=_sum_watts([s.watts for s in chosen]))
    if method == "battery":
        found = batteries(power_supply)[0]
        names = ", ".join(b.name for b in found)
        return _Source(method, f"system (battery {names}, discharging: the whole device, screen and radios "
                       "included, all processes)", f"power_now or current_now x voltage_now {sampled}",
                       [b.name for b in found], read=_sum_watts([b.watts for b in found]))
    return _Source("estimated", "this process and its reaped children (estimate: CPU seconds x watts per core)",
                   "CPU seconds (getrusage) x watts per core: not a power reading")


def describe(method: str | None = None, watts_per_core: float | None = None, powercap: Path | None = None,
             hwmon: Path | None = None, power_supply: Path | None = None) -> str:
    """One line: the source used here, what it measures, and why each better one is not."""
    roots = _roots(powercap, hwmon, power_supply)
    used, skipped = choose(method, *roots)
    src = _source(used, *roots, SAMPLE_INTERVAL_S)
    watts, source = resolve_watts(watts_per_core)
    what = f"{src.scope}; {watts:g} W per core ({source})" if used == "estimated" else f"{src.scope}; {src.resolution}"
    return f"{used}: {what}" + "".join(f"; not {m}: {why}" for m, why in skipped)


def scope_kind(method: str | None, scope: str | None) -> str:
    """What a record's energy covers, for labels: "estimated", "system" (battery, board input), "rail" (one
    rail of a board) or "package" (CPU packages: RAPL, hwmon package sensors, and records made before scopes)."""
    if method == "estimated":
        return "estimated"
    scope = scope or ""
    return "system" if scope.startswith("system") else "rail" if scope.startswith("rail") else "package"


class EnergyMeter:
    """Context manager measuring (a sensor) or estimating (CPU time) the energy of the block it wraps.

    Example:
        with EnergyMeter(watts_per_core=profile.watts_per_core) as meter:
            run()
        meter.result  # {"joules": ..., "method": "rapl"|"hwmon-power"|...|"estimated", "scope": ..., ...}

    Args:
        watts_per_core: power of a busy core for the estimate (see module docstring for the fallbacks).
        method: "auto" (the first readable source), a name in ``METHODS`` (error if it cannot measure here), or
            None: ``ONDEVICE_ENERGY_METHOD``, else auto.
        powercap, hwmon, power_supply: sysfs roots (tests pass fake trees; None: the real ones).
        interval_s: how often a power sensor or battery is sampled.
        clock: the time source (tests pass a fake one).
    """

    def __init__(self, watts_per_core: float | None = None, method: str | None = None,
                 powercap: Path | None = None, hwmon: Path | None = None, power_supply: Path | None = None,
                 interval_s: float = SAMPLE_INTERVAL_S, clock: Callable[[], float] = time.perf_counter):
        self.watts_per_core, self.watts_source = resolve_watts(watts_per_core)
        roots = _roots(powercap, hwmon, power_supply)
        self.method, self.skipped = choose(method, *roots)
        self._src = _source(self.method, *roots, interval_s)
        self.interval_s, self.clock = interval_s, clock
        self.result: dict | None = None

    def _counters(self) -> list[int]:
        return [int(p.read_text()) for p, _ in self._src.counters or []]

    def __enter__(self) -> EnergyMeter:
        self._e0 = self._counters()
        self._sampler = Sampler(self._src.read, self.interval_s, self.clock) if self._src.read else None
        self._t0 = self.clock()
        self._cpu0 = _cpu_seconds()
        if self._sampler:
            self._sampler.start(self._t0)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        sampled = self._sampler.stop() if self._sampler else {}
        seconds = (self._sampler.t_end if self._sampler else self.clock()) - self._t0  # the span sampled
        cpu_seconds = _cpu_seconds() - self._cpu0
        e1 = self._counters()
        src = self._src
        result: dict = {"method": self.method, "seconds": seconds, "cpu_seconds": cpu_seconds, "scope": src.scope,
                        "resolution": src.resolution, "watts_per_core": None}
        if src.counters is not None:
            deltas = [None if m is None and b < a else counter_delta(a, b, m or 0)
                      for a, b, (_, m) in zip(self._e0, e1, src.counters)]
            result.update(joules=None if None in deltas else sum(deltas) / 1e6, domains=src.domains)
            if None in deltas:
                result["note"] = "an hwmon energy counter went backwards (reset or wrapped): no figure"
        elif src.read is not None:
            result.update(sampled, domains=src.domains)
            if sampled["joules"] is None:
                result["note"] = ("a sensor could not be read during the block" if self.method != "battery" else
                                  "the battery stopped discharging or could not be read during the block "
                                  "(charger plugged in?): no figure")
        else:
            result.update(joules=cpu_seconds * self.watts_per_core, watts_per_core=self.watts_per_core,
                          watts_source=self.watts_source)  # profile | env | default
        j = result["joules"]
        result["avg_watts"] = j / seconds if j is not None and seconds > 0 else None
        self.result = result

    @property
    def joules(self) -> float | None:
        if self.result is None:
            raise RuntimeError("EnergyMeter.joules is only known after the with-block ends")
        return self.result["joules"]
