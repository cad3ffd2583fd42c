"""RAPL over fake powercap trees: packages and DRAM are summed, psys (the whole platform, which contains the
package) and core/uncore (inside the package) never are; the record keeps which counters it summed and, for the
estimate, where its watts per core came from. Fallbacks past RAPL see no hwmon or battery (``NONE``), so a
laptop running the tests does not measure its own battery."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ondevice.device.energy import DEFAULT_WATTS_PER_CORE, WATTS_ENV, EnergyMeter, rapl_domains, resolve_watts
from ondevice.errors import InvalidArgument, OndeviceError


def NONE(tmp: Path) -> dict[str, Path]:
    """Absent hwmon and power_supply trees: no sensor past RAPL."""
    return {"hwmon": tmp / "no-hwmon", "power_supply": tmp / "no-power-supply"}


def zone(root: Path, zone_name: str, name: str, energy: int | str) -> Path:
    d = root / zone_name
    d.mkdir(parents=True)
    (d / "name").write_text(name + "\n")
    (d / "energy_uj").write_text(f"{energy}\n")
    (d / "max_energy_range_uj").write_text("262143328850\n")
    return d / "energy_uj"


def laptop(root: Path) -> dict[str, Path]:
    """An Intel laptop since Skylake: package-0 with core/uncore, and psys (the platform)."""
    return {"package": zone(root, "intel-rapl:0", "package-0", 1_000_000),
            "core": zone(root, "intel-rapl:0:0", "core", 0), "uncore": zone(root, "intel-rapl:0:1", "uncore", 0),
            "psys": zone(root, "intel-rapl:1", "psys", 5_000_000)}


def test_psys_and_core_uncore_are_never_summed_with_the_package(tmp_path):
    files = laptop(tmp_path)
    assert [d.name for d in rapl_domains(tmp_path)] == ["intel-rapl:0/package-0"]
    with EnergyMeter(powercap=tmp_path) as meter:
        files["package"].write_text("11000000\n")  # +10 J
        files["psys"].write_text("17000000\n")  # +12 J, the package's 10 J inside it
        files["core"].write_text("8000000\n")
    r = meter.result
    assert r["method"] == "rapl" and r["joules"] == pytest.approx(10.0)
    assert r["domains"] == ["intel-rapl:0/package-0"]
    assert r["scope"].startswith("cpu packages, DRAM excluded")


def test_two_packages_and_their_dram_are_summed(tmp_path):
    """A two-socket server: DRAM is a domain of its own, outside the package figure."""
    p0 = zone(tmp_path, "intel-rapl:0", "package-0", 0)
    d0 = zone(tmp_path, "intel-rapl:0:0", "dram", 0)
    p1 = zone(tmp_path, "intel-rapl:1", "package-1", 0)
    d1 = zone(tmp_path, "intel-rapl:1:0", "dram", 0)
    assert [d.name for d in rapl_domains(tmp_path)] == ["intel-rapl:0/package-0", "intel-rapl:0:0/dram",
                                                        "intel-rapl:1/package-1", "intel-rapl:1:0/dram"]
    with EnergyMeter(method="rapl", powercap=tmp_path) as meter:
        for f, uj in ((p0, 30_000_000), (d0, 4_000_000), (p1, 20_000_000), (d1, 6_000_000)):
            f.write_text(str(uj))
    assert meter.joules == pytest.approx(60.0)
    assert meter.result["scope"].startswith("cpu packages and DRAM")


def test_unreadable_counters_fall_back_to_a_labelled_estimate(tmp_path):
    zone(tmp_path, "intel-rapl:0", "package-0", "x")  # malformed, as a root-only file reads for us: skipped
    assert rapl_domains(tmp_path) == []
    with EnergyMeter(watts_per_core=2.0, powercap=tmp_path, **NONE(tmp_path)) as meter:
        sum(i * i for i in range(200_000))
    r = meter.result
    assert r["method"] == "estimated" and r["watts_per_core"] == 2.0 and r["watts_source"] == "profile"
    with pytest.raises(Exception, match="not readable"):
        EnergyMeter(method="rapl", powercap=tmp_path)


def test_the_watts_per_core_say_where_they_came_from(monkeypatch):
    monkeypatch.delenv(WATTS_ENV, raising=False)
    assert resolve_watts() == (DEFAULT_WATTS_PER_CORE, "default")
    monkeypatch.setenv(WATTS_ENV, "2.5")
    assert resolve_watts() == (2.5, "env")
    assert resolve_watts(1.5) == (1.5, "profile")  # the profile's watts= wins over the env
    monkeypatch.setenv(WATTS_ENV, "lots")
    with pytest.raises(InvalidArgument, match="not a number"):
        resolve_watts()


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a mode-000 file anyway")
def test_root_only_counters_say_so_and_how_to_open_them(tmp_path):
    from ondevice.device.energy import rapl_root_only, rapl_unavailable

    assert rapl_unavailable(tmp_path) == "no readable RAPL counters" and rapl_root_only(tmp_path) == []
    f = zone(tmp_path, "intel-rapl:0", "package-0", 1_000_000)
    f.chmod(0)  # as kernels since 5.10 leave energy_uj for non-root
    try:
        assert rapl_domains(tmp_path) == [] and rapl_root_only(tmp_path) == [f]
        why = rapl_unavailable(tmp_path)
        assert "exist" in why and "root-only" in why and "run as root" in why and "undone at every boot" in why
        assert f"sudo chmod o+r {tmp_path}/intel-rapl:*/energy_uj" in why and why.endswith("estimated until then")
        with pytest.raises(OndeviceError, match=r"root-only .*sudo chmod o\+r .*or use method='estimated'$"):
            EnergyMeter(method="rapl", powercap=tmp_path)
        with EnergyMeter(powercap=tmp_path, **NONE(tmp_path)) as meter:
            pass
        assert meter.result["method"] == "estimated"
    finally:
        f.chmod(0o644)


def test_device_energy_line_says_root_only(monkeypatch, capsys, tmp_path):
    """``ondevice device``'s energy line, with the counters root-only (faked: as root every file reads) and no
    other sensor: the estimate, and why each better source is not used."""
    import argparse

    from ondevice.device import cli, energy, sensors

    monkeypatch.setattr(energy, "rapl_domains", lambda root=None: [])
    monkeypatch.setattr(energy, "rapl_root_only", lambda root=None: [Path("/x/intel-rapl:0/energy_uj")])
    monkeypatch.setattr(sensors, "HWMON", tmp_path / "hwmon")
    monkeypatch.setattr(sensors, "POWER_SUPPLY", tmp_path / "ps")
    monkeypatch.delenv("ONDEVICE_ENERGY_METHOD", raising=False)
    monkeypatch.delenv(WATTS_ENV, raising=False)
    cli.run(argparse.Namespace(threads=None, model=None, probe=False, json=False))
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("energy"))
    assert line == ("energy    estimated: this process and its reaped children (estimate: CPU seconds x watts per "
                    "core); 5 W per core (default); not rapl: RAPL counters exist (/sys/class/powercap/intel-rapl:*/"
                    "energy_uj) but are root-only (kernels since 5.10): run as root, or `sudo chmod o+r "
                    "/sys/class/powercap/intel-rapl:*/energy_uj` (undone at every boot); not hwmon-energy: no hwmon "
                    f"energy counters ({tmp_path}/hwmon absent); not hwmon-power: no hwmon power sensors "
                    f"({tmp_path}/hwmon absent); not battery: no battery ({tmp_path}/ps absent)"), line
