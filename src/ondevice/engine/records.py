"""The typed records every verb consumes (modelled on mlx-lm's ``GenerationResponse``).

Streaming yields one :class:`Generation` per token; it carries its own timings so the CLI, bench,
eval and server need nothing else. A :class:`Request` is what the batch generator (engine/generator.py) takes.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from dataclasses import fields as fields_of
from typing import TYPE_CHECKING, Literal

from .. import fields
from ..errors import InvalidArgument

if TYPE_CHECKING:
    from .base import SamplerLike

FinishReason = Literal["stop", "length", "cancelled"]


@dataclass(frozen=True, slots=True)
class Generation:
    """One generated token and the timings of the stream so far.

    Times are seconds from the start of the call (``stream()`` entry), measured with
    ``time.perf_counter``. ``finish_reason`` is ``None`` except on the last record.
    """

    text: str  # the text this token adds (may be "" while a UTF-8 sequence is incomplete)
    token: int  # token id; -1 on a final record that carries no token
    index: int  # 0-based position among generated tokens
    t: float  # seconds since start when this token was ready
    ttft: float  # seconds from start to the first generated token
    prompt_tokens: int
    prompt_time: float  # seconds spent in prefill (tokenize excluded)
    prompt_tps: float  # prompt tokens / prompt_time
    generation_tokens: int  # tokens generated so far, this one included
    generation_tps: float  # decode tokens/s so far: (generation_tokens - 1) / (t - ttft)
    finish_reason: FinishReason | None = None
    logprob: float | None = None
    cached_tokens: int = 0  # prompt tokens whose KV was reused, not recomputed
    top_logprobs: tuple[tuple[int, float], ...] | None = None  # (token, logprob), best first, when asked for
    draft_tokens: int = 0  # speculative decoding: tokens drafted so far
    draft_accepted: int = 0  # ... and how many of them the target accepted
    decode_steps: int = 0  # target llama_decode calls (the prompt's included) that gave this generation a token
    entropy: float | None = None  # nats, of the distribution the token came from (Sampling.token_stats)
    stop: str | None = None  # the stop string that ended the reply (finish_reason "stop" by a stop string)

    @property
    def acceptance(self) -> float:
        """Share of drafted tokens accepted (0 without drafts)."""
        return self.draft_accepted / self.draft_tokens if self.draft_tokens else 0.0

    @property
    def tokens_per_step(self) -> float:
        """Generated tokens per target decode: the speculative speed-up over plain decoding, before the
        verification batches' extra cost (1.0 for plain decoding)."""
        return self.generation_tokens / self.decode_steps if self.decode_steps else 0.0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class Result:
    """What ``generate`` returns: the whole text and the timings of its last record."""

    text: str
    tokens: list[int]
    finish_reason: FinishReason
    last: Generation | None  # None when nothing was generated (max_tokens=0)
    peak_rss_bytes: int = 0

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def timings(self) -> dict:
        if self.last is None:
            return {}
        d = self.last.to_dict()
        for k in ("text", "token", "index", "logprob", "top_logprobs", "entropy", "stop"):
            d.pop(k)
        d["peak_rss_bytes"] = self.peak_rss_bytes
        return d


# Sampling's fields for llama.cpp's samplers beyond top-k/top-p/min-p/temp, named as llama-server's request fields
MORE_SAMPLERS = ("repeat_last_n", "typical_p", "top_n_sigma", "xtc_probability", "xtc_threshold", "mirostat",
                 "mirostat_tau", "mirostat_eta", "dynatemp_range", "dynatemp_exponent", "dry_multiplier", "dry_base",
                 "dry_allowed_length", "dry_penalty_last_n", "dry_sequence_breakers", "n_indent", "t_max_predict_ms")


UNTIL_END = 1 << 30  # max_tokens -1: more tokens than any context holds, so the text's or the context's end ends it


@fields.keywords("Sampling")
@dataclass(frozen=True, slots=True)
class Sampling:
    """Sampling settings; ``temp == 0`` is greedy. Validated on construction."""

    temp: float = 0.8
    top_p: float = 0.95
    top_k: int = 40
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    presence_penalty: float = 0.0  # OpenAI's: subtracted once from any token already generated
    frequency_penalty: float = 0.0  # OpenAI's: subtracted per earlier occurrence
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token, bias added to its logit)
    # llama.cpp's other samplers, by llama-server's names and defaults (each off at its default)
    repeat_last_n: int = 64  # tokens the penalties look back over (0: none, -1: the whole context)
    typical_p: float = 1.0  # locally typical sampling (1 = off)
    top_n_sigma: float = -1.0  # keep logits within n standard deviations of the top one (<= 0 = off)
    xtc_probability: float = 0.0  # XTC: chance of removing the likeliest tokens above the threshold (0 = off)
    xtc_threshold: float = 0.1
    mirostat: int = 0  # 1 or 2: Mirostat (v1, v2) after temp, in place of the others and the penalties (llama.cpp's)
    mirostat_tau: float = 5.0  # its target surprise
    mirostat_eta: float = 0.1  # its learning rate
    dynatemp_range: float = 0.0  # dynamic temperature: temp +- range, by the entropy (0 = off)
    dynatemp_exponent: float = 1.0
    dry_multiplier: float = 0.0  # DRY: penalise tokens that extend a repeated sequence (0 = off)
    dry_base: float = 1.75  # multiplier * base ^ (length of the repeat - allowed length)
    dry_allowed_length: int = 2
    dry_penalty_last_n: int = 64  # tokens it scans (0 = off)
    dry_sequence_breakers: tuple[str, ...] = ("\n", ":", "\"", "*")  # a repeat does not run across these
    seed: int = 0xFFFFFFFF  # llama.cpp's LLAMA_DEFAULT_SEED: random (None is taken for it)
    max_tokens: int = 256
    stop: tuple[str, ...] = field(default_factory=tuple)
    grammar: str | None = None  # GBNF text, enforced by llama.cpp's grammar sampler
    ignore_eos: bool = False
    # speculative decoding: None (off), "lookup" (n-gram drafts from the prompt and the text so far) or "model"
    # (a draft model loaded with the target, e.g. ``load(..., draft_model=...)``); the output is unchanged
    draft: str | None = None
    draft_max: int = 16  # most tokens drafted per step (the draft length adapts below it)
    token_stats: bool = False  # record each token's logprob and entropy (raw logits; the cascade's confidence)
    # code infill (llama-server's): after the first newline, a line indented by fewer than n_indent spaces or tabs
    # ends the reply where its text starts; a newline after t_max_predict_ms of generation ends it (0: off)
    n_indent: int = 0
    t_max_predict_ms: float = 0.0
    infill: bool = False  # llama.cpp's infill sampler after the others (fill-in-the-middle: llama-server's "infill")

    @property
    def repeats(self) -> bool:
        """Whether the repeat/presence/frequency penalties apply: llama.cpp's Mirostat chain has none."""
        return self.repeat_last_n != 0 and not self.mirostat and (
            self.repeat_penalty != 1.0 or bool(self.presence_penalty) or bool(self.frequency_penalty))

    @property
    def dry(self) -> bool:
        return self.dry_multiplier > 0 and self.dry_penalty_last_n != 0 and not self.mirostat

    @property
    def penalized(self) -> bool:
        """Whether a sampler looks back over the tokens so far (the prompt's included)."""
        return self.repeats or self.dry

    @classmethod
    def of(cls, sampling: Sampling | Mapping | None = None, **kw) -> Sampling:
        """``sampling`` (a Sampling or a dict of its fields) with the keyword arguments ``kw`` over it; an
        unknown name is an error that says which one is meant (``temperature``: ``temp``)."""
        if sampling is not None and not isinstance(sampling, (Sampling, Mapping)):
            raise InvalidArgument(f"sampling={sampling!r} is a {type(sampling).__name__}; give a Sampling or a "
                                  f"dict of its fields")
        given = {**(asdict(sampling) if isinstance(sampling, Sampling) else dict(sampling or {})), **kw}
        if err := fields.unknown("Sampling", given, cls.__dataclass_fields__):
            raise err
        return cls(**given)

    def __post_init__(self) -> None:
        if self.seed is None or self.seed == -1:  # OpenAI's "no seed", llama.cpp's -1: a random one
            object.__setattr__(self, "seed", 0xFFFFFFFF)
        # llama.cpp's -1 ("no limit") and -2 ("until the context is full"), llama-cpp-python's None: all run to the end
        if self.max_tokens is None or (isinstance(self.max_tokens, int) and self.max_tokens in (-1, -2)):
            object.__setattr__(self, "max_tokens", UNTIL_END)
        if isinstance(self.dry_sequence_breakers, str):
            object.__setattr__(self, "dry_sequence_breakers", (self.dry_sequence_breakers,))
        elif isinstance(self.dry_sequence_breakers, list):
            object.__setattr__(self, "dry_sequence_breakers", tuple(self.dry_sequence_breakers))
        if isinstance(self.logit_bias, Mapping):  # OpenAI's and llama-cpp-python's shape: {token: bias}
            object.__setattr__(self, "logit_bias", tuple(self.logit_bias.items()))
        fields.check(self)
        try:
            bias = tuple((int(t), float(b)) for t, b in self.logit_bias)
        except (TypeError, ValueError):
            raise InvalidArgument(f"logit_bias={self.logit_bias!r:.200} is not token ids with biases; give "
                                  f"{{token_id: bias}} or ((token_id, bias), ...)") from None
        except OverflowError:  # an int past float's range (10**400)
            raise InvalidArgument("logit_bias holds a bias too large for a number; give finite biases (-100 to 100 "
                                  "is OpenAI's range; -inf bans a token)") from None
        if any(math.isnan(b) or b == math.inf for _, b in bias):  # -inf bans a token; NaN or +inf means nothing
            raise InvalidArgument(f"logit_bias={dict(bias)!r} holds NaN or +inf; give finite biases (-inf bans a "
                                  f"token)")
        object.__setattr__(self, "logit_bias", bias)
        for f in fields_of(self):  # NaN, inf or an int past float's range in any sampler setting: an error here,
            value = getattr(self, f.name)  # not a reply or a GET /slots that JSON cannot carry, or an OverflowError
            if isinstance(f.default, float) and not (math.isfinite(value) if isinstance(value, float) else
                                                     abs(value) < 1e308):
                raise InvalidArgument(f"--{f.name.replace('_', '-')} / {f.name}={value!r:.40} must be a finite "
                                      f"number")
        checks = [
            ("temp", self.temp >= 0 and math.isfinite(self.temp), "must be a finite number >= 0 (0 = greedy)"),
            ("top-p", 0 <= self.top_p <= 1, "must be in [0, 1] (0: the likeliest token only)"),
            ("top-k", self.top_k >= 0, "must be >= 0 (0 = off)"),
            ("min-p", 0 <= self.min_p <= 1, "must be in [0, 1]"),
            ("repeat-penalty", self.repeat_penalty > 0, "must be > 0 (1 = off)"),
            ("presence-penalty", -2 <= self.presence_penalty <= 2, "must be in [-2, 2] (0 = off)"),
            ("frequency-penalty", -2 <= self.frequency_penalty <= 2, "must be in [-2, 2] (0 = off)"),
            ("repeat-last-n", self.repeat_last_n >= -1, "must be >= -1 (0 = off, -1 = the whole context)"),
            ("typical-p", 0 <= self.typical_p <= 1, "must be in [0, 1] (1 = off)"),
            ("top-n-sigma", math.isfinite(self.top_n_sigma), "must be a finite number (<= 0 = off)"),
            ("xtc-probability", 0 <= self.xtc_probability <= 1, "must be in [0, 1] (0 = off)"),
            ("xtc-threshold", 0 <= self.xtc_threshold <= 1, "must be in [0, 1] (> 0.5 = off)"),
            ("mirostat", self.mirostat in (0, 1, 2), "must be 0 (off), 1 or 2"),
            ("mirostat-tau", self.mirostat_tau >= 0 and math.isfinite(self.mirostat_tau),
             "must be a finite number >= 0"),
            ("mirostat-eta", 0 < self.mirostat_eta <= 1, "must be in (0, 1]"),
            ("dynatemp-range", self.dynatemp_range >= 0 and math.isfinite(self.dynatemp_range),
             "must be a finite number >= 0 (0 = off)"),
            ("dynatemp-exponent", self.dynatemp_exponent > 0 and math.isfinite(self.dynatemp_exponent),
             "must be a finite number > 0"),
            ("dry-multiplier", self.dry_multiplier >= 0 and math.isfinite(self.dry_multiplier),
             "must be a finite number >= 0 (0 = off)"),
            ("dry-base", self.dry_base >= 1 and math.isfinite(self.dry_base), "must be a finite number >= 1"),
            ("dry-allowed-length", self.dry_allowed_length >= 0, "must be >= 0"),
            ("dry-penalty-last-n", self.dry_penalty_last_n >= 0, "must be >= 0 (0 = off)"),
            ("dry-sequence-breakers", all(isinstance(b, str) and b for b in self.dry_sequence_breakers),
             "must be non-empty strings"),
            ("max-tokens", self.max_tokens >= 0, "must be >= 0, or -1 (or None): until the text or the context ends"),
            ("seed", 0 <= self.seed <= 0xFFFFFFFF, "must be in [0, 2**32-1], or -1 for a random one"),
            ("draft", self.draft in (None, "lookup", "model"), "must be 'lookup', 'model' or None (off)"),
            ("draft-max", 1 <= self.draft_max <= 64, "must be in [1, 64]"),
        ]
        for name, ok, why in checks:
            if not ok:  # one message for both: the flag of run/chat/serve and the field of the Python API
                field_name = name.replace("-", "_")
                raise InvalidArgument(f"--{name} / {field_name}={getattr(self, field_name)!r} {why}")


@dataclass(eq=False, kw_only=True)
class Request:
    """One generation: the whole prompt's tokens and how to sample."""

    tokens: list[int]
    sampling: Sampling
    sampler: SamplerLike | None = None  # built by insert() unless given (the server builds it to fail early)
    logprobs: int | None = None  # top-k logprobs of generated tokens (0: only the chosen one)
    prompt_logprobs: int | None = None  # echo: logprobs of every prompt token (forces recompute)
    # legacy completions with logprobs: a sampled end-of-sequence token is a generated token with its own
    # logprobs entry (as llama-server and OpenAI give it; lm-eval drops the last entry as the generated one)
    eos_entry: bool = False
    t_arrival: float = field(default_factory=time.perf_counter)
    from_logits: bool = False  # the slot's last decode already holds the logits to sample first (no prefill)
    adapters: tuple[str, ...] | None = None  # LoRA adapters by name (engine.adapters); None: the active ones
    slot: int = -1  # the sequence of the slot that serves it, once admitted (llama-server's id_slot)
    post_probs: bool = False  # logprobs after the sampler chain, not of the raw logits (post_sampling_probs)
