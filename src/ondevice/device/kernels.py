"""Which extra CPU kernels a model uses on this machine: chosen safely, proved by a self-test, cached.

llama.cpp's CPU backend can put weights in extra buffer types with their own matmul kernels: CPU_REPACK
(Q4_0/Q4_K/IQ4_NL/Q8_0 rows interleaved for AVX2/AVX-512/NEON; faster prompts) and, on Xeons with AMX,
AMX. The AMX one crashes (SIGSEGV in ``ggml_backend_amx_mul_mat``) on the first decode on some machines
(llama.cpp issue 20824), so it is never on by default:

* ``--amx auto`` (the default) turns AMX on only when this machine and llama.cpp build passed the self-test
  with it *and* it measured faster; ``--repack auto`` keeps repack on unless its self-test failed here.
* the self-test (``device/selftest.py``) loads a model and decodes a few tokens in a child process per kernel
  configuration (a crash kills only the child), checks the logits agree with the no-extra-kernels run and,
  for ``ondevice device --probe``, times a short pp/tg of each in turns. Results are cached per machine and llama.cpp
  build and set of weight types in ``<data dir>/device/kernels.json`` (``ONDEVICE_KERNELS_CACHE`` overrides).
  The unit is every type a file holds (:func:`types_of`, e.g. ``Q4_1+Q8_0+F32``), not its main one: a kernel
  crash can be specific to one type, and most files mix types (a Q4_K_M, Gemma 3's Q8_0 with Q5_0/Q4_K/Q6_K
  tensors), so a file whose minority types were never through a kernel here is tested before it runs there.
* the first load of a set of weight types on an unseen machine/build runs a quick self-test of the default
  configuration (no timing; about a second); ``ondevice device --probe`` tests every configuration for
  Q4_0, Q4_1, Q8_0 and Q4_K_M variants of the default model (or the models given with ``-m``) and times them.

Flags: ``--amx``/``--repack`` ``auto|on|off`` (env ``ONDEVICE_AMX``/``ONDEVICE_REPACK``); ``on`` and ``off``
skip the self-test. The mechanism that applies a choice is in ``engine/bufts.py``.
"""

from __future__ import annotations

import ctypes
import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from ..errors import InvalidArgument, OndeviceError
from .kernels_cache import (  # noqa: F401
    MAX_TRIES,
    KernelsNotice,
    _entry,
    _key,
    _read,
    _store,
    build_id,
    cache_path,
    cached,
    pending,
    retest_due,
    stored,
    tested,
    testing_lock,
    valid,
)
from .selftest import selftest

MODES = ("auto", "on", "off")
AMX = "AMX"
AMX_FLAGS = ("amx_tile", "amx_int8")
FAMILIES = ("Q4_0", "Q4_1", "Q8_0", "Q4_K_M")  # what --probe tests (variants of the default model)
FASTER = 1.05  # another safe configuration must beat the default by 5% to be chosen (noise is not a reason)


@dataclass(frozen=True, slots=True)
class Choice:
    """The kernels one load uses: AMX on/off, repack on/off, the buffer types that gives, and why."""

    amx: bool
    repack: bool
    bufts: tuple[str, ...]
    reason: str

    def to_dict(self) -> dict:
        return asdict(self)


def requested(amx: str | None = None, repack: str | None = None) -> tuple[str, str]:
    """(amx, repack) modes: the given ones, else ``ONDEVICE_AMX``/``ONDEVICE_REPACK``, else auto; validated."""
    out = []
    for name, v in (("amx", amx), ("repack", repack)):
        v = v if v is not None else os.environ.get(f"ONDEVICE_{name.upper()}") or "auto"
        v = {"1": "on", "true": "on", "0": "off", "false": "off"}.get(str(v).strip().lower(), str(v).strip().lower())
        if v not in MODES:
            raise InvalidArgument(f"--{name} / ONDEVICE_{name.upper()} {v!r} is not one of auto, on, off")
        out.append(v)
    return out[0], out[1]


def label(bufts: tuple[str, ...] | list[str]) -> str:
    """A configuration's name: its buffer types joined by '+', or 'none'."""
    return "+".join(bufts) or "none"


def configs(offered: tuple[str, ...], cpu_flags: list[str] | tuple[str, ...]) -> list[tuple[bool, bool]]:
    """The (amx, repack) configurations worth testing here, the no-extra-kernels one first."""
    from ..engine.bufts import wanted

    amx_ok = AMX in offered and set(AMX_FLAGS) <= set(cpu_flags)
    out, seen = [], set()
    for a in (False, True) if amx_ok else (False,):
        for r in (False, True):
            key = wanted(offered, a, r)
            if key not in seen and (not a or AMX in key):
                seen.add(key)
                out.append((a, r))
    return out


def took_no_weights(res: dict, offered) -> bool:
    """Whether a configuration's load put no weight in any extra buffer type (it ran the plain kernels)."""
    return res.get("buffers") is not None and not set(res["buffers"]) & set(offered)


def _score(res: dict | None) -> float | None:
    """Geometric mean of a measured configuration's pp and tg tok/s (None when not measured or failed)."""
    if not res or not res.get("ok") or not res.get("pp_tps") or not res.get("tg_tps"):
        return None
    return math.sqrt(res["pp_tps"] * res["tg_tps"])


def _every_round(res: dict | None, default: dict | None) -> bool:
    """Whether ``res`` beat ``default`` by :data:`FASTER` in every timing round (rounds timed in turns, so a burst
    of load on a busy machine slows both alike); True for results timed without rounds (older caches)."""
    rounds = [r.get(k) for r in (res or {}, default or {}) for k in ("pp_rounds", "tg_rounds")]
    if not all(rounds) or len({len(r) for r in rounds}) != 1:
        return True
    pp, tg, dpp, dtg = rounds
    return all(math.sqrt(a * b) > FASTER * math.sqrt(c * d) for a, b, c, d in zip(pp, tg, dpp, dtg))


def choose(amx: str, repack: str, offered: tuple[str, ...], cpu_flags: list[str] | tuple[str, ...],
           results: dict[str, dict] | None) -> Choice:
    """The kernels to use, from the requested modes, what the build offers, the CPU's flags and the
    self-test ``results`` for this set of weight types (``{label: {"ok", "pp_tps", "tg_tps", "error"}}`` or None).

    AMX in auto needs a passed *and* measured self-test that beats the safe default by :data:`FASTER`;
    repack in auto is on where offered unless its self-test failed. ``on`` is obeyed (an error where the
    build or CPU cannot), ``off`` always.
    """
    from ..engine.bufts import wanted

    amx_possible = AMX in offered and set(AMX_FLAGS) <= set(cpu_flags)
    repack_possible = any(n != AMX for n in offered)
    if amx == "on" and not amx_possible:
        why = "this CPU has no AMX (amx_tile, amx_int8)" if AMX in offered else "this llama.cpp build has no AMX kernels"
        raise InvalidArgument(f"--amx on: {why}; use --amx auto or off")
    if repack == "on" and not repack_possible:
        raise InvalidArgument("--repack on: this llama.cpp build offers no repacked CPU kernels (built with "
                              "GGML_CPU_REPACK=OFF?); use --repack auto or off")
    results = {k: v for k, v in (results or {}).items() if v.get("ok") is not None}  # inconclusive: untested
    if "none" in results and not results["none"].get("ok"):
        results = {}  # the model failed even without extra kernels: the test says nothing about them
    amx_opts = [amx == "on"] if amx != "auto" else ([False, True] if amx_possible else [False])
    repack_opts = [repack == "on"] if repack != "auto" else ([True, False] if repack_possible else [False])
    cands = []
    for a in amx_opts:
        for r in repack_opts:
            res = results.get(label(wanted(offered, a, r)))
            if amx == "auto" and a and _score(res) is None:
                continue  # AMX only on proof: passed and measured here
            if res is not None and not res.get("ok") and (a and amx == "auto" or r and repack == "auto"):
                continue  # failed its self-test on this machine: auto never picks it
            cands.append((a, r))
    if not cands:
        cands = [(False, False)]  # auto found nothing proven: the safe minimum
    def score(c: tuple[bool, bool]) -> float | None:
        res = results.get(label(wanted(offered, *c)))
        if res and res.get("ok") and took_no_weights(res, offered):
            res = results.get("none", res)  # its extra kernels took no weights: the same kernels as none
        return _score(res)

    default = next((c for c in cands if not c[0]), cands[0])  # no AMX; repack where allowed (listed first)
    best = max(cands, key=lambda c: score(c) or 0.0)
    s_best, s_def = score(best), score(default)
    pick = best if s_best and (not s_def or s_best > FASTER * s_def and _every_round(
        results.get(label(wanted(offered, *best))), results.get(label(wanted(offered, *default))))) else default
    bufts = wanted(offered, *pick)
    forced = " ".join(f"--{n} {v}" for n, v in (("amx", amx), ("repack", repack)) if v != "auto")
    if amx != "auto" and repack != "auto":
        why = forced
    elif not results:
        why = f"{forced or 'auto'}, not self-tested here"
    else:
        failed = [k for k, v in results.items() if not v.get("ok")]
        why = ("auto, measured fastest" if pick == best and s_best and pick != default else
               f"{forced or 'auto'}, self-tested")
        if failed:
            why += "; failed here: " + ", ".join(f"{k} ({results[k].get('error')})" for k in failed)
    return Choice(amx=pick[0], repack=pick[1], bufts=bufts, reason=why)


class _GgufInitParams(ctypes.Structure):  # ggml's struct gguf_init_params
    _fields_ = [("no_alloc", ctypes.c_bool), ("ctx", ctypes.c_void_p)]


def types_label(by_type: dict[str, float]) -> str:
    """The self-test's unit for a file: its weight types joined by '+', most bytes first (``Q4_1+Q8_0+F32``);
    'unknown' for a file with none. F32 counts too: KleidiAI's extra buffer type on Arm takes F32 matrices."""
    return "+".join(sorted(by_type, key=lambda t: (-by_type[t], t))) or "unknown"


def types_of(model_path: str | Path, trusted: bool = False) -> str | None:
    """Every weight type a GGUF file holds, as :func:`types_label` names them: the self-test's unit.

    ``trusted``: the file is known to be well-formed (a restored container: checked when it was encrypted,
    authenticated since), so llama.cpp's own parser reads it (ggml's ``gguf_init_from_file``, metadata only:
    ~10 ms for a 151k-token vocabulary, where ondevice's Python check takes ~0.2 s); None if it cannot.
    """
    if not trusted:
        from ..models.gguf_check import validate_gguf

        return types_label(validate_gguf(model_path).quant_mix)
    from ..engine.llama import _lib, llama_cpp_lib

    _lib()
    lib = llama_cpp_lib()  # dlsym on libllama's handle also finds the ggml functions it links
    init, free = lib["gguf_init_from_file"], lib["gguf_free"]
    init.restype, init.argtypes = ctypes.c_void_p, [ctypes.c_char_p, _GgufInitParams]
    free.restype, free.argtypes = None, [ctypes.c_void_p]
    n, kind, size = lib["gguf_get_n_tensors"], lib["gguf_get_tensor_type"], lib["gguf_get_tensor_size"]
    n.restype, n.argtypes = ctypes.c_int64, [ctypes.c_void_p]
    kind.restype, kind.argtypes = ctypes.c_int, [ctypes.c_void_p, ctypes.c_int64]
    size.restype, size.argtypes = ctypes.c_size_t, [ctypes.c_void_p, ctypes.c_int64]
    ctx = init(str(model_path).encode(), _GgufInitParams(True, None))
    if not ctx:
        return None
    try:
        by_id: dict[int, int] = {}
        for i in range(n(ctx)):
            k = kind(ctx, i)
            by_id[k] = by_id.get(k, 0) + size(ctx, i)
    finally:
        free(ctx)
    from gguf import GGMLQuantizationType

    def name(k: int) -> str:
        try:
            return GGMLQuantizationType(k).name
        except ValueError:  # a type this gguf does not name: still its own unit
            return f"type{k}"

    return types_label({name(k): v for k, v in by_id.items()})


# ---- what the engine calls -----------------------------------------------------------------------------

def _notice(msg: str) -> None:
    """One line before a self-test pause, logged at INFO on the ``ondevice.kernels`` logger: the CLI shows it as
    ``ondevice VERB: note: ...`` on stderr (``ondevice.cli._warnings_as_lines``); a library user's program prints
    nothing unless it shows that logger."""
    import logging

    logging.getLogger("ondevice.kernels").info(msg)


def _quick(model_path: str | Path, types: str, names: tuple[str, ...], flags) -> dict:
    """The first load's quick self-test of a set of weight types (no AMX: auto needs timing for it), or a fresh
    try of its inconclusive results (:func:`~.kernels_cache.retest_due`): conclusive results already cached are
    kept, and the entry counts its tries."""
    from ..engine.bufts import wanted, would_use
    from . import selftest as st

    cands = [c for c in configs(names, flags) if not c[0]]
    if not set(would_use(model_path, wanted(names, False, True))) & set(names):
        return _entry(model_path, {}, measured=False, note="no extra kernel takes weights of these types here")
    old = stored(types)
    retry = pending(old) if old else []
    limit = f"at most {st.CHILD_TIMEOUT_S:.0f} s"
    if retry:
        tries = int(old.get("tries") or 1) + 1
        _notice(f"the CPU kernels self-test of weight types {types} was inconclusive here "
                f"({old['results'][retry[0]].get('error')}, {old.get('tested_at')}): testing {', '.join(retry)} "
                f"again before loading (try {tries} of {MAX_TRIES}; a few seconds, {limit})")
    else:
        tries = None
        _notice(f"first load of weight types {types} with this machine and llama.cpp build: self-testing its CPU "
                f"kernels ({', '.join(label(wanted(names, *c)) for c in cands)}) in a child process before loading "
                f"(a few seconds, {limit}; the result is cached in {cache_path()})")
    results = selftest(model_path, cands)
    if old:  # what the last try settled stays (a probe's timings too)
        results.update({k: v for k, v in old["results"].items() if v.get("ok") is not None})
    keep = {k: old[k] for k in ("variant", "threads") if old and k in old}
    return _entry(model_path, results, measured=bool(old and old.get("measured")), **keep,
                  **({"tries": tries} if tries else {}))


def resolve(amx: str | None, repack: str | None, model_path: str | Path, types: str | None = None) -> Choice:
    """The kernels for loading ``model_path`` here; on the first load of its set of weight types on this machine
    and build, a dry run (metadata only) says whether the extra kernels would take any of its weights, and only
    then does the quick self-test run (Q4_1 on AVX2, say, has nothing to repack: nothing to prove). An inconclusive
    test is tried again on a later load (at most MAX_TRIES in all, RETRY_AFTER_S apart; see kernels_cache).

    ``types`` is the file's :func:`types_of` when the caller knows it already (a restored container).
    """
    from ..engine.bufts import offered
    from .info import cpu_flags

    amx, repack = requested(amx, repack)
    names = offered()
    flags = cpu_flags()
    proven = _prove_amx(model_path, types, repack, names, flags) if amx == "on" else None
    if not names or (amx != "auto" and repack != "auto"):
        return choose(amx, repack, names, flags, None)
    types = types or types_of(model_path)
    entry = tested(types) or proven  # just tested by _prove_amx: holds even where the cache cannot be written
    if entry is None:
        with testing_lock():  # a load of the same new types in another process meanwhile: its result is read
            entry = tested(types)
            if entry is None:
                entry = _quick(model_path, types, names, flags)
                _store(types, entry, names)
    choice = choose(amx, repack, names, flags, entry["results"])
    return replace(choice, reason=f"auto, {entry['note']}") if entry.get("note") else choice


def amx_on(repack: str, names: tuple[str, ...], flags, results: dict | None) -> tuple[Choice, str]:
    """The one rule for ``--amx on`` (the load and ``ondevice device`` both use it): the configuration
    :func:`choose` picks from the self-test ``results``, and its state here: "ok" (passed: loaded with it),
    "untested" (tested first, in a child), "failed" or "inconclusive" (refused)."""
    c = choose("on", repack, names, flags, results)
    res = (results or {}).get(label(c.bufts))
    state = ("untested" if not isinstance(res, dict) else "ok" if res.get("ok") else
             "failed" if res.get("ok") is False else "inconclusive")
    return c, state


def _prove_amx(model_path: str | Path, types: str | None, repack: str, names: tuple[str, ...],
               flags: list[str] | tuple[str, ...]) -> dict | None:
    """``--amx on`` is obeyed where AMX works: a load with it that crashed its self-test here would kill this
    process with a bare SIGSEGV (llama.cpp issue 20824; outside the CLI's supervisor, a user's program or
    notebook), so the configuration :func:`amx_on` picks is self-tested first, in a child, once per set of weight
    types, and refused when it failed (under ``--repack auto`` a failed AMX+CPU_REPACK falls back to AMX alone,
    tested in turn). A CPU or build without AMX is :func:`choose`'s error. Returns the entry it checked."""
    from ..engine.bufts import would_use
    from . import selftest as st

    if st.IN_CHILD or AMX not in names or not set(AMX_FLAGS) <= set(flags):
        return None
    types = types or types_of(model_path)
    entry = stored(types) or _entry(model_path, {}, measured=False)
    done: set[str] = set()
    while True:
        c, state = amx_on(repack, names, flags, entry["results"])
        key = label(c.bufts)
        if AMX not in would_use(model_path, c.bufts):
            return None  # AMX takes none of these weights: nothing of its kernels runs
        if key in done or state in ("ok", "failed") or state == "inconclusive" and not retest_due(entry, [key]):
            break
        done.add(key)
        tries = int(entry.get("tries") or 1) + 1 if state == "inconclusive" else entry.get("tries")
        _notice(f"--amx on: self-testing llama.cpp's AMX kernels ({key}) on weight types {types} in a child process "
                f"before loading (a few seconds, at most {st.CHILD_TIMEOUT_S:.0f} s; cached in {cache_path()})")
        plain = [p for p in configs(names, flags) if not p[0]]  # what auto's first load tests, and the baseline
        results = {**entry["results"], **st.selftest(model_path, [*plain, (c.amx, c.repack)])}
        keep = {k: entry[k] for k in ("measured", "variant", "threads") if k in entry}  # not the old note
        entry = _entry(model_path, results, **keep, **({"tries": tries} if tries else {}))  # stamped now
        _store(types, entry, names)
    if state != "ok":  # a crash, wrong logits, or a child that never finished (AMX hangs on some Xeons)
        res = entry["results"].get(key) or {}
        raise OndeviceError(f"--amx on (ONDEVICE_AMX, amx='on'): llama.cpp's AMX kernels ({key}) "
                            f"{'failed' if state == 'failed' else 'did not finish'} their self-test on this "
                            f"machine for weights of types {types} ({res.get('error')}, {entry.get('tested_at')}), "
                            f"so a load with them could crash or hang this process; use --amx auto (AMX only where "
                            f"it passed and is faster) or off (`ondevice device --probe -m MODEL` tests them again)")
    return entry


def variants(threads: int | None = None, families: tuple[str, ...] = FAMILIES) -> dict[str, Path]:
    """Q4_0, Q4_1, Q8_0 and Q4_K_M files of the default model (requantized from its Q4_1 once by ondevice's
    quantize worker, cached in the data dir)."""
    from ..engine.resources import physical_cores
    from ..models import resolve as resolve_model
    from ..models.store import data_dir
    from ..quant.quantize import ftype_id, run_worker

    src = Path(resolve_model(None).path)
    out: dict[str, Path] = {}
    d = data_dir() / "device" / "kernel-models"
    d.mkdir(parents=True, exist_ok=True)
    for fam in families:
        if fam == "Q4_1":
            out[fam] = src
            continue
        dst = d / f"{src.stem}-{fam}.gguf"
        if not dst.exists():
            tmp = dst.with_suffix(".tmp")
            run_worker(src, tmp, ftype_id(fam), [], True, threads or physical_cores(), 600)
            os.replace(tmp, dst)
        out[fam] = dst
    return out


def probe_kernels(threads: int | None = None, models: dict[str, Path] | None = None,
                  say: Callable[[str], None] | None = None) -> dict:
    """The full self-test: every configuration for each of ``models`` (``{name: path}``; default: the default
    model's :func:`variants`), measured; stored per set of weight types and returned (``say``: a line as each
    model starts)."""
    from ..engine.bufts import offered
    from .info import cpu_flags

    names = offered()
    if not names:
        return cached()
    cands = configs(names, cpu_flags())
    todo = models or variants(threads)
    for i, (variant, path) in enumerate(todo.items()):
        if say:
            say(f"kernels: testing {types_of(path)} ({variant}, {i + 1}/{len(todo)}): {len(cands)} configurations, "
                f"then timing those that pass")
        results = selftest(path, cands, measure=True, threads=threads)
        _store(types_of(path), _entry(path, results, measured=True, variant=variant, threads=threads), names)
    return cached()


def _shown(amx: str, repack: str, names: tuple[str, ...], flags, e: dict | None) -> tuple[str, str]:
    """(what a load of these weight types does here with these settings, why): the rule the load follows."""
    try:
        if amx == "on" and AMX in names and set(AMX_FLAGS) <= set(flags):
            c, state = amx_on(repack, names, flags, e and e["results"])
            key = label(c.bufts)
            if state == "failed" or state == "inconclusive" and not (e and retest_due(e, [key])):
                return "refused", (f"--amx on: {key} {'failed' if state == 'failed' else 'did not finish'} its "
                                   f"self-test here; use --amx auto or off")
            if state != "ok":
                return key, "--amx on: self-tested first by the next load with it, which is refused if it fails"
            return key, c.reason
        c = choose(amx, repack, names, flags, e and e["results"])
    except InvalidArgument as err:
        return "refused", str(err)
    why = f"auto, {e['note']}" if e and e.get("note") and amx == repack == "auto" else c.reason
    if e and retest_due(e, pending(e)):
        why += f"; inconclusive: the next load tests again (try {int(e.get('tries') or 1) + 1} of {MAX_TRIES})"
    return label(c.bufts), why


def kernels_summary() -> dict:
    """What ``ondevice device`` shows: the build's extra kernels, the untested default and each tested set of
    weight types, each with what a load with the requested settings does (the load's own rule)."""
    from ..engine.bufts import offered
    from .info import cpu_flags

    try:
        names = offered()
    except Exception as e:  # noqa: BLE001 — llama-cpp-python missing or broken: `ondevice device` still answers
        return {"offered": [], "error": f"{type(e).__name__}: {e}", "default": {"label": "-", "reason": "no llama.cpp"},
                "types": {}, "cache": str(cache_path())}
    flags = cpu_flags()
    amx, repack = requested()
    fams = {}
    for fam, e in sorted(cached().get("types", {}).items()):
        if not valid(e):
            fams[fam] = {"results": {}, "tested_at": "-", "malformed": True, "choice": "untested",
                         "note": "a malformed cache entry", "reason": "the next load of these types tests them again"}
            continue
        choice, why = _shown(amx, repack, names, flags, e)
        fams[fam] = {**e, "choice": choice, "reason": why}
    d, why = _shown(amx, repack, names, flags, None)
    return {"offered": list(names), "requested": {"amx": amx, "repack": repack},
            "default": {"label": d, "reason": why}, "types": fams, "cache": str(cache_path())}
