"""Real measurements behind a fit: build a variant, time it with the bench, score it with the eval.

Every number the planner uses comes from here and every one is cached, so ``--resume`` after a kill does
not measure anything twice:

- speed (the device's per-type table, OHQ's on-chip cost): decode and prompt tok/s of whole-model variants
  from ``ondevice.bench`` in its child process, under a device profile when one is given (the bench's own
  mechanism: threads, CPU affinity and a memory cap applied in the worker). Cached per machine, llama.cpp
  build and profile (the same identity the kernel self-test cache uses, plus the profile) in
  ``<data dir>/fit/speed.json`` and reused by every later fit on this device, like the roofline probe;
  ``reprobe=True`` measures again;
- quality: mean KL divergence from the reference on a text, from ``ondevice.evaluate`` (which caches the
  reference's compact logits). Cached per reference, text and chunking in ``<data dir>/fit/kld.json``; reused
  only with ``resume=True`` (or by the device-independent benchmark);
- memory (a ``mem<=`` bound, and every validated candidate): peak RSS of a file running the bench tests in a
  process of its own (one repetition; an interleaved bench's process holds every file, so it cannot say),
  cached beside the speeds (``-memory`` sections);
- task score (``--quality SUITE``): an ``ondevice eval`` suite's score of a validated file, cached like KLD
  per reference, suite, limit and seed.

Bench and eval results are read by :func:`speed_of`, :func:`kld_of` and :func:`score_of` only: the one place
that knows their record fields.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import OndeviceError
from ..models.gguf_copy import splice
from .groups import BASE, Layout
from .paired import paired, paired_rse

# bench rounds of a speed measurement: with the drift between rounds taken out (``paired``) the rest is
# each run's own noise, which more rounds average down (3 rounds: tok/s predictions off by up to 13% here)
REPETITIONS = 6


def plan_key(plan: dict[str, str], imatrix: str | None = None) -> str:
    """A plan's canonical name: the lowered groups, sorted (``base`` when none), plus the imatrix used."""
    low = ";".join(f"{g}={t}" for g, t in sorted(plan.items()) if t != BASE)
    return (low or "base") + (f"|imatrix={imatrix[:12]}" if imatrix else "")


NOISY_NOTE = ("(!) noisy, do not trust: tok/s measured while other processes kept the cores busy or the "
              "container's CPU quota throttled it, or its runs spread widely; fit again on a quiet machine (with "
              "fewer -t under a quota), or with more rounds (-r)")


def noisy_mark(speed: dict) -> str:
    """`` (!)`` after a speed measured while the machine was busy or its runs spread (see :func:`speed_of`)."""
    from ..bench.noise import NOISY_MARK

    return f" {NOISY_MARK}" if speed.get("noisy") else ""


# --- the one place that reads bench and eval results ---------------------------------------------------


def speed_of(records) -> dict:
    """``{"tg", "tg_std", "pp", "pp_std", "noisy", "load", "peak_rss", "rss_model", "rss_anon", "limits"}`` from
    bench records (dicts or typed). ``limits``: what the worker applied for a device profile (None: the host)."""
    out: dict = {"noisy": False}
    for r in records:
        r = r if isinstance(r, dict) else r.to_dict()
        if r.get("status") == "oom":
            size = (r.get("model_size_bytes") or 0) / 1e6
            raise OndeviceError(f"{r.get('model')} ({size:.1f} MB) ran out of memory under the device profile "
                                f"{r.get('profile')!r}: it does not fit that device; use a profile with more "
                                f"memory or a smaller model")
        if r.get("status") != "ok":
            raise OndeviceError(f"the bench of {r.get('model')} failed ({r.get('status')}): {r.get('error')}")
        kind = "tg" if str(r["test"]).startswith("tg") else "pp"
        out[kind], out[f"{kind}_std"] = r["tps_mean"], r["tps_std"]
        out["noisy"] = out["noisy"] or bool(r.get("noisy"))
        out["load"] = r.get("load_avg_1m") or (r.get("meta") or {}).get("load_avg_before")
        out["peak_rss"] = max(out.get("peak_rss") or 0, r.get("peak_rss_bytes") or 0) or None
        out["rss_model"] = max(out.get("rss_model") or 0, r.get("rss_model_bytes") or 0) or None
        out["rss_anon"] = max(out.get("rss_anon") or 0, r.get("rss_anon_bytes") or 0) or None  # at the peak
        out["limits"] = (r.get("meta") or {}).get("limits")
    return out


def kld_of(records) -> dict:
    """``{"kld", "kld_err", "ppl", "ppl_err", "ppl_ref", "top1"}`` from the eval's ``kld:`` record (``ppl_ref``:
    the reference's perplexity on the same tokens)."""
    for r in records:
        r = r if isinstance(r, dict) else r.to_dict()
        if str(r.get("test", "")).startswith("kld:"):
            return {"kld": r["kld_mean"], "kld_err": r["kld_err"], "ppl": r["ppl"], "ppl_err": r.get("ppl_err"),
                    "ppl_ref": r.get("ppl_ref"), "top1": r["top1_agree"], "n_scored": r["n_scored"]}
    raise OndeviceError("the eval returned no KLD record")


def score_of(records) -> dict:
    """``{"score", "coverage", "n_items", "categories"}`` from the eval's ``suite:`` record."""
    for r in records:
        r = r if isinstance(r, dict) else r.to_dict()
        if str(r.get("test", "")).startswith("suite:"):
            return {"score": r["score"], "coverage": r.get("coverage"), "n_items": r.get("n_items"),
                    "categories": r.get("categories")}
    raise OndeviceError("the eval returned no suite record")


# --- caches --------------------------------------------------------------------------------------------


def fit_dir() -> Path:
    from ..models.store import data_dir

    d = data_dir() / "fit"
    d.mkdir(parents=True, exist_ok=True)
    return d


@contextmanager
def _locked(path: Path):
    with open(path.with_suffix(".lock"), "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


class Cache:
    """One section of a JSON cache file: ``file[section][key] -> dict``, written atomically under a lock."""

    def __init__(self, path: Path, section: str):
        self.path, self.section = path, section

    def _read(self) -> dict:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}

    def get(self, key: str) -> dict | None:
        return self.entries().get(key)

    def entries(self) -> dict[str, dict]:
        """Every measurement of this section (key -> record)."""
        return self._read().get(self.section, {})

    def put(self, key: str, value: dict) -> None:
        from ..models.store import write_json

        with _locked(self.path):
            data = self._read()
            data.setdefault(self.section, {})[key] = value
            write_json(self.path, data)


def device_section(model_sha: str, threads: int, tests: tuple[str, ...], repetitions: int,
                   profile: dict | None = None) -> str:
    """The speed cache's section: machine and build, the model, the bench settings and the device profile
    (``DeviceProfile.to_dict()``; None for the host, whose sections stay as they were before profiles)."""
    from ..device.kernels import _key

    # "interleaved" (Meter.speeds): every file in one process, runs in turn; earlier fits' figures differ
    ident = f"{_key()}|{model_sha}|t{threads}|{','.join(tests)}|r{repetitions}|interleaved"
    if profile is not None:
        ident += "|profile=" + json.dumps(profile, sort_keys=True)
    return hashlib.sha256(ident.encode()).hexdigest()[:20]


QUALITY_VERSION = 2  # 2: eval's exact KLD (since 2026-12-06); the top-256 figures before were lower bounds, 16% low


def quality_section(ref_sha: str, text_sha: str, ctx: int, chunks: int) -> str:
    """The cache section of a quality measurement; figures of an older :data:`QUALITY_VERSION` are measured again."""
    return hashlib.sha256(f"{ref_sha}|{text_sha}|{ctx}|{chunks}|v{QUALITY_VERSION}".encode()).hexdigest()[:20]


# --- building and measuring ----------------------------------------------------------------------------


@dataclass
class Item:
    """One plan to measure: its KLD on each ``(cache, text, ctx, chunks)``, built with ``imatrix``; the file
    stays at ``keep`` when given (else it is deleted once measured). ``path``: a file that exists (the shipped
    one), measured as it is under the cache key ``name``: never built, never deleted."""

    plan: dict[str, str]
    quality: list[tuple[Cache, Path, int, int]] = field(default_factory=list)
    imatrix: Path | None = None
    imatrix_sha: str | None = None
    keep: Path | None = None
    path: Path | None = None
    name: str | None = None
    memory: bool = False  # also its peak RSS, alone in a process (``memory.memories``)

    @property
    def key(self) -> str:
        return self.name or plan_key(self.plan, self.imatrix_sha)

    @property
    def owned(self) -> bool:
        """Whether the meter makes this file and deletes it once measured."""
        return self.path is None and self.keep is None


@dataclass
class Meter:
    """Builds variants of ``source`` (the reference file) and measures them, with caches and a log.

    ``jobs`` KLD runs go at once (each a one-thread eval; llama.cpp releases the GIL), and a build overlaps
    another plan's eval: on 2 cores the sensitivity runs take about half the time. Benches never overlap
    anything. ``seen`` holds the ``(cache section, key)`` measured in this run (shared by every meter of
    one fit): those are reused even without ``resume``.

    Once :meth:`splicing` has built, per type, the variant with every group offered that type at it (from
    the same source and importance matrix), a plan is not quantized again but spliced from those files
    (``models.gguf_copy.splice``): llama.cpp quantizes each tensor on its own, so the tensors are the ones
    quantizing the plan would write (``tests/test_fit.py`` compares them). ``sources`` is shared by every
    meter of one fit.
    """

    source: Path
    layout: Layout
    ref: Path
    threads: int
    speed_cache: Cache
    workdir: Path
    say: Callable[[str], None]
    tests: tuple[str, ...] = ("pp128", "tg64")
    repetitions: int = REPETITIONS
    reprobe: bool = False
    resume: bool = False
    eval_threads: int = 1  # KLD does not depend on threads; one thread suffers least from busy cores
    jobs: int = 1
    seen: set = field(default_factory=set)
    profile: str | None = None  # a device profile spec the benches run under (None: the host)
    built: int = 0
    reused: int = 0
    spliced: int = 0
    sources: dict = field(default_factory=dict)  # (source, imatrix) -> {type: its all-type variant}
    noted: set = field(default_factory=set)  # the kinds of bench note said (``_notes``), shared like ``seen``

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._path_locks: dict[Path, threading.Lock] = {}

    def _count(self, attr: str) -> None:
        with self._lock:
            setattr(self, attr, getattr(self, attr) + 1)

    def build(self, plan: dict[str, str], dst: Path, imatrix: Path | None = None) -> Path:
        """Quantize the source to ``plan`` at ``dst`` (or splice it: :meth:`splicing`); the tensor types read
        back must be the plan's."""
        from ..engine.resources import physical_cores
        from ..quant.quantize import ftype_id, run_worker, weight_types

        tmp = dst.with_suffix(".tmp")
        want = self.layout.expected_types(plan)
        files = self._type_files(imatrix)
        spliced = BASE in files and all(t in files for t in set(want.values()))
        try:
            if spliced:
                splice(files[BASE], files, {n: t for n, t in want.items() if t != BASE}, tmp)
                self._count("spliced")
            else:  # quantizing is not measured: all cores, whatever the bench's thread count
                run_worker(self.source, tmp, ftype_id(BASE), self.layout.overrides(plan), False, physical_cores(),
                           imatrix=imatrix)
                self._count("built")
            got = weight_types(tmp, independent=not spliced)
        except BaseException:  # Ctrl-C or a failed build: no half-written file stays behind
            tmp.unlink(missing_ok=True)
            raise
        bad = {n: (got.get(n), t) for n, t in want.items() if got.get(n) != t}
        if bad:
            tmp.unlink(missing_ok=True)
            name, (g, t) = next(iter(bad.items()))
            raise OndeviceError(f"the quantizer did not follow the plan: {name} is {g}, planned {t} "
                                f"({len(bad)} tensors differ)")
        os.replace(tmp, dst)
        return dst

    @contextmanager
    def splicing(self, opts: dict[str, list[str]], imatrix: Path | None = None):
        """Within: every plan of the current source and ``imatrix`` that needs a build is spliced from one
        variant per type in ``opts`` (group -> its types, the base among them) with every group offered that
        type at it, built when a plan first needs one. After: those stay in use if they were built (until the
        fit ends, in the work folder); if nothing needed a build (a resumed fit), later plans are quantized."""
        key = (str(self.source), str(imatrix) if imatrix else None)
        self.sources[key] = {"opts": opts, "files": None, "lock": threading.RLock()}
        try:
            yield
        finally:
            if self.sources[key]["files"] is None:
                del self.sources[key]

    def _type_files(self, imatrix: Path | None) -> dict:
        """Type -> a ``gguf.GGUFReader`` of its variant (see :meth:`splicing`; read once: parsing the
        tokenizer's metadata takes seconds), or {} outside :meth:`splicing`."""
        entry = self.sources.get((str(self.source), str(imatrix) if imatrix else None))
        if entry is None:
            return {}
        with entry["lock"]:  # one thread builds them; the others wait, then splice
            if entry["files"] is None:
                entry["files"] = {}  # while they are built, their own builds quantize
                stamp = hashlib.sha256("|".join(f"{p}:{p.stat().st_mtime_ns}" for p in (Path(self.source), imatrix)
                                                if p).encode()).hexdigest()[:12]
                files = {}
                for t in dict.fromkeys(t for ts in entry["opts"].values() for t in ts):
                    dst = self.workdir / f"type-{stamp}-{t}.gguf"
                    if not dst.is_file():
                        self.build({g: t for g, ts in entry["opts"].items() if t in ts and t != BASE}, dst, imatrix)
                    files[t] = dst
                from gguf import GGUFReader

                entry["files"] = {t: GGUFReader(f) for t, f in files.items()}
            return entry["files"]

    def _ensure(self, it: Item, dst: Path) -> None:
        if it.path is not None:
            if not it.path.is_file():
                raise OndeviceError(f"{it.path} is gone: the file to measure as {it.key!r} must stay in place")
            return
        with self._lock:
            lock = self._path_locks.setdefault(dst, threading.Lock())
        with lock:
            if not dst.is_file():
                self.build(it.plan, dst, it.imatrix)

    def _speed_hit(self, key: str) -> dict | None:
        if self.reprobe and (self.speed_cache.section, key) not in self.seen:
            return None
        hit = self.speed_cache.get(key)
        kinds = {"tg" if str(t).startswith("tg") else "pp" for t in self.tests}
        return hit if hit is not None and kinds <= set(hit) else None  # an entry without a figure is no hit

    def speed(self, key: str, path: Path) -> dict:
        """Decode/prompt tok/s of the file at ``path`` (cached per device and build under ``key``)."""
        return self.speeds([(key, path)])[0]

    def speeds(self, files: list[tuple[str, Path]]) -> list[dict]:
        """:meth:`speed` of several files, measured together: one bench process loads them all and runs each
        repetition round the files in turn (``ondevice bench --interleave``); per file the figure
        :func:`paired` makes of the runs (``tg_runs``/``pp_runs``: every run), and its relative standard
        error (``tg_rse``/``pp_rse``: :func:`paired_rse`). This machine's speed drifts
        over seconds by far more than the files differ (SmolLM2 Q8_0, tg128: 100.6, 76.3, 78.1 tok/s in three
        processes, +-2 within each), and it is the moment, not the process: two copies of SmolLM2 in one
        process, 64-token generations alternated, moved together between 74 and 101 tok/s and their medians
        agreed within 3%. So files benched at different moments mislead; interleaved runs see the same
        moments.
        Under a device profile with a memory cap (a cap is per process) each file runs in a process of its
        own, once per round, the files in turn."""
        import statistics

        import ondevice

        out: list[dict | None] = [None] * len(files)
        todo = []
        for i, (key, _path) in enumerate(files):
            hit = self._speed_hit(key)
            if hit is not None:
                self._count("reused")
                out[i] = hit
            else:
                todo.append(i)
        if not todo:
            return out
        reps = max(1, self.repetitions)
        paths = {i: str(Path(files[i][1]).resolve()) for i in todo}
        kw = {"threads": self.threads, "store": False, "roofline": False,
              **({"profile": [self.profile]} if self.profile else {})}
        runs = ([([paths[i]], 1) for _round in range(reps) for i in todo] if self._capped()
                else [([paths[i] for i in todo], reps)])
        batches = []
        for group, n in runs:
            batches.append(ondevice.bench(group, ",".join(self.tests), repetitions=n, print_notes=False,
                                          **({"interleave": True} if len(group) > 1 else {}), **kw))
            self._notes(batches[-1].notes)
            if batches[-1].interrupted:  # Ctrl-C stopped the bench: nothing half-measured goes to the cache
                raise KeyboardInterrupt
        recs: dict[str, list] = {paths[i]: [] for i in todo}
        for batch in batches:
            for r in batch:
                r = r if isinstance(r, dict) else r.to_dict()
                recs[r["model_path"]].append(r)
        res = {i: speed_of(recs[paths[i]]) for i in todo}  # a failed or out-of-memory bench raises here
        for kind in ("tg", "pp"):
            runs = {i: [v for r in recs[paths[i]] if str(r["test"]).startswith(kind)
                        for v in r.get("tps_samples") or []] for i in todo}
            figs, rses = paired([runs[i] for i in todo]), paired_rse([runs[i] for i in todo])
            for i, fig, rse in zip(todo, figs, rses):
                if runs[i]:
                    std = statistics.stdev(runs[i]) if len(runs[i]) > 1 else res[i][f"{kind}_std"]
                    res[i].update({kind: fig, f"{kind}_runs": runs[i], f"{kind}_std": std, f"{kind}_rse": rse})
        for i in todo:
            self.speed_cache.put(files[i][0], res[i])
            self.seen.add((self.speed_cache.section, files[i][0]))
            out[i] = res[i]
        return out

    def _notes(self, notes) -> None:
        """Say each kind of bench note once per fit (a memory-capped fit benches a process per variant and round,
        and each would repeat the same note about the page cache): the kind is the note without its test name
        and figures."""
        for n in notes:
            kind = re.sub(r"[0-9.]+", "#", n.split(": ", 1)[-1])
            with self._lock:
                if kind in self.noted:
                    continue
                self.noted.add(kind)
            self.say(f"  bench note (said once): {n}")

    def _capped(self) -> bool:
        from ..device import parse_profile

        return bool(self.profile) and parse_profile(self.profile).mem_limit_bytes is not None

    def _kld_hit(self, cache: Cache, key: str) -> dict | None:
        return cache.get(key) if self.resume or (cache.section, key) in self.seen else None

    def kld(self, cache: Cache, key: str, path: Path, text: Path, ctx: int, chunks: int) -> dict:
        """KLD of ``path`` against the reference on ``text`` (cached; reused when resuming or seen this run)."""
        hit = self._kld_hit(cache, key)
        if hit is not None:
            self._count("reused")
            return hit
        import ondevice

        from ..errors import InvalidArgument

        try:
            res = kld_of(ondevice.evaluate(str(path), ref=str(self.ref), text=str(text), ctx=ctx, chunks=chunks,
                                           threads=self.eval_threads, store=False))
        except InvalidArgument as e:  # eval's flags are not fit's: a text too short names the fit's own
            part = "calib" if text.stem.endswith("-calib") else "eval"
            raise InvalidArgument(str(e).replace("--ctx", f"--{part}-ctx").replace("a longer text", "a longer "
                                  "--text (each of its first and last thirds)")) from None
        cache.put(key, res)
        self.seen.add((cache.section, key))
        return res

    def score(self, cache: Cache, key: str, path: Path, suite: str, limit: int | None) -> dict:
        """``suite``'s score of ``path`` on ``limit`` items (greedy; cached like :meth:`kld`)."""
        hit = self._kld_hit(cache, key)
        if hit is not None:
            self._count("reused")
            return hit
        import ondevice

        res = score_of(ondevice.evaluate(str(path), suite=suite, limit=limit, threads=self.eval_threads,
                                         store=False))
        cache.put(key, res)
        self.seen.add((cache.section, key))
        return res

    def measure(self, items: list[Item], *, speed: bool = False) -> list[dict]:
        """Measure several plans: their speeds when ``speed`` (:meth:`speeds`: in turn, nothing else runs while
        the bench times), their peak RSS where ``Item.memory`` (``memory.memories``), then their KLDs on ``jobs``
        threads. The files are built only when some figure is not cached. Returns per item ``{"speed": ...,
        "kld": [...], "file": path or None, "mem": {...} or None}``."""
        from .memory import mem_hit, memories

        paths = [it.path or it.keep or self.workdir / f"v-{hashlib.sha256(it.key.encode()).hexdigest()[:12]}.gguf"
                 for it in items]
        speeds: list[dict | None] = [None] * len(items)

        def quality(i: int) -> list[dict]:
            it, dst = items[i], paths[i]
            if any(self._kld_hit(c, it.key) is None for c, *_ in it.quality) or it.keep is not None:
                self._ensure(it, dst)
            try:
                return [self.kld(c, it.key, dst, t, ctx, n) for c, t, ctx, n in it.quality]
            finally:
                if it.owned:  # free the disk early: the other plans are still being built
                    dst.unlink(missing_ok=True)

        try:
            for i, it in enumerate(items):
                need_s = speed and self._speed_hit(it.key) is None
                need_q = any(self._kld_hit(c, it.key) is None for c, *_ in it.quality)
                need_m = it.memory and mem_hit(self, it.key) is None
                if need_s or need_q or need_m:
                    self.say(f"  measuring {it.key}" + (" (speed)" if need_s else "") + (" (KLD)" if need_q else "")
                             + (" (memory)" if need_m else ""))
                if need_s or need_m:
                    self._ensure(it, paths[i])
            if speed:  # all built first, then benched in turn (see speeds)
                speeds = self.speeds([(it.key, path) for it, path in zip(items, paths)])
            mine = [i for i, it in enumerate(items) if it.memory]  # after the speeds: nothing overlaps a bench
            mems = dict(zip(mine, memories(self, [(items[i].key, paths[i]) for i in mine], [speeds[i] for i in mine])))
            with ThreadPoolExecutor(max(1, self.jobs)) as ex:
                klds = list(ex.map(quality, range(len(items))))
        finally:
            for it, dst in zip(items, paths):
                if it.owned:
                    dst.unlink(missing_ok=True)
        return [{"speed": s, "kld": k, "file": it.keep, "mem": mems.get(i)}
                for i, (s, k, it) in enumerate(zip(speeds, klds, items))]

    def variant(self, plan: dict[str, str], *, speed: bool, quality: list[tuple[Cache, Path, int, int]],
                imatrix: Path | None = None, imatrix_sha: str | None = None, keep: Path | None = None) -> dict:
        """Measure one plan (see :meth:`measure`)."""
        return self.measure([Item(plan, quality, imatrix, imatrix_sha, keep)], speed=speed)[0]
