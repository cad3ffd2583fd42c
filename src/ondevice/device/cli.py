"""``ondevice device``: what this machine is, how energy is measured, its measured roofs (the probe) and
which extra CPU kernels (AMX, CPU_REPACK) models use here, with their self-test."""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime

PROBE_WAIT_S = 15.0  # --probe first waits (at most this long) for a quiet machine


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--probe", action="store_true",
                   help="measure memory bandwidth and peak compute, and self-test and time every CPU kernel "
                        "configuration (AMX, CPU_REPACK) on Q4_0/Q4_1/Q8_0/Q4_K_M variants of the default model "
                        "(or the models of -m); replaces the cached results")
    p.add_argument("-m", "--model", action="append", metavar="MODEL",
                   help="with --probe: self-test and time the kernels on this model (catalog name, stored variant "
                        "or .gguf; repeatable) instead of the default model's variants. Results hold for every file "
                        "with the same set of weight types; `--amx auto` uses AMX only for a set timed faster here")
    p.add_argument("-t", "--threads", type=int, action="append",
                   help="thread count for --probe (repeatable; default, or 0 / -1: one per physical performance core)")
    p.add_argument("--json", action="store_true", help="one JSON object instead of text")


def _age(iso: str) -> str:
    try:
        days = (datetime.now(UTC) - datetime.fromisoformat(iso)).total_seconds() / 86400
    except ValueError:
        return "unknown age"
    return "today" if days < 1 else f"{days:.0f} days ago"


def run(args: argparse.Namespace) -> int:
    from ..errors import InvalidArgument, OndeviceError
    from .energy import describe
    from .info import device_info
    from .kernels import kernels_summary, probe_kernels, took_no_weights
    from .kernels_cache import MAX_TRIES, RETRY_AFTER_S
    from .probe import cached_probes, probe

    if args.threads and not args.probe:
        raise InvalidArgument("--threads only applies with --probe; add --probe")
    if args.model and not args.probe:
        raise InvalidArgument("-m/--model only applies with --probe (`ondevice device --probe -m MODEL`)")
    models = None
    if args.model:
        from ..models import resolve as resolve_model

        models = {m: resolve_model(m).path for m in args.model}  # every name found before anything is measured
    if args.probe:
        from ..engine.resources import check_threads
        from .cores import resolve_threads

        # all of them before anything is measured (and the caches rewritten); 0 and -1: the default (None)
        args.threads = [t and check_threads(t, "-t/--threads")
                        for t in (resolve_threads(t, "-t/--threads") for t in args.threads or [])]
        for t in args.threads or [None]:
            p = probe(t, refresh=True, wait_idle_s=PROBE_WAIT_S)  # not under other work: it would read low
            if p.loaded:
                print(f"ondevice device: note: other work kept {p.load:.2f} cores busy during the {p.threads}-thread "
                      f"probe, so it reads low; it does not replace a probe measured quiet", file=sys.stderr)
        probe_kernels((args.threads or [None])[0], models, say=lambda line: print(line, file=sys.stderr, flush=True))
    info = device_info()
    try:
        energy = describe()  # the source a bench would use here, and why each better one is not
    except OndeviceError as e:  # ONDEVICE_ENERGY_METHOD names a source that cannot measure here
        energy = f"unusable: {e}"
    probes = cached_probes()
    kern = kernels_summary()
    if args.json:
        print(json.dumps({"device": info, "energy": energy, "probes": probes, "kernels": kern}, indent=2))
        return 0
    mem = info["memory_total_bytes"] / 2**30
    quota = f" (CPU quota {info['cpu_quota']:g})" if info.get("cpu_quota") is not None else ""
    kinds = (f": {info['performance_cores']} performance + {info['efficiency_cores']} efficiency"
             if info.get("performance_cores") is not None else "")
    default = f"; default threads {info['default_threads']}" if kinds else ""
    print(f"cpu       {info['cpu_model']} ({info['arch']}), {info['physical_cores']} cores{kinds} / "
          f"{info['logical_cores']} threads, {info['usable_cpus']} usable{quota}{default}")
    print(f"features  {' '.join(info['cpu_flags']) or '-'}")
    limit = info.get("memory_limit_bytes")
    high = ", memory.high: the kernel throttles above it" if info.get("memory_limit_file") == "memory.high" else ""
    cap = f" (this process's cgroup limit: {limit / 2**30:.2f} GiB{high})" if limit is not None else ""
    print(f"memory    {mem:.1f} GiB{cap}; load average {', '.join(f'{x:.2f}' for x in info['load_avg'])}")
    vm = {True: ", virtual machine", False: "", None: ""}[info.get("hypervisor")]
    turbo = f", boost {info['boost']}" if info.get("boost") else ""
    print(f"system    {info['os']} {info['kernel']}, governor {info['governor']}{turbo}{vm}, Python {info['python']}")
    if info.get("llama_cpp"):
        print(f"llama.cpp llama-cpp-python {info['llama_cpp']['version']}: {info['llama_cpp']['system_info']}")
    print(f"energy    {energy}")
    if not probes:
        print("probe     none yet: `ondevice device --probe` (or the first `ondevice bench`) measures it")
    for t, p in sorted(probes.items(), key=lambda kv: int(kv[0])):
        print(f"probe     {t} threads: {p['bandwidth_gbs']:.1f} GB/s, {p['peak_gflops']:.0f} GFLOP/s, measured "
              f"{p['measured_at']} ({_age(p['measured_at'])}; load {p.get('load_avg_1m') or 0:.2f} then"
              + (f", other work {p['load']:.2f} cores during it" if p.get("load") is not None else "")
              + "; the GFLOP/s is an fp32 matmul's)")
    print(f"kernels   this build offers {', '.join(kern['offered']) or 'no extra CPU kernels'}; "
          f"weight types not tested yet get {kern['default']['label']} ({kern['default']['reason']})")
    if not kern["types"]:
        print("kernels   not self-tested yet: `ondevice device --probe` (or the first load of a model) tests them")
    for types, e in kern["types"].items():
        res = ", ".join(f"{k} " + (f"ok {r['pp_tps']:.0f}/{r['tg_tps']:.0f} t/s" if r.get("pp_tps") else
                                   f"ok (not timed: {r['timing_error']})" if r.get("ok") and r.get("timing_error")
                                   else "ok"
                                   if r.get("ok") else f"inconclusive ({r.get('error')})" if r.get("ok") is None
                                   else f"FAILED ({r.get('error')})")
                        + (" (took no weights: the same kernels as none)"
                           if k != "none" and took_no_weights(r, kern["offered"]) else "")
                        for k, r in sorted(e["results"].items(), key=lambda kv: (kv[0] != "none", kv[0])))
        res = res or e.get("note", "-")
        if e.get("malformed"):
            print(f"kernels   {types:13s} {res}: {e['reason']}")
            continue
        timed = any(r.get("pp_tps") for r in e["results"].values())
        timing = (", pp/tg timed" if timed else ", timing failed" if e.get("measured") else ", not timed")
        why = e["reason"] if not e["reason"].startswith("auto") or "next load" in e["reason"] else ""
        print(f"kernels   {types:13s} {res} -> {e['choice']}{f' ({why})' if why else ''}; tested {e['tested_at']} "
              f"({_age(e['tested_at'])}{timing}; load {e.get('load_avg_1m') or 0:.2f} then)")
    if any(r.get("ok") is None for e in kern["types"].values() for r in e["results"].values()):
        print(f"kernels   inconclusive tests count as untested; a later load tests them again (at most {MAX_TRIES} "
              f"tries, {RETRY_AFTER_S / 60:.0f} minutes apart), and `ondevice device --probe` on a quiet machine "
              f"redoes them")
    return 0
