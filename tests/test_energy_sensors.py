"""Energy from hwmon counters, hwmon power sensors and a discharging battery, over fake sysfs trees whose files
the tests rewrite while the meter runs: the joules must be the ones those values make; what is summed (sockets,
not cores; the board input, not the rails inside it), the scope and the fallbacks (charging battery, unreadable
or unknown sensors) are checked too."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from ondevice.device.energy import EnergyMeter, describe, scope_kind, unavailable
from ondevice.device.sensors import Sampler, classify
from ondevice.errors import InvalidArgument, OndeviceError


@pytest.fixture
def roots(tmp_path, monkeypatch):
    """Empty powercap/hwmon/power_supply trees (no RAPL), and no method from the env."""
    monkeypatch.delenv("ONDEVICE_ENERGY_METHOD", raising=False)
    r = {k: tmp_path / k for k in ("powercap", "hwmon", "power_supply")}
    for p in r.values():
        p.mkdir()
    return r


def chip(hwmon: Path, n: int, name: str, kind: str, sensors: dict[str | None, int | str]) -> dict[str | None, Path]:
    """hwmonN with ``name`` and ``kind``K_input (+ _label unless the label is None) per sensor."""
    d = hwmon / f"hwmon{n}"
    d.mkdir()
    (d / "name").write_text(name + "\n")
    out = {}
    for k, (label, value) in enumerate(sensors.items(), 1):
        (d / f"{kind}{k}_input").write_text(f"{value}\n")
        if label is not None:
            (d / f"{kind}{k}_label").write_text(label + "\n")
        out[label] = d / f"{kind}{k}_input"
    return out


def battery(ps: Path, name: str, status: str, **values: int | str) -> Path:
    d = ps / name
    d.mkdir()
    (d / "type").write_text("Battery\n")
    (d / "status").write_text(status + "\n")
    for k, v in values.items():
        (d / k).write_text(f"{v}\n")
    return d


def step(roots, writes: dict, before_w: float, after_w: float, pause: float = 0.2, **kw) -> dict:
    """Measure ``pause`` s at ``before_w`` watts, write ``writes`` (path -> text) to step the sensor to ``after_w``,
    measure ``pause`` s more, and check the meter's joules against the ones the step gives over the span it
    reports (``seconds``), wherever in the with-block's bounds that span starts and the step falls: a loaded
    machine can take long to enter or leave the block (a CI run under two suites failed the old check, which
    took the span to end where the block's body did); a step between two samples is off by at most the step
    times the gap around it. Returns the meter's result."""
    t_a = time.perf_counter()
    with EnergyMeter(interval_s=0.02, **roots, **kw) as meter:
        time.sleep(pause)
        t_w0 = time.perf_counter()
        for path, text in writes.items():
            path.write_text(text)
        t_w1 = time.perf_counter()
        time.sleep(pause)
    t_b = time.perf_counter()
    r = meter.result
    span = r["seconds"]
    assert t_b - t_a >= span  # the span sampled lies inside the block

    def joules(t0: float, ts: float) -> float:
        return before_w * (ts - t0) + after_w * (t0 + span - ts)

    ends = [joules(t0, ts) for t0 in (t_a, t_b - span) for ts in (t_w0, t_w1)]
    slack = abs(after_w - before_w) * r["max_gap_s"] + 0.01
    assert min(ends) - slack <= r["joules"] <= max(ends) + slack, (r, ends, slack)
    return r


def test_labels_are_classed_by_what_they_cover():
    assert [classify(x, "ina3221") for x in ("VDD_IN", "POM_5V_IN", "VDD_CPU_GPU_CV", "POM_5V_CPU", "VDD_SOC")] == [
        "input", "input", "cpu", "cpu", "other"]
    assert [classify(x, "amd_energy") for x in ("Esocket0", "Ecore012")] == ["package", "core"]
    assert classify(None, "power_meter") == "input" and classify(None, "ina219") == "other"


def test_hwmon_energy_sums_sockets_not_the_cores_inside_them(roots):
    """amd_energy on a two-socket Zen server: per-core counters are inside the socket ones."""
    f = chip(roots["hwmon"], 0, "amd_energy", "energy",
             {"Ecore000": 0, "Ecore001": 0, "Esocket0": 1_000_000, "Esocket1": 5_000_000})
    with EnergyMeter(**roots) as meter:
        f["Esocket0"].write_text("4000000\n")  # +3 J
        f["Esocket1"].write_text("7000000\n")  # +2 J
        f["Ecore000"].write_text("2500000\n")  # inside socket 0: not added
    r = meter.result
    assert r["method"] == "hwmon-energy" and r["joules"] == pytest.approx(5.0)
    assert r["domains"] == ["hwmon0/amd_energy/Esocket0", "hwmon0/amd_energy/Esocket1"]
    assert r["scope"].startswith("cpu packages") and scope_kind(r["method"], r["scope"]) == "package"


def test_an_energy_counter_going_backwards_gives_no_figure(roots):
    f = chip(roots["hwmon"], 0, "zenergy", "energy", {"Esocket0": 9_000_000})
    with EnergyMeter(**roots) as meter:
        f["Esocket0"].write_text("1000\n")
    assert meter.joules is None and "backwards" in meter.result["note"] and meter.result["avg_watts"] is None


def test_hwmon_power_integrates_the_board_input_only(roots):
    """A Jetson's INA3221: VDD_IN contains the CPU/GPU and SoC rails, so it alone is integrated."""
    f = chip(roots["hwmon"], 1, "ina3221", "power", {"VDD_IN": 1_000_000, "VDD_CPU_GPU_CV": 400_000,
                                                       "VDD_SOC": 300_000})
    # 1 W -> 3 W; VDD_SOC, inside VDD_IN, must not count
    r = step(roots, {f["VDD_IN"]: "3000000\n", f["VDD_SOC"]: "2000000\n"}, 1.0, 3.0, pause=0.3)
    assert r["method"] == "hwmon-power" and r["domains"] == ["hwmon1/ina3221/VDD_IN"]
    assert r["samples"] >= 4 and r["interval_s"] == 0.02 and r["distinct_readings"] == 2
    assert r["scope"].startswith("system (board input: VDD_IN") and scope_kind(r["method"], r["scope"]) == "system"


def test_ina3221_rails_are_current_times_voltage(roots):
    """The mainline ina3221 driver (Jetson Orin): no power*_input, but each channel's bus voltage (in{k}_input, mV)
    and current (curr{k}_input, mA); in4-in6 are shunt voltages with no current."""
    d = roots["hwmon"] / "hwmon2"
    d.mkdir()
    for name, value in {"name": "ina3221", "in1_label": "VDD_IN", "in1_input": 5000, "curr1_input": 800,
                        "in2_label": "VDD_CPU_GPU_CV", "in2_input": 5000, "curr2_input": 300, "in4_input": 40}.items():
        (d / name).write_text(f"{value}\n")
    r = step(roots, {d / "curr1_input": "1200\n"}, 4.0, 6.0)  # 4 W -> 6 W
    assert r["method"] == "hwmon-power" and r["domains"] == ["hwmon2/ina3221/VDD_IN"]


def test_the_sampler_integrates_trapezoids_over_its_clock():
    """The integral itself, on a fake clock (the thread never wakes within the test: interval 1 h)."""
    now, watts = [0.0], [2.0]
    s = Sampler(lambda: watts[0], interval_s=3600, clock=lambda: now[0])
    s.start()  # (0 s, 2 W)
    now[0], watts[0] = 10.0, 4.0
    s.sample()  # (10 s, 4 W): 30 J over the first 10 s
    now[0] = 15.0
    out = s.stop()  # (15 s, 4 W): 20 J more
    assert out["joules"] == pytest.approx(50.0) and out["samples"] == 3 and out["max_gap_s"] == 10.0


def test_a_slow_read_leaves_no_part_of_the_region_out():
    """Each read takes 1 s of the (fake) clock, as a loaded machine can delay one: the readings hold over the
    edges, so a steady 2 W over the 2 s from start to stop is 4 J (the trapezoids alone, from the first sample to
    the last, gave 2 J: a CI run on a busy machine saw 5% missing from a 50 ms block)."""
    now = [0.0]

    def read() -> float:
        now[0] += 1.0
        return 2.0

    s = Sampler(read, interval_s=3600, clock=lambda: now[0])
    s.start(t0=0.0)  # read done at 1 s
    out = s.stop()  # read done at 2 s
    assert out["joules"] == pytest.approx(4.0) and s.t_end - s.t0 == pytest.approx(2.0)


def test_a_cpu_rail_is_a_rail_and_unknown_rails_are_not_summed(roots):
    chip(roots["hwmon"], 0, "ina219", "power", {None: 900_000})  # unlabelled: where it sits is unknown
    chip(roots["hwmon"], 1, "ina3221", "power", {"VDD_GPU": 500_000})
    why = unavailable("hwmon-power", **roots)
    assert "found (hwmon0/ina219/power1_input, hwmon1/ina3221/VDD_GPU) but none is" in why
    with pytest.raises(OndeviceError, match="'hwmon-power' cannot measure here: hwmon power sensors found"):
        EnergyMeter(method="hwmon-power", **roots)
    chip(roots["hwmon"], 2, "ina3221", "power", {"POM_5V_CPU": 2_000_000})
    with EnergyMeter(**roots) as meter:
        time.sleep(0.1)
    r = meter.result
    assert r["domains"] == ["hwmon2/ina3221/POM_5V_CPU"] and r["joules"] == pytest.approx(2.0 * r["seconds"], rel=1e-9)
    assert r["scope"].startswith("rail: CPU") and scope_kind(r["method"], r["scope"]) == "rail"


def test_unreadable_hwmon_sensors_fall_through_to_the_next_source(roots):
    chip(roots["hwmon"], 0, "amd_energy", "energy", {"Esocket0": "x"})  # as an unreadable file reads: skipped
    chip(roots["hwmon"], 1, "power_meter", "power", {None: 50_000_000})  # ACPI power meter: the whole system
    with EnergyMeter(**roots) as meter:
        time.sleep(0.05)
    r = meter.result
    assert r["method"] == "hwmon-power" and r["joules"] == pytest.approx(50.0 * r["seconds"], rel=1e-9)
    assert [m for m, _ in meter.skipped] == ["rapl", "hwmon-energy"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a mode-000 file anyway")
def test_root_only_hwmon_counters_say_so(roots):
    f = chip(roots["hwmon"], 0, "amd_energy", "energy", {"Esocket0": 1})["Esocket0"]
    f.chmod(0)
    try:
        assert "exist" in unavailable("hwmon-energy", **roots) and "not readable" in unavailable("hwmon-energy",
                                                                                                 **roots)
        assert EnergyMeter(**roots).method == "estimated"
    finally:
        f.chmod(0o644)


def test_discharging_battery_power_now_is_the_whole_device(roots):
    ps = roots["power_supply"]
    bat = battery(ps, "BAT0", "Discharging", power_now=8_000_000)
    mouse = battery(ps, "hidpp_battery_0", "Discharging", power_now=1_000_000)
    (mouse / "scope").write_text("Device\n")  # a peripheral's battery: not the system's
    r = step(roots, {bat / "power_now": "2000000\n"}, 8.0, 2.0)  # 8 W -> 2 W
    assert r["method"] == "battery" and r["domains"] == ["BAT0"]
    assert r["scope"].startswith("system (battery BAT0, discharging: the whole device")
    assert scope_kind(r["method"], r["scope"]) == "system"


def test_battery_current_times_voltage_android_sign(roots):
    """No power_now: current_now (negative while discharging on Android) x voltage_now."""
    bat = battery(roots["power_supply"], "battery", "Discharging", current_now=-1_500_000, voltage_now=4_000_000)
    step(roots, {bat / "current_now": "-500000\n"}, 6.0, 2.0, method="battery")  # 6 W -> 2 W


def test_a_charging_battery_is_not_used_and_says_why(roots):
    battery(roots["power_supply"], "BAT0", "Charging", power_now=15_000_000)
    with EnergyMeter(**roots) as meter:
        pass
    assert meter.result["method"] == "estimated"
    why = unavailable("battery", **roots)
    assert why.startswith("battery BAT0 is Charging, not discharging")
    with pytest.raises(OndeviceError, match="'battery' cannot measure here: battery BAT0 is Charging"):
        EnergyMeter(method="battery", **roots)
    assert f"not battery: {why}" in describe(**roots)


def test_a_battery_that_stops_discharging_gives_no_figure(roots):
    bat = battery(roots["power_supply"], "BAT0", "Discharging", power_now=5_000_000)
    with EnergyMeter(interval_s=0.02, **roots) as meter:
        (bat / "status").write_text("Charging\n")  # the charger is plugged in mid-run
    r = meter.result
    assert r["joules"] is None and r["unreadable_samples"] >= 1 and "stopped discharging" in r["note"]


def test_describe_names_the_source_and_why_better_ones_are_not(roots):
    chip(roots["hwmon"], 0, "ina3221", "power", {"VDD_IN": 4_000_000})
    line = describe(**roots)
    assert line.startswith("hwmon-power: system (board input: VDD_IN; hwmon power sensors; whole device")
    assert "power readings sampled every 0.05 s" in line
    assert line.endswith("; not rapl: no readable RAPL counters; not hwmon-energy: no hwmon energy counters")
    assert describe("estimated", 3.0, **roots).startswith("estimated: this process") and "3 W per core" in describe(
        "estimated", 3.0, **roots)


def test_the_method_comes_from_the_env_when_not_passed(roots, monkeypatch):
    chip(roots["hwmon"], 0, "ina3221", "power", {"VDD_IN": 4_000_000})
    monkeypatch.setenv("ONDEVICE_ENERGY_METHOD", "estimated")
    assert EnergyMeter(**roots).method == "estimated"
    assert EnergyMeter(method="auto", **roots).method == "hwmon-power"  # the argument wins
    monkeypatch.setenv("ONDEVICE_ENERGY_METHOD", "rapel")
    with pytest.raises(InvalidArgument, match="'rapel' .*ONDEVICE_ENERGY_METHOD"):
        EnergyMeter(**roots)


def test_the_report_marks_system_and_rail_figures():
    from ondevice.bench.record import BenchRecord
    from ondevice.report.formats import _energy, energy_notes

    def rec(method, scope):
        return BenchRecord.from_dict({"kind": "bench", "energy_j_per_token": 0.5, "energy_method": method,
                                      "energy_scope": scope})

    recs = [rec("battery", "system (battery BAT0, discharging: ...)"), rec("hwmon-power", "rail: CPU (...)"),
            rec("rapl", "cpu packages, DRAM excluded (...)"), rec("estimated", "this process ...")]
    assert [_energy(r) for r in recs] == ["0.5000 (sys.)", "0.5000 (rail)", "0.5000", "0.5000 (est.)"]
    notes = energy_notes(recs)
    assert len(notes) == 3 and any(n.startswith("J/tok (sys.): measured at the battery") for n in notes)
    assert energy_notes(recs[2:3]) == []
