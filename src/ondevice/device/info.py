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


def _cpuinfo() -> list[dict[str, str]]:
    """/proc/cpuinfo as one dict per logical CPU (empty off Linux)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
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


def cpu_model() -> str:
    for entry in _cpuinfo():
        for key in ("model name", "Model", "Hardware", "cpu model"):
            if entry.get(key):
                return entry[key]
    return platform.processor() or platform.machine() or "unknown"


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


def _memory_limit() -> int | None:
    from .limits import cgroup_memory

    cg = cgroup_memory()
    return cg[0] if cg else None


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
    info = {
        "cpu_model": cpu_model(),
        "arch": platform.machine(),
        "cpu_flags": cpu_flags(),
        "physical_cores": physical_cores(),
        "logical_cores": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "l3_cache_bytes": l3_cache_bytes(),
        "memory_total_bytes": total_memory_bytes(),
        "memory_limit_bytes": _memory_limit(),  # this process's cgroup limit (a container's), None: none
        "os": platform.system(),
        "kernel": platform.release(),
        "governor": governor(),
        "load_avg": load,
        "python": sys.version.split()[0],
        "ondevice": ondevice_version(),
    }
    if include_llama:
        info["llama_cpp"] = llama_cpp_info()
    return info
