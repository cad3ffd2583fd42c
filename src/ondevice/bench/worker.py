"""One bench configuration in its own process: ``python -m ondevice.bench.worker [config.json]``.

Reads a JSON config (from the file argument or stdin), applies the device profile, loads the models
once, then for each test: untimed setup (KV depth), warm-up, ``repetitions`` timed runs (with several
models, interleaved: see :func:`run_test`). It prints JSON lines on stdout: ``{"type": "limits"}``, one
``{"type": "loaded"}`` per model, then one ``{"type": "result"}`` per test and model (``index``: the
model's place in ``models``; ``status`` "ok", "oom" or "error"). Anything llama.cpp writes to fd 1 goes
to stderr instead, so stdout carries only these lines.

Config keys: ``models`` (``{"path", "name"}`` each), ``engine`` (EngineConfig fields), ``profile`` (spec
or None), ``tests`` (TestSpec dicts), ``repetitions``, ``warmup`` (bool), ``seed``.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from dataclasses import dataclass

from ..device.cgroup import cpu_throttled
from ..errors import ContextOverflow, InvalidArgument, KVCacheTooLarge, OndeviceError
from .measure import cpu_seconds, mapped_rss_bytes, max_rss_bytes, mean_std, percentile, proc_status, reset_peak_rss
from .noise import busy_seconds, other_load, throttled_between

_out = None  # the private copy of stdout


def emit(obj: dict) -> None:
    _out.write(json.dumps(obj, default=str) + "\n")
    _out.flush()


def _summary(values: list[float | None]) -> dict:
    vals = [v for v in values if v is not None]
    m, s = mean_std(vals)
    return {"mean": m, "std": s, "samples": vals}


@dataclass
class _Run:
    """One timed repetition of one model and what it cost (deltas over that run alone)."""

    sample: object
    mem: dict
    cpu: tuple[float, float]  # user, system seconds
    busy_s: float | None  # all processes' busy CPU seconds (None: /proc/stat unreadable)
    wall_s: float
    energy: dict
    throttled_s: float | None = None  # the CPU quota throttled the cgroup this long (None: no cpu.stat)


def _timed(wl, watts_per_core: float | None) -> _Run:
    from ..device import EnergyMeter

    throttled0 = cpu_throttled()  # a container's CPU quota (cpu.stat), read outside the timed span
    busy0, (u0, s0), t0 = busy_seconds(), cpu_seconds(), time.perf_counter()
    with EnergyMeter(watts_per_core=watts_per_core) as meter:
        sample = wl.run()
    wall, (u1, s1), busy1 = time.perf_counter() - t0, cpu_seconds(), busy_seconds()
    busy = busy1 - busy0 if busy0 is not None and busy1 is not None else None
    return _Run(sample, proc_status(), (u1 - u0, s1 - s0), busy, wall, meter.result or {},
                throttled_between(throttled0, cpu_throttled()))


def run_test(models: list, spec, cfg: dict, watts_per_core: float | None) -> list[dict]:
    """Set up, warm up and time one test on each of ``models``; the worker-side half of their bench records.

    The repetitions go round the models in turn, the first of each round rotating, so every model's runs
    are spread over the same stretch of time: on a machine whose speed drifts over seconds, models compared
    this way differ by what they are, not by when they ran. Each run's CPU time, other load and energy are
    its own; memory is the process's, so with several models only the model's own mapped pages are given.
    """
    from .workloads import WORKLOADS

    cls = WORKLOADS[spec.kind]
    wls = [cls(spec, m, seed=int(cfg.get("seed", 42))) for m in models]
    for wl in wls:
        wl.setup()
        if cfg.get("warmup", True):
            wl.warmup()
    reps = int(cfg.get("repetitions", 5))
    peak_reset = reset_peak_rss()  # the peak from here on is this test's (load and warm-up excluded)
    load_avg = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    runs: list[list[_Run]] = [[] for _ in wls]
    for r in range(reps):
        for k in range(len(wls)):
            i = (r + k) % len(wls)
            runs[i].append(_timed(wls[i], watts_per_core))
    return [_result(wl, rs, peak_reset, load_avg, len(wls)) for wl, rs in zip(wls, runs)]


def _result(wl, runs: list[_Run], peak_reset: bool, load_avg: float | None, n_models: int) -> dict:
    samples = [r.sample for r in runs]
    wall = sum(r.wall_s for r in runs)
    user, sys_ = sum(r.cpu[0] for r in runs), sum(r.cpu[1] for r in runs)
    busy = None if any(r.busy_s is None for r in runs) else sum(r.busy_s for r in runs)
    at_peak = max((r.mem for r in runs), key=lambda m: m.get("rss", 0)) if runs else {}
    end = runs[-1].mem if runs else {}
    itl_ms = [x * 1000 for smp in samples for x in smp.itl_s]
    tps = [s.n_tokens / s.time_s if s.time_s > 0 else None for s in samples]
    pre = [s.prefill_tokens / s.prefill_s if s.prefill_s > 0 else None for s in samples]
    dec = [s.decode_tokens / s.decode_s if s.decode_s > 0 else None for s in samples]
    energies = [r.energy for r in runs]
    joules = None if any(e.get("joules") is None for e in energies) else sum(e["joules"] for e in energies)
    first = energies[0] if energies else {}
    # J per token of the test's t/s; chat: per generated token (its first tokens included)
    tokens = sum(s.energy_tokens or s.n_tokens for s in samples)
    own = n_models == 1  # the process's memory is this model's alone
    out = {
        "tps": _summary(tps),
        "time_s": _summary([s.time_s for s in samples]),
        "ttft_s": _summary([s.ttft_s for s in samples]),
        "prefill_tps": _summary(pre),
        "decode_tps": _summary(dec),
        "n_tokens_per_rep": samples[0].n_tokens if samples else 0,
        "itl_ms": {"p50": percentile(itl_ms, 50), "p90": percentile(itl_ms, 90), "p99": percentile(itl_ms, 99),
                   "mean": mean_std(itl_ms)[0], "n": len(itl_ms)},
        "memory": {
            "peak_rss_bytes": end.get("peak_rss") if own else None,  # VmHWM since the reset above
            "peak_rss_is_test_only": peak_reset,
            "rss_at_peak_bytes": at_peak.get("rss") if own else None,
            "rss_file_at_peak_bytes": at_peak.get("rss_file") if own else None,  # mostly the mmapped model
            "rss_anon_at_peak_bytes": at_peak.get("rss_anon") if own else None,  # KV cache, buffers, Python
            "rss_model_bytes": mapped_rss_bytes(str(wl.model.path)),  # of rss_file: the model's own pages
            # getrusage: what /usr/bin/time reports (also reset above)
            "process_max_rss_bytes": max_rss_bytes() if own else None,
            "vm_size_bytes": end.get("vm_size") if own else None,
        },
        "cpu": {"user_s": user, "sys_s": sys_, "total_s": user + sys_,
                "utilisation": (user + sys_) / wall if wall > 0 else None},
        "measured_wall_s": wall,
        "load": other_load(0.0, busy, user + sys_, wall),  # cores other processes kept busy meanwhile
        "throttled_s": None if any(r.throttled_s is None for r in runs) else sum(r.throttled_s for r in runs),
        "load_avg_1m": load_avg,
        "energy": {
            "joules": joules,
            "method": first.get("method"),
            "scope": first.get("scope"),
            "watts_per_core": first.get("watts_per_core"),
            "watts_source": first.get("watts_source"),  # estimate: profile | env | default
            "domains": first.get("domains"),  # the counters, sensors or batteries read
            "resolution": first.get("resolution"),
            # sampled sources (hwmon-power, battery): samples over all runs, the interval and the longest gap
            "samples": sum(e["samples"] for e in energies) if first.get("samples") is not None else None,
            "interval_s": first.get("interval_s"),
            "max_gap_s": max((e.get("max_gap_s") or 0.0 for e in energies), default=None)
            if first.get("samples") is not None else None,
            "note": next((e["note"] for e in energies if e.get("note")), None),  # why there is no figure
            "avg_watts": joules / wall if joules is not None and wall > 0 else None,
            "j_per_token": joules / tokens if tokens and joules is not None else None,
        },
        "tokens_note": wl.tokens_note,
    }
    if wl.spec.kind == "chat":
        out["prompt_lengths"] = wl.prompt_lengths
    return out


def _is_oom(exc: BaseException, capped: bool) -> bool:
    if isinstance(exc, MemoryError):
        return True
    # under RLIMIT_AS a shared library (numpy's, llama.cpp's) can fail to map: an ImportError/OSError
    if capped and any(s in str(exc) for s in ("failed to map segment", "Cannot allocate memory")):
        return True
    # under a memory cap llama.cpp reports a failed mmap/alloc as a failed load or context, and a KV cache the
    # cap leaves no room for is refused before it is allocated
    return capped and isinstance(exc, OndeviceError) and (
        isinstance(exc, KVCacheTooLarge) or not isinstance(exc, (InvalidArgument, ContextOverflow)))


def main(argv: list[str] | None = None) -> int:
    global _out
    argv = sys.argv[1:] if argv is None else argv
    # Keep stdout for our JSON lines only: native code printing to fd 1 lands on stderr.
    _out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    if argv:
        with open(argv[0]) as f:
            cfg = json.load(f)
    else:
        cfg = json.loads(sys.stdin.read())

    from .workloads import TestSpec

    tests = [TestSpec.from_dict(t) for t in cfg["tests"]]

    def fail_all(status: str, message: str, start: int = 0) -> int:
        for spec in tests[start:]:
            for i in range(len(cfg["models"])):
                emit({"type": "result", "index": i, "test": spec.name, "status": status, "error": message})
        return 0

    from ..device import apply_profile, parse_profile

    prof = parse_profile(cfg.get("profile"))
    capped = prof.mem_limit_bytes is not None
    try:
        applied = apply_profile(prof) if cfg.get("profile") else None
    except InvalidArgument as e:
        if capped and "address space" in str(e):
            # RLIMIT_AS below what the Python runtime already maps: the run cannot fit under the cap
            return fail_all("oom", f"memory cap does not fit the runtime before the model loads: {e}")
        raise
    emit({"type": "limits", "limits": applied.to_dict() if applied else None, "pid": os.getpid()})

    eng_cfg = dict(cfg.get("engine") or {})
    if applied is not None and not eng_cfg.get("n_threads"):
        eng_cfg["n_threads"] = applied.threads
    models = []
    for i, m in enumerate(cfg["models"]):
        try:
            models.append(_load(m, eng_cfg))
        except BaseException as e:
            if isinstance(e, KeyboardInterrupt):
                raise
            oom = _is_oom(e, capped)
            why = str(e).strip().splitlines()[-1] if str(e).strip() else ""  # numpy's ImportError: a page
            cap = " (out of memory under the cap)" if oom else ""
            return fail_all("oom" if oom else "error",
                            f"model load failed{cap} ({m['name'] or m['path']}): {type(e).__name__}: {why}")
        emit({"type": "loaded", "index": i, **models[-1][1]})
    for t, spec in enumerate(tests):
        try:
            results = run_test([m for m, _ in models], spec, cfg, prof.watts_per_core)
        except BaseException as e:
            if isinstance(e, KeyboardInterrupt):
                raise
            status = "oom" if _is_oom(e, capped) else "error"
            if isinstance(e, ContextOverflow):
                e = e.advise("-c/--ctx-size", min(m.engine.n_ctx_train for m, _ in models))
            msg = f"{type(e).__name__}: {e}"
            if status == "error" and not isinstance(e, OndeviceError):
                msg += "\n" + traceback.format_exc(limit=4)
            for i in range(len(models)):
                emit({"type": "result", "index": i, "test": spec.name, "status": status, "error": msg})
            if isinstance(e, MemoryError):
                return fail_all("oom", "not run: an earlier test ran out of memory", t + 1)
            continue
        for i, res in enumerate(results):
            emit({"type": "result", "index": i, "test": spec.name, "status": "ok", "error": None, **res})
    return 0


def _load(m: dict, eng_cfg: dict) -> tuple[object, dict]:
    """Load one model of the config; returns it and its ``loaded`` event."""
    from ..engine.base import EngineConfig
    from ..engine.llama import LlamaEngine, build_info
    from ..engine.model import Model

    t0 = time.perf_counter()
    engine = LlamaEngine(m["path"], EngineConfig(**eng_cfg))
    model = Model(name=m.get("name", ""), path=m["path"], engine=engine, template=engine.chat_template())
    load_s = time.perf_counter() - t0 - engine.kernel_test_time  # a first load's kernel self-test is not the load
    load_mem = proc_status()
    return model, {"load_time_s": load_s, "engine_load_time_s": engine.load_time,
                   "n_ctx": engine.n_ctx, "n_threads": engine.n_threads, "n_batch": engine.n_batch,
                   "load_peak_rss_bytes": load_mem.get("peak_rss"), "llama_build": build_info(),
                   "kernels": engine.kernels_used, "buffer_types": engine.buffer_types,
                   "kernel_choice": engine.kernels.to_dict(), "model_desc": _desc(engine)}


def _desc(engine) -> str | None:
    """llama.cpp's description of the loaded model (``llama_model_desc``: "llama 256M Q4_1"), as llama-bench's
    ``model_type``."""
    import ctypes

    buf = ctypes.create_string_buffer(256)
    n = engine.ll.llama_model_desc(engine.model, buf, len(buf))
    return buf.value.decode("utf-8", errors="replace") if n >= 0 else None


if __name__ == "__main__":
    raise SystemExit(main())
