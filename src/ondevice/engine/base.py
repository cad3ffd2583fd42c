"""The one small engine interface. Backends implement it; everything else uses only this."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .records import Generation, Sampling

if TYPE_CHECKING:
    import numpy as np


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """How to load a model. ``n_ctx=0`` means the model's trained context (capped at 4096)."""

    n_ctx: int = 0
    n_threads: int | None = None  # None: all physical cores
    n_threads_batch: int | None = None  # None: same as n_threads
    n_batch: int = 2048
    n_ubatch: int = 512
    n_seq_max: int = 1  # sequences in the KV cache (the server's slots), n_ctx / n_seq_max cells each
    kv_unified: bool = False  # one pool of n_ctx cells for all sequences (attention then spans all of them)
    type_k: str = "f16"  # KV cache types: f16, q8_0, q4_0, f32
    type_v: str = "f16"
    flash_attn: bool | None = None  # None: llama.cpp's 'auto' (its own default)
    use_mmap: bool = True
    embeddings: bool = False
    pooling: str | None = None  # embeddings pooling: none, mean, cls, last (None: the model's default)
    seed: int = 0xFFFFFFFF
    warmup: bool = True  # one tiny decode at load, as llama.cpp's own tools do (pages weights in, sizes buffers)
    # an encrypted model (protect/): where its key is ("env:NAME", "file:PATH", "keyring:NAME"; None: the
    # ONDEVICE_MODEL_KEY variable), never the key itself; and how it is restored ("pipelined" or "strawman")
    key_source: str | None = None
    restore: str = "pipelined"
    # extra CPU kernels (device/kernels.py): "auto", "on" or "off"; None reads ONDEVICE_AMX / ONDEVICE_REPACK
    amx: str | None = None  # AMX tiles (Sapphire Rapids+): auto = only where a self-test here proved it safe and faster
    repack: str | None = None  # CPU_REPACK interleaved weights: auto = on unless its self-test failed here


class Engine(ABC):
    """Tokenize, prefill, decode and sample on one sequence (``seq`` selects another)."""

    n_ctx: int
    n_vocab: int
    eos_tokens: frozenset[int]

    @abstractmethod
    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]: ...

    @abstractmethod
    def detokenize(self, tokens: Sequence[int], special: bool = False) -> str: ...

    @abstractmethod
    def token_bytes(self, token: int, special: bool = False) -> bytes: ...

    @abstractmethod
    def prefill(self, tokens: Sequence[int], seq: int = 0, logits_all: bool = False) -> None:
        """Append ``tokens`` to the KV of ``seq``; logits are kept for the last (or every) token."""

    @abstractmethod
    def decode(self, token: int, seq: int = 0) -> None:
        """Append one token to ``seq`` and compute its logits."""

    @abstractmethod
    def logits(self, i: int = -1) -> np.ndarray:
        """Raw logits ``(n_vocab,)`` of row ``i`` of the last batch (a copy)."""

    @abstractmethod
    def sample(self, sampler: object, i: int = -1) -> int:
        """Sample with a sampler from :meth:`make_sampler` on row ``i`` and accept the token."""

    @abstractmethod
    def make_sampler(self, sampling: Sampling) -> object: ...

    @abstractmethod
    def n_past(self, seq: int = 0) -> int: ...

    @abstractmethod
    def truncate(self, n: int, seq: int = 0) -> None:
        """Keep only the first ``n`` positions of ``seq`` (prefix reuse)."""

    @abstractmethod
    def reset(self) -> None:
        """Clear the whole KV cache."""

    @abstractmethod
    def save_state(self, seq: int = 0) -> bytes: ...

    @abstractmethod
    def load_state(self, state: bytes, seq: int = 0) -> None: ...

    @abstractmethod
    def stream_tokens(self, tokens: Sequence[int], sampling: Sampling) -> Iterator[Generation]:
        """Prefill ``tokens`` (after what is already cached) and yield one record per new token."""
