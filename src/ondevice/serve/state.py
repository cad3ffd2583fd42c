"""What the server holds: the model, its batcher, the embeddings context, prompt rendering and limits."""

from __future__ import annotations

import asyncio
import json
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..engine.args import FLASH_ATTN
from ..engine.base import EngineConfig
from ..engine.chat import message_text
from ..engine.chat_templates import check_renders, model_template, template_from
from ..engine.embed import capacity, embed_batch, embedding_config, packs
from ..engine.model import BaseModelWarning, Model, check_same_vocab
from ..errors import ContextOverflow, InvalidArgument, ModelNotFound
from .batcher import Batcher
from .metrics import Metrics
from .settings import ServeSettings

CALL_POLL_S = 0.2  # how often a request waiting on the batcher thread looks for its client and a stopping server


def resolve_model(name: str | None) -> tuple[str, Path]:
    """(display name, path) of a catalog name, stored variant or .gguf path."""
    try:
        from ..models import resolve
    except ImportError:  # the models package is not importable: only explicit paths work
        if name and Path(name).is_file():
            return Path(name).stem, Path(name)
        raise ModelNotFound(f"cannot resolve model {name!r} without ondevice.models; pass a .gguf path with -m")
    ref = resolve(name)
    _ = ref.info  # validates the GGUF before llama.cpp sees it
    return ref.name, Path(ref.path)


def served_name(given: str | None, name: str) -> str:
    """What the server calls its model: the repository address it was started with (``hf.co/OWNER/REPO:QUANT``,
    from -m or -hf: what Ollama names such a model, and what its clients send), else the file's name."""
    from ..models.hf_repo import parse_repo

    ref = parse_repo(given) if given else None
    return ref.written if ref is not None else name


def _as_lora(load_spec, spec: str) -> str:
    """``load_spec(spec)`` of a --lora adapter, its errors naming --lora (the adapter loader says --adapter)."""
    try:
        return load_spec(spec)
    except InvalidArgument as e:
        raise InvalidArgument(str(e).replace("--adapter", "--lora", 1)) from None


class UnknownModel(Exception):
    """A model name the server does not serve (Ollama's routes: any; OpenAI's: another model ondevice knows): 404."""


def _names_file(name: str, path) -> bool:
    """Whether the model ``name`` is the file at ``path`` (a server started by path, asked by catalog name); told
    from names and paths alone: resolving a catalog name could assemble a model while a request waits."""
    from ..models.catalog import CATALOG, store_variants

    p, entry, stored = Path(path).resolve(), CATALOG.get(name), store_variants().get(name)
    if stored is not None and stored.resolve() == p:
        return True
    return entry is not None and (p == entry.store_path.resolve() or (entry.kind == "in_place" and
                                                                     p.name == entry.filename))


def _known_models() -> set[str]:
    """The names of the models ondevice knows here (its catalog and the store's variants)."""
    from ..models.catalog import known_names

    return set(known_names())


class PromptTooLong(InvalidArgument):
    """A prompt over the server's limit (a 400 with code context_length_exceeded)."""


class ServerState:
    """Loads the model once; every request handler reads from here."""

    def __init__(self, settings: ServeSettings):
        from ..engine.llama import LlamaEngine

        self.settings = s = settings
        template = template_from(s.chat_template, s.chat_template_file)  # its mistakes said before the load
        name, self.path = resolve_model(s.model)
        self.model_id = s.alias or served_name(s.model, name)
        parallel = s.parallel
        knobs = self.fitted_knobs()
        threads, flash_attn = knobs.get("n_threads", s.threads), knobs.get("flash_attn", FLASH_ATTN[s.flash_attn])
        self.engine = LlamaEngine(self.path, EngineConfig(
            n_ctx=s.ctx * parallel, n_threads=threads, n_threads_batch=s.threads_batch, n_batch=max(s.batch, parallel),
            n_ubatch=min(knobs.get("n_ubatch", s.ubatch), max(s.batch, parallel)), n_seq_max=parallel,
            type_k=s.kv_type, type_v=s.kv_type, warmup=False,  # the batcher warms it up on its own thread
            use_mmap=s.mmap, mlock=s.mlock, amx=s.amx, repack=s.repack, flash_attn=flash_attn))
        eng = self.engine
        try:
            # LoRA: --lora ones applied to requests that name none (llama-server's), --adapter ones when named
            self.adapter_names = [_as_lora(eng.adapters.load_spec, a) for a in s.lora]
            self.adapter_names += [eng.adapters.load_spec(a) for a in s.adapter]
            self.default_adapters = tuple(self.adapter_names[:len(s.lora)])
            # the scale an adapter is applied at (its flag's, 0 for --lora-init-without-apply, until POST
            # /lora-adapters sets one)
            self.lora_scale = {n: 0.0 if s.lora_init_without_apply and n in self.default_adapters
                               else eng.adapters.scales[n] for n in self.adapter_names}
        except BaseException:
            eng.close()
            raise
        self.template = model_template(template, eng, name)
        if template is None and self.template:  # every chat request would fail: refused now, as llama-server does
            try:
                check_renders(self.template, f"{name}'s own chat template", "; give one that works with "
                              "--chat-template NAME|JINJA or --chat-template-file FILE")
            except BaseException:
                eng.close()
                raise
        self.model = Model(name=name, path=self.path, engine=eng, template=self.template)  # renders prompts
        # token text tables built once: the engine's piece buffer is not shared across threads
        self.vocab_bytes = [eng.token_bytes(t) for t in range(eng.n_vocab)]
        # control tokens' text too: only a control token's plain piece is empty (half the start-up of a 262k vocab)
        self.special_bytes = [b or eng.token_bytes(t, special=True) for t, b in enumerate(self.vocab_bytes)]
        self.pieces = [token_name(b) for b in self.special_bytes]  # logprobs' "token"
        self.metrics = Metrics()
        self.draft_engine = None  # speculative decoding with a draft model (--draft MODEL)
        if s.draft not in (None, "lookup", "none"):
            dname, dpath = resolve_model(s.draft)
            self.draft_engine = LlamaEngine(dpath, EngineConfig(
                n_ctx=s.ctx * parallel, n_threads=threads, n_batch=max(s.batch, parallel), n_seq_max=parallel,
                warmup=False, amx=s.amx, repack=s.repack, flash_attn=flash_attn))
            check_same_vocab(eng, self.draft_engine, name, dname)
        # (mode, draft_max) for requests that do not say
        self.default_draft = ("model" if self.draft_engine else None if s.draft == "none" else s.draft, s.draft_max)
        self.closing = False  # the server is stopping (Runner.end_requests): nothing more is started
        self.batcher = Batcher(eng, parallel=parallel, slot_ctx=s.ctx, prefill_chunk=s.prefill_chunk,
                               prefill_batch=s.prefill_batch, prefill_share=s.prefill_share,
                               max_queue=s.max_queue, metrics=self.metrics, vocab_bytes=self.vocab_bytes,
                               draft_engine=self.draft_engine)
        self.embedder = None
        if s.embeddings:
            self.embedder = LlamaEngine(self.path, embedding_config(
                s.embeddings_ctx, n_threads=s.threads, amx=s.amx, repack=s.repack))
            self.embed_capacity = capacity(self.embedder)  # (tokens, inputs) per decode
        self.created = int(time.time())
        m = self.metrics
        m.gauge("queue_depth", "Requests waiting for a slot.", lambda: self.batcher.queue_depth)
        m.gauge("slots_busy", "Slots generating or prefilling.", lambda: self.batcher.busy)
        m.gauge("slots_total", "Slots (sequences decoded together).", lambda: parallel)
        m.gauge("slot_context_tokens", "Context tokens per slot.", lambda: s.ctx)
        m.gauge("prefill_tokens_per_second", "Prompt tokens per second the server's prefill steps ran at lately, as "
                "queue admission reads it (0: none measured yet).", lambda: self.batcher.prefill_tps)

    def fitted_knobs(self) -> dict:
        """The runtime knobs a variant's ``fit --knobs`` measured on this machine, less those the settings give
        (a flag or env var overrides its knob); ``knobs_note`` says which were applied, or why none were."""
        from ..models.runtime_knobs import fitted_knobs

        s, fields = self.settings, {"threads": "n_threads", "flash_attn": "flash_attn", "ubatch": "n_ubatch"}
        given = {fields[f]: getattr(s, f) for f in fields if f in s.model_fields_set} | {"type_v": s.kv_type}
        knobs, self.knobs_note = fitted_knobs(self.path, given)
        return knobs

    def adapters_for(self, model: str | None, lora: list | None = None) -> tuple[str, ...]:
        """The adapters a request runs under, each at its scale (``Adapters.scaled``): those its ``model`` names
        ('BASE+NAME' or '+NAME+NAME2'), else the --lora ones, each at the scale ``POST /lora-adapters`` last set;
        or llama-server's per-request ``lora`` list ([{"id": 0, "scale": 0.5}]: those adapters at those scales,
        the others off; an empty list is none given)."""
        from ..errors import InvalidArgument

        ads = self.engine.adapters
        names = self.named_adapters(model)
        if not lora:  # an empty list too is no choice, as llama-server reads it
            return tuple(ads.scaled(n, self.lora_scale[n]) for n in names or self.default_adapters
                         if self.lora_scale[n] != 0)
        if names:
            raise InvalidArgument(f"model {model!r} names adapters and lora lists them too; send one of the two")
        scales: dict[str, float] = {}
        for i, e in enumerate(lora):
            if not 0 <= e.id < len(self.adapter_names):
                have = (f"0..{len(self.adapter_names) - 1} (GET /lora-adapters lists them)" if self.adapter_names
                        else "none (start the server with --adapter NAME=PATH)")
                raise InvalidArgument(f"lora[{i}].id={e.id}: no adapter has that id; ids: {have}")
            scales[self.adapter_names[e.id]] = e.scale  # a later entry for the same id wins, as llama-server's
        return tuple(ads.scaled(n, v) for n, v in scales.items() if v != 0)

    def named_adapters(self, model: str | None) -> tuple[str, ...]:
        """The adapter names in a request's ``model`` ('BASE+NAME'); anything else: none. A name this server
        does not serve is answered by its model, as llama-server answers any (clients send "gpt-4o"), except
        another model ondevice knows: :class:`UnknownModel` (404), not a reply from a model not asked for."""
        base = (model or "").split("+")[0]
        if base and base != self.model_id and base in _known_models() and not _names_file(base, self.path):
            raise UnknownModel(f"model {base!r} is not the model this server serves ({self.model_id}); start "
                               f"`ondevice serve -m {base}` to serve it (GET /v1/models lists what this one serves)")
        if not model or "+" not in model:
            return ()
        names = tuple(n for n in model.split("+")[1:] if n)
        unknown = [n for n in names if n not in self.adapter_names]
        if unknown:
            from ..errors import InvalidArgument

            have = ", ".join(f"{self.model_id}+{n}" for n in self.adapter_names) or "none (start with --adapter)"
            raise InvalidArgument(f"model {model!r}: no adapter named {unknown[0]!r}; adapters served: {have}")
        return names

    def answered_by(self, model: str | None) -> str:
        """The ``model`` a reply names: the base, with the adapters the request asked for ('BASE+NAME')."""
        return "+".join([self.model_id, *self.named_adapters(model)])

    def start(self) -> None:
        self.batcher.start()

    def close(self) -> None:
        self.batcher.stop()
        self.engine.close()
        if self.draft_engine is not None:
            self.draft_engine.close()
        if self.embedder is not None:
            self.embedder.close()

    # -- prompts --------------------------------------------------------------------------------------
    def chat_tokens(self, messages: list[dict], tools: list[dict] | None, system_note: str | None) -> list[int]:
        """The chat prompt's tokens (Model.tokenize_prompt: message text never becomes a control token)."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", BaseModelWarning)
            return self.model.tokenize_prompt(messages, tools=tools, system_note=system_note)

    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
        return self.engine.tokenize(text, add_special=add_special, parse_special=parse_special)

    def check_prompt(self, tokens: list[int], embeddings: bool = False) -> None:
        limit = self.settings.prompt_limit
        if not tokens:
            raise InvalidArgument("the prompt is empty; give some text")
        if len(tokens) > limit:
            raise PromptTooLong(f"the prompt has {len(tokens)} tokens but this server accepts at most {limit} "
                                f"(max_prompt_tokens; per-slot context {self.settings.ctx}); shorten the prompt "
                                f"or restart the server with a larger --ctx / --max-prompt-tokens")
        bad = [t for t in tokens if not 0 <= t < self.engine.n_vocab]
        if bad:
            hint = (" LangChain's OpenAIEmbeddings sends OpenAI's tiktoken ids unless made with "
                    "check_embedding_ctx_length=False" if embeddings else "")
            raise InvalidArgument(f"token id {bad[0]} is outside the vocabulary (0..{self.engine.n_vocab - 1}); "
                                  f"send text, or this model's token ids (POST /tokenize).{hint}")

    def detokenize(self, tokens: list[int]) -> str:
        n = len(self.vocab_bytes)
        bad = [t for t in tokens if not 0 <= t < n]
        if bad:
            raise InvalidArgument(f"token id {bad[0]} is outside the vocabulary (0..{n - 1})")
        return b"".join(self.vocab_bytes[t] for t in tokens).decode("utf-8", errors="replace")

    def embedding_packs(self, token_lists: list[list[int]]) -> list[range]:
        """Check every input of an embeddings request, in order; then split them into runs of consecutive
        inputs that fit one decode each (engine/embed.py)."""
        limit = self.settings.embeddings_ctx
        for tokens in token_lists:  # the prompt limits first, as for every route
            if tokens:
                self.check_prompt(tokens, embeddings=True)
            if self.embedder is None:
                raise InvalidArgument("embeddings are off on this server; restart it with --embeddings")
            if len(tokens) > limit:
                raise PromptTooLong(f"the input has {len(tokens)} tokens but embeddings accept at most {limit}; "
                                    f"shorten it or restart the server with a larger --embeddings-ctx")
            if not tokens:
                raise InvalidArgument("the input is empty; give some text")
        return packs([len(t) for t in token_lists], *self.embed_capacity)

    async def embed(self, token_lists: list[list[int]], request) -> Any:
        """Pooled embeddings ``(len(token_lists), n_embd)`` of checked inputs that fit one decode (a run from
        :meth:`embedding_packs`), computed on the batcher thread (the one computing thread); None: the client
        left before they were started (see :meth:`on_batcher`)."""

        def run():
            try:
                return embed_batch(self.embedder, token_lists)
            except ContextOverflow as e:
                raise PromptTooLong(str(e)) from e

        return await self.on_batcher(run, request)

    async def on_batcher(self, fn: Callable[[], Any], request) -> Any:
        """``fn()`` on the batcher thread between two steps (embeddings, slot files), for a request whose client
        may leave or whose server may stop while it waits there: not started yet when the client leaves, it is
        dropped (None); when the server stops, it is a ShuttingDown (a 503, not the 500 of a handler cancelled at
        the end of the graceful shutdown). One already running finishes: one decode, one slot file."""
        from .http import ShuttingDown

        if self.closing:
            raise ShuttingDown()
        try:
            fut = self.batcher.call(fn)
        except RuntimeError:  # the batcher has stopped
            raise ShuttingDown() from None
        waiting = asyncio.wrap_future(fut)
        while True:
            try:
                return await asyncio.wait_for(asyncio.shield(waiting), CALL_POLL_S)
            except TimeoutError:
                pass
            if self.closing and fut.cancel():
                raise ShuttingDown()
            if await request.is_disconnected() and fut.cancel():
                return None

    def tokenizer_info(self) -> dict:
        """What vLLM's /tokenizer_info gives (and lm-eval's remote tokenizer reads): special tokens, template."""
        eng = self.engine
        bos = eng.bos_token if eng.bos_token is not None and eng.bos_token >= 0 else None
        eos = eng.eos_token
        return {"tokenizer_class": "llama.cpp", "eos_token": self.pieces[eos] if eos is not None else None,
                "eos_token_id": eos, "bos_token": self.pieces[bos] if bos is not None else None,
                "bos_token_id": bos, "add_bos_token": bool(eng.add_bos), "pad_token": None,
                "chat_template": self.template, "model_max_length": self.settings.ctx, "vocab_size": eng.n_vocab}

    def model_cards(self) -> list:
        """/v1/models: the model, then the model with each adapter (``BASE+NAME``)."""
        from .replies import ModelCard

        eng = self.engine
        meta = {"path": str(self.path), "n_vocab": eng.n_vocab, "n_ctx_train": eng.n_ctx_train,
                "n_ctx_slot": self.settings.ctx, "parallel": self.settings.parallel,
                "chat_template": self.template is not None}
        return [ModelCard(id=self.model_id, created=self.created, meta=meta)] + [
            ModelCard(id=f"{self.model_id}+{n}", created=self.created) for n in self.adapter_names]


def token_name(piece: bytes) -> str:
    """A token's text as OpenAI's logprobs name it: the text, or for a piece that is not whole UTF-8 (part of
    an emoji or a CJK character) ``bytes:\\xf0\\x9f``, so that no two pieces share a name."""
    p = token_piece(piece)
    return p if isinstance(p, str) else "bytes:" + "".join(f"\\x{b:02x}" for b in p)


def token_piece(piece: bytes) -> str | list[int]:
    """A token's piece as llama-server's /tokenize gives it: its text, or its bytes where it holds part of a
    character."""
    try:
        return piece.decode("utf-8")
    except UnicodeDecodeError:
        return list(piece)


def message_dicts(messages) -> list[dict]:
    """Pydantic chat messages -> the dicts a chat template renders (tool calls with their arguments parsed)."""
    out = []
    for i, m in enumerate(messages):
        content = m.content
        if isinstance(content, list):  # OpenAI's text parts, joined as every chat's are
            content = message_text({"role": m.role, "content": [p.model_dump() for p in content]}, i)
        if m.tool_calls:
            try:
                calls = [{"name": c.function.name, "arguments": json.loads(c.function.arguments or "{}")}
                         for c in m.tool_calls]
            except json.JSONDecodeError as e:
                raise InvalidArgument(f"messages[{i}].tool_calls[].function.arguments is not JSON ({e}); "
                                      f"send the arguments as a JSON string") from e
        d = {"role": m.role, "content": content or ""}
        if m.tool_calls:  # a template that renders tool_calls gets them; others get them as text (engine/chat.py)
            d["tool_calls"] = [{"type": "function", "id": c.id, "function": f} for c, f in zip(m.tool_calls, calls)]
        if m.name:
            d["name"] = m.name
        if m.tool_call_id:
            d["tool_call_id"] = m.tool_call_id
        out.append(d)
    return out
