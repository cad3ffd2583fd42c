"""``ondevice.bench(...)``: the library door to sweeps; the CLI only parses flags into this call."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from .. import fields
from ..config import config_from
from ..errors import InvalidArgument
from .config import DEFAULT_TESTS, FLAGS, BenchConfig
from .record import BenchRecord
from .sweep import BenchResult, run_sweep
from .workloads import TestSpec

__all__ = ["DEFAULT_TESTS", "BenchConfig", "bench", "make_config"]


def make_config(config: BenchConfig | None = None, **settings: Any) -> BenchConfig:
    """``config`` (default: from ``ONDEVICE_BENCH_*`` and the defaults) with ``settings`` over it; a bad value
    is an InvalidArgument naming the flag."""
    if config is not None:
        settings = {**config.model_dump(exclude_unset=True), **settings}
    return config_from(BenchConfig, verb="bench", what="bench settings", flags=FLAGS, **settings)


def bench(models: str | Path | Iterable[str | Path | None] | None = None,
          tests: str | Iterable[str] | Iterable[TestSpec] | None = None,
          config: BenchConfig | None = None, *,
          store: bool | str | Path | object = True,
          progress: bool = False,
          print_notes: bool = True,
          on_record: Callable[[BenchRecord], None] | None = None,
          amx: str | None = None, repack: str | None = None,
          **settings: Any) -> BenchResult:
    """Benchmark models on this device and return one :class:`BenchRecord` per configuration and test.

    Args:
        models: model names, stored variants or .gguf paths (None: the default embedded model).
        tests: specs like ``"pp512,tg128,pg512,128,tg128@d1024,chat"`` (default: pp512, tg128,
            tg128@d512, chat).
        config: a :class:`BenchConfig` (the fields of ``ondevice bench``'s flags); ``settings`` override it.
        store: True for the default store, a path, a ``Store``, or False to keep records in memory only.
        progress: a progress bar on stderr.
        print_notes: print the sweep's notes on its figures on stderr (they are in ``result.notes`` either way).
        on_record: called with each record as it is stored (a resumed session's stored ones too), in sweep order.
        amx, repack: the extra CPU kernels, "auto", "on" or "off" (``--amx``/``--repack``; None: ``ONDEVICE_AMX``/
            ``ONDEVICE_REPACK``, else auto); each record's ``kernels`` names those its load really used.
        settings: any :class:`BenchConfig` field, a value or a list to sweep: ``threads``, ``n_batch``,
            ``n_ubatch``, ``n_ctx``, ``type_k``, ``type_v``, ``flash_attn``, ``profile`` (llama-bench's -t, -b,
            -ub, -c, -ctk, -ctv, -fa; ``--profile``); ``repetitions``, ``warmup``, ``seed``; ``session``,
            ``resume`` (skip configurations stored in ``session``, default the latest); ``roofline``,
            ``reprobe``; ``wait_idle`` (seconds to wait at most for a quiet machine before each configuration;
            records are flagged ``noisy`` either way).

    Returns:
        A list of ``BenchRecord`` (``BenchResult``, with ``.session`` and ``.interrupted``).
    """
    from ..store import Store

    params = [p for p in inspect.signature(bench).parameters if p != "settings"]  # a typo's hint names them too
    if err := fields.unknown("ondevice.bench()", settings, {*params, *BenchConfig.model_fields}):
        raise err
    if models is not None:
        models = fields.model_ref(models)
        if not isinstance(models, (str, Path, Iterable)):
            raise InvalidArgument(f"ondevice.bench(): models={models!r} is not a name or a path; give a catalog name, "
                                  f"a stored variant's name, a .gguf path, or a list of them")
        settings["models"] = [str(fields.model_ref(m)) for m in ([models] if isinstance(models, (str, Path))
                                                                  else models) if m is not None]
    if tests is not None:
        settings["tests"] = [tests] if isinstance(tests, str) else [t.name if isinstance(t, TestSpec) else t
                                                                     for t in tests]
    cfg = make_config(config, **settings)
    if cfg.resume and store is False:
        raise InvalidArgument("resume needs the store; drop store=False (or --no-store)")
    own = None
    if store is True:
        own = st = Store()
    elif store is False or store is None:
        st = None
    elif isinstance(store, (str, Path)):
        own = st = Store(store)
    else:
        st = store
    try:
        from ..engine.args import kernel_env

        with kernel_env(amx, repack):  # the workers read them from their environment
            return run_sweep(cfg, store=st, progress=progress, print_notes=print_notes, on_record=on_record)
    finally:
        if own is not None:
            own.close()
