"""The CPU's name from /proc/cpuinfo texts: ARM cores decoded from CPU implementer/part (Android and server
kernels print no name), the core mix of a big.LITTLE phone, the board after it; boost and hypervisor state."""

from __future__ import annotations

from pathlib import Path

from ondevice.device.info import boost, cpu_model, hypervisor


def arm(parts: list[str], extra: str = "", implementer: str = "0x41") -> str:
    blocks = [f"processor\t: {i}\nFeatures\t: fp asimd asimddp\nCPU implementer\t: {implementer}\n"
              f"CPU architecture: 8\nCPU variant\t: 0x1\nCPU part\t: {p}\nCPU revision\t: 0\n"
              for i, p in enumerate(parts)]
    return "\n".join(blocks) + ("\n" + extra if extra else "")


def write(tmp_path: Path, text: str) -> Path:
    (tmp_path / "cpuinfo").write_text(text)
    return tmp_path / "cpuinfo"


def test_an_android_phone_gets_its_core_mix_biggest_first(tmp_path):
    sd8gen2 = ["0xd46"] * 3 + ["0xd4d"] * 2 + ["0xd47"] * 2 + ["0xd4e"]
    assert cpu_model(write(tmp_path, arm(sd8gen2))) == \
        "Cortex-X3 x1 + Cortex-A710 x2 + Cortex-A715 x2 + Cortex-A510 x3"


def test_a_board_name_follows_the_cores_and_unknown_parts_are_hex(tmp_path):
    assert cpu_model(write(tmp_path, arm(["0xd08"] * 4, "Hardware\t: BCM2835\nModel\t: Raspberry Pi 4 Model B\n"))) \
        == "Cortex-A72 x4 (Raspberry Pi 4 Model B)"
    assert cpu_model(write(tmp_path, arm(["0xabc"] * 2, implementer="0x99"))) == "0x99:0xabc x2"


def test_x86_keeps_its_model_name(tmp_path):
    text = "processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: 12th Gen Intel(R) Core(TM) i7-1260P\n" \
           "flags\t\t: fpu sse2 avx2 hypervisor\n"
    path = write(tmp_path, text)
    assert cpu_model(path) == "12th Gen Intel(R) Core(TM) i7-1260P"
    assert hypervisor(path) is True
    assert hypervisor(write(tmp_path, arm(["0xd08"]))) is None  # ARM cpuinfo cannot tell


def test_boost_from_intel_pstate_or_cpufreq(tmp_path):
    assert boost(tmp_path) is None
    (tmp_path / "cpufreq").mkdir()
    (tmp_path / "cpufreq" / "boost").write_text("1\n")
    assert boost(tmp_path) == "on"
    (tmp_path / "intel_pstate").mkdir()
    (tmp_path / "intel_pstate" / "no_turbo").write_text("1\n")  # intel_pstate's word wins
    assert boost(tmp_path) == "off"
