"""One bench configuration in its own process: ``python -m ondevice.bench.worker [config.json]``.

Reads a JSON config (from the file argument or stdin), applies the device profile, loads the model
once, then for each test: untimed setup (KV depth), warm-up, ``repetitions`` timed runs. It prints
JSON lines on stdout: ``{"type": "limits"}``, ``{"type": "loaded"}``, then one ``{"type": "result"}``
per test (``status`` "ok", "oom" or "error"). Anything llama.cpp writes to fd 1 goes to stderr instead,
so stdout carries only these lines.

Config keys: ``model_path``, ``model``, ``engine`` (EngineConfig fields), ``profile`` (spec or None),
``tests`` (TestSpec dicts), ``repetitions``, ``warmup`` (bool), ``seed``.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback

from ..errors import ContextOverflow, InvalidArgument, OndeviceError
from .measure import cpu_seconds, mapped_rss_bytes, max_rss_bytes, mean_std, percentile, proc_status, reset_peak_rss
from .noise import busy_seconds, other_load

_out = None  # the private copy of stdout


def emit(obj: dict) -> None:
    _out.write(json.dumps(obj, default=str) + "\n")
    _out.flush()


def _summary(values: list[float | None]) -> dict:
    vals = [v for v in values if v is not None]
    m, s = mean_std(vals)
    return {"mean": m, "std": s, "samples": vals}


def run_test(model, spec, cfg: dict, watts_per_core: float | None) -> dict:
    """Set up, warm up and time one test; the worker-side half of a bench record."""
    from ..device import EnergyMeter
    from .workloads import WORKLOADS

    cls = WORKLOADS[spec.kind]
    wl = cls(spec, model, seed=int(cfg.get("seed", 42)))
    wl.setup()
    if cfg.get("warmup", True):
        wl.warmup()
    reps = int(cfg.get("repetitions", 5))
    peak_reset = reset_peak_rss()  # the peak from here on is this test's (load and warm-up excluded)
    samples, mems = [], []
    load_avg = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    busy0 = busy_seconds()
    u0, s0 = cpu_seconds()
    t0 = time.perf_counter()
    with EnergyMeter(watts_per_core=watts_per_core) as meter:
        for _ in range(reps):
            samples.append(wl.run())
            mems.append(proc_status())
    wall = time.perf_counter() - t0
    u1, s1 = cpu_seconds()
    busy1 = busy_seconds()
    at_peak = max(mems, key=lambda m: m.get("rss", 0)) if mems else {}
    end = mems[-1] if mems else {}
    itl_ms = [x * 1000 for smp in samples for x in smp.itl_s]
    tps = [s.n_tokens / s.time_s if s.time_s > 0 else None for s in samples]
    pre = [s.prefill_tokens / s.prefill_s if s.prefill_s > 0 else None for s in samples]
    dec = [s.decode_tokens / s.decode_s if s.decode_s > 0 else None for s in samples]
    energy = meter.result or {}
    # J per token of the test's t/s; chat: per generated token (its first tokens included)
    tokens = sum(s.energy_tokens or s.n_tokens for s in samples)
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
            "peak_rss_bytes": end.get("peak_rss"),  # VmHWM since the reset above
            "peak_rss_is_test_only": peak_reset,
            "rss_at_peak_bytes": at_peak.get("rss"),
            "rss_file_at_peak_bytes": at_peak.get("rss_file"),  # mostly the mmapped model
            "rss_anon_at_peak_bytes": at_peak.get("rss_anon"),  # KV cache, compute buffers, Python
            "rss_model_bytes": mapped_rss_bytes(str(model.path)),  # of rss_file: the model's own pages
            "process_max_rss_bytes": max_rss_bytes(),  # getrusage: what /usr/bin/time reports (also reset above)
            "vm_size_bytes": end.get("vm_size"),
        },
        "cpu": {"user_s": u1 - u0, "sys_s": s1 - s0, "total_s": (u1 - u0) + (s1 - s0),
                "utilisation": ((u1 - u0) + (s1 - s0)) / wall if wall > 0 else None},
        "measured_wall_s": wall,
        "load": other_load(busy0, busy1, (u1 - u0) + (s1 - s0), wall),  # cores other processes used meanwhile
        "load_avg_1m": load_avg,
        "energy": {
            "joules": energy.get("joules"),
            "method": energy.get("method"),
            "scope": energy.get("scope"),
            "watts_per_core": energy.get("watts_per_core"),
            "avg_watts": energy.get("avg_watts"),
            "j_per_token": energy["joules"] / tokens if tokens and energy.get("joules") is not None else None,
        },
        "tokens_note": wl.tokens_note,
    }
    if spec.kind == "chat":
        out["prompt_lengths"] = wl.prompt_lengths
    return out


def _is_oom(exc: BaseException, capped: bool) -> bool:
    if isinstance(exc, MemoryError):
        return True
    # under RLIMIT_AS a shared library (numpy's, llama.cpp's) can fail to map: an ImportError/OSError
    if capped and any(s in str(exc) for s in ("failed to map segment", "Cannot allocate memory")):
        return True
    # under a memory cap llama.cpp reports a failed mmap/alloc as a failed load or context
    return capped and isinstance(exc, OndeviceError) and not isinstance(exc, (InvalidArgument, ContextOverflow))


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
            emit({"type": "result", "test": spec.name, "status": status, "error": message})
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
    try:
        from ..engine.base import EngineConfig
        from ..engine.llama import LlamaEngine, build_info
        from ..engine.model import Model

        t0 = time.perf_counter()
        engine = LlamaEngine(cfg["model_path"], EngineConfig(**eng_cfg))
        model = Model(name=cfg.get("model", ""), path=cfg["model_path"], engine=engine,
                      template=engine.chat_template())
        load_s = time.perf_counter() - t0
    except BaseException as e:
        if isinstance(e, KeyboardInterrupt):
            raise
        oom = _is_oom(e, capped)
        why = str(e).strip().splitlines()[-1] if str(e).strip() else ""  # numpy's ImportError is a page long
        return fail_all("oom" if oom else "error", f"model load failed{' (out of memory under the cap)' if oom else ''}"
                        f": {type(e).__name__}: {why}")
    load_mem = proc_status()
    emit({"type": "loaded", "load_time_s": load_s, "engine_load_time_s": engine.load_time,
          "n_ctx": engine.n_ctx, "n_threads": engine.n_threads, "n_batch": engine.n_batch,
          "load_peak_rss_bytes": load_mem.get("peak_rss"), "llama_build": build_info(),
          "kernels": engine.kernels_used, "buffer_types": engine.buffer_types,
          "kernel_choice": engine.kernels.to_dict()})
    for i, spec in enumerate(tests):
        try:
            res = run_test(model, spec, cfg, prof.watts_per_core)
        except BaseException as e:
            if isinstance(e, KeyboardInterrupt):
                raise
            status = "oom" if _is_oom(e, capped) else "error"
            if isinstance(e, ContextOverflow):
                e = e.advise("-c/--ctx-size", engine.n_ctx_train)
            msg = f"{type(e).__name__}: {e}"
            if status == "error" and not isinstance(e, OndeviceError):
                msg += "\n" + traceback.format_exc(limit=4)
            emit({"type": "result", "test": spec.name, "status": status, "error": msg})
            if isinstance(e, MemoryError):
                return fail_all("oom", "not run: an earlier test ran out of memory", i + 1)
            continue
        emit({"type": "result", "test": spec.name, "status": "ok", "error": None, **res})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
