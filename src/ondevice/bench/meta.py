"""What a bench record knows about the model and the hardware: identity, sha256 (cached), roofline."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from ..models.store import cached_sha256


@dataclass(frozen=True)
class ModelMeta:
    """A model as the bench sees it."""

    name: str  # the resolved name: catalog/variant name, or the file's stem for a path
    path: str
    sha256: str
    file_size: int
    parameters: int
    architecture: str
    quant: str  # e.g. "Q4_1 69%, Q8_0 31%"
    info: object  # GGUFInfo (tensors and hyper-parameters for the roofline)

    def to_dict(self) -> dict:
        return {"name": self.name, "path": self.path, "sha256": self.sha256, "file_size": self.file_size,
                "parameters": self.parameters, "architecture": self.architecture, "quant": self.quant}


def model_meta(name: str | None) -> ModelMeta:
    """Resolve a model name/path, validate it and hash it."""
    from ..models import resolve

    ref = resolve(name)
    info = ref.info
    return ModelMeta(name=ref.name, path=str(Path(ref.path).resolve()), sha256=cached_sha256(ref.path),
                     file_size=info.file_size, parameters=info.parameters, architecture=info.architecture,
                     quant=info.quant_summary, info=info)


def config_key(settings: dict, model_sha256: str) -> str:
    """Stable hash of a configuration (settings + model variant): what ``--resume`` skips."""
    blob = json.dumps({"settings": settings, "model_sha256": model_sha256}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def roofline_for(meta: ModelMeta, phases: list[tuple[str, int, int]], time_s: float | None,
                 n_ubatch: int, type_k: str, type_v: str, roofs) -> dict | None:
    """% of the roofline for a timed span made of ``phases`` (prefill/decode, tokens, start depth).

    The bound time is the sum over phases of tokens / bound tok/s; ``pct`` = bound time / measured time.
    Each phase also gets its own roofline (binding roof, memory/compute tok/s). The compute roof is the
    probe's fp32 sgemm (``compute_roof``); with quantized weights (``weight_kernels`` "int8") llama.cpp runs
    int8 dot products whose roof is higher, so a compute-bound ``pct`` is then a share of the fp32 roof,
    not of the true one (``pct_basis`` says which).
    """
    from ..device import decode_cost, prefill_cost, roofline
    from ..device.roofline import weight_kernels

    info = meta.info
    if roofs is None or not phases or not time_s:
        return None
    hp = {"n_layers": info.n_layers, "n_embd": info.n_embd, "n_head": info.n_head,
          "n_head_kv": info.n_head_kv or info.n_head}
    if None in hp.values():
        return None
    from ..eval.window import KV_TYPE_BYTES

    kvb = (KV_TYPE_BYTES.get(type_k, 2.0) + KV_TYPE_BYTES.get(type_v, 2.0)) / 2
    out_phases, bound_time = [], 0.0
    for phase, n, depth in phases:
        if n <= 0:
            continue
        if phase == "prefill":
            cost = prefill_cost(info.tensors, n_prompt=n, depth=depth, n_ubatch=n_ubatch, kv_bytes_per_elem=kvb,
                                **hp)
        else:  # decode cost is linear in depth: the mean depth gives the mean cost
            cost = decode_cost(info.tensors, depth=round(depth + (n - 1) / 2), kv_bytes_per_elem=kvb, **hp)
        r = roofline(0.0, cost.bytes_per_token, cost.flops_per_token, roofs.bandwidth_gbs, roofs.peak_gflops)
        bound_time += n / r["bound_tps"]
        out_phases.append({"phase": phase, "tokens": n, "depth": depth, "bound": r["bound"],
                           "bound_tps": r["bound_tps"], "memory_tps": r["memory_tps"],
                           "compute_tps": r["compute_tps"], "bytes_per_token": cost.bytes_per_token,
                           "flops_per_token": cost.flops_per_token,
                           "intensity_flop_per_byte": r["intensity_flop_per_byte"]})
    if not out_phases:
        return None
    main = max(out_phases, key=lambda p: p["tokens"] / p["bound_tps"])
    total = sum(p["tokens"] for p in out_phases)
    kernels = weight_kernels(info.tensors)
    int8_compute = kernels == "int8" and any(p["bound"] == "compute" for p in out_phases)
    return {"pct": 100.0 * bound_time / time_s, "bound": main["bound"], "bound_time_s": bound_time,
            "bound_tps": total / bound_time, "phases": out_phases,
            "bandwidth_gbs": roofs.bandwidth_gbs, "peak_gflops": roofs.peak_gflops,
            "compute_roof": "fp32", "weight_kernels": kernels,
            "pct_basis": ("fp32 roof: quantized weights run int8 dot products, whose roof is higher"
                          if int8_compute else "roofline"),
            "probe": {"threads": roofs.threads, "cached": roofs.cached, "measured_at": roofs.measured_at,
                      "bandwidth_method": roofs.bandwidth_method, "compute_method": roofs.compute_method,
                      "load_avg_1m": roofs.load_avg_1m, "load": getattr(roofs, "load", None)}}


def host_meta(info: dict) -> dict:
    """What a bench record's ``meta`` says about the machine, from ``device_info``: the hardware, and what this
    process may use of it (``usable_cpus`` after affinity and a container's CPU quota, the cgroup memory
    limit), so a run in a container is told apart from one on the host; on a hybrid CPU its performance and
    efficiency cores (None elsewhere)."""
    keys = ("cpu_model", "cpu_flags", "governor", "boost", "hypervisor", "kernel", "os", "arch", "physical_cores",
            "performance_cores", "efficiency_cores", "logical_cores", "usable_cpus", "cpu_quota", "l3_cache_bytes",
            "memory_total_bytes", "memory_limit_bytes", "memory_limit_file", "python")
    out = {k: info.get(k) for k in keys}
    out["load_avg_before"] = info.get("load_avg")
    return out
