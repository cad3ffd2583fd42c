"""llama-bench's field names beside ours in ``bench``'s csv, json, jsonl and sql exports.

``ondevice bench -o json`` takes llama-bench's ``-o`` names, so scripts written for llama-bench's output
(``jq '.[].avg_ts'``, a pandas table of ``n_prompt``/``n_gen``/``avg_ts``) read ours too; llama.cpp's
``scripts/compare-llama-bench.py`` is not claimed (it joins rows on ``flash_attn``, which stays ours). Each
record keeps its own fields; the llama-bench fields it lacks are added with llama-bench's meaning and encoding:
its figures (``avg_ts``, ``stddev_ts``, ``avg_ns``, ``stddev_ns``, ``samples_ts``, ``samples_ns``), the model
(``model_type`` is llama.cpp's own ``llama_model_desc``, as llama-bench prints it), the build (``build_commit``:
``ondevice-<version>+llama-cpp-python-<version>-<hash of llama.cpp's build line>``, so rows group by build as
llama-bench's do by commit; ``build_number`` is 0, llama-cpp-python does not report it), the CPU, and its
GPU and placement settings at the values llama-bench writes when they are not given (everything here runs on
the CPU). Two names stay ours: ``flash_attn`` (true/false, null for auto; llama-bench writes 1/0/-1) and
``repack`` (auto/on/off as asked; the kernels used are in ``kernels``).
"""

from __future__ import annotations

import statistics
from datetime import UTC, datetime

from .machines import build_commit

# llama-bench's fields with one value here: its defaults for GPU, placement and loading flags (CPU only)
FIXED = {"gpu_info": "", "backends": "CPU", "n_gpu_layers": -1, "n_cpu_moe": 0, "cpu_mask": "0x0",
         "cpu_strict": False, "poll": 50, "split_mode": "layer", "main_gpu": 0, "no_kv_offload": False,
         "devices": "auto", "tensor_split": "0.00", "tensor_buft_overrides": "none", "load_mode": "auto",
         "lazy_mode": "auto", "embeddings": False, "no_op_offload": 0, "no_host": False, "fit_target": 0,
         "fit_min_ctx": 0}


def _test_time(created: str | None) -> str | None:
    """llama-bench's ``test_time``: UTC, to the second, with a Z."""
    if not created:
        return None
    return datetime.fromisoformat(created).astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def fields(r: dict) -> dict:
    """The llama-bench fields of the bench record ``r`` (a stored dict) that it does not have already."""
    meta = r.get("meta") or {}
    times = [t for t in r.get("time_s_samples") or [] if t is not None]
    out = {
        "build_commit": build_commit(meta), "build_number": 0,
        "cpu_info": meta.get("cpu_model"), **FIXED,
        "model_filename": r.get("model_path"), "model_type": meta.get("model_desc"),
        "model_size": r.get("model_tensor_bytes"), "model_n_params": r.get("model_params"),
        "n_threads": r.get("threads"),
        "test_time": _test_time(r.get("created")),
        "avg_ns": round(statistics.fmean(times) * 1e9) if times else None,
        "stddev_ns": round(statistics.stdev(times) * 1e9) if len(times) > 1 else (0 if times else None),
        "avg_ts": r.get("tps_mean"), "stddev_ts": r.get("tps_std"),
        "samples_ns": [round(t * 1e9) for t in times] if times else None, "samples_ts": r.get("tps_samples"),
    }
    return {k: v for k, v in out.items() if k not in r}


def strip(r: dict) -> dict:
    """``r`` read back from one of our exports without the llama-bench fields :func:`fields` added (they are
    derived); a row another tool wrote is returned as it is."""
    if not str(r.get("build_commit", "")).startswith("ondevice-"):
        return r
    from ..bench.record import BenchRecord

    ours = set(BenchRecord._names())
    added = set(fields({"meta": {}})) - ours
    return {k: v for k, v in r.items() if k not in added}
