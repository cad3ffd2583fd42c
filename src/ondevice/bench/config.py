"""What a bench sweep is told: one declaration for ``ondevice bench``'s flags, ``ONDEVICE_BENCH_*`` and
``ondevice.bench(...)``'s keywords (see :mod:`ondevice.config`).

Every list is a sweep axis (llama-bench's comma lists); the cartesian product is the set of configurations.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BeforeValidator, Field, NonNegativeInt, PositiveInt, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from ..config import AnyList, CommaList, IntList
from ..engine.args import FLASH_ATTN, switch
from .workloads import TestSpec, parse_tests


def _on_off_auto(v):
    """llama-bench's -fa values: on/off/auto, 1/0/-1 (and true/false) -> True/False/None."""
    if isinstance(v, str):
        if switch(v) not in FLASH_ATTN:
            raise ValueError(f"{v!r} is not on, off or auto (1, 0 or -1)")
        return FLASH_ATTN[switch(v)]
    return v


FlashAttn = Annotated[bool | None, BeforeValidator(_on_off_auto)]

# pp512 + tg128 are llama-bench's defaults; tg128@d512 shows the cost of a filled KV cache and chat the
# TTFT of real prompts. r=5 like llama-bench. About 60-70 s on 2 cores for the 135M default model.
DEFAULT_TESTS = "pp512,tg128,tg128@d512,chat"

# llama-bench's spelling of the flags (the others are --field-name)
FLAGS = {"models": ("-m", "--model"), "threads": ("-t", "--threads"), "n_batch": ("-b", "--batch-size"),
         "n_ubatch": ("-ub", "--ubatch-size"), "n_ctx": ("-c", "--ctx-size"), "type_k": ("-ctk", "--cache-type-k"),
         "type_v": ("-ctv", "--cache-type-v"), "flash_attn": ("-fa", "--flash-attn"),
         "repetitions": ("-r", "--repetitions")}


class BenchConfig(BaseSettings):
    """A sweep: the models, the tests, the settings to sweep and how to measure."""

    model_config = SettingsConfigDict(env_prefix="ONDEVICE_BENCH_", extra="forbid", frozen=True,
                                      protected_namespaces=())

    models: CommaList[str] = Field(default_factory=list, description="model names, stored variants or .gguf "
                                                                     "paths (none: the embedded model)")
    tests: CommaList[str] = Field(default_factory=list, description="tests: ppN, tgN, pgP,N, any with @dD (KV "
                                                                    f"depth), chat[N] (none: {DEFAULT_TESTS})")
    threads: IntList[int] = Field(default_factory=list, description="threads (none, 0 or -1: physical performance "
                                                                     "cores)")
    n_batch: IntList[PositiveInt] = Field(default_factory=lambda: [2048], description="logical batch n_batch")
    n_ubatch: IntList[PositiveInt] = Field(default_factory=lambda: [512], description="micro-batch n_ubatch")
    n_ctx: CommaList[NonNegativeInt] = Field(default_factory=lambda: [0], description="context size (0: just "
                                                                                      "enough for the tests)")
    type_k: CommaList[str] = Field(default_factory=lambda: ["f16"], description="KV cache type of K")
    type_v: CommaList[str] = Field(default_factory=lambda: ["f16"], description="KV cache type of V")
    flash_attn: CommaList[FlashAttn] = Field(default_factory=lambda: [None], description=(
        "flash attention: on/off/auto (1/0/-1), as llama-bench; auto (none): llama.cpp decides, as in `ondevice run` "
        "and `serve`"))
    profile: AnyList[str] = Field(default_factory=list, description="device profile: a name (host, phone-4g, "
                                                                    "edge-1g) or threads=2,mem=1G,cpus=0 (repeat "
                                                                    "to sweep; none: host)")
    repetitions: PositiveInt = Field(5, description="timed repetitions per test, after the warm-up")
    interleave: bool = Field(False, description="compare the models fairly: load them all in one process and "
                                                "run each repetition round the models in turn, so drift in "
                                                "the machine's speed hits all alike (peak RSS is then not "
                                                "per model; no memory-capped profile)")
    warmup: bool = Field(True, description="one untimed run before the timed ones")
    seed: int = Field(42, description="seed of the random prompt tokens")
    wait_idle: float = Field(0.0, ge=0, json_schema_extra={"const": 120.0},
                             description="before each configuration wait until other processes leave the CPU "
                                         "quiet for 3 s, at most this many seconds (given bare: 120); noisy "
                                         "records are flagged either way")
    session: str | None = Field(None, description="session id to record under (none: a new one; with resume, "
                                                  "the one to continue, none: the latest)")
    resume: bool = Field(False, description="skip configurations already stored in the session (--session, else "
                                            "the latest bench session)")
    roofline: bool = Field(True, description="probe the machine (once, cached) and give % of roofline")
    reprobe: bool = Field(False, description="measure bandwidth and compute again instead of the cached probe")

    @field_validator("type_k", "type_v")
    @classmethod
    def _kv_type(cls, v: list[str]) -> list[str]:
        from ..engine.llama import _KV_TYPES

        bad = [x for x in v if x not in _KV_TYPES]
        if bad:
            raise ValueError(f"{bad[0]!r} is not a KV cache type; use {', '.join(_KV_TYPES)}")
        return v

    @field_validator("threads")
    @classmethod
    def _threads(cls, v: list[int]) -> list[int]:
        from ..engine.resources import check_threads

        # before the sweep starts, not as an error row per configuration; 0 and -1 (llama.cpp's): the default
        return [check_threads(n or -1, "-t/--threads") for n in v]

    @field_validator("n_ctx")
    @classmethod
    def _n_ctx(cls, v: list[int]) -> list[int]:
        if small := [n for n in v if 0 < n < 16]:
            raise ValueError(f"{small[0]} is too small a context; use at least 16 (or 0: just enough for the tests)")
        return v

    @model_validator(mode="after")
    def _quantized_v_needs_flash_attn(self) -> BenchConfig:
        quantized = [t for t in self.type_v if t not in ("f32", "f16", "bf16")]
        if quantized and all(fa is False for fa in self.flash_attn):  # llama.cpp refuses every such context
            raise ValueError(f"a quantized V cache ({quantized[0]}) needs flash attention in llama.cpp: add -fa 1 "
                             "(or -fa auto), or keep -ctv f16")
        return self

    @field_validator("tests")
    @classmethod
    def _tests(cls, v: list[str]) -> list[str]:
        parse_tests(v)  # a bad spec is an InvalidArgument naming it
        return v

    @model_validator(mode="after")
    def _interleave(self) -> BenchConfig:
        from ..device import parse_profile

        if self.interleave and len(set(self.models)) > 1:
            for spec in self.profile:
                cap = parse_profile(spec).mem_limit_bytes
                if cap is not None:
                    raise ValueError(f"interleave loads every model into one process, which would share the "
                                     f"memory cap of profile {spec!r} ({cap / 2**20:.0f} MiB); drop the "
                                     f"interleave or use a profile without mem=")
        return self

    @property
    def specs(self) -> list[TestSpec]:
        return parse_tests(self.tests or DEFAULT_TESTS)
