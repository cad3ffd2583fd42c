"""The kernels' self-test (device/kernels.py chooses from its results): each CPU kernel configuration loaded and
decoded in a child process, so a crash kills only the child, and, for ``ondevice device --probe``, timed.

The timing is a second child that loads every configuration that passed and times them in turns, a few rounds,
best of the rounds for each: on a busy machine a burst of load then slows every configuration alike in some round,
instead of whichever one happened to run during it (one run each, in order, once made the plain kernels look 3x
faster than the repacked ones on a loaded machine, and the probe stored that choice).
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import tempfile

from ..supervise import python

CHILD_TIMEOUT_S = 120.0
# signals that mean the code the child ran broke; any other (SIGKILL, SIGTERM, SIGINT...) came from outside
BROKE = frozenset({signal.SIGSEGV, signal.SIGBUS, signal.SIGILL, signal.SIGFPE, signal.SIGABRT, signal.SIGTRAP})
IN_CHILD = False  # inside the self-test's child: its loads are the test (kernels.resolve tests nothing there)
ROUNDS = 3  # timing rounds, each over every configuration that passed


def _run_child(job: dict) -> tuple[str, int | None, str]:
    """Run this module's child on ``job``: (its stdout, its exit code or None when it ran out of time, the last
    line of its stderr)."""
    from ..supervise import STATE_ENV

    env = {k: v for k, v in os.environ.items() if k != STATE_ENV}  # the child's crash is not the user's
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(python("-m", "ondevice.device.selftest", json.dumps(job)),
                                stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL, text=True, env=env)
        try:
            out, _ = proc.communicate(timeout=CHILD_TIMEOUT_S)
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
            rc = None
        except BaseException:  # Ctrl-C, a SIGTERM taken as an interrupt: the user's command stops, the child too
            proc.kill()
            proc.wait()
            raise
        err.seek(0)
        tail = (err.read().strip().splitlines()[-1:] or [""])[0]
    return out, rc, tail


def selftest(model_path, configs_: list[tuple[bool, bool]], measure: bool = False,
             threads: int | None = None) -> dict[str, dict]:
    """Load ``model_path`` and decode under each (amx, repack) configuration, in child processes; with
    ``measure``, then time the ones that passed (:func:`_timings`).

    One child runs the configurations in order and reports each as a JSON line; when it dies of a signal that
    means the code broke (:data:`BROKE`: SIGSEGV, SIGBUS, SIGILL, SIGFPE, SIGABRT, SIGTRAP) or an error, the
    configuration in flight is recorded as failed (``ok`` False) and a new child takes the rest. A configuration
    also fails when its logits disagree with the first (no extra kernels) one. A child that runs out of time or
    is killed from outside (SIGKILL: the out-of-memory killer; SIGTERM, SIGINT, SIGHUP: a user, a supervisor)
    proves nothing (a busy machine is not a broken kernel): it and the configurations after it are inconclusive
    (``ok`` None), which the choice treats as untested and a later load tests again.

    A KeyboardInterrupt (Ctrl-C, or the CLI's SIGTERM) here kills the child and propagates: the user's command
    stops, and nothing is recorded (the next load tests again).
    """
    from ..engine.bufts import offered, wanted
    from .kernels import label

    todo = list(configs_)
    results: dict[str, dict] = {}
    names = offered()
    while todo:
        out, rc, tail = _run_child({"model": str(model_path), "configs": todo, "threads": threads})
        for line in out.splitlines():
            if line.startswith("{"):
                res = json.loads(line)
                results[label(wanted(names, res.pop("amx"), res.pop("repack")))] = res
                todo.pop(0)
        if todo and rc is None:  # out of time
            for c in todo:
                results[label(wanted(names, *c))] = {"ok": None, "error": f"timeout after {CHILD_TIMEOUT_S:.0f} s, "
                                                                          f"a busy machine?"}
            todo = []
        elif todo and rc < 0 and -rc not in BROKE:  # killed from outside: says nothing about the kernels
            why = (f"killed by {_signame(-rc)} from outside, "
                   + ("the out-of-memory killer?" if -rc == signal.SIGKILL else "a user or a supervisor?"))
            for c in todo:
                results[label(wanted(names, *c))] = {"ok": None, "error": why}
            todo = []
        elif todo:  # the child died during todo[0]
            what = _signame(-rc) if rc < 0 else f"exit {rc}: {tail[-200:]}"
            results[label(wanted(names, *todo[0]))] = {"ok": False, "error": what}
            todo.pop(0)
    base = results.get("none")
    for k, r in results.items():
        if k != "none" and r.get("ok") and base and base.get("ok"):
            cos = _cosine(r.pop("probe"), base["probe"])
            r["agreement"] = round(cos, 5)
            if cos < 0.99:
                r.update(ok=False, error=f"wrong logits (cosine {cos:.3f} with no extra kernels)")
    for r in results.values():
        r.pop("probe", None)
    if measure:
        passed = [c for c in configs_ if results.get(label(wanted(names, *c)), {}).get("ok")]
        for k, t in _timings(model_path, passed, threads).items():
            results[k].update(t)
    return results


def _timings(model_path, configs_: list[tuple[bool, bool]], threads: int | None) -> dict[str, dict]:
    """{label: {"pp_tps", "tg_tps" (the best round's), "pp_rounds", "tg_rounds"}} for the configurations, timed in
    turns in one child; ``{"timing_error": why}`` each when the child dies or runs out of time (untimed: the choice
    then keeps the default)."""
    from ..engine.bufts import offered, wanted
    from .kernels import label

    if not configs_:
        return {}
    out, rc, tail = _run_child({"model": str(model_path), "configs": configs_, "threads": threads, "time": ROUNDS})
    names = offered()
    if rc != 0:  # untimed, and why
        why = (f"timeout after {CHILD_TIMEOUT_S:.0f} s, a busy machine?" if rc is None else
               _signame(-rc) if rc < 0 else f"exit {rc}: {tail[-200:]}")
        return {label(wanted(names, *c)): {"timing_error": why} for c in configs_}
    lines = [json.loads(x) for x in out.splitlines() if x.startswith("{")]
    return {label(wanted(names, t.pop("amx"), t.pop("repack"))): t for t in lines}


def _signame(sig: int) -> str:
    try:
        return signal.Signals(sig).name
    except ValueError:
        return f"signal {sig}"


def _cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b))
    na, nb = math.sqrt(sum(x * x for x in a)), math.sqrt(sum(y * y for y in b))
    return dot / (na * nb) if na and nb else 0.0


def _child(job: dict) -> int:
    """In the child: each configuration in turn, one JSON line each (stdout is ours alone); with ``time``, the
    configurations all loaded, then that many rounds of a 64-token prompt and 32 decoded tokens each in turn,
    one line each with its pp and tg tok/s per round and the best of them."""
    import importlib
    import time

    try:  # its crashes are expected (that is what it tests): no core dump in the user's folder (272 MB on a SIGSEGV)
        import resource

        resource.setrlimit(resource.RLIMIT_CORE, (0, resource.getrlimit(resource.RLIMIT_CORE)[1]))
    except (ImportError, ValueError, OSError):  # no such limit here (Windows)
        pass
    import numpy as np

    # this file runs as __main__ here: the flag kernels.resolve reads is the package module's (else every load of
    # the test would self-test again, in a child of its own, until the time limit)
    importlib.import_module("ondevice.device.selftest").IN_CHILD = True
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # llama.cpp printing to fd 1 lands on stderr
    from ..engine.base import EngineConfig
    from ..engine.llama import LlamaEngine

    def load(amx: bool, repack: bool) -> LlamaEngine:
        return LlamaEngine(job["model"], EngineConfig(n_ctx=256, n_threads=job.get("threads"), warmup=False,
                                                      amx="on" if amx else "off", repack="on" if repack else "off"))

    rng = np.random.default_rng(0)
    toks, ids = None, None
    if job.get("time"):
        engines = [(c, load(*c)) for c in job["configs"]]
        toks = [int(t) for t in rng.integers(100, min(engines[0][1].n_vocab, 30000), 64)]
        pp: list[list[float]] = [[] for _ in engines]
        tg: list[list[float]] = [[] for _ in engines]
        for _ in range(int(job["time"])):
            for i, (_, eng) in enumerate(engines):
                eng.reset()
                t0 = time.perf_counter()
                eng.prefill(toks)
                pp[i].append(round(len(toks) / (time.perf_counter() - t0), 1))
                tok, t0 = int(eng.logits().argmax()), time.perf_counter()
                for _ in range(32):
                    eng.decode(tok)
                    tok = int(eng._row(-1).argmax())
                tg[i].append(round(32 / (time.perf_counter() - t0), 1))
        for i, ((amx, repack), eng) in enumerate(engines):
            out.write(json.dumps({"amx": amx, "repack": repack, "pp_tps": max(pp[i]), "tg_tps": max(tg[i]),
                                  "pp_rounds": pp[i], "tg_rounds": tg[i]}) + "\n")
            eng.close()
        return 0
    for amx, repack in job["configs"]:
        eng = load(amx, repack)
        toks = toks or [int(t) for t in rng.integers(100, min(eng.n_vocab, 30000), 64)]
        ids = ids if ids is not None else rng.choice(eng.n_vocab, 256, replace=False)
        eng.reset()
        eng.prefill(toks)
        row = eng.logits()
        probe = [float(x) for x in row[ids]]
        tok = int(row.argmax())
        for _ in range(4):
            eng.decode(tok)
            tok = int(eng._row(-1).argmax())
        ok = bool(np.isfinite(row).all())
        out.write(json.dumps({"amx": amx, "repack": repack, "ok": ok, "error": None if ok else "non-finite logits",
                              "buffers": eng.buffer_types, "probe": probe}) + "\n")
        eng.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        raise SystemExit("usage: python -m ondevice.device.selftest JOB_JSON (the kernels self-test's child)")
    return _child(json.loads(argv[0]))


if __name__ == "__main__":
    raise SystemExit(main())
