"""What the machine is: CPU, SIMD flags, cores, memory, kernel, governor, load, software versions. All cheap."""

from __future__ import annotations

import os
import platform
import sys
from functools import lru_cache
from pathlib import Path

# SIMD features llama.cpp's CPU kernels dispatch on (x86 names as in /proc/cpuinfo "flags").
X86_FLAGS = (
    "sse3",
    "ssse3",
    "avx",
    "avx2",
    "fma",
    "f16c",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512_vnni",
    "avx512_bf16",
    "avx_vnni",
    "amx_tile",
    "amx_int8",
    "amx_bf16",
)
# aarch64 /proc/cpuinfo "Features": asimd is NEON, asimddp the int8 dot product, asimdhp fp16 arithmetic.
ARM_FLAGS = ("asimd", "asimddp", "asimdhp", "fphp", "sve", "sve2", "i8mm", "bf16", "sme")


def _cpuinfo(path: str | Path = "/proc/cpuinfo") -> list[dict[str, str]]:
    """/proc/cpuinfo as one dict per logical CPU (empty off Linux)."""
    try:
        text = Path(path).read_text()
    except OSError:
        return []
    cpus = []
    for block in text.strip().split("\n\n"):
        entry = {}
        for line in block.splitlines():
            key, _, value = line.partition(":")
            entry[key.strip()] = value.strip()
        cpus.append(entry)
    return cpus


# ARM cores by (CPU implementer, CPU part) as /proc/cpuinfo gives them, after lscpu's table (common parts only;
# others are written as hex).
ARM_PARTS = {
    0x41: {0xc07: "Cortex-A7", 0xc09: "Cortex-A9", 0xc0f: "Cortex-A15", 0xd03: "Cortex-A53", 0xd04: "Cortex-A35",
           0xd05: "Cortex-A55", 0xd07: "Cortex-A57", 0xd08: "Cortex-A72", 0xd09: "Cortex-A73", 0xd0a: "Cortex-A75",
           0xd0b: "Cortex-A76", 0xd0c: "Neoverse-N1", 0xd0d: "Cortex-A77", 0xd40: "Neoverse-V1",
           0xd41: "Cortex-A78", 0xd44: "Cortex-X1", 0xd46: "Cortex-A510", 0xd47: "Cortex-A710", 0xd48: "Cortex-X2",
           0xd49: "Neoverse-N2", 0xd4b: "Cortex-A78C", 0xd4d: "Cortex-A715", 0xd4e: "Cortex-X3",
           0xd4f: "Neoverse-V2", 0xd80: "Cortex-A520", 0xd81: "Cortex-A720", 0xd82: "Cortex-X4",
           0xd84: "Neoverse-V3", 0xd85: "Cortex-X925", 0xd87: "Cortex-A725", 0xd8e: "Neoverse-N3"},
    0x46: {0x001: "A64FX"},
    0x51: {0x001: "Oryon", 0x800: "Kryo-2XX-Gold", 0x801: "Kryo-2XX-Silver", 0x802: "Kryo-3XX-Gold",
           0x803: "Kryo-3XX-Silver", 0x804: "Kryo-4XX-Gold", 0x805: "Kryo-4XX-Silver"},
    0x61: {0x022: "Apple M1 Icestorm", 0x023: "Apple M1 Firestorm", 0x032: "Apple M2 Blizzard",
           0x033: "Apple M2 Avalanche"},
    0xc0: {0xac3: "Ampere-1", 0xac4: "Ampere-1a"},
}


def _arm_cores(cpus: list[dict[str, str]]) -> str | None:
    """The ARM core mix from ``CPU implementer``/``CPU part``, biggest cores (highest CPU numbers) first:
    "Cortex-X3 x1 + Cortex-A715 x2 + ... + Cortex-A510 x3"; None when cpuinfo has no such lines."""
    groups: dict[str, list[int]] = {}
    for i, e in enumerate(cpus):
        try:
            impl, part = int(e["CPU implementer"], 16), int(e["CPU part"], 16)
        except (KeyError, ValueError):
            continue
        name = ARM_PARTS.get(impl, {}).get(part) or f"0x{impl:02x}:0x{part:03x}"
        groups.setdefault(name, []).append(i)
    if not groups:
        return None
    order = sorted(groups.items(), key=lambda kv: -max(kv[1]))
    return " + ".join(f"{name} x{len(idx)}" for name, idx in order)


def cpu_model(cpuinfo: str | Path = "/proc/cpuinfo") -> str:
    """The CPU's name: x86's ``model name``; on ARM the cores decoded from ``CPU implementer``/``CPU part``
    (Android and server kernels print no name), with the board (``Model``/``Hardware``) after it where given."""
    cpus = _cpuinfo(cpuinfo)
    named = next((e[k] for e in cpus for k in ("model name", "Model", "Hardware", "cpu model") if e.get(k)), None)
    arm = None if any("vendor_id" in e for e in cpus) else _arm_cores(cpus)
    if arm:
        board = next((e[k] for e in cpus for k in ("Model", "Hardware") if e.get(k)), None)
        return f"{arm} ({board})" if board else arm
    return named or platform.processor() or platform.machine() or "unknown"


def hypervisor(cpuinfo: str | Path = "/proc/cpuinfo") -> bool | None:
    """Whether this runs in a virtual machine (x86's ``hypervisor`` flag); None where cpuinfo cannot tell."""
    cpus = _cpuinfo(cpuinfo)
    if not cpus or "flags" not in cpus[0]:
        return None
    return "hypervisor" in cpus[0]["flags"].split()


def boost(root: str | Path = "/sys/devices/system/cpu") -> str | None:
    """Turbo/boost: "on", "off", or None where the kernel does not say (intel_pstate's ``no_turbo``,
    else cpufreq's ``boost``)."""
    for rel, on in (("intel_pstate/no_turbo", "0"), ("cpufreq/boost", "1")):
        try:
            return "on" if (Path(root) / rel).read_text().strip() == on else "off"
        except OSError:
            continue
    return None


def cpu_flags() -> list[str]:
    """The SIMD flags from ``X86_FLAGS``/``ARM_FLAGS`` this CPU has (``neon`` added for aarch64 asimd)."""
    info = _cpuinfo()
    raw = set((info[0].get("flags") or info[0].get("Features") or "").split()) if info else set()
    if "pni" in raw:  # the kernel calls SSE3 "pni" (Prescott New Instructions)
        raw.add("sse3")
    wanted = X86_FLAGS + ARM_FLAGS
    found = [f for f in wanted if f in raw]
    if "asimd" in raw or "neon" in raw or (platform.machine() in ("arm64", "aarch64") and not raw):
        found.insert(0, "neon")  # NEON is mandatory on aarch64 even when the kernel does not list it
    return found


def physical_cores() -> int | None:
    try:
        import psutil

        n = psutil.cpu_count(logical=False)
        if n:
            return n
    except ImportError:
        pass
    pairs = {(e.get("physical id"), e.get("core id")) for e in _cpuinfo() if "core id" in e}
    return len(pairs) or None


def proc_kib_fields(path: str = "/proc/self/status") -> dict[str, int]:
    """The ``Key:  N kB`` lines of a /proc file (status, meminfo) in bytes; {} where unreadable."""
    out: dict[str, int] = {}
    try:
        text = Path(path).read_text()
    except OSError:
        return out
    for line in text.splitlines():
        key, _, value = line.partition(":")
        parts = value.split()
        if len(parts) == 2 and parts[1] == "kB" and parts[0].isdigit():
            out[key] = int(parts[0]) * 1024  # "kB" in the kernel is KiB
    return out


def total_memory_bytes() -> int | None:
    if (mem := proc_kib_fields("/proc/meminfo").get("MemTotal")) is not None:
        return mem
    try:
        import psutil

        return int(psutil.virtual_memory().total)
    except ImportError:
        return None


def governor() -> str:
    try:
        return Path("/sys/devices/system/cpu/cpu0/cpufreq/scaling_governor").read_text().strip()
    except OSError:
        return "unknown"


def l3_cache_bytes() -> int | None:
    """Largest cache level of CPU 0 from sysfs (used to size the bandwidth probe)."""
    best = None
    for d in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            size = (d / "size").read_text().strip()
        except OSError:
            continue
        mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(size[-1:], 1)
        digits = size.rstrip("KMG")
        if digits.isdigit():
            best = max(best or 0, int(digits) * mult)
    return best


def ondevice_version() -> str:
    # ondevice/__init__ has run (or is running) before this subpackage loads; don't re-import it.
    v = getattr(sys.modules.get("ondevice"), "__version__", None)
    if v:
        return str(v)
    try:
        from importlib.metadata import version

        return version("ondevice")
    except Exception:
        return "unknown"


@lru_cache(maxsize=1)
def llama_cpp_info() -> dict:
    """llama-cpp-python version and llama.cpp's system info line (what SIMD it was built with)."""
    try:
        import llama_cpp
    except Exception as e:  # not installed, or its shared library failed to load
        return {"version": None, "system_info": None, "error": f"{type(e).__name__}: {e}"}
    raw = llama_cpp.llama_print_system_info()
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
    return {"version": getattr(llama_cpp, "__version__", None), "system_info": text.strip()}


def machine_key(info: dict | None = None) -> str:
    """Identity of the hardware+kernel for caching probe results."""
    info = info or device_info(include_llama=False)
    return "|".join(
        str(info[k]) for k in ("cpu_model", "logical_cores", "physical_cores", "memory_total_bytes", "kernel")
    )


def device_info(include_llama: bool = True) -> dict:
    """A snapshot of the machine and software, stored with every run."""
    try:
        load = list(os.getloadavg())
    except OSError:
        load = None
    from .cgroup import affinity_cpus, cap_by_quota, cpu_quota, memory_limit
    from .cores import core_split, default_threads

    quota, mem, split = cpu_quota(), memory_limit(), core_split("all")
    info = {
        "cpu_model": cpu_model(),
        "arch": platform.machine(),
        "cpu_flags": cpu_flags(),
        "physical_cores": physical_cores(),
        "logical_cores": os.cpu_count(),
        # hybrid CPUs (Intel P+E cores, ARM big.LITTLE): the machine's physical cores by kind; None: all alike
        "performance_cores": split["performance"] if split["hybrid"] else None,
        "efficiency_cores": split["efficiency"] if split["hybrid"] else None,
        "default_threads": default_threads(),  # one per performance core allowed, capped by the CPU quota
        "usable_cpus": cap_by_quota(affinity_cpus(), quota),  # affinity, capped by the CPU quota
        "affinity_cpus": affinity_cpus(),
        "cpu_quota": quota["cpus"] if quota else None,  # a container's CPU limit (docker --cpus), None: none
        "l3_cache_bytes": l3_cache_bytes(),
        "memory_total_bytes": total_memory_bytes(),
        "memory_limit_bytes": mem["limit_bytes"] if mem else None,  # this process's cgroup limit, None: none
        "memory_limit_file": mem["file"] if mem else None,  # memory.high: the kernel throttles above it
        "os": platform.system(),
        "kernel": platform.release(),
        "governor": governor(),
        "boost": boost(),
        "hypervisor": hypervisor(),
        "load_avg": load,
        "python": sys.version.split()[0],
        "ondevice": ondevice_version(),
    }
    if include_llama:
        info["llama_cpp"] = llama_cpp_info()
    return info
