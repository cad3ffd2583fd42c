"""A llama-architecture model in torch, read straight from the GGUF that llama.cpp serves, with LoRA.

Why our own ~200-line definition rather than transformers' GGUF loader: (1) tensors keep llama.cpp's names
and layout (Q/K rows as the converter permuted them, rope on adjacent pairs as llama.cpp's NORM mode), so an
adapter's tensors are ``<GGUF tensor name>.lora_a/.lora_b`` with no renaming or un-permuting on export;
(2) the frozen base stays in its GGUF block format (Q4_1/Q8_0 packed bytes, dequantized a chunk of rows at
a time inside the matmul, the QLoRA setting), which is what makes a 600 MB training budget reachable for a
135M model (fp32 weights alone would be 540 MB); (3) no transformers import (hundreds of MB, seconds).
Only the llama architecture (SmolLM2, Llama, Qwen2-style without biases) is covered; others are refused.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import InvalidArgument

MODULES = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
_CHUNK_ELEMS = 1 << 21  # dequantize at most this many weights at once (8 MiB of fp32)


@dataclass
class LlamaConfig:
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    n_ff: int
    n_vocab: int
    rope_base: float
    rms_eps: float
    arch: str = "llama"

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


class Packed:
    """A frozen weight ``(out, in)`` kept as GGUF blocks; :meth:`rows` dequantizes a slice of rows exactly as
    gguf-py's reference does (Q4_1: d*q + m, Q8_0: d*q; other types are stored dequantized in fp32)."""

    def __init__(self, tensor) -> None:
        from gguf import GGMLQuantizationType as Q
        from gguf.quants import dequantize

        self.out, self.inp = int(tensor.shape[1]), int(tensor.shape[0])  # GGUF shape is (in, out): ne order
        self.kind = tensor.tensor_type
        raw = tensor.data
        if self.kind == Q.Q4_1:
            b = raw.reshape(self.out, self.inp // 32, 20)
            self.d = torch.from_numpy(b[..., 0:2].copy().view(np.float16)).float()  # (out, nb, 1)
            self.m = torch.from_numpy(b[..., 2:4].copy().view(np.float16)).float()
            self.q = torch.from_numpy(b[..., 4:].copy())  # (out, nb, 16) uint8: low nibbles 0-15, high 16-31
        elif self.kind == Q.Q8_0:
            b = raw.reshape(self.out, self.inp // 32, 34)
            self.d = torch.from_numpy(b[..., 0:2].copy().view(np.float16)).float()
            self.q = torch.from_numpy(b[..., 2:].copy().view(np.int8))  # (out, nb, 32)
        else:
            self.dense = torch.from_numpy(np.array(dequantize(raw, self.kind), dtype=np.float32)
                                          .reshape(self.out, self.inp))

    def rows(self, lo: int, hi: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        from gguf import GGMLQuantizationType as Q

        if hasattr(self, "dense"):
            return self.dense[lo:hi].to(dtype)
        q = self.q[lo:hi]
        w = torch.empty((hi - lo, *q.shape[1:-1], 32), dtype=torch.float32)  # (rows, nb, 32), filled in place:
        if self.kind == Q.Q4_1:  # a third less time than cat + new tensors per op (same values, fp32 math)
            torch.bitwise_and(q, 0xF, out=w[..., :16])
            torch.bitwise_right_shift(q, 4, out=w[..., 16:])
            w.mul_(self.d[lo:hi]).add_(self.m[lo:hi])
        else:  # Q8_0
            w.copy_(q).mul_(self.d[lo:hi])
        return w.view(hi - lo, self.inp).to(dtype)

    def nbytes(self) -> int:
        if hasattr(self, "dense"):
            return self.dense.numel() * 4
        return sum(t.numel() * t.element_size() for t in (self.d, self.q, getattr(self, "m", self.d[:0])))


def _chunks(w: Packed):
    step = max(1, _CHUNK_ELEMS // w.inp)
    return [(lo, min(w.out, lo + step)) for lo in range(0, w.out, step)]


class _FrozenMatmul(torch.autograd.Function):
    """``x @ W.T`` with W dequantized a chunk at a time, in forward and again in backward: nothing of W (and
    not x: a frozen weight needs no input for its own gradient) is kept between them."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: Packed) -> torch.Tensor:  # (..., in) -> (..., out)
        ctx.w = w
        return torch.cat([x @ w.rows(lo, hi, x.dtype).T for lo, hi in _chunks(w)], dim=-1)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        w = ctx.w
        gx = sum(g[..., lo:hi] @ w.rows(lo, hi, g.dtype) for lo, hi in _chunks(w))
        return gx, None


class Linear(torch.nn.Module):
    """A frozen GGUF weight plus an optional LoRA ``scale * B(A(x))`` (llama.cpp: scale = alpha / rank)."""

    def __init__(self, name: str, w: Packed):
        super().__init__()
        self.name, self.w = name, w
        self.rank, self.alpha = 0, 0.0
        self.probe: list | None = None  # (x, grad_out) pairs while budget.py probes

    def add_lora(self, rank: int, alpha: float, generator: torch.Generator | None = None) -> None:
        self.rank, self.alpha = rank, alpha
        # A: small random (as PEFT's kaiming-uniform); B: zeros, so training starts from the base model exactly
        bound = 1.0 / math.sqrt(self.w.inp)
        a = (torch.rand(rank, self.w.inp, generator=generator) * 2 - 1) * bound
        self.lora_a = torch.nn.Parameter(a)  # (r, in)
        self.lora_b = torch.nn.Parameter(torch.zeros(self.w.out, rank))  # (out, r)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _FrozenMatmul.apply(x, self.w)
        if self.rank:
            y = y + (x @ self.lora_a.to(x.dtype).T) @ self.lora_b.to(x.dtype).T * (self.alpha / self.rank)
        if self.probe is not None and y.requires_grad:
            xd = x.detach()
            y.register_hook(lambda g: self.probe.append((xd, g.detach())))
        return y


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * w).to(x.dtype)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """llama.cpp's NORM rope: rotate adjacent pairs (x[2i], x[2i+1]). x: (B, T, H, D); cos/sin: (T, D/2)."""
    x0, x1 = x[..., 0::2], x[..., 1::2]
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    return torch.stack([x0 * c - x1 * s, x0 * s + x1 * c], dim=-1).flatten(-2)


class Block(torch.nn.Module):
    def __init__(self, cfg: LlamaConfig, i: int, get):
        super().__init__()
        self.cfg = cfg
        self.attn_norm, self.ffn_norm = get(f"blk.{i}.attn_norm.weight"), get(f"blk.{i}.ffn_norm.weight")
        self.lin = torch.nn.ModuleDict({m: Linear(f"blk.{i}.{m}.weight", get(f"blk.{i}.{m}.weight", packed=True))
                                        for m in MODULES})

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        c, lin = self.cfg, self.lin
        B, T, _ = h.shape
        x = rms_norm(h, self.attn_norm, c.rms_eps)
        q = rope(lin["attn_q"](x).view(B, T, c.n_head, c.head_dim), cos, sin)
        k = rope(lin["attn_k"](x).view(B, T, c.n_head_kv, c.head_dim), cos, sin)
        v = lin["attn_v"](x).view(B, T, c.n_head_kv, c.head_dim)
        rep = c.n_head // c.n_head_kv  # query head j uses kv head j // rep, as llama.cpp
        k, v = (t.repeat_interleave(rep, dim=2) for t in (k, v))
        # attention in fp32 also under bf16 (as autocast does): torch's CPU flash-attention backward in bf16
        # took 1.7x the time of upcasting, computing and casting back (4.1 vs 2.5 ms a layer on AMX)
        a = F.scaled_dot_product_attention(*(t.transpose(1, 2).float() for t in (q, k, v)), is_causal=True).to(h.dtype)
        h = h + lin["attn_output"](a.transpose(1, 2).reshape(B, T, c.n_embd))
        x = rms_norm(h, self.ffn_norm, c.rms_eps)
        return h + lin["ffn_down"](F.silu(lin["ffn_gate"](x)) * lin["ffn_up"](x))


def trainable(path):
    """The GGUF header of a model adapt can train (one file, llama architecture), else an InvalidArgument that
    says why; checked before the data is tokenized, so the reason given is the first one."""
    from ..models.gguf_check import validate_gguf
    from ..models.gguf_split import refuse_split

    info = validate_gguf(path)  # fast header walk (gguf-py's GGUFReader takes ~10 s on a 49k vocabulary)
    refuse_split(info, "ondevice adapt")
    if info.architecture != "llama":
        raise InvalidArgument(f"ondevice adapt trains llama-architecture models (SmolLM2, Llama); "
                              f"{Path(path).name} is '{info.architecture}'")
    return info


class LlamaLoRA(torch.nn.Module):
    """The whole model; ``forward(tokens, positions_wanted)`` returns logits only where asked (the answer
    tokens), so the (T, n_vocab) head is never formed for prompt positions."""

    def __init__(self, path: str | Path, dtype: torch.dtype = torch.float32):
        super().__init__()
        info = trainable(path)
        g = lambda k, d=None: info.metadata.get(f"llama.{k}", d)
        self.cfg = cfg = LlamaConfig(
            n_layer=int(g("block_count")), n_embd=int(g("embedding_length")), n_head=int(g("attention.head_count")),
            n_head_kv=int(g("attention.head_count_kv")), n_ff=int(g("feed_forward_length")),
            n_vocab=int(info.tensor_shapes["token_embd.weight"][1]), rope_base=float(g("rope.freq_base", 10000.0)),
            rms_eps=float(g("attention.layer_norm_rms_epsilon")))
        self.dtype = dtype
        types = {t.name: t.type_name for t in info.tensors}
        nbytes = {t.name: t.n_bytes for t in info.tensors}
        f = open(path, "rb")  # noqa: SIM115 (closed below)

        def read(name: str) -> _Tensor:
            if name not in types:
                raise InvalidArgument(f"{Path(path).name} has no tensor {name}; not a llama-layout GGUF")
            f.seek(info.tensor_offsets[name])
            return _Tensor(info.tensor_shapes[name], types[name], np.frombuffer(f.read(nbytes[name]), np.uint8))

        def get(name: str, packed: bool = False):
            t = read(name)
            if packed:
                return Packed(t)
            from gguf.quants import dequantize

            return torch.from_numpy(np.array(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(-1))

        tensors = {n: None for n in types}
        self.embd = get("token_embd.weight", packed=True)
        self.head = Linear("output.weight", get("output.weight", packed=True)) if "output.weight" in tensors \
            else Linear("token_embd.weight", self.embd)  # tied embeddings (SmolLM2)
        self.out_norm = get("output_norm.weight")
        self.blocks = torch.nn.ModuleList(Block(cfg, i, get) for i in range(cfg.n_layer))
        self.grad_from = 0  # layers below this one run without autograd (nothing trainable there)
        self.checkpoint = False
        f.close()

    def linears(self) -> dict[str, Linear]:
        return {lin.name: lin for b in self.blocks for lin in b.lin.values()}

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Rows of the Q8_0 embedding, dequantized per token. tokens: (B, T) -> (B, T, n_embd)."""
        e = self.embd
        flat = tokens.reshape(-1)
        if hasattr(e, "dense"):
            rows = e.dense[flat]
        else:
            q = e.q[flat].to(torch.float32) * e.d[flat]
            rows = q + e.m[flat] if hasattr(e, "m") else q
        return rows.reshape(*tokens.shape, e.inp).to(self.dtype)

    def rope_tables(self, n_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin), each (T, D/2), for positions 0..T-1."""
        c = self.cfg
        inv = c.rope_base ** (-torch.arange(0, c.head_dim, 2, dtype=torch.float32) / c.head_dim)
        ang = torch.arange(n_tokens, dtype=torch.float32)[:, None] * inv[None]  # (T, D/2)
        return ang.cos().to(self.dtype), ang.sin().to(self.dtype)

    def logits(self, h: torch.Tensor, want: torch.Tensor | None = None) -> torch.Tensor:
        """The last layer's output (B, T, n_embd) -> float32 logits of the ``want`` positions (all if None)."""
        h = rms_norm(h, self.out_norm, self.cfg.rms_eps)
        h = h[want] if want is not None else h.reshape(-1, self.cfg.n_embd)
        return self.head(h).float()

    def forward(self, tokens: torch.Tensor, want: torch.Tensor | None = None) -> torch.Tensor:
        """tokens (B, T); want: bool (B, T) of positions whose logits to return -> (n_want, n_vocab) float32."""
        cos, sin = self.rope_tables(tokens.shape[1])
        h = self.embed(tokens)
        for i, blk in enumerate(self.blocks):
            if i < self.grad_from:
                with torch.no_grad():
                    h = blk(h, cos, sin)
            elif self.checkpoint and torch.is_grad_enabled():
                from torch.utils.checkpoint import checkpoint

                h = checkpoint(blk, h, cos, sin, use_reentrant=False)
            else:
                h = blk(h, cos, sin)
        return self.logits(h, want)


@dataclass
class _Tensor:
    shape: tuple[int, ...]  # ggml order: shape[0] is the row length
    type_name: str
    data: np.ndarray  # the raw bytes

    @property
    def tensor_type(self):
        from gguf import GGMLQuantizationType

        return GGMLQuantizationType[self.type_name]
