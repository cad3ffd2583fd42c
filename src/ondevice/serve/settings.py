"""Server settings: one declaration gives the flag, the ``ONDEVICE_*`` env var, the validation and the help
(the mechanism, shared with ``bench`` and ``eval``, is :mod:`ondevice.config`).

Modelled on llama-cpp-python's ``server/settings.py``. Precedence: command-line flag > environment > default.
"""

from __future__ import annotations

import argparse
import errno
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, NonNegativeInt, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from ..capped import read_capped, size_text
from ..config import AnyList, add_config_arguments, config_from
from ..device.cores import minus_one_is_zero
from ..engine.llama_flags import KV_TYPES

KEY_FILE_LIMIT = 1 << 20  # bytes: a file of API keys, one per line (`/dev/zero` was read to a MemoryError)


def _key_lines(path: str) -> list[str]:
    """The keys in ``path``, one per line; a file over :data:`KEY_FILE_LIMIT` is no key file."""
    data = read_capped(path, KEY_FILE_LIMIT)
    if data is None:
        raise OSError(errno.EFBIG, f"over {size_text(KEY_FILE_LIMIT)}, not a file of keys")
    return [k for k in data.decode("utf-8").splitlines() if k.strip()]


def _minus_one_is_none(value: Any) -> Any:
    """A pydantic ``BeforeValidator`` for a count whose default (None) llama.cpp spells -1 (``-tb -1``); other
    numbers below 1 are refused here, with the way to ask for the default."""
    try:
        n = int(str(value).strip()) if not isinstance(value, (bool, float)) and value is not None else None
    except ValueError:
        return value  # not a whole number: pydantic's own error
    if n == -1:
        return None
    if n is not None and n < 1:
        raise ValueError("must be >= 1, or -1 for the default (as many as --threads)")
    return value


class ServeSettings(BaseSettings):
    """Everything ``ondevice serve`` can be told."""

    model_config = SettingsConfigDict(env_prefix="ONDEVICE_", extra="forbid", protected_namespaces=())

    model: str | None = Field(None, description="catalog name, stored variant or path to a .gguf "
                                                "(None: the default model)")
    host: str = Field("127.0.0.1", description="address to bind; 0.0.0.0 exposes the server to the network")
    port: int = Field(8080, ge=0, le=65535, description="TCP port (0: any free port)")
    parallel: int = Field(4, ge=1, le=256, description="slots: sequences decoded together in one batch")
    ctx: int = Field(2048, ge=64, description="context tokens per slot (the KV cache holds ctx * parallel)")
    threads: Annotated[NonNegativeInt | None, BeforeValidator(minus_one_is_zero)] = Field(
        None, description="CPU threads (None, 0 or -1: one per physical performance core)")
    kv_type: Literal[KV_TYPES] = Field(
        "f16", description="KV cache type (f32: results that depend least on where a sequence sits in the cache; "
                "with flash attention on, a slot restored from a file can still flip a greedy near-tie)")
    flash_attn: Literal["auto", "on", "off"] = Field(
        "auto", description="flash attention, as llama-server's -fa (auto: llama.cpp decides, on for CPUs; `ondevice "
                            "bench -fa off,auto` shows which decodes faster here; not given, a variant from `ondevice "
                            "fit --knobs` loads with the knobs its fit measured on this machine)")
    batch: int = Field(2048, ge=32, description="most tokens in one llama_decode (decode + prefill chunk)")
    ubatch: int = Field(512, ge=1, description="physical batch: tokens per compute step (llama-server's -ub)")
    threads_batch: Annotated[int | None, BeforeValidator(_minus_one_is_none)] = Field(
        None, ge=1, description="threads for prompts (None or -1: as many as --threads; llama-server's -tb)")
    mmap: bool = Field(True, description="map the model file (--no-mmap: read it into memory)")
    mlock: bool = Field(False, description="keep the model's weights in RAM (llama-server's --mlock)")
    prefill_chunk: int = Field(512, ge=16, description="most prompt tokens per step while other slots decode, "
                                                       "so a long prompt does not stall running streams")
    prefill_batch: int = Field(32, ge=1, description="a step starts no further new prompt once it holds this many "
                                                     "prompt tokens (or --prefill-share of those waiting, if more): "
                                                     "a burst of requests gets its first tokens in arrival order, a "
                                                     "share per step, instead of all after the whole burst's prefill")
    prefill_share: float = Field(0.5, ge=0, le=1, description="share of the waiting prompt tokens a step may start "
                                                              "(0.5: half the burst in the first step, half the rest "
                                                              "in the next, ...; 1: all at once; 0: --prefill-batch "
                                                              "alone)")
    max_prompt_tokens: int = Field(0, ge=0, description="longest prompt accepted (0: ctx - 1); longer is a 400")
    max_queue: int = Field(64, ge=0, description="requests waiting for a slot; beyond it a 429 with Retry-After")
    timeout: float = Field(600.0, gt=0, description="seconds a request may take, queue wait included (504 after)")
    sse_ping_interval: float = Field(30, description="seconds a stream may stay silent (queued, a long prompt) "
                                                     "before an SSE comment ': ping' keeps proxies from cutting it; "
                                                     "0 or less: never (llama-server's)")
    max_body_bytes: int = Field(8 * 1024 * 1024, ge=1024, description="largest request body (413 beyond)")
    api_key: str | None = Field(None, description="require 'Authorization: Bearer KEY' (401 without it); several "
                                                  "keys separated by commas, as llama-server's")
    api_key_file: str | None = Field(None, description="a file of API keys, one per line (llama-server's)")
    embeddings: bool = Field(True, description="serve /v1/embeddings from a second small context (mean pooled)")
    embeddings_ctx: int = Field(512, ge=16, description="longest input of /v1/embeddings, in tokens")
    alias: str | None = Field(None, description="model id reported by /v1/models (None: the model's name)")
    chat_template: str | None = Field(None, description="the chat template instead of the model file's: chatml, "
                                                        "llama3, gemma, phi3, or Jinja text (llama-server's)")
    chat_template_file: str | None = Field(None, description="a Jinja chat template from a file (llama-server's)")
    adapter: AnyList[str] = Field([], description="a LoRA adapter NAME=PATH (or NAME=STORED, an `ondevice adapt "
                                                  "list` name) made by `ondevice adapt` (repeatable); "
                                                  "a request picks it with model 'BASE+NAME' (or llama-server's "
                                                  "per-request lora field), the base stays loaded once")
    lora: AnyList[str] = Field([], description="llama-server's --lora PATH[:SCALE] (or --lora-scaled PATH SCALE): "
                                               "an adapter applied to every request that names none "
                                               "(repeatable; ids in /lora-adapters in this order, then --adapter's)")
    lora_init_without_apply: bool = Field(False, description="load the --lora adapters at scale 0 (off until POST "
                                                             "/lora-adapters sets their scales), as llama-server's")
    slots: bool = Field(True, description="GET /slots: each slot's state, counts and settings, as llama-server's")
    slot_save_path: str | None = Field(None, description="folder of slot files: POST /slots/ID?action=save|restore "
                                                         "writes or reads a slot's prompt cache there, in "
                                                         "llama-server's format (None: refused)")
    draft: str | None = Field(None, description="speculative decoding by default: 'lookup' (n-gram drafts from "
                                                "the prompt and text so far) or a draft MODEL sharing the "
                                                "vocabulary; requests may override with draft (None: off)")
    draft_max: int = Field(16, ge=1, le=64, description="most tokens drafted per step")
    cors: str = Field("local", description="web pages allowed to call the server from a browser (CORS): 'local' "
                                           "(pages from localhost, 127.0.0.1 or [::1], any port: Ollama's "
                                           "default), '*' (any page: llama-server's), 'none', or origins "
                                           "separated by commas (https://app.example.com)")
    allowed_hosts: str | None = Field(None, description="Host header names the server answers to besides "
                                                        "localhost and IP addresses, separated by commas "
                                                        "(.example.com: the domain and its subdomains; '*': any). "
                                                        "Bound to a loopback address, other names are refused "
                                                        "(403, against DNS rebinding: Ollama's rule); give the "
                                                        "names a reverse proxy forwards. Given, it is checked on "
                                                        "any bind")
    header_timeout: float = Field(10.0, gt=0, description="seconds a client may take to send a request's headers "
                                                          "(from connecting, or its first byte on a kept-alive "
                                                          "connection) before it is disconnected with a 408; "
                                                          "headers over 64 KiB get a 431")
    body_timeout: float = Field(10.0, gt=0, description="seconds a client may pause while sending a request's "
                                                        "body (between two reads, as nginx's "
                                                        "client_body_timeout; not the whole body) before it is "
                                                        "disconnected with a 408")
    access_log: bool = Field(True, description="one line per request on stderr: method, route, status, "
                                               "tokens, ms (errors with their reason)")
    # device -> cloud cascade (ondevice.cascade): the device answers; unsure answers go to this endpoint
    cascade: str | None = Field(None, description="OpenAI-compatible cloud endpoint to defer unsure answers to "
                                                  "(None: no cascade)")
    cascade_model: str | None = Field(None, description="model name at the cloud (None: the one it lists; "
                                   "a cloud listing several needs it)")
    cascade_threshold: float = Field(0.5, ge=0, le=1, description="defer when the confidence is below this")
    cascade_defer_share: float | None = Field(None, ge=0, le=1, description="defer this share of requests, the "
                                              "least confident (the threshold that deferred it on the fitted "
                                              "combiner's dev answers: `ondevice cascade fit`); replaces "
                                              "--cascade-threshold")
    cascade_budget: float = Field(1.0, ge=0, le=1, description="most share of requests deferred per window")
    cascade_window: float = Field(60.0, gt=0, description="seconds of the deferral budget's sliding window")
    cascade_timeout: float = Field(10.0, gt=0, description="seconds the cloud may take for its whole answer, "
                                                           "streamed or not, before the device answers (a relayed "
                                                           "stream cut past it ends with finish_reason error)")
    cascade_key_env: str = Field("ONDEVICE_CLOUD_KEY", description="name of the env var holding the cloud's "
                                                                   "API key (the key is never logged)")
    cascade_prefix_tokens: int = Field(16, ge=0, description="streaming: decide after this many device tokens "
                                                             "(0: buffer the whole answer, then decide)")
    cascade_keep_hard: bool = Field(False, description="keep deferred inputs with the cloud's answers in the "
                                                       "store (export: ondevice cascade export)")
    cascade_combiner: str | None = Field(None, description="confidence combiner file (None: the one fitted for "
                                                           "this model by `ondevice cascade fit`, if any)")
    amx: Literal["auto", "on", "off"] = Field(
        "auto", description="Intel AMX kernels (auto: off unless proven safe and faster here; see `ondevice device`)")
    repack: Literal["auto", "on", "off"] = Field(
        "auto", description="CPU_REPACK interleaved-weight kernels (auto: on unless its self-test failed here)")

    @field_validator("flash_attn", "amx", "repack", mode="before")
    @classmethod
    def _on_off(cls, v: Any) -> Any:
        from ..engine.args import switch

        return switch(v) if v is not None else v

    @field_validator("cors")
    @classmethod
    def _origins(cls, v: str) -> str:
        if v not in ("local", "*", "none"):
            bad = [o for o in v.split(",")
                   if not re.fullmatch(r"[A-Za-z][A-Za-z0-9+.-]*://[^/\s:]+(:\d+)?", o.strip())]  # app://x too
            if bad:
                raise ValueError(f"{bad[0].strip()!r} is not an origin; give scheme://host[:port] "
                                 f"(e.g. http://localhost:3000), or local, * or none")
        return v

    @field_validator("allowed_hosts")
    @classmethod
    def _hosts(cls, v: str | None) -> str | None:
        if v is not None:
            bad = [h for h in v.split(",") if h.strip() != "*"
                   and not re.fullmatch(r"\.?[A-Za-z0-9_]([A-Za-z0-9_.-]*[A-Za-z0-9_])?\.?", h.strip())]
            if bad or not v.strip():
                raise ValueError(f"{(bad or [v])[0].strip()!r} is not a host name; give names without scheme or "
                                 f"port (api.example.com, .example.com for its subdomains), or *")
        return v

    @field_validator("slot_save_path")
    @classmethod
    def _slot_folder(cls, v: str | None) -> str | None:
        if v is not None and not Path(v).expanduser().is_dir():
            raise ValueError(f"{v} is not a folder; make it first (mkdir -p {v})")
        return v

    @field_validator("draft")
    @classmethod
    def _drafter(cls, v: str | None) -> str | None:
        from ..engine.llama_flags import draft_count

        if why := draft_count(v):
            raise ValueError(why)
        return v

    @field_validator("api_key")
    @classmethod
    def _key(cls, v: str | None) -> str | None:
        if v is not None and not v.strip():  # ONDEVICE_API_KEY= (empty): no key, as before
            return None
        if v is not None and not v.replace(",", "").strip():  # ",": keys meant, none given; not an open server
            raise ValueError("holds no key; give KEY (or KEY1,KEY2), or leave --api-key out for an open server")
        if v is not None:  # compared with the header's bytes as UTF-8 (http.Guard): a non-ASCII key works as curl
            try:  # sends it; bytes that are not UTF-8 (an env var's) could never match
                v.encode()
            except UnicodeEncodeError:
                raise ValueError("is not valid UTF-8 text; give the key as UTF-8") from None
        return v

    @field_validator("api_key_file")
    @classmethod
    def _key_file(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                keys = _key_lines(v)
            except (OSError, UnicodeDecodeError) as e:
                raise ValueError(f"{v} cannot be read ({getattr(e, 'strerror', None) or e}); give a text file "
                                 f"with one key per line") from None
            if not keys:
                raise ValueError(f"{v} holds no key; write one key per line")
        return v

    @property
    def api_keys(self) -> tuple[str, ...]:
        """The keys a request may send (--api-key's, split at commas, then --api-key-file's lines); none: open."""
        keys = (self.api_key or "").split(",")
        if self.api_key_file:
            keys += _key_lines(self.api_key_file)
        return tuple(k.strip() for k in keys if k.strip())

    @model_validator(mode="after")
    def _check(self) -> ServeSettings:
        if self.max_prompt_tokens >= self.ctx:
            raise ValueError(f"max_prompt_tokens {self.max_prompt_tokens} must be below ctx {self.ctx} "
                             f"(room is needed for the reply); lower it or raise --ctx")
        if self.cascade is None:  # the cascade's own settings would be ignored without it (given, even as a default)
            fields = type(self).model_fields
            env = self.model_config["env_prefix"]
            given = [f"{env}{n.upper()}" if f"{env}{n.upper()}" in os.environ else "--" + n.replace("_", "-")
                     for n in fields if n.startswith("cascade_") and n in self.model_fields_set]
            if given:
                one = len(given) == 1
                raise ValueError(f"{', '.join(given)} only {'applies' if one else 'apply'} with --cascade URL (the "
                                 f"cloud to defer to); add --cascade URL or drop {'it' if one else 'them'}")
        return self

    @property
    def prompt_limit(self) -> int:
        return self.max_prompt_tokens or self.ctx - 1


# flags with a short alias or llama-server's name (the last one is the one errors name)
FLAGS = {"model": ("-m", "--model"), "threads": ("-t", "--threads"), "parallel": ("-np", "--parallel"),
         "ctx": ("-c", "--ctx-size", "--ctx"), "flash_attn": ("-fa", "--flash-attn"),
         "batch": ("-b", "--batch-size", "--batch"), "ubatch": ("-ub", "--ubatch-size", "--ubatch"),
         "threads_batch": ("-tb", "--threads-batch"), "alias": ("-a", "--alias"), "timeout": ("-to", "--timeout"),
         "embeddings": ("--embedding", "--embeddings"), "draft": ("-md", "--model-draft", "--draft"),
         "draft_max": ("--draft-n", "--draft-max")}


def add_settings_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per field; absent flags fall through to the env var, then the default."""
    add_config_arguments(parser, ServeSettings, FLAGS)


def settings_from_args(args: argparse.Namespace | None = None, **over: Any) -> ServeSettings:
    """Settings from given flags (strings are validated by pydantic) over env vars; errors name the flag."""
    return config_from(ServeSettings, args, verb="serve", what="server settings", flags=FLAGS, **over)
