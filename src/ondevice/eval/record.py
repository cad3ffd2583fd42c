"""The eval summary record: one frozen, typed record per measurement (``ppl:``, ``kld:``, ``suite:`` tests).

``ondevice.evaluate`` returns them; the store and ``--json`` hold their flat dicts (``to_dict``: the fields of
its kind, the unset ones left out, as the dicts were written before), and stored dicts read back with
``EvalRecord.from_dict`` (see :mod:`ondevice.store.record`). The model's identity and lineage (``family``,
``family_sha256``, ``variant_type``) are on every record: quality joins speed on ``model_sha256``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from ..store.record import FlatRecord


@dataclass(frozen=True, slots=True)
class EvalRecord(FlatRecord):
    """One eval measurement; only the fields of its kind (``test``'s prefix) are set."""

    # every record
    test: str = ""  # "ppl:<corpus>" | "kld:<corpus>" | "suite:<name>"
    model: str = ""
    model_sha256: str = ""
    model_path: str | None = None
    file_size: int | None = None
    session: str | None = None
    created: str | float | None = None  # ISO 8601 UTC (store.record.created_now); before 2026-12-03 time.time()
    kind: str = "eval"
    ondevice: str | None = None
    llama_cpp_python: str | None = None
    family: str | None = None  # the shipped model this variant was made from
    family_sha256: str | None = None
    variant_type: str | None = None  # the type `ondevice quantize` made it as (None: shipped)
    quant: str | None = None
    adapter: str | None = None  # a LoRA adapter applied to the model under test (`eval --adapter`)
    adapter_sha256: str | None = None
    adapter_scale: float | None = None  # the scale it was applied at (`--adapter FILE:SCALE`); None: 1, as trained
    threads: int | None = None
    kernels: str | None = None  # the extra CPU buffer types the model under test used ("none": plain CPU), as bench's
    n_ctx: int | None = None  # ppl/kld: the chunk size; suites: the context window
    time_s: float | None = None
    # ppl: and kld:
    ppl: float | None = None
    ppl_err: float | None = None
    nll_mean: float | None = None
    n_scored: int | None = None  # tokens scored (ppl/kld) or items scored (suites)
    corpus: dict | None = None
    corpus_tokens: int | None = None
    n_chunks: int | None = None
    # kld: against a reference variant
    ref_model: str | None = None
    ref_sha256: str | None = None
    ref_file_size: int | None = None
    ref_cache: str | None = None
    ref_cached: bool | None = None
    ref_cache_bytes: int | None = None  # the reference's full rows in ref_cache (0: over the cap, none kept)
    topk: int | None = None  # only the reference's top-k log-probs were kept (None: the full distribution)
    kld_exact: bool | None = None  # False: kld_* are lower bounds (coarse-grained over the reference's top-k)
    ppl_ref: float | None = None
    ppl_ref_err: float | None = None
    dppl: float | None = None
    dppl_err: float | None = None
    ln_ppl_ratio: float | None = None
    ln_ppl_ratio_err: float | None = None
    kld_mean: float | None = None
    kld_err: float | None = None
    kld_median: float | None = None
    kld_p99: float | None = None
    kld_max: float | None = None
    ref_tail_mass_mean: float | None = None
    top1_agree: float | None = None
    top1_err: float | None = None
    dp_rms: float | None = None
    dp_rms_err: float | None = None
    # suite:
    suite: str | None = None
    n_items: int | None = None
    n_skipped: int | None = None
    coverage: float | None = None  # share of the items that fit the window
    score: float | None = None  # 0..1, over the items scored
    score_stderr: float | None = None  # standard error of score (per-task stdev / sqrt(n), over the task means)
    score_skipped_as_0: float | None = None
    n_truncated: int | None = None  # answers cut by max_tokens (finish_reason "length")
    score_micro: float | None = None
    tasks: dict | None = None
    categories: dict | None = None
    skipped: tuple[dict, ...] | None = None
    decode_tps_mean: float | None = None
    ttft_s_median: float | None = None
    generated_tokens: int | None = None
    judge_mean: float | None = None
    judge_score: float | None = None
    judge_missing: int | None = None
    log: str | None = None
    limit: int | None = None
    seed: int | None = None
    max_tokens: int | None = None
    temp: float | None = None
    chat_template: bool | None = None
    n_ctx_requested: int | None = None
    n_ctx_train: int | None = None
    kv_bytes_est: int | None = None
    extra: dict = field(default_factory=dict)  # keys this version does not know, kept for the round trip

    _tuples: ClassVar[frozenset[str]] = frozenset({"skipped"})
    _ALWAYS: ClassVar[frozenset[str]] = frozenset({"test", "model", "model_sha256", "session", "kind", "family",
                                                   "family_sha256", "variant_type", "quant"})
    _SUITE_SETTINGS: ClassVar[frozenset[str]] = frozenset({"limit", "seed", "max_tokens", "temp", "coverage",
                                                           "score", "decode_tps_mean", "ttft_s_median"})

    def _keep(self, name: str, value: Any) -> bool:
        """Unset fields are left out, except identity and a suite's settings and headline figures (None is a
        value there: no limit, nothing scored)."""
        return value is not None or name in self._ALWAYS or (self.is_suite and name in self._SUITE_SETTINGS)

    @property
    def is_suite(self) -> bool:
        return self.test.startswith("suite:")
