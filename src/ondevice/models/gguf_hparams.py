"""Metadata values llama.cpp asserts on (an abort, not an error it reports), checked after the header walk of
:mod:`.gguf_check` so that they get a clear error instead."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from .gguf_check import _ARRAY, _STRING, VOCAB_KEY, InvalidModelFile, _invalid

MAX_LAYERS = 512  # LLAMA_MAX_LAYERS
MAX_EXPERTS = 1024  # LLAMA_MAX_EXPERTS
# tokenizer.ggml.model values llama.cpp builds a tokenizer for ("none"/"no_vocab" leave it without one)
TOKENIZER_MODELS = ("llama", "bert", "gpt2", "hybriddna", "whitespace", "t5", "rwkv", "plamo2", "gemma4")


def check_hparams(path: Path, arch: str, metadata: dict[str, Any], types: dict[str, int],
                  array_lengths: dict[str, int], unspellable: list[int] = ()) -> None:
    """Raise :class:`InvalidModelFile` for the first value of ``metadata`` that llama.cpp would abort on."""
    def bad(what: str) -> InvalidModelFile:
        return _invalid(path, f"corrupt metadata: {what}")

    def integer(key: str) -> int | None:
        v = metadata.get(key)
        return v if isinstance(v, int) and not isinstance(v, bool) else None

    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.model"):
        if key in types and types[key] != (_ARRAY if key == VOCAB_KEY else _STRING):
            raise bad(f"'{key}' has GGUF type {types[key]}, not a {'array' if key == VOCAB_KEY else 'string'}")
    blocks = f"{arch}.block_count"
    if blocks in types:
        n = integer(blocks)
        if n is None or not 1 <= n <= MAX_LAYERS:
            raise bad(f"{blocks} is {metadata.get(blocks, '(an array)')!r}; llama.cpp runs 1 to {MAX_LAYERS} layers")
        nextn = integer(f"{arch}.nextn_predict_layers")
        if nextn is not None and not 0 <= nextn <= n:
            raise bad(f"{arch}.nextn_predict_layers is {nextn}, more than the {n} layers")
    experts, used = integer(f"{arch}.expert_count"), integer(f"{arch}.expert_used_count")
    if experts is not None and not 0 <= experts <= MAX_EXPERTS:
        raise bad(f"{arch}.expert_count is {experts}; llama.cpp allows 0 to {MAX_EXPERTS}")
    if used is not None and not 0 <= used <= (experts or 0):
        raise bad(f"{arch}.expert_used_count is {used} but the model has {experts or 0} experts")
    for key, v in metadata.items():
        if key.startswith(f"{arch}.") and key.endswith("_epsilon"):
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0
            if not ok:
                raise bad(f"{key} is {v!r}; a norm epsilon must be a finite number >= 0")
        elif types.get(key) in (6, 12) and not math.isfinite(v):  # float32/64: NaN rope bases give NaN logits
            raise bad(f"{key} is {v!r}; it must be a finite number")
    for key in (f"{arch}.embedding_length", f"{arch}.attention.head_count", f"{arch}.attention.head_count_kv",
                f"{arch}.context_length", f"{arch}.feed_forward_length"):
        v = metadata.get(key)
        vals = v if isinstance(v, list) else [v]
        if key in metadata and any(not isinstance(x, int) or isinstance(x, bool) or x < 0 or x >= 1 << 31
                                   for x in vals):
            raise bad(f"{key} is {v!r}; it must be a non-negative 32-bit integer")
    model = metadata.get("tokenizer.ggml.model")
    if isinstance(model, str) and model not in TOKENIZER_MODELS:
        what = "no tokenizer" if model in ("none", "no_vocab") else "a tokenizer llama.cpp does not know"
        raise bad(f"tokenizer.ggml.model is {model!r}, {what}; ondevice needs a model with a vocabulary "
                  f"({', '.join(TOKENIZER_MODELS)})")
    if model == "llama" and unspellable:
        raise bad(f"the SentencePiece vocabulary has no byte tokens (<0x{unspellable[0]:02X}> and "
                  f"{len(unspellable) - 1} more), which llama.cpp needs for any character it cannot spell (it "
                  f"aborts instead); the file was converted without them")
    n_vocab = array_lengths.get(VOCAB_KEY)
    if model is not None and not n_vocab:
        raise bad(f"the model names tokenizer {model!r} but has no {VOCAB_KEY}")
    if n_vocab:
        for key, v in metadata.items():
            if key.startswith("tokenizer.ggml.") and key.endswith("_token_id") and (
                    not isinstance(v, int) or isinstance(v, bool) or not -1 <= v < n_vocab):
                raise bad(f"{key} is {v!r}, outside the vocabulary of {n_vocab} tokens")
