"""``ondevice.bench(...)``: the library door to sweeps; the CLI only parses flags into this call."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from ..errors import InvalidArgument
from .sweep import BenchResult, SweepParams, run_sweep
from .workloads import TestSpec, parse_tests

# pp512 + tg128 are llama-bench's defaults; tg128@d512 shows the cost of a filled KV cache and chat the
# TTFT of real prompts. r=5 like llama-bench. About 60-70 s on 2 cores for the 135M default model.
DEFAULT_TESTS = "pp512,tg128,tg128@d512,chat"


def _listify(v, default: list) -> list:
    if v is None:
        return list(default)
    if isinstance(v, (str, bytes)) or not isinstance(v, Iterable):
        return [v]
    out = list(v)
    return out or list(default)


def bench(models: str | Path | Iterable[str | Path | None] | None = None,
          tests: str | Iterable[str] | Iterable[TestSpec] | None = None, *,
          threads: int | Iterable[int] | None = None,
          repetitions: int = 5,
          n_batch: int | Iterable[int] | None = None,
          n_ubatch: int | Iterable[int] | None = None,
          n_ctx: int | Iterable[int] | None = None,
          type_k: str | Iterable[str] | None = None,
          type_v: str | Iterable[str] | None = None,
          flash_attn: bool | Iterable[bool] | None = None,
          profile: str | Iterable[str] | None = None,
          store: bool | str | Path | object = True,
          session: str | None = None,
          resume: bool = False,
          warmup: bool = True,
          seed: int = 42,
          progress: bool = False,
          roofline: bool = True,
          reprobe: bool = False,
          wait_idle: float = 0.0) -> BenchResult:
    """Benchmark models on this device and return one :class:`BenchRecord` per configuration and test.

    Args:
        models: model names, stored variants or .gguf paths (None: the default embedded model).
        tests: specs like ``"pp512,tg128,pg512,128,tg128@d1024,chat"`` (default: pp512, tg128,
            tg128@d512, chat).
        threads, n_batch, n_ubatch, n_ctx, type_k, type_v, flash_attn, profile: a value or a list to
            sweep (llama-bench's -t, -b, -ub, -c, -ctk, -ctv, -fa; profile is ``--profile``).
        repetitions: timed runs per test after one warm-up (mean ± std over these).
        store: True for the default store, a path, a ``Store``, or False to keep records in memory only.
        session: the session id to record under (default: a new one; with ``resume``: the latest).
        resume: skip configurations already recorded (status ok/oom) in ``session``.
        roofline: compute % of roofline (probes the machine once per thread count, then cached).
        reprobe: measure the machine again instead of using the cached probe (after a change of hardware,
            power settings or background load).
        wait_idle: before each configuration wait, at most this many seconds, until other processes leave
            the CPU quiet (0: do not wait). Records are flagged ``noisy`` either way when they are.

    Returns:
        A list of ``BenchRecord`` (``BenchResult``, with ``.session`` and ``.interrupted``).
    """
    from ..store import Store

    specs = parse_tests(DEFAULT_TESTS if tests is None else
                        [t.name if isinstance(t, TestSpec) else t for t in _listify(tests, [])])
    params = SweepParams(
        models=[str(m) if m is not None else None for m in _listify(models, [None])],
        tests=specs,
        threads=[int(t) if t else None for t in _listify(threads, [None])],
        n_batch=[int(x) for x in _listify(n_batch, [2048])],
        n_ubatch=[int(x) for x in _listify(n_ubatch, [512])],
        n_ctx=[int(x) for x in _listify(n_ctx, [0])],
        type_k=[str(x) for x in _listify(type_k, ["f16"])],
        type_v=[str(x) for x in _listify(type_v, ["f16"])],
        flash_attn=[bool(x) for x in _listify(flash_attn, [False])],
        profiles=[p or None for p in _listify(profile, [None])],
        repetitions=int(repetitions), warmup=warmup, seed=seed, wait_idle=float(wait_idle or 0),
    )
    if resume and store is False:
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
        return run_sweep(params, store=st, session=session, resume=resume, progress=progress, roofline=roofline,
                         reprobe=reprobe)
    finally:
        if own is not None:
            own.close()
