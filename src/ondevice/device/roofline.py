"""Roofline model for transformer inference on a CPU: what speed the memory and the ALUs allow.

Per decoded token at depth ``d`` (tokens already in the KV cache)::

    bytes = sum(n_bytes of every tensor except token_embd)      # each weight read once
          + n_bytes(token_embd) / n_vocab                        # the embedding lookup reads one row
          + [n_bytes(token_embd) if the output head is tied]     # ...and a tied head reads the whole table
          + 2 * n_layers * d * n_embd_kv * kv_bytes_per_elem     # K and V of every cached position
    flops = 2 * matmul_params + 4 * n_layers * d * n_embd        # GEMVs + (QK^T and AV)

with ``n_embd_kv = n_head_kv * n_embd / n_head`` (GQA shares K/V heads) and ``matmul_params`` the elements
of every weight matrix used in a matmul (not norms, biases or the embedding lookup; the tied table counts
as the output head). For prefill of ``P`` prompt tokens in micro-batches of ``n_ubatch`` starting at depth
``d0`` the weights are read once per micro-batch, the output head runs only for the last token (llama.cpp
computes logits for the last position unless asked for all), and token ``p`` attends ``d0 + p`` positions::

    bytes = ceil(P / n_ubatch) * (W - head) + head + P * embd_row + sum_i 2*n_layers*(d0 + end_i)*n_embd_kv*kv_b
    flops = P * 2 * (matmul_params - head_params) + 2 * head_params + 4 * n_layers * n_embd * (d0*P + P(P-1)/2)

reported per prompt token (divided by ``P``). The roofline then is::

    memory_tps  = bandwidth_bytes_per_s / bytes_per_token
    compute_tps = peak_flops_per_s / flops_per_token
    bound_tps   = min(memory_tps, compute_tps); bound = which one is smaller
    achieved_pct = 100 * achieved_tps / bound_tps

Simplifications: activations, KV writes and the padding llama.cpp adds to the KV length are ignored; MoE
expert tensors count in full; quantized weights cost their stored bytes. Units: GB = 1e9 bytes.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import InvalidArgument

TOKEN_EMBD = "token_embd.weight"
OUTPUT = "output.weight"
# Tensors that are not matmul weights: norms, biases, positional/rope tables.
_NOT_MATMUL = ("norm", ".bias", "rope_freqs", "rope_factors", "pos_embd", "token_types")


@dataclass(frozen=True, slots=True)
class Tensor:
    name: str
    type_name: str
    n_elements: int
    n_bytes: int


@dataclass(frozen=True, slots=True)
class Cost:
    """Bytes moved and FLOPs done per token."""

    bytes_per_token: float
    flops_per_token: float
    weight_bytes_per_token: float
    kv_bytes_per_token: float

    @property
    def intensity(self) -> float:
        """Arithmetic intensity, FLOP per byte."""
        return self.flops_per_token / self.bytes_per_token


def as_tensors(tensors: Iterable[Any]) -> list[Tensor]:
    """Accept tuples ``(name, type_name, n_elements, n_bytes)`` or objects with those attributes."""
    out = []
    for t in tensors:
        if isinstance(t, Tensor):
            out.append(t)
        elif isinstance(t, Sequence) and not isinstance(t, str) and len(t) == 4:
            out.append(Tensor(str(t[0]), str(t[1]), int(t[2]), int(t[3])))
        else:
            out.append(Tensor(t.name, t.type_name, int(t.n_elements), int(t.n_bytes)))
    if not out:
        raise InvalidArgument("the model has no tensors; is the GGUF file complete?")
    return out


def _is_matmul(name: str) -> bool:
    return name.endswith(".weight") and name != TOKEN_EMBD and not any(s in name for s in _NOT_MATMUL)


FLOAT_TYPES = ("F32", "F16", "BF16")  # weights llama.cpp multiplies in floating point (fp32 FMAs)


def weight_kernels(tensors: Iterable[Any]) -> str:
    """The arithmetic most matmul weight elements run: "float" (F32/F16/BF16: fp32 FMAs, as the probe's fp32
    sgemm) or "int8" (quantized: llama.cpp quantizes the activations and runs int8 dot products, VNNI/AMX/
    i8mm, whose peak is several times the fp32 one, so a compute-bound % of the fp32 roof overstates)."""
    ts = [t for t in as_tensors(tensors) if _is_matmul(t.name)]
    floats = sum(t.n_elements for t in ts if t.type_name.upper() in FLOAT_TYPES)
    return "float" if 2 * floats > sum(t.n_elements for t in ts) else "int8"


@dataclass(frozen=True, slots=True)
class _Weights:
    body_bytes: int  # all tensors but token_embd and the output head
    head_bytes: int  # output.weight, or the whole token_embd table when tied
    embd_row_bytes: float
    body_params: int  # matmul params outside the head
    head_params: int


def _weights(tensors: Iterable[Any], n_embd: int) -> _Weights:
    ts = as_tensors(tensors)
    by_name = {t.name: t for t in ts}
    embd = by_name.get(TOKEN_EMBD)
    if embd is None:
        raise InvalidArgument(f"no {TOKEN_EMBD} tensor; the roofline needs a llama.cpp-style GGUF")
    if embd.n_elements % n_embd:
        raise InvalidArgument(
            f"{TOKEN_EMBD} has {embd.n_elements} elements, not a multiple of n_embd={n_embd}"
        )
    n_vocab = embd.n_elements // n_embd
    head = by_name.get(OUTPUT, embd)  # no output.weight: the head is tied to the embedding table
    body = [t for t in ts if t.name not in (TOKEN_EMBD, OUTPUT)]
    return _Weights(
        body_bytes=sum(t.n_bytes for t in body),
        head_bytes=head.n_bytes,
        embd_row_bytes=embd.n_bytes / n_vocab,
        body_params=sum(t.n_elements for t in body if _is_matmul(t.name)),
        head_params=head.n_elements,
    )


def _kv_bytes_per_pos(n_layers: int, n_embd: int, n_head: int, n_head_kv: int, kv_bytes: float) -> float:
    if n_head <= 0 or n_embd % n_head:
        raise InvalidArgument(f"n_embd={n_embd} is not divisible by n_head={n_head}; check the GGUF metadata")
    n_embd_kv = n_head_kv * (n_embd // n_head)
    return 2 * n_layers * n_embd_kv * kv_bytes  # K and V


def decode_cost(
    tensors: Iterable[Any],
    *,
    n_layers: int,
    n_embd: int,
    n_head: int,
    n_head_kv: int,
    depth: int = 0,
    kv_bytes_per_elem: float = 2.0,
) -> Cost:
    """Bytes and FLOPs to decode one token with ``depth`` tokens already in the cache (f16 KV: 2 bytes)."""
    if depth < 0:
        raise InvalidArgument(f"depth={depth} must be >= 0")
    w = _weights(tensors, n_embd)
    weight_bytes = w.body_bytes + w.head_bytes + w.embd_row_bytes
    kv = depth * _kv_bytes_per_pos(n_layers, n_embd, n_head, n_head_kv, kv_bytes_per_elem)
    flops = 2 * (w.body_params + w.head_params) + 4 * n_layers * depth * n_embd
    return Cost(weight_bytes + kv, float(flops), weight_bytes, kv)


def prefill_cost(
    tensors: Iterable[Any],
    *,
    n_layers: int,
    n_embd: int,
    n_head: int,
    n_head_kv: int,
    n_prompt: int,
    depth: int = 0,
    n_ubatch: int = 512,
    kv_bytes_per_elem: float = 2.0,
) -> Cost:
    """Bytes and FLOPs per prompt token to prefill ``n_prompt`` tokens on top of ``depth`` cached ones."""
    if n_prompt < 1 or n_ubatch < 1 or depth < 0:
        raise InvalidArgument(
            f"need n_prompt >= 1, n_ubatch >= 1, depth >= 0 (got {n_prompt}, {n_ubatch}, {depth})"
        )
    w = _weights(tensors, n_embd)
    n_batches = math.ceil(n_prompt / n_ubatch)
    weight_bytes = n_batches * w.body_bytes + w.head_bytes + n_prompt * w.embd_row_bytes
    per_pos = _kv_bytes_per_pos(n_layers, n_embd, n_head, n_head_kv, kv_bytes_per_elem)
    # micro-batch i ends at min((i+1)*n_ubatch, P) and reads K/V of every position before its end
    kv = sum(per_pos * (depth + min((i + 1) * n_ubatch, n_prompt)) for i in range(n_batches))
    attended = depth * n_prompt + n_prompt * (n_prompt - 1) // 2
    flops = n_prompt * 2 * w.body_params + 2 * w.head_params + 4 * n_layers * n_embd * attended
    return Cost((weight_bytes + kv) / n_prompt, flops / n_prompt, weight_bytes / n_prompt, kv / n_prompt)


def roofline(
    achieved_tps: float,
    bytes_per_token: float,
    flops_per_token: float,
    bandwidth_gbs: float,
    peak_gflops: float,
) -> dict:
    """Which roof bounds the speed, the bound in tokens/s, and the share of it achieved."""
    for name, v in (
        ("bytes_per_token", bytes_per_token),
        ("flops_per_token", flops_per_token),
        ("bandwidth_gbs", bandwidth_gbs),
        ("peak_gflops", peak_gflops),
    ):
        if not (math.isfinite(v) and v > 0):
            raise InvalidArgument(f"roofline {name}={v} must be a positive number")
    if not (math.isfinite(achieved_tps) and achieved_tps >= 0):
        raise InvalidArgument(f"roofline achieved_tps={achieved_tps} must be a number >= 0")
    memory_tps = bandwidth_gbs * 1e9 / bytes_per_token
    compute_tps = peak_gflops * 1e9 / flops_per_token
    bound = "memory" if memory_tps <= compute_tps else "compute"
    bound_tps = min(memory_tps, compute_tps)
    return {
        "bound": bound,
        "bound_tps": bound_tps,
        "achieved_tps": achieved_tps,
        "achieved_pct": 100.0 * achieved_tps / bound_tps,
        "memory_tps": memory_tps,
        "compute_tps": compute_tps,
        "intensity_flop_per_byte": flops_per_token / bytes_per_token,
        "ridge_flop_per_byte": peak_gflops / bandwidth_gbs,
        "achieved_gbs": achieved_tps * bytes_per_token / 1e9,
        "achieved_gflops": achieved_tps * flops_per_token / 1e9,
    }
