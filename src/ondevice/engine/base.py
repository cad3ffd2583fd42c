"""The one small engine contract (a Protocol listing what callers use). Backends implement it."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from .. import fields
from ..errors import InvalidArgument
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
    mlock: bool = False  # keep the weights in RAM (mlock), as llama.cpp's --mlock
    embeddings: bool = False
    pooling: str | None = None  # embeddings pooling: none, mean, cls, last (None: the model's default)
    seed: int = 0xFFFFFFFF  # the default seed of a Model's calls (a call's own wins); -1 or this: a random one
    warmup: bool = True  # one tiny decode at load, as llama.cpp's own tools do (pages weights in, sizes buffers)
    # an encrypted model (protect/): where its key is ("env:NAME", "file:PATH", "keyring:NAME"; None: the
    # ONDEVICE_MODEL_KEY variable), never the key itself; and how it is restored ("pipelined" or "strawman")
    key_source: str | None = None
    restore: str = "pipelined"
    # extra CPU kernels (device/kernels.py): "auto", "on" or "off"; None reads ONDEVICE_AMX / ONDEVICE_REPACK
    amx: str | None = None  # AMX tiles (Sapphire Rapids+): auto = only where a self-test here proved it safe and faster
    repack: str | None = None  # CPU_REPACK interleaved weights: auto = on unless its self-test failed here
    adapters: tuple[str, ...] = ()  # LoRA adapter GGUFs ("PATH" or "NAME=PATH") active on the context (adapt/)

    def __post_init__(self) -> None:
        fields.check(self)
        for name in ("n_batch", "n_ubatch", "n_seq_max"):
            if getattr(self, name) < 1:
                raise InvalidArgument(f"{name}={getattr(self, name)} must be >= 1")
        if self.n_ctx < 0:
            raise InvalidArgument(f"--ctx / n_ctx={self.n_ctx} must be >= 0 (0: the model's trained context)")


class SamplerLike(Protocol):
    """What :meth:`Engine.make_sampler` returns: an opaque sampler state, freed with ``close``."""

    def close(self) -> None: ...


@runtime_checkable
class Engine(Protocol):
    """Exactly what callers use of an engine: one model, one context, sequences ``seq`` in its KV cache.

    :class:`~ondevice.engine.llama.LlamaEngine` is the backend; the generator (engine/generator.py), bench,
    eval and the server use only these members.
    """

    config: EngineConfig
    n_ctx: int  # KV cells in all (each sequence has n_ctx / n_seq_max of them unless kv_unified)
    n_ctx_train: int
    n_batch: int  # most tokens in one decode_batch
    n_vocab: int
    n_threads: int
    eos_tokens: frozenset[int]
    load_time: float

    # -- text <-> tokens
    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]: ...

    def detokenize(self, tokens: Sequence[int], special: bool = False) -> str: ...

    def token_bytes(self, token: int, special: bool = False) -> bytes: ...

    def token_text(self, token: int) -> str: ...

    @property
    def bos_token(self) -> int: ...

    @property
    def eos_token(self) -> int: ...

    @property
    def add_bos(self) -> bool: ...

    def chat_template(self) -> str | None: ...

    def meta(self, key: str) -> str | None: ...

    # -- compute
    def warmup(self) -> None: ...

    def decode_batch(self, items: Sequence[tuple[int, int, int, bool]]) -> None:
        """One decode over ``(token, pos, seq, want_logits)`` items; logits rows are read by item index."""

    def prefill(self, tokens: Sequence[int], seq: int = 0, logits_all: bool = False) -> None:
        """Append ``tokens`` to the KV of ``seq``; logits are kept for the last (or every) token."""

    def decode(self, token: int, seq: int = 0) -> None:
        """Append one token to ``seq`` and compute its logits."""

    def logits(self, i: int | np.ndarray = -1) -> np.ndarray:
        """Raw logits ``(n_vocab,)`` of batch item ``i`` of the last decode (a copy)."""

    def all_logits(self) -> np.ndarray:
        """Every logits row of the last decode, ``(n_rows, n_vocab)``, in item order (a copy)."""

    def embed(self, tokens: Sequence[int], seq: int = 0) -> np.ndarray:
        """Pooled embedding ``(n_embd,)`` (an engine made with ``embeddings=True``)."""

    # -- sampling
    def make_sampler(self, sampling: Sampling, prompt: Sequence[int] = ()) -> SamplerLike:
        """A sampler for ``sampling``; the penalties look back over the end of ``prompt`` too (llama-server's)."""

    def sample(self, sampler: SamplerLike, i: int | np.ndarray = -1) -> int:
        """Sample from batch item ``i``'s logits (or a saved logits row) and accept the token; < 0 when a grammar
        admits none."""

    # -- the KV cache
    def n_past(self, seq: int = 0) -> int: ...

    def truncate(self, n: int, seq: int = 0) -> None:
        """Keep only the first ``n`` positions of ``seq`` (prefix reuse)."""

    def copy_seq(self, src: int, dst: int) -> None:
        """Give ``dst`` the KV of ``src``."""

    def reset(self) -> None:
        """Clear the whole KV cache."""

    def save_state(self, seq: int = 0) -> bytearray: ...

    def load_state(self, state: bytes | bytearray, seq: int = 0) -> None: ...

    def stream_tokens(self, tokens: Sequence[int], sampling: Sampling, seq: int = 0) -> Iterator[Generation]:
        """Prefill ``tokens`` after what ``seq`` holds and yield one record per new token (a batch of one)."""

    def close(self) -> None: ...
