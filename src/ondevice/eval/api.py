"""``ondevice.evaluate``: perplexity, KL divergence against a reference variant, and task suites.

Every summary is returned as a record and written to the SQLite store (``kind="eval"``) with the model's
sha256, so quality joins speed (``kind="bench"``) on the exact file. Record fields the report reads:
``ppl``, ``ppl_err`` (``ppl:<corpus>``); ``kld_mean``, ``kld_p99``, ``top1_agree``, ``dppl`` (``kld:<corpus>``);
``score`` in 0..1, ``coverage``, ``categories`` (``suite:<name>``); and on every record ``model``,
``model_sha256``, ``file_size`` and the variant's lineage (``family``, ``family_sha256``, ``variant_type``:
the root of its ``ondevice quantize`` provenance chain and the type it was made as), which is how the
report finds the F16 a quantized variant is compared with.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .. import fields
from ..models.gguf_split import total_size
from .config import EvalConfig
from .record import EvalRecord


def model_sha256(ref) -> str:
    """sha256 of a resolved model's file (cached per path, size and mtime)."""
    from ..models.store import cached_sha256

    return cached_sha256(ref.path)


def _config_key(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _base(ref, sha: str) -> dict:
    import llama_cpp

    from .. import __version__
    from ..store.record import created_now

    return {"model": ref.name, "model_path": str(ref.path), "model_sha256": sha,
            "file_size": total_size(ref.path), "ondevice": __version__,
            "llama_cpp_python": llama_cpp.__version__, "created": created_now()}


def make_config(config: EvalConfig | None = None, **settings: Any) -> EvalConfig:
    """``config`` (default: from ``ONDEVICE_EVAL_*`` and the defaults) with ``settings`` over it; a bad value
    is an InvalidArgument naming the flag."""
    from ..config import config_from

    if config is not None:
        settings = {**config.model_dump(exclude_unset=True), **settings}
    return config_from(EvalConfig, verb="eval", what="eval settings", **settings)


def evaluate(model: str | os.PathLike[str] | None = None, config: EvalConfig | None = None, *,
             store: bool | str | os.PathLike[str] = True, progress: Callable[[str], None] | bool | None = None,
             amx: str | None = None, repack: str | None = None, **settings: Any) -> list[EvalRecord]:
    """Evaluate ``model``; one :class:`EvalRecord` per measurement (also written to the store).

    Args:
        config: an :class:`EvalConfig` (the fields of ``ondevice eval``'s flags); ``settings`` override it:
        ppl: measure perplexity on ``corpus`` (``lee``, ``pydoc``) or the file ``text``.
        ctx, chunks: llama-perplexity's chunk size (None: ``ctx_size`` where given, else 512) and number of
            chunks (None: all the text holds).
        ref: a reference variant (e.g. the F16 file): adds KLD (exact: from both full distributions, as
            llama-perplexity's), top-1 agreement and ΔPPL against it. Implies ``ppl``. The reference's logits are
            cached in the data dir where they take at most 2 GiB.
        topk: keep only the reference's top-K log-probs per token (a small cache; the KLD is then a lower bound,
            ``kld_exact`` False; see :mod:`ondevice.eval.ppl`). None: the exact KLD.
        suite: a suite name (``assistant-en``, ``smartbench``, ``humaneval``) or a JSONL path.
        limit, seed: a stratified subset of the suite (and the sampling seed when ``temp > 0``).
        max_tokens: the reply budget per item (None: 512 for ``humaneval``, 256 for the other suites); answers it
            cut are counted in the record's ``n_truncated``.
        judge, judge_model, judge_key: an OpenAI-compatible endpoint that also grades the answers.
        ctx_size: the context window, as llama.cpp's ``-c``: the suite run's (0: the trained context where memory
            allows, see :mod:`ondevice.eval.window`; capped at it), and the perplexity chunk unless ``ctx`` says.
        strict: refuse a suite with an item that does not fit the window, instead of skipping it.
        threads, session, log_dir: threads (None: physical cores), the session id, where per-sample suite
            logs go (default: ``<data dir>/eval-logs``; with ``store=False`` only when ``log_dir`` is given).
        store: True (the default store), a path to another SQLite file, or False (do not record: nothing is
            written unless ``log_dir`` asks for the per-sample log).
        amx, repack: the extra CPU kernels of every load (the reference's too), "auto", "on" or "off"
            (``--amx``/``--repack``; None: ``ONDEVICE_AMX``/``ONDEVICE_REPACK``, else auto). Each record's
            ``kernels`` names those the model under test really used: they change the figures a little.
    """
    from ..engine.args import kernel_env

    with kernel_env(amx, repack):
        return _evaluate(model, make_config(config, **settings), store, progress)


def _evaluate(model, c: EvalConfig, store, progress) -> list[EvalRecord]:
    from ..errors import InvalidArgument
    from ..models.catalog import resolve

    model = fields.model_ref(model)
    mref = resolve(model)  # an unknown model is said first (nothing is loaded yet)
    if not (c.ppl or c.ref or c.suite or c.text):
        raise InvalidArgument("nothing to evaluate; ask for perplexity (--ppl; ppl=True), a reference model (--ref "
                              "MODEL; ref=...) and/or a suite (--suite NAME; suite=...)")
    if c.suite and c.judge and not c.judge_model:  # said before the model is loaded
        from .runner import NEEDS_JUDGE_MODEL

        raise InvalidArgument(NEEDS_JUDGE_MODEL)
    say = fields.progress_sink(progress)
    _ = mref.info  # validate before llama.cpp sees the file
    sha = model_sha256(mref)
    session = c.session or f"eval-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    base = {**_base(mref, sha), **lineage(sha, mref)}
    if c.adapter:  # checked against the model here; every load of the model below applies it
        from ..adapt.adapter_file import check
        from ..adapt.store import resolve as resolve_adapter
        from ..adapt.store import split_scale
        from ..models.store import cached_sha256

        spec, scale = split_scale(c.adapter)  # PATH[:SCALE]
        adapter = resolve_adapter(spec)  # a path or a stored adapter's name
        check(adapter, mref.path)
        base.update(adapter=str(adapter), adapter_sha256=cached_sha256(adapter),
                    **({"adapter_scale": scale} if scale != 1 else {}))
    records: list[dict] = []
    try:
        if c.ppl or c.ref or c.text:  # a text to measure (llama-perplexity's -f) is a perplexity asked for
            records += _ppl_records(mref, base, c.corpus, c.text, c.ppl_ctx, c.chunks, c.ref, c.topk, c.threads, say)
        if c.suite:
            records.append(_suite_record(mref, base, session, c.suite, c.limit, c.seed, c.max_tokens, c.temp,
                                         c.judge, c.judge_model, c.judge_key, c.threads, c.log_dir, say, c.ctx_size,
                                         c.strict, keep_log=bool(store) or c.log_dir is not None))
    except KeyboardInterrupt as e:  # Ctrl-C: the records already complete (a perplexity before a suite) are kept
        from .runner import Interrupted

        stop = e if isinstance(e, Interrupted) else Interrupted()
        if store and records:
            _store(store, session, records)
            stop.stored = [r["test"] for r in records]
        raise stop from None
    return _store(store, session, records) if store else [EvalRecord.from_dict({**r, "session": session})
                                                          for r in records]


def _adapters(base: dict) -> tuple[str, ...]:
    """The engine's adapter specs for the model under test: its adapter (at its scale), or none."""
    if not base.get("adapter"):
        return ()
    scale = base.get("adapter_scale")
    return (base["adapter"] + ("" if scale is None else f":{scale!r}"),)


def _store(store: bool | str | os.PathLike[str], session: str, records: list[dict]) -> list[EvalRecord]:
    """Write complete records to the store (True: the default one); the typed records."""
    from ..store import Store

    typed = [EvalRecord.from_dict({**r, "session": session}) for r in records]
    with Store(None if store is True else store) as db:
        for r, d in zip(typed, records):
            cfg = {k: d.get(k) for k in ("test", "model_sha256", "n_ctx", "n_chunks", "ref_sha256", "topk",
                                         "limit", "seed", "max_tokens", "temp")}
            cfg["corpus_sha256"] = (r.corpus or {}).get("sha256")
            for k in ("adapter_sha256", "adapter_scale"):  # only then: the keys of runs without stay as they were
                if d.get(k) is not None:
                    cfg[k] = d[k]
            db.add("eval", r.to_dict(), session=session, config_key=_config_key(cfg), model=r.model,
                   model_sha256=r.model_sha256, test=r.test)
    return typed


def _ppl_records(mref, base, corpus, text, ctx, chunks, ref, topk, threads, say) -> list[dict]:
    from ..engine.base import EngineConfig
    from ..engine.llama import LlamaEngine
    from ..errors import InvalidArgument, NonFiniteLogits
    from ..models.catalog import resolve
    from ..models.store import data_dir
    from . import ppl as P
    from .corpora import load_corpus

    trained = mref.info.context_length
    if trained and ctx > trained:
        raise InvalidArgument(f"--ctx/-c {ctx} (the perplexity chunk) is above {mref.name}'s trained context "
                              f"({trained}); use {trained} or less")
    text_corpus = load_corpus(corpus, text)
    cfg = EngineConfig(n_ctx=ctx, n_threads=threads, warmup=False,  # timings are not measured here
                       adapters=_adapters(base))
    ref_cfg = dataclasses.replace(cfg, adapters=())  # an adapter belongs to the model under test, not the reference
    say(f"corpus {text_corpus.name}: {text_corpus.chars} chars, sha256 {text_corpus.sha256[:12]}")
    if not ref:
        eng = LlamaEngine(mref.path, cfg)
        try:
            res = P.perplexity(eng, text_corpus, ctx, chunks)
        finally:
            eng.close()
        return [{**base, "test": f"ppl:{text_corpus.name}", **res, "threads": eng.n_threads,
                 "kernels": eng.kernels_used}]
    rref = resolve(ref)
    _ = rref.info  # validate
    rsha = model_sha256(rref)
    cache_dir = data_dir() / "eval-cache"
    cache = (P.cache_path(cache_dir, rsha, text_corpus, ctx, topk) if topk
             else P.full_cache_path(cache_dir, rsha, text_corpus, ctx))
    reng = None
    try:
        # The reference is only loaded when the cache cannot answer.
        probe = LlamaEngine(mref.path, cfg)
        try:
            tokens = P.corpus_tokens(probe, text_corpus)
            n_chunks = len(P.make_chunks(tokens, ctx, chunks, None))
            per = ctx - 1 - ctx // 2
            if topk:
                hit = P.load_ref(cache, n_chunks, per)
                hit = hit if hit is not None and list(hit[1]) == list(tokens) else None
            else:
                hit = P.load_full_ref(cache, n_chunks, per, tokens, probe.n_vocab)
            cached = hit is not None
            if not cached:
                say(f"loading the reference {rref.name} ({n_chunks} chunks of {ctx})")
                reng = LlamaEngine(rref.path, ref_cfg)
            if not topk:  # the exact KLD: the reference's full rows, chunk by chunk
                say(f"scoring {mref.name} against {rref.name}'s full distributions"
                    + (" (cached reference)" if cached else ""))
                res = P.kl_divergence_exact(probe, text_corpus, ctx, chunks, ref_engine=reng, cached=hit,
                                            cache_file=cache, ref_name=rref.name)
                if not cached and not res["ref_cache_bytes"]:
                    say(f"the reference's rows ({4 * res['n_scored'] * probe.n_vocab / 1e9:.1f} GB) are over the "
                        f"cache's {P.FULL_CACHE_MAX_BYTES / 2**30:g} GiB: not cached, the reference runs every time")
            else:
                if cached:
                    ref_rows, ref_tokens = hit[0], list(hit[1])
                else:
                    try:
                        ref_rows, ref_tokens, n_chunks, _ = P.reference_rows(reng, text_corpus, ctx, chunks, topk,
                                                                             cache)
                    except NonFiniteLogits:
                        raise NonFiniteLogits(f"logits as the reference ({rref.name})") from None
                    reng.close()  # the compact rows are all it needs: free its memory before the model runs
                    reng = None
                say(f"scoring {mref.name} against {rref.name}'s top-{topk}" + (" (cached reference)" if cached
                                                                                 else ""))
                res = P.kl_divergence(probe, ref_rows, ref_tokens, text_corpus, ctx, n_chunks)
            threads_used, kernels = probe.n_threads, probe.kernels_used
        finally:
            probe.close()
    finally:
        if reng is not None:
            reng.close()
    ref_fields = {"ref_model": rref.name, "ref_sha256": rsha, "ref_file_size": total_size(rref.path),
                  "ref_cache": str(cache) if cached or res.get("ref_cache_bytes", 1) else None, "ref_cached": cached,
                  "threads": threads_used, "kernels": kernels}
    ppl_keys = ("ppl", "ppl_err", "nll_mean", "n_scored", "corpus", "corpus_tokens", "n_ctx", "n_chunks", "time_s")
    return [{**base, "test": f"ppl:{text_corpus.name}", **{k: res[k] for k in ppl_keys}, "threads": threads_used,
             "kernels": kernels},
            {**base, "test": f"kld:{text_corpus.name}", **res, **ref_fields}]


def lineage(sha: str, mref) -> dict:
    """The family a variant belongs to: follow ``source_sha256`` through the store's provenance sidecars
    to the first file that was not made by ``ondevice quantize`` (the shipped model)."""
    from ..models.catalog import read_provenance, store_variants

    made = {}  # sha256 -> (name, provenance) of every stored variant
    for name, path in store_variants().items():
        side = read_provenance(path) or {}
        if side.get("sha256"):
            made[side["sha256"]] = (name, side.get("provenance") or {})
    own = made.get(sha, (mref.name, {}))[1]
    name, cur, seen = mref.name, sha, set()
    while cur in made and made[cur][1].get("source_sha256") and cur not in seen:
        seen.add(cur)
        prov = made[cur][1]
        name, cur = prov.get("source", name), prov["source_sha256"]
    return {"family": name, "family_sha256": cur, "variant_type": own.get("type"), "quant": mref.info.quant_summary}


def _progress_line(i: int, n: int, row: dict) -> str:
    if row.get("skipped"):
        return f"  [{i}/{n}] {row['id']}: skipped ({row['skip_reason']})"
    return f"  [{i}/{n}] {row['id']}: {row['score']:.3f}"


def _suite_record(mref, base, session, suite, limit, seed, max_tokens, temp, judge, judge_model, judge_key,
                  threads, log_dir, say, ctx_size=0, strict=False, keep_log=True) -> dict:
    from ..engine import load
    from ..models.store import data_dir
    from .config import suite_max_tokens
    from .runner import run_suite
    from .suites import load_suite
    from .window import suite_window

    s = load_suite(suite, limit=limit, seed=seed)
    max_tokens = suite_max_tokens(str(suite), max_tokens)  # humaneval's code answers get a larger default
    win = suite_window(mref.info, ctx_size)
    if win.note:
        say(win.note)
    log_path = (Path(log_dir or data_dir() / "eval-logs") / f"{session}-{s.name}-{base['model_sha256'][:12]}.jsonl"
                if keep_log else None)
    model = load(str(mref.path), n_threads=threads, n_ctx=win.n_ctx,
                 adapters=_adapters(base))
    n_threads, n_ctx, kernels = model.engine.n_threads, model.engine.n_ctx, model.engine.kernels_used
    try:
        say(f"suite {s.name}: {len(s.items)} items on {mref.name} ({'chat template' if model.is_chat else 'plain'}, "
            f"context window {n_ctx} tokens)")
        summary = run_suite(model, s, max_tokens=max_tokens, temp=temp, seed=seed, log_path=log_path, judge=judge,
                            judge_model=judge_model, judge_key=judge_key, strict=strict,
                            progress=lambda i, n, row: say(_progress_line(i, n, row)))
    finally:
        model.close()
    return {**base, "test": f"suite:{s.name}", **summary, "limit": limit, "seed": seed, "max_tokens": max_tokens,
            "temp": temp, "chat_template": model.is_chat, "threads": n_threads, "kernels": kernels, "n_ctx": n_ctx,
            "n_ctx_requested": ctx_size, "n_ctx_train": win.n_ctx_train, "kv_bytes_est": win.kv_bytes}
