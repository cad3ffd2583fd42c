"""Power and energy sensors that Linux exposes without root where RAPL is missing: hwmon energy counters, hwmon
power sensors (board rails) and the battery while it discharges. ``energy.EnergyMeter`` chooses among them.

Which hwmon sensors are summed. Each ``energy*_input`` / ``power*_input`` is classed by its ``*_label`` (and
the chip's ``name`` for chips that have no labels):

* ``input``: the board's input rail, which contains every other rail (Jetson INA3221 ``VDD_IN``,
  ``POM_5V_IN``; labels with a token ``IN``/``VIN``/``INPUT``/``TOTAL``; the ACPI ``power_meter`` chip of
  servers, which meters the whole system). Scope: the whole board (system).
* ``package``: a CPU socket/package (``amd_energy``/``zenergy`` ``Esocket0``; labels naming a socket, package
  or pkg; the ``fam15h_power`` chip). Scope: CPU packages, as RAPL's ``package-*``.
* ``cpu``: a CPU rail (Jetson ``VDD_CPU_GPU_CV``, ``POM_5V_CPU``: a label with a token ``CPU``). Scope: that
  rail alone (it may feed a GPU too, as its label then says).
* ``core`` (``Ecore000``: a label naming a core) and everything else (GPU, DDR, Wi-Fi rails, unlabelled
  sensors of unknown place) are never summed: cores are inside their package, and a rail of unknown place may
  be inside another that is summed.

Only the best class found is summed (input, then package, then cpu) so that no rail is counted twice with one
that contains it; sensors of that class on several chips are added (two sockets, two INA3221 each with a part).

Batteries: ``/sys/class/power_supply/*`` with ``type`` Battery, not ``scope`` Device (a mouse's battery), not
``present`` 0, and ``status`` Discharging. Power is ``power_now`` (µW) or ``current_now`` (µA) × ``voltage_now``
(µV), absolute (Android reports discharge current as negative). It is the whole device: screen, radios and
every process. Gauges update every few seconds on many laptops, so a run shorter than that sees one value;
the result's ``distinct_readings`` says how many different values the samples saw.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

HWMON = Path("/sys/class/hwmon")
POWER_SUPPLY = Path("/sys/class/power_supply")
SAMPLE_INTERVAL_S = 0.05  # power sensors are read this often during a measured block
CLASSES = ("input", "package", "cpu")  # summed classes, best first

_KNOWN_CHIPS = {"power_meter": "input", "fam15h_power": "package"}  # chips whose sensors have no labels


@dataclass(frozen=True, slots=True)
class Sensor:
    """One readable hwmon value: ``name`` says where (``hwmon2/ina3221/VDD_IN``), ``cls`` what it covers;
    ``volts``: the channel's voltage (mV) where power is current (mA, in ``path``) x voltage."""

    name: str
    path: Path
    cls: str
    volts: Path | None = None

    def watts(self) -> float | None:
        """Power now (W): ``power*_input`` µW, or ``curr*_input`` mA x ``in*_input`` mV (= µW); None: unreadable."""
        p = _int(self.path)
        v = _int(self.volts) if self.volts is not None else 1
        return None if p is None or v is None else p * v / 1e6


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def classify(label: str | None, chip: str) -> str:
    """The class of one hwmon sensor (see the module docstring): input, package, cpu, core or other."""
    if not label:
        return _KNOWN_CHIPS.get(chip, "other")
    low = label.lower()
    tokens = set(re.split(r"[^a-z0-9]+", low))
    if tokens & {"in", "vin", "input", "total"}:
        return "input"
    if any(w in low for w in ("socket", "package", "pkg")):
        return "package"
    if "core" in low:
        return "core"
    return "cpu" if "cpu" in tokens else "other"


def hwmon_sensors(kind: str, root: Path = HWMON) -> tuple[list[Sensor], list[Sensor]]:
    """Readable hwmon sensors of ``kind`` ("energy" or "power"): (those to sum, all readable ones found)."""
    found = []
    for chip_dir in sorted(root.glob("hwmon*")):
        chip = _read(chip_dir / "name") or chip_dir.name
        for f in sorted(chip_dir.glob(f"{kind}*_input"), key=lambda p: (len(p.name), p.name)):
            value = _read(f)
            if value is None or not value.lstrip("-").isdigit():
                continue  # unreadable or malformed: as if absent
            label = _read(f.with_name(f.name.replace("_input", "_label")))
            found.append(Sensor(f"{chip_dir.name}/{chip}/{label or f.name}", f, classify(label, chip)))
        if kind == "power" and not list(chip_dir.glob("power*_input")):
            found += _current_times_voltage(chip_dir, chip)
    for cls in CLASSES:
        chosen = [s for s in found if s.cls == cls]
        if chosen:
            return chosen, found
    return [], found


def _current_times_voltage(chip_dir: Path, chip: str) -> list[Sensor]:
    """Power channels of a chip with no ``power*_input``: ``curr{k}_input`` x ``in{k}_input`` where both read
    (the mainline ``ina3221`` driver on Jetson boards gives each rail's bus voltage and current, not its power),
    labelled by ``in{k}_label`` or ``curr{k}_label``."""
    out = []
    for curr in sorted(chip_dir.glob("curr*_input"), key=lambda p: (len(p.name), p.name)):
        k = curr.name.removeprefix("curr").removesuffix("_input")
        volts = chip_dir / f"in{k}_input"
        if _int(curr) is None or _int(volts) is None:
            continue
        label = _read(chip_dir / f"in{k}_label") or _read(chip_dir / f"curr{k}_label")
        out.append(Sensor(f"{chip_dir.name}/{chip}/{label or f'curr{k}_input x in{k}_input'}", curr,
                          classify(label, chip), volts))
    return out


def hwmon_unavailable(kind: str, root: Path = HWMON) -> str:
    """Why no hwmon sensor of ``kind`` is used (the empty string when one is)."""
    chosen, found = hwmon_sensors(kind, root)
    if chosen:
        return ""
    what = "energy counters" if kind == "energy" else "power sensors"
    if found:
        names = ", ".join(s.name for s in found[:4]) + (", ..." if len(found) > 4 else "")
        return (f"hwmon {what} found ({names}) but none is a board input, CPU package or CPU rail, so none "
                "is summed (cores are inside their package; other rails may be inside one another)")
    unreadable = [f for f in root.glob(f"hwmon*/{kind}*_input") if _read(f) is None]
    if unreadable:
        return f"hwmon {what} exist ({unreadable[0]}, ...) but are not readable by this user"
    return f"no hwmon {what}" + ("" if root.exists() else f" ({root} absent)")


def scope_of(sensors: list[Sensor], what: str) -> str:
    """The scope words for the summed ``sensors`` (all of one class), ``what`` saying how they were read."""
    cls, names = sensors[0].cls, ", ".join(s.name.rsplit("/", 1)[-1] for s in sensors)
    if cls == "input":
        return f"system (board input: {names}; {what}; whole device, all processes)"
    if cls == "package":
        return f"cpu packages ({names}; {what}; whole machine, all processes)"
    return f"rail: CPU ({names}; {what}; that rail only, not the whole board; all processes)"


@dataclass(frozen=True, slots=True)
class Battery:
    name: str
    dir: Path

    def watts(self) -> float | None:
        """Power drawn now (W), or None when it cannot be read or the battery no longer discharges."""
        if _read(self.dir / "status") != "Discharging":
            return None
        p = _int(self.dir / "power_now")
        if p is not None:
            return abs(p) / 1e6
        i, v = _int(self.dir / "current_now"), _int(self.dir / "voltage_now")
        return abs(i) * abs(v) / 1e12 if i is not None and v is not None else None


def _int(path: Path) -> int | None:
    v = _read(path)
    try:
        return int(v) if v is not None else None
    except ValueError:
        return None


def batteries(root: Path = POWER_SUPPLY) -> tuple[list[Battery], str]:
    """The system batteries now discharging with a readable power, and why none is when the list is empty."""
    why, out = [], []
    for d in sorted(root.glob("*")):
        if _read(d / "type") != "Battery" or _read(d / "scope") == "Device" or _read(d / "present") == "0":
            continue
        b = Battery(d.name, d)
        status = _read(d / "status")
        if status != "Discharging":
            why.append(f"battery {d.name} is {status or 'of unknown status'}, not discharging "
                       "(on a charger the battery does not carry the device's power)")
        elif b.watts() is None:
            why.append(f"battery {d.name} is discharging but has no readable power_now or current_now x voltage_now")
        else:
            out.append(b)
    if not out and not why:
        why.append("no battery" + ("" if root.exists() else f" ({root} absent)"))
    return out, "; ".join(why)


class Sampler:
    """Reads ``read()`` (watts, or None) every ``interval_s`` in a background thread from ``start()`` to
    ``stop()`` (each of which takes a sample too) and integrates it over time (trapezoids) from ``t0``, the clock
    before the first read, to ``t_end``, the clock after the last: the first and last readings hold over the edges
    (a read that a loaded machine delays must not leave part of the region out: 5% of a 50 ms block was)."""

    def __init__(self, read: Callable[[], float | None], interval_s: float = SAMPLE_INTERVAL_S,
                 clock: Callable[[], float] = time.perf_counter):
        self.read, self.interval_s, self.clock = read, interval_s, clock
        self.samples: list[tuple[float, float | None]] = []  # (time, watts); None: unreadable then
        self.t0 = self.t_end = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="ondevice-power-sampler", daemon=True)

    def sample(self) -> None:
        watts = self.read()
        self.samples.append((self.clock(), watts))

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def start(self, t0: float | None = None) -> None:
        """``t0``: where the measured region began (the caller's clock reading); None: now."""
        self.t0 = self.clock() if t0 is None else t0
        self.sample()
        self._thread.start()

    def stop(self) -> dict:
        """Stop and return ``joules`` (None when any sample was unreadable) with how it was sampled."""
        self._stop.set()
        self._thread.join()
        self.sample()
        self.t_end = self.clock()
        s = self.samples
        gaps = [b[0] - a[0] for a, b in zip(s, s[1:])]
        bad = sum(w is None for _, w in s)
        joules = None if bad else (sum((a[1] + b[1]) / 2 * (b[0] - a[0]) for a, b in zip(s, s[1:]))
                                   + s[0][1] * (s[0][0] - self.t0) + s[-1][1] * (self.t_end - s[-1][0]))
        return {"joules": joules, "samples": len(s), "interval_s": self.interval_s,
                "max_gap_s": max(gaps, default=0.0), "unreadable_samples": bad,
                "distinct_readings": len({w for _, w in s if w is not None})}
