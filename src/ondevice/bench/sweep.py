"""Sweeps: expand comma lists into configurations, run each in its own worker process, store each record.

One worker per configuration (model x threads x batch x ubatch x ctx x KV types x flash-attn x profile)
runs every test of that configuration on one loaded model; each (configuration, test) is one record
with its own ``config_key``. With ``interleave``, one worker per settings loads every model and runs
each test's repetitions round the models in turn (a fair comparison on a machine whose speed drifts).
Records are committed to the store as the worker reports them, so a
``kill -9`` of the sweep loses only the test in flight, and ``--resume`` skips what is stored.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime

from ..stop_signals import interrupt_on_signals
from ..store.record import created_now
from ..supervise import python
from .config import BenchConfig
from .meta import ModelMeta, config_key, host_meta, model_meta, roofline_for
from .noise import NOISY_LOAD, assess, wait_idle
from .record import BenchRecord
from .workloads import WORKLOADS, TestSpec

DONE_STATUSES = ("ok", "oom")  # what --resume skips; errors are retried


@dataclass
class Config:
    model: ModelMeta
    settings: dict  # threads, n_batch, n_ubatch, n_ctx, type_k, type_v, flash_attn, profile, repetitions
    tests: list[TestSpec]
    # per test: how many earlier tests of the sweep are this same measurement (a byte-identical file given
    # again with -m, the same file twice, -t 1,1, -p 64,64). llama-bench prints a row for each, so each gets
    # its own key; the first keeps the plain key of its variant, so --resume still skips a variant stored under
    # another name or path (set by :func:`expand`)
    copies: list[int] = field(default_factory=list)

    def copy(self, j: int) -> dict:
        """The ``settings`` entry that tells test ``j`` apart from the same measurement earlier in the sweep."""
        n = self.copies[j] if j < len(self.copies) else 0  # not set yet: expand is counting them
        return {"copy": n} if n else {}

    def key(self, j: int) -> str:
        """The ``config_key`` of test ``j``: what --resume skips and a report shows one row for."""
        t = self.tests[j]
        return config_key({**self.settings, "test": t.name, "params": t.params, **self.copy(j)}, self.model.sha256)


class BenchResult(list[BenchRecord]):
    """The records of a sweep (a list of :class:`BenchRecord`), plus ``session``, ``interrupted``,
    ``report_path`` and ``notes`` (what the sweep noted about its figures, printed on stderr unless asked not to)."""

    session: str = ""
    interrupted: bool = False
    exit_code: int = 130  # when interrupted: 130 for Ctrl-C, 128 + the signal for a SIGTERM or SIGHUP
    report_path: str | None = None
    notes: tuple[str, ...] = ()


def _resolve_threads(threads: int | None, profile: str | None) -> int:
    from ..device import parse_profile
    from ..engine.resources import physical_cores

    if threads:
        return threads
    prof = parse_profile(profile)
    if prof.threads or prof.cpu_affinity:
        return prof.resolved_threads()
    return physical_cores()


def expand(config: BenchConfig) -> list[Config]:
    """Configurations in llama-bench order (model outermost)."""
    from ..device.kernels import requested

    amx, repack = requested()  # ONDEVICE_AMX / ONDEVICE_REPACK (the --amx/--repack flags set them)
    models: list[str | None] = list(config.models) or [None]
    metas = {}
    for m in models:
        if m not in metas:
            metas[m] = model_meta(m)
    tests = config.specs
    out = []
    for m, t, b, ub, c, tk, tv, fa, prof in itertools.product(
            models, config.threads or [None], config.n_batch, config.n_ubatch, config.n_ctx, config.type_k,
            config.type_v, config.flash_attn, config.profile or [None]):
        settings = {"threads": _resolve_threads(t, prof), "n_batch": b, "n_ubatch": ub, "n_ctx": c,
                    "type_k": tk, "type_v": tv, "flash_attn": fa, "profile": prof or "host",
                    "repetitions": config.repetitions, "amx": amx, "repack": repack,
                    **({"interleave": True} if config.interleave else {}),  # a measuring method of its own
                    **({"warmup": False} if not config.warmup else {})}  # a cold start is another measurement
        out.append(Config(metas[m], settings, list(tests)))
    seen: dict[str, int] = {}
    for cfg in out:  # in sweep order: the first of a measurement is copy 0
        for j in range(len(cfg.tests)):
            key = cfg.key(j)
            cfg.copies.append(seen.get(key, 0))
            seen[key] = seen.get(key, 0) + 1
    return out


def new_session_id() -> str:
    return datetime.now().strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:4]


class Progress:
    """A one-line progress bar on stderr (plain lines when stderr is not a terminal)."""

    def __init__(self, total: int, enabled: bool = True):
        self.total, self.n, self.enabled = total, 0, enabled
        self.tty = sys.stderr.isatty()
        self.t0 = time.perf_counter()

    def show(self, label: str) -> None:
        if not self.enabled:
            return
        width = 24
        fill = int(width * self.n / max(1, self.total))
        line = f"[{'#' * fill}{'.' * (width - fill)}] {self.n}/{self.total} {time.perf_counter() - self.t0:5.0f}s {label}"
        if self.tty:
            sys.stderr.write("\r\033[K" + line[:120])
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    def step(self, label: str) -> None:
        self.n += 1
        self.show(label)

    def close(self) -> None:
        if self.enabled and self.tty:
            sys.stderr.write("\n")
            sys.stderr.flush()


def _die_with_parent() -> None:  # runs in the child between fork and exec
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def worker_command() -> list[str]:
    return python("-m", "ondevice.bench.worker")


def _worker_env(settings: dict) -> dict:
    env = dict(os.environ)
    # numpy's BLAS is idle in the worker; one BLAS thread keeps it from competing with llama.cpp's
    # threads, and two malloc arenas keep the address space small (RLIMIT_AS counts reserved arenas).
    env.setdefault("OPENBLAS_NUM_THREADS", "1")
    env.setdefault("OMP_NUM_THREADS", str(settings["threads"]))  # llama.cpp's OpenMP pool size
    env.setdefault("MALLOC_ARENA_MAX", "2")
    return env


def _oom_like(rc: int, stderr: str) -> bool:
    if rc < 0 and -rc in (signal.SIGKILL, signal.SIGABRT, signal.SIGSEGV, signal.SIGBUS):
        return True  # the OOM killer (cgroup), std::bad_alloc -> abort, or a failed allocation dereferenced
    return any(s in stderr for s in ("MemoryError", "bad_alloc", "Cannot allocate memory", "failed to allocate"))


def run_worker(cfg: dict, settings: dict, on_event, capped: bool) -> tuple[int, str]:
    """Start a worker, feed it ``cfg``, call ``on_event(dict)`` per JSON line; returns (rc, stderr tail).

    The worker is in its own session (Ctrl-C reaches only the parent, which stops it) and dies with the
    parent (PR_SET_PDEATHSIG), so a killed sweep leaves no orphan measuring in the background.
    """
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(worker_command(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err,
                                text=True, env=_worker_env(settings), start_new_session=True,
                                # the sweep is single-threaded, so preexec_fn is safe here
                                preexec_fn=_die_with_parent if sys.platform == "linux" else None)  # noqa: PLW1509
        try:
            proc.stdin.write(json.dumps(cfg))
            proc.stdin.close()
            for line in proc.stdout:
                line = line.strip()
                if line.startswith("{"):
                    on_event(json.loads(line))
            rc = proc.wait()
        except BaseException:
            proc.kill()  # Ctrl-C or a store failure: stop measuring now
            proc.wait()
            raise
        err.seek(0)
        tail = err.read()[-3000:]
    return rc, tail


def _flat(res: dict) -> dict:
    """Worker result -> the record's flat metric columns."""
    mem, cpu, en = res.get("memory") or {}, res.get("cpu") or {}, res.get("energy") or {}
    ttft = res.get("ttft_s") or {}
    return {
        "tps_mean": res["tps"]["mean"], "tps_std": res["tps"]["std"], "tps_samples": res["tps"]["samples"],
        "avg_s": res["time_s"]["mean"], "time_s_samples": res["time_s"]["samples"],
        "ttft_s_mean": ttft.get("mean"), "ttft_s_std": ttft.get("std"), "ttft_s_samples": ttft.get("samples"),
        "prefill_tps_mean": res["prefill_tps"]["mean"], "prefill_tps_std": res["prefill_tps"]["std"],
        "decode_tps_mean": res["decode_tps"]["mean"], "decode_tps_std": res["decode_tps"]["std"],
        "itl_ms_p50": res["itl_ms"]["p50"], "itl_ms_p90": res["itl_ms"]["p90"],
        "itl_ms_p99": res["itl_ms"]["p99"], "itl_ms_mean": res["itl_ms"]["mean"],
        "peak_rss_bytes": mem.get("peak_rss_bytes"), "rss_file_bytes": mem.get("rss_file_at_peak_bytes"),
        "rss_anon_bytes": mem.get("rss_anon_at_peak_bytes"), "process_max_rss_bytes": mem.get("process_max_rss_bytes"),
        "cpu_time_s": cpu.get("total_s"), "cpu_user_s": cpu.get("user_s"), "cpu_sys_s": cpu.get("sys_s"),
        "cpu_utilisation": cpu.get("utilisation"), "measured_wall_s": res.get("measured_wall_s"),
        "energy_j": en.get("joules"), "energy_j_per_token": en.get("j_per_token"),
        "energy_method": en.get("method"), "energy_scope": en.get("scope"),
        "energy_watts_per_core": en.get("watts_per_core"),
        "tokens_note": res.get("tokens_note"),
        "rss_model_bytes": mem.get("rss_model_bytes"), "load": res.get("load"), "load_avg_1m": res.get("load_avg_1m"),
    }


def _timed_phases(spec: TestSpec, res: dict) -> list[tuple[str, int, int]]:
    if spec.kind == "chat":  # time_s is the decode after each conversation's first token
        return [("decode", spec.n_gen - 1, n + 1) for n in res.get("prompt_lengths", [])]
    return WORKLOADS[spec.kind].phases(spec)


def _probe(threads: int, cache: dict, notes: list[str], refresh: bool = False, wait_idle_s: float = 0.0):
    if threads not in cache:
        from ..device import probe

        try:
            cache[threads] = p = probe(threads, refresh=refresh, wait_idle_s=wait_idle_s)
        except Exception as e:  # noqa: BLE001 — no roofline is a note, not a failed sweep
            cache[threads] = None
            notes.append(f"roofline unavailable at {threads} threads: {e}")
        else:
            if p.cached:  # a probe from another day or load can skew every % of roofline: say which one
                notes.append(f"% of roofline at {threads} threads uses the probe measured {p.measured_at} "
                             f"({p.bandwidth_gbs:.1f} GB/s, {p.peak_gflops:.0f} GFLOP/s); --reprobe measures again")
            elif p.loaded:  # measured now, under other work: it reads low, every % of roofline high
                notes.append(f"the roofline probe at {threads} threads ran while other work kept {p.load:.2f} cores "
                             f"busy, so its roofs read low and % of roofline high (it is in the records' "
                             f"roofline.probe.load and does not replace a quiet cached probe); --wait-idle waits "
                             f"for a quiet machine first")
    return cache[threads]


def run_sweep(config: BenchConfig, *, store=None, progress: bool = False, on_record=None,
              print_notes: bool = True) -> BenchResult:
    """Run every configuration; returns the records (previously stored ones too when resuming), each also passed
    to ``on_record`` as it lands. The notes go to ``result.notes`` and, with ``print_notes``, to stderr."""
    from .. import __version__
    from ..device import device_info, parse_profile

    configs = expand(config)
    session, resume, roofline = config.session, config.resume, config.roofline
    if resume and store is not None and session is None:
        prev = store.sessions("bench")
        session = prev[0][0] if prev else None
    session = session or new_session_id()
    done: dict[str, BenchRecord] = {}
    notes: list[str] = []
    if resume and store is not None:
        stored = store.records("bench", session)
        for r in map(BenchRecord.from_dict, stored):
            if r.status in DONE_STATUSES:
                done[r.config_key] = r
        if not stored:  # a typo in --session, or a sweep killed before its first record: say which it ran
            notes.append(f"--resume: session {session} holds no records, so every test ran "
                         f"(`ondevice report --list` shows the stored sessions)")
    result = BenchResult()
    result.session = session
    n_total = sum(len(c.tests) for c in configs)
    bar = Progress(n_total, progress)
    roofs: dict[int, object] = {}
    skipped = 0
    if roofline and config.reprobe:  # measure the machine again first, once per thread count
        for t in sorted({c.settings["threads"] for c in configs}):
            _probe(t, roofs, notes, refresh=True, wait_idle_s=config.wait_idle)
    try:
        with interrupt_on_signals():  # a `kill` keeps the records as Ctrl-C does
            for group in _groups(configs, config.interleave):
                todo = [j for j in range(len(group[0].tests)) if any(c.key(j) not in done for c in group)]
                for cfg in group:
                    for j, t in enumerate(cfg.tests):
                        if cfg.key(j) in done:
                            result.append(done[cfg.key(j)])
                            if on_record:
                                on_record(done[cfg.key(j)])
                            bar.step(f"{t.name}: stored (resume)")
                            skipped += 1
                for part in _ctx_runs(group[0], todo):
                    _run_config(group, part, config, store, session, result, bar, roofs if roofline else None,
                                notes, __version__, device_info, parse_profile, on_record, done)
    except KeyboardInterrupt as e:
        result.interrupted = True
        result.exit_code = getattr(e, "exit_code", 130)
    finally:
        bar.close()
    if skipped:
        notes.append(f"--resume: {skipped} of the tests were in session {session} already: their stored records are "
                     f"shown, not measured again")
    result.notes = tuple(notes)
    for n in notes if print_notes else ():
        print(f"ondevice bench: note: {n}", file=sys.stderr)
    return result


def _groups(configs: list[Config], interleave: bool) -> list[list[Config]]:
    """The configurations each worker runs: one each, or with ``interleave`` all that differ only in the
    model (in sweep order)."""
    if not interleave:
        return [[c] for c in configs]
    out: dict[str, list[Config]] = {}
    for c in configs:
        out.setdefault(json.dumps(c.settings, sort_keys=True), []).append(c)
    return list(out.values())


def _ctx_runs(cfg: Config, todo: list[int]) -> list[list[int]]:
    """``todo`` cut into runs of consecutive tests that need the same context, each loaded on its own. llama-bench
    gives every test a context of its own length (prompt + generated + depth), so a record's n_ctx, KV memory
    and compare key do not depend on which other tests the sweep holds. With -c N: one run."""
    if cfg.settings["n_ctx"]:
        return [todo] if todo else []
    runs: list[tuple[int, list[int]]] = []
    for j in todo:
        need = _auto_ctx([cfg.tests[j]])
        if runs and runs[-1][0] == need:
            runs[-1][1].append(j)
        else:
            runs.append((need, [j]))
    return [part for _, part in runs]


def _auto_ctx(tests: list[TestSpec]) -> int:
    """Just enough context for ``tests``, in steps of 256."""
    return -(-max(WORKLOADS[t.kind].ctx_needed(t) for t in tests) // 256) * 256


def _build_line(info: dict) -> str | None:
    """llama.cpp's build as a loaded worker writes it (``build_info``), for a record whose load failed."""
    lc = info.get("llama_cpp") or {}
    return f"llama-cpp-python {lc['version']}; {lc.get('system_info')}" if lc.get("version") else None


def worker_config(cfgs: list[Config], todo: list[TestSpec], config: BenchConfig) -> dict:
    """The JSON a worker reads for ``todo`` tests of ``cfgs`` (one settings, one or more models; n_ctx 0: just
    enough, in steps of 256)."""
    s = cfgs[0].settings
    n_ctx = s["n_ctx"] or _auto_ctx(todo)
    return {"models": [{"path": c.model.path, "name": c.model.name} for c in cfgs],
            "profile": None if s["profile"] == "host" else s["profile"],
            "engine": {"n_ctx": n_ctx, "n_threads": s["threads"], "n_batch": s["n_batch"],
                       "n_ubatch": s["n_ubatch"], "type_k": s["type_k"], "type_v": s["type_v"],
                       "flash_attn": s["flash_attn"], "amx": s["amx"], "repack": s["repack"]},
            "tests": [t.to_dict() for t in todo], "repetitions": config.repetitions,
            "warmup": config.warmup, "seed": config.seed}


def _run_config(cfgs: list[Config], todo: list[int], config: BenchConfig, store, session: str,
                result: BenchResult, bar: Progress, roofs: dict | None, notes: list[str], version: str,
                device_info, parse_profile, on_record, done: dict) -> None:
    """Run the tests ``todo`` (indices into ``tests``) of the configurations ``cfgs`` (same settings and tests;
    several models when interleaved) in one worker; records what ``done`` does not hold yet."""
    s = cfgs[0].settings
    specs = [cfgs[0].tests[j] for j in todo]
    wcfg = worker_config(cfgs, specs, config)
    n_ctx = wcfg["engine"]["n_ctx"]
    prof_spec = wcfg["profile"]
    capped = parse_profile(prof_spec).mem_limit_bytes is not None
    quiet = None
    if config.wait_idle > 0:  # before the probe too: one measured under other work reads low, and is cached
        bar.show(f"waiting up to {config.wait_idle:.0f} s for a quiet machine ...")
        quiet = wait_idle(config.wait_idle, show=bar.enabled)
    probe = _probe(s["threads"], roofs, notes) if roofs is not None else None
    info = device_info()  # load average *before* this configuration runs
    by_name: dict[str, list[int]] = {}  # a name given twice (-p 64,64) is run twice, in todo's order
    for j in todo:
        by_name.setdefault(cfgs[0].tests[j].name, []).append(j)
    state: dict = {"loaded": {}, "limits": None}
    names = [c.model.name for c in cfgs]
    bar.show(f"{' + '.join(names)} t={s['threads']} {specs[0].name} ...")

    def record(i: int, j: int, status: str, error: str | None, res: dict | None) -> None:
        cfg, spec = cfgs[i], cfgs[i].tests[j]
        seen.add((i, j))
        if cfg.key(j) in done:  # measured again only to interleave with the others
            return
        loaded = state["loaded"].get(i, {})
        rec = {
            "schema": 1, "kind": "bench", "session": session, "config_key": cfg.key(j), "status": status,
            "error": error, "created": created_now(),
            "model": cfg.model.name, "model_path": cfg.model.path, "model_sha256": cfg.model.sha256,
            "model_size_bytes": cfg.model.file_size, "model_tensor_bytes": cfg.model.info.tensor_bytes,
            "model_params": cfg.model.parameters,
            "model_arch": cfg.model.architecture, "model_quant": cfg.model.quant,
            "test": spec.name, "workload": spec.kind, "n_prompt": spec.n_prompt, "n_gen": spec.n_gen,
            "n_depth": spec.n_depth, **{k: v for k, v in s.items()},
            "n_ctx": loaded.get("n_ctx", n_ctx), "n_ctx_requested": s["n_ctx"],
            "kernels": loaded.get("kernels"),  # the extra CPU buffer types the load really used ("none": plain CPU)
            "load_time_s": loaded.get("load_time_s"), "load_peak_rss_bytes": loaded.get("load_peak_rss_bytes"),
            "roofline_pct": None, "roofline_bound": None, "roofline": None,
            "settings": {**s, "test": spec.name, "params": spec.params, "warmup": config.warmup,
                         "seed": config.seed, **cfg.copy(j)},
            "meta": {"ondevice": version, "llama_build": loaded.get("llama_build") or _build_line(info),
                     **host_meta(info), "limits": state["limits"], "wait_idle": quiet,
                     "buffer_types": loaded.get("buffer_types"), "kernel_choice": loaded.get("kernel_choice"),
                     "model_desc": loaded.get("model_desc"),
                     **({"interleaved_with": names[:i] + names[i + 1:]} if len(cfgs) > 1 else {})},
        }
        if res is not None:
            rec.update(_flat(res))
            en = res.get("energy") or {}  # what the energy figure is made of (counters or sensors, watts' source)
            rec["meta"]["energy"] = {k: en.get(k) for k in ("domains", "watts_source", "avg_watts", "resolution",
                                                              "samples", "interval_s", "max_gap_s", "note")}
            rec["meta"]["throttled_s"] = res.get("throttled_s")  # by the container's CPU quota (None: no cpu.stat)
            rec["noise"] = why = assess(rec["tps_mean"], rec["tps_std"], rec["load"], res.get("throttled_s"),
                                        res.get("measured_wall_s"))  # [] when clean
            rec["noisy"] = bool(why)
            cap = (state["limits"] or {}).get("mem_limit_bytes")
            if cap and (rec.get("peak_rss_bytes") or 0) > cap:  # the cap did not hold: say why, in the record too
                msg = (f"{spec.name}: peak RSS {rec['peak_rss_bytes'] / 2**20:.0f} MiB over the {cap / 2**20:.0f} "
                       f"MiB cap: model pages already in the page cache are charged to whoever read them first, "
                       f"not to the capped run (drop the page cache, as root: echo 1 > /proc/sys/vm/drop_caches)")
                notes.append(msg)
                rec["meta"]["limits"] = dict(state["limits"], notes=[*state["limits"].get("notes", []), msg])
            if res.get("prompt_lengths"):
                rec["prompt_lengths"] = res["prompt_lengths"]
            roof = roofline_for(cfg.model, _timed_phases(spec, res), res["time_s"]["mean"], s["n_ubatch"],
                                s["type_k"], s["type_v"], probe)
            if roof:
                rec.update(roofline_pct=roof["pct"], roofline_bound=roof["bound"], roofline=roof)
                if roof["pct"] > 100:
                    notes.append(roofline_note(spec.name, s["threads"], roof, probe))
        typed = BenchRecord.from_dict(rec)
        if store is not None:
            store.add("bench", typed.to_dict(), session=session, config_key=typed.config_key,
                      model=cfg.model.name, model_sha256=cfg.model.sha256, test=spec.name, status=status)
        result.append(typed)
        if on_record:
            on_record(typed)
        bar.step(f"{spec.name}: {status}" + (f" {typed.tps_mean:.1f} t/s" if res and typed.tps_mean is not None
                                              else ""))

    seen: set[tuple[int, int]] = set()

    def on_event(ev: dict) -> None:
        kind = ev.get("type")
        if kind == "limits":
            state["limits"] = ev.get("limits")
        elif kind == "loaded":
            state["loaded"][ev.get("index", 0)] = ev
        elif kind == "result" and ev.get("test") in by_name:
            ok, i = ev["status"] == "ok", ev.get("index", 0)
            j = next((j for j in by_name[ev["test"]] if (i, j) not in seen), None)  # its first not yet reported
            if j is not None:
                record(i, j, ev["status"], ev.get("error"), ev if ok else None)

    rc, tail = run_worker(wcfg, s, on_event, capped)
    if state["limits"] and state["limits"].get("cgroup_path"):
        from ..device import remove_cgroup

        remove_cgroup(state["limits"]["cgroup_path"])  # the worker made it and has exited: it is empty
    missing = [(i, j) for i in range(len(cfgs)) for j in todo if (i, j) not in seen]
    if missing:
        oom = capped and _oom_like(rc, tail)
        why = (f"the worker died (exit {rc}{', signal ' + signal.Signals(-rc).name if rc < 0 else ''})"
               + (" under the memory cap" if oom else "") + (f": {tail.strip()[-400:]}" if tail.strip() else ""))
        if rc < 0 and not oom:  # the likely cause and the flag that avoids it (AMX, repack), as run/serve say
            from ..supervise import crash_message

            choice = next((ev.get("kernel_choice") for ev in state["loaded"].values()), None)
            why += "; " + crash_message("bench", -rc, choice).split(": error: ", 1)[1]
        for i, j in missing:
            record(i, j, "oom" if oom else "error", why, None)


def roofline_note(test: str, threads: int, roof: dict, probe) -> str:
    """What a run faster than its roofline (``roof["pct"]`` > 100) means. Compute-bound, the roof is the probe's
    float32 matmul, which llama.cpp's int8 dot products on quantized weights (VNNI, AMX) exceed: no reprobe
    changes that. Memory-bound, the measured bandwidth is what is off."""
    said = f"{test} at {threads} thread{'' if threads == 1 else 's'} ran at {roof['pct']:.0f}% of the roofline"
    if roof["bound"] == "compute":
        load = getattr(probe, "load", None)
        busy = (f"; the probe also ran while other work kept {load:.2f} cores busy, so it reads low"
                if load is not None and load > NOISY_LOAD else "")
        return (f"{said}: its compute roof is the probe's float32 matmul peak ({roof['peak_gflops']:.0f} GFLOP/s), "
                f"and llama.cpp's kernels for quantized weights run int8 dot products (VNNI, AMX where the CPU has "
                f"them) that go past it, so the figure is a share of the fp32 peak, not a measurement error{busy}")
    during = f", other work {probe.load:.2f} cores during it" if getattr(probe, "load", None) is not None else ""
    return (f"{said}: the probe ({probe.measured_at}, load {probe.load_avg_1m or 0:.2f} then{during}) understates this "
            f"machine's memory bandwidth; --reprobe measures it again")
