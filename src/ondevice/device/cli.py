"""``ondevice device``: what this machine is, how energy is measured, and its measured roofs (the probe)."""

from __future__ import annotations

import argparse
import json
from datetime import UTC, datetime


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--probe", action="store_true",
                   help="measure memory bandwidth and peak compute now (replaces the cached probe; ~10 s)")
    p.add_argument("-t", "--threads", type=int, action="append",
                   help="thread count for --probe (repeatable; default: all usable CPUs)")
    p.add_argument("--json", action="store_true", help="one JSON object instead of text")


def _age(iso: str) -> str:
    try:
        days = (datetime.now(UTC) - datetime.fromisoformat(iso)).total_seconds() / 86400
    except ValueError:
        return "unknown age"
    return "today" if days < 1 else f"{days:.0f} days ago"


def run(args: argparse.Namespace) -> int:
    from ..errors import InvalidArgument
    from .energy import rapl_domains
    from .info import device_info
    from .probe import cached_probes, probe

    if args.threads and not args.probe:
        raise InvalidArgument("--threads only applies with --probe; add --probe")
    if args.probe:
        for t in args.threads or [None]:
            probe(t, refresh=True)
    info = device_info()
    energy = "rapl" if rapl_domains() else "estimated (no readable RAPL counters)"
    probes = cached_probes()
    if args.json:
        print(json.dumps({"device": info, "energy": energy, "probes": probes}, indent=2))
        return 0
    mem = info["memory_total_bytes"] / 2**30
    print(f"cpu       {info['cpu_model']} ({info['arch']}), {info['physical_cores']} cores / "
          f"{info['logical_cores']} threads, {info['usable_cpus']} usable")
    print(f"features  {' '.join(info['cpu_flags']) or '-'}")
    print(f"memory    {mem:.1f} GiB; load average {', '.join(f'{x:.2f}' for x in info['load_avg'])}")
    print(f"system    {info['os']} {info['kernel']}, governor {info['governor']}, Python {info['python']}")
    if info.get("llama_cpp"):
        print(f"llama.cpp llama-cpp-python {info['llama_cpp']['version']}: {info['llama_cpp']['system_info']}")
    print(f"energy    {energy}")
    if not probes:
        print("probe     none yet: `ondevice device --probe` (or the first `ondevice bench`) measures it")
    for t, p in sorted(probes.items(), key=lambda kv: int(kv[0])):
        print(f"probe     {t} threads: {p['bandwidth_gbs']:.1f} GB/s, {p['peak_gflops']:.0f} GFLOP/s, measured "
              f"{p['measured_at']} ({_age(p['measured_at'])}; load {p.get('load_avg_1m') or 0:.2f} then)")
    return 0
