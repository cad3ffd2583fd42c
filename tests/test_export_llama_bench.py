"""``ondevice bench -o json|jsonl|csv|sql`` carries llama-bench's field names beside ours, so scripts written for
llama-bench's output read ours: the same keys, with llama-bench's meaning (checked against the real llama-bench
built from the same vendored llama.cpp where benchmarks/peers.py has built it)."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from ondevice.report import export, read

# the keys of llama-bench's -o json in llama.cpp as vendored by llama-cpp-python 0.3.36
LLAMA_BENCH_KEYS = {
    "build_commit", "build_number", "cpu_info", "gpu_info", "backends", "model_filename", "model_type", "model_size",
    "model_n_params", "n_batch", "n_ubatch", "n_threads", "cpu_mask", "cpu_strict", "poll", "type_k", "type_v",
    "n_gpu_layers", "n_cpu_moe", "split_mode", "main_gpu", "no_kv_offload", "flash_attn", "devices", "tensor_split",
    "tensor_buft_overrides", "load_mode", "lazy_mode", "embeddings", "no_op_offload", "no_host", "repack",
    "fit_target", "fit_min_ctx", "n_prompt", "n_gen", "n_depth", "test_time", "avg_ns", "stddev_ns", "avg_ts",
    "stddev_ts", "samples_ns", "samples_ts"}


def _peer_llama_bench() -> Path | None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    try:
        from peers import tool_path
    except ImportError:
        return None
    finally:
        sys.path.pop(0)
    p = tool_path("llama-bench")
    return p if p.is_file() else None


def test_a_real_bench_exports_llama_bench_fields(cli, smol_path):
    r = cli("bench", "-m", str(smol_path), "-p", "16", "-n", "4", "-r", "2", "-t", "1", "--no-store", "--no-report",
            "--no-progress", "-o", "json")
    assert r.returncode == 0, r.stderr
    recs = json.loads(r.stdout)
    assert [x["test"] for x in recs] == ["pp16", "tg4"]
    for x in recs:
        assert LLAMA_BENCH_KEYS <= set(x), sorted(LLAMA_BENCH_KEYS - set(x))
        assert x["avg_ts"] == x["tps_mean"] and x["samples_ts"] == x["tps_samples"] and x["n_threads"] == 1
        assert len(x["samples_ns"]) == 2 and abs(x["avg_ns"] - sum(x["samples_ns"]) / 2) <= 1
        ts = [1e9 * n / ns for n, ns in zip([x["n_prompt"] or x["n_gen"]] * 2, x["samples_ns"])]
        assert ts == pytest.approx(x["samples_ts"], rel=1e-3)  # the same repetitions, in time and in tokens/s
        assert x["model_filename"] == str(smol_path) and x["model_size"] == x["model_tensor_bytes"]
        assert x["test_time"].endswith("Z") and x["test_time"][:10] == x["created"][:10]
        assert x["build_commit"].startswith("ondevice-") and x["backends"] == "CPU"
        assert x["flash_attn"] is None and x["repack"] == "auto"  # these two stay ours (llama-bench: -1, bool)
    assert recs[0]["model_type"].startswith("llama ") and recs[0]["model_type"].endswith(" Q4_1")
    peer = _peer_llama_bench()
    if peer is None:
        return
    theirs = json.loads(subprocess.run(
        [str(peer), "-m", str(smol_path), "-p", "16", "-n", "0", "-r", "1", "-t", "1", "--repack", "0", "-o", "json"],
        capture_output=True, text=True, check=True, timeout=300).stdout)[0]
    assert set(theirs) == LLAMA_BENCH_KEYS  # the list above is llama-bench's own
    for k in ("model_type", "model_size", "model_n_params", "cpu_info", "gpu_info", "backends", "n_gpu_layers",
              "cpu_mask", "poll", "split_mode", "tensor_split", "load_mode", "n_batch", "n_ubatch", "type_k"):
        assert recs[0][k] == theirs[k], (k, recs[0][k], theirs[k])


def _cell(v: str):
    try:
        return json.loads(v)
    except ValueError:
        return v


def test_every_format_but_md_carries_them_and_eval_records_do_not():
    rec = {"kind": "bench", "test": "tg8", "n_prompt": 0, "n_gen": 8, "threads": 2, "tps_mean": 100.0,
           "tps_std": 1.0, "tps_samples": [99.0, 101.0], "time_s_samples": [0.0808, 0.0792],
           "created": "2026-12-05T02:06:24.123456+00:00", "model_path": "/m.gguf", "model_tensor_bytes": 5,
           "meta": {"ondevice": "0.1.0", "cpu_model": "CPU X", "model_desc": "llama 256M Q4_1"}}
    for fmt in ("json", "jsonl", "csv"):
        text = export([rec], fmt)
        if fmt == "csv":
            (x,) = [{k: _cell(v) for k, v in row.items()} for row in csv.DictReader(io.StringIO(text))]
        else:
            (x,) = json.loads(text) if fmt == "json" else [json.loads(text)]
        assert (x["avg_ts"], x["n_threads"], x["avg_ns"], x["stddev_ns"]) == (100.0, 2, 80000000, 1131371), fmt
        assert (x["test_time"], x["model_type"], x["cpu_info"]) == ("2026-12-05T02:06:24Z", "llama 256M Q4_1", "CPU X")
        assert read(text, fmt) == [rec], fmt  # ondevice reads back its own record
    sql = export([rec], "sql")
    assert '"avg_ts" REAL' in sql and "'llama 256M Q4_1'" in sql
    assert "avg_ts" not in export([rec], "md")
    (e,) = read(export([{"kind": "eval", "test": "ppl:lee", "created": rec["created"]}], "json"), "json")
    assert "avg_ts" not in e and "build_commit" not in e
