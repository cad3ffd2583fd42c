"""The bench record: one frozen, typed row per (configuration, test), like the engine's ``Generation``.

Stored as its flat JSON dict (``to_dict``) in SQLite and in every export, so files written before this
class existed read back with ``BenchRecord.from_dict`` (see :mod:`ondevice.store.record`).
Units are in the names: ``_s`` seconds, ``_ms``, ``_bytes``, ``_j``, ``tps`` tokens per second.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

from ..store.record import FlatRecord


@dataclass(frozen=True, slots=True)
class BenchRecord(FlatRecord):
    """One test of one configuration; the metrics are None unless ``status`` is "ok"."""

    # identity and configuration (every record)
    schema: int = 1
    kind: str = "bench"
    session: str = ""
    config_key: str = ""
    status: str = "ok"  # ok | oom | error
    error: str | None = None
    created: str = ""  # ISO 8601, UTC
    model: str = ""
    model_path: str | None = None
    model_sha256: str = ""
    model_size_bytes: int | None = None  # the file
    model_tensor_bytes: int | None = None  # its tensors' data: llama-bench's "size" (no header, no padding)
    model_params: int | None = None
    model_arch: str | None = None
    model_quant: str | None = None
    test: str = ""
    workload: str | None = None  # pp | tg | pg | chat | ...
    n_prompt: int = 0
    n_gen: int = 0
    n_depth: int = 0
    threads: int | None = None
    n_batch: int = 2048
    n_ubatch: int = 512
    n_ctx: int | None = None  # what the worker really used
    n_ctx_requested: int = 0  # 0: just enough for the tests
    type_k: str = "f16"
    type_v: str = "f16"
    flash_attn: bool | None = None  # None: auto (llama.cpp decides; on for CPUs), as `ondevice run` loads
    profile: str = "host"
    repetitions: int | None = None
    amx: str | None = None  # kernels asked for (auto/on/off)
    repack: str | None = None
    kernels: str | None = None  # the extra CPU buffer types the load really used ("none": plain CPU)
    load_time_s: float | None = None
    load_peak_rss_bytes: int | None = None
    roofline_pct: float | None = None
    roofline_bound: str | None = None  # memory | compute
    roofline: dict | None = None
    settings: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)
    # metrics (status "ok")
    tps_mean: float | None = None
    tps_std: float | None = None
    tps_samples: tuple[float, ...] | None = None
    avg_s: float | None = None
    time_s_samples: tuple[float, ...] | None = None
    ttft_s_mean: float | None = None
    ttft_s_std: float | None = None
    ttft_s_samples: tuple[float, ...] | None = None
    prefill_tps_mean: float | None = None
    prefill_tps_std: float | None = None
    decode_tps_mean: float | None = None
    decode_tps_std: float | None = None
    itl_ms_p50: float | None = None
    itl_ms_p90: float | None = None
    itl_ms_p99: float | None = None
    itl_ms_mean: float | None = None
    peak_rss_bytes: int | None = None
    rss_file_bytes: int | None = None
    rss_anon_bytes: int | None = None
    process_max_rss_bytes: int | None = None
    cpu_time_s: float | None = None
    cpu_user_s: float | None = None
    cpu_sys_s: float | None = None
    cpu_utilisation: float | None = None
    measured_wall_s: float | None = None
    energy_j: float | None = None
    energy_j_per_token: float | None = None
    energy_method: str | None = None  # rapl | hwmon-energy | hwmon-power | battery | estimated
    energy_scope: str | None = None
    energy_watts_per_core: float | None = None
    tokens_note: str | None = None
    rss_model_bytes: int | None = None
    load: float | None = None  # cores other processes kept busy during the timed runs
    load_avg_1m: float | None = None
    noisy: bool = False
    noise: tuple[str, ...] = ()  # why not to trust it; () when clean
    prompt_lengths: tuple[float, ...] | None = None  # chat tests: each conversation's prompt tokens
    extra: dict = field(default_factory=dict)  # keys this version does not know, kept for the round trip

    _tuples: ClassVar[frozenset[str]] = frozenset({"tps_samples", "time_s_samples", "ttft_s_samples", "noise",
                                                   "prompt_lengths"})

    def _keep(self, name: str, value: Any) -> bool:
        """Metrics only on "ok" records, optional keys only when set (as the dicts were written before)."""
        if name in METRIC_FIELDS and self.status != "ok":
            return False
        return not (name in _OPTIONAL and value is None)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def copy_index(self) -> int:
        """How many earlier records of its sweep are this same measurement: 0, or 1, 2, ... for a byte-identical
        file given again with -m, the same file twice, -t 1,1 (``bench.sweep.Config.copies``)."""
        return int(self.settings.get("copy", 0))


_NAMES = tuple(f.name for f in fields(BenchRecord))
# written only when set (older records lack them)
_OPTIONAL = {"amx", "repack", "prompt_lengths", "model_tensor_bytes"}
# Keys of every record, whatever its status, and of every "ok" record.
RECORD_FIELDS = tuple(n for n in _NAMES[:_NAMES.index("tps_mean")] if n not in _OPTIONAL)
METRIC_FIELDS = tuple(n for n in _NAMES[_NAMES.index("tps_mean"):] if n not in ("prompt_lengths", "extra"))
