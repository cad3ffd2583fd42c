"""``ondevice.load(name) -> Model``: a model file, its engine and its chat template, behind one object."""

from __future__ import annotations

import dataclasses
import numbers
import random
import resource
import sys
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Self

from .. import fields
from ..errors import InvalidArgument
from . import chat, chat_templates
from .base import Engine, EngineConfig
from .generator import BatchGenerator, Request
from .records import Generation, Result, Sampling
from .stops import with_prompt_stops
from .turns import Turns

Prompt = str | Sequence[dict]
RANDOM_SEED = Sampling().seed  # llama.cpp's LLAMA_DEFAULT_SEED: a random seed
# call arguments of llama-cpp-python (and OpenAI's clients) that are not Sampling fields here: what to use instead
OTHER_LIBRARIES = {
    "stream": "no argument here: model.stream(prompt, ...) yields a record per token as it comes, "
              "model.generate(prompt, ...) returns the whole reply",
    "logprobs": "each record of model.stream(prompt, ..., token_stats=True) carries its token's logprob "
                "(Generation.logprob); the best alternatives per token come from `ondevice serve`'s /v1/completions "
                "(logprobs=N)",
}


class BaseModelWarning(UserWarning):
    """Chat asked of a model that has no chat template (a base model)."""


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (ru_maxrss is KiB on Linux)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


@dataclass
class Model:
    """A loaded model, made by :func:`ondevice.load` (not constructed directly). ``stream``/``generate`` accept a
    string or a list of chat messages; ``close()`` (or a ``with`` block) frees it."""

    name: str
    path: Path
    engine: Engine
    template: str | None
    draft_engine: Engine | None = None  # speculative decoding with a draft model (same vocabulary)
    _generator: BatchGenerator | None = dataclasses.field(default=None, repr=False)
    # a stream nobody reads for this long while another call waits is ended for that call (see stream)
    idle_timeout: float = 10.0
    _turns: Turns = dataclasses.field(default_factory=Turns, repr=False, compare=False)
    _embedder: Engine | None = dataclasses.field(default=None, repr=False)  # embed()'s context, made at its first call
    _seeds: random.Random | None = dataclasses.field(default=None, repr=False)  # load(seed=N): each call's seed
    knobs_note: str = ""  # a fitted variant's runtime knobs applied at load (models.runtime_knobs), or why not

    def __post_init__(self) -> None:
        if not callable(getattr(self.engine, "decode_batch", None)):  # not isinstance(Engine): no property is run
            raise InvalidArgument(f"Model(engine={self.engine!r}) is not a loaded engine; a Model is made by "
                                  f"ondevice.load(name or path), not constructed directly")

    def __repr__(self) -> str:
        return f"Model(name={self.name!r}, path='{self.path}', chat={self.is_chat}, n_ctx={self.engine.n_ctx})"

    def __enter__(self) -> Self:
        self._check_open()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def is_chat(self) -> bool:
        return self.template is not None

    def render(self, prompt: Prompt, *, chat_template: bool | None = None, tools: list | None = None,
               system_note: str | None = None) -> tuple[str, bool]:
        """The text to tokenize and whether special tokens (BOS) should be added by the tokenizer.

        Strings go through the chat template when the model has one, unless ``chat_template=False``
        (raw completion). Messages on a base model fall back to a plain transcript with a warning. ``tools``
        go to a template that shows them; for one that does not, ``system_note`` (their description) is
        added to the system message instead. The one chat rendering of the library and the server (for
        display: :meth:`tokenize_prompt` is what generation uses).
        """
        self._check_open()
        messages, tools = self._conversation(prompt, chat_template, tools, system_note)
        if messages is None:
            return prompt, True
        if not self.is_chat:
            return chat.plain_prompt(messages)[0], True
        return chat.render(self.template, messages, tools=tools, **self._template_kw()), False

    def tokenize_prompt(self, prompt: Prompt, *, chat_template: bool | None = None, tools: list | None = None,
                        system_note: str | None = None) -> list[int]:
        """The prompt's token ids. A raw string is the caller's own text (special tokens parsed); in chat
        messages only the template's own markers are special: ``<|im_start|>`` typed in a message is text,
        so no user can inject a role. Messages on a base model give a :class:`~ondevice.engine.chat.PromptTokens`
        whose stops (the transcript's next turn) every generation from it adds to its own."""
        self._check_open()
        eng = self.engine
        messages, tools = self._conversation(prompt, chat_template, tools, system_note)
        if messages is None:
            toks = eng.tokenize(prompt, add_special=True, parse_special=True)
        else:
            toks = chat.encode(self.template, messages, specials=eng.control_tokens(), tools=tools,
                               tokenize=lambda text, bos: eng.tokenize(text, add_special=bos, parse_special=False),
                               **self._template_kw())
        if not toks:
            raise InvalidArgument("the prompt is empty; give some text" if messages is None else
                                  "the chat template rendered nothing for this conversation; fix the template or "
                                  "give another (--chat-template), or run without one (--raw)")
        return toks

    def _conversation(self, prompt: Prompt, chat_template: bool | None, tools: list | None,
                      system_note: str | None) -> tuple[list[dict] | None, list | None]:
        """(messages, tools) to render, or (None, None) for a raw completion string."""
        _check_chat_args(chat_template, tools)
        use_template = self.is_chat if chat_template is None else chat_template
        if isinstance(prompt, str) and not use_template:
            return None, None
        if chat_template is False:  # no raw completion of messages: a template (or a transcript) is what they are
            raise InvalidArgument("chat_template=False makes a raw completion of a string, and the prompt is chat "
                                  "messages; give the text as a string, or leave chat_template out for messages")
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        if not self.is_chat:
            warnings.warn(f"{self.name} has no chat template (a base model); using a plain-text transcript "
                          f"instead — pick an instruct model for chat", BaseModelWarning, stacklevel=4)
            return messages, None
        shows_tools = "tools" in self.template
        if system_note and not shows_tools:
            if messages and messages[0]["role"] in ("system", "developer"):
                messages = [dict(messages[0], content=f"{messages[0]['content']}\n\n{system_note}"), *messages[1:]]
            else:
                messages = [{"role": "system", "content": system_note}, *messages]
        return messages, (tools if shows_tools else None)

    def _template_kw(self) -> dict:
        eng = self.engine
        return {"bos_token": eng.token_text(eng.bos_token) if eng.add_bos else "",
                "eos_token": eng.token_text(eng.eos_token), "n_ctx": eng.n_ctx}

    def tokenize(self, text: str | bytes, *, special: bool = True, add_bos: bool | None = None) -> list[int]:
        """Token ids of raw ``text``: special tokens (``<|im_start|>``) parsed when ``special``, the model's BOS
        first when ``add_bos`` (None: as ``special``; llama-cpp-python's chat handlers ask ``add_bos=False,
        special=True``); UTF-8 ``bytes`` (llama-cpp-python's argument) too. Any thread, at any time (it does not
        wait for a generation)."""
        if isinstance(text, (bytes, bytearray)):
            try:
                text = bytes(text).decode("utf-8")
            except UnicodeDecodeError as e:
                raise InvalidArgument(f"tokenize: the bytes are not UTF-8 ({e.reason} at {e.start}); give text"
                                      ) from None
        if not isinstance(text, str):
            raise InvalidArgument(f"tokenize: {text!r} is not text; give a string")
        self._check_open()
        return self.engine.tokenize(text, add_special=special if add_bos is None else bool(add_bos),
                                    parse_special=special)

    def detokenize(self, tokens: Sequence[int], *, special: bool = False) -> str:
        """The text of token ids; special tokens such as ``<|im_end|>`` give no text unless ``special`` (as
        llama-cpp-python's ``detokenize(tokens, special=True)``)."""
        self._check_open()  # the engine answers ids it has cached even when closed: one error for all of them
        if isinstance(tokens, (str, bytes)):  # iterated, its characters were named "token id 'h'"
            raise InvalidArgument(f"detokenize takes token ids (a list of ints), not text: {tokens[:40]!r}; "
                                  f"model.tokenize(text) gives the ids of a text")
        return self.engine.detokenize(tokens, special=special)

    def stream(self, prompt: Prompt, *, chat_template: bool | None = None, tools: list | None = None,
               sampling: Sampling | dict | None = None, **sampling_kw) -> Iterator[Generation]:
        """An iterator of one :class:`Generation` per token. Keyword args are :class:`Sampling` fields (checked
        now; the generation starts when the iterator is first read).

        A model generates one reply at a time: a call made while another one's stream is being read waits
        for it to end or be closed. A stream nobody reads for ``idle_timeout`` seconds (10) while a call waits
        is ended for that call: reading it again raises :class:`~ondevice.errors.StreamAbandoned`."""
        self._check_open()
        if not isinstance(prompt, (str, list, tuple)):
            raise InvalidArgument(f"the prompt {prompt!r} is not a string or a list of chat messages; give one "
                                  f"of them ([{{'role': 'user', 'content': ...}}])")
        if prompt and isinstance(prompt[0], numbers.Integral) and not isinstance(prompt, str):
            raise InvalidArgument("the prompt is token ids, not text or chat messages; stream them with "
                                  "model.stream_tokens(ids, max_tokens=...) (or give the text)")
        _check_chat_args(chat_template, tools)
        s = self._sampling(sampling, sampling_kw)
        return self._turn(lambda: self._stream(
            self.tokenize_prompt(prompt, chat_template=chat_template, tools=tools), s))

    def stream_tokens(self, tokens: Sequence[int], sampling: Sampling | dict | None = None,
                      **sampling_kw) -> Iterator[Generation]:
        """Stream from prompt ``tokens``: a batch of one through the generator, which reuses the KV of the
        longest common prefix with what the model computed before and cuts stop strings (never shown): the
        sampling's and those ``tokens`` carry (a base model's transcript, from :meth:`tokenize_prompt`).
        ``prompt_tokens`` in the records counts the whole prompt; ``cached_tokens`` how many were reused.
        Sampling as :meth:`stream` takes it."""
        self._check_open()
        n_vocab = self.engine.n_vocab
        if isinstance(tokens, (str, bytes, Mapping)) or not hasattr(tokens, "__len__") or len(tokens) == 0:
            raise InvalidArgument(f"stream_tokens: tokens={tokens!r} must be a non-empty list of token ids "
                                  f"(model.tokenize(text) gives them)")
        if bad := [t for t in tokens if isinstance(t, bool) or not isinstance(t, numbers.Integral)
                   or not 0 <= t < n_vocab][:3]:  # llama.cpp would fail the decode (or abort)
            raise InvalidArgument(f"stream_tokens: token ids {bad!r} are not in the vocabulary (0 to {n_vocab - 1})")
        s = self._sampling(sampling, sampling_kw)
        return self._turn(lambda: self._stream(tokens, s))

    def _sampling(self, sampling: Sampling | dict | None, kw: dict) -> Sampling:
        """The call's :class:`Sampling`, seeded from ``load(seed=N)`` when the call names no seed of its own, as
        llama-cpp-python's ``Llama(seed=N)`` seeds its completions: each call draws the next seed of a sequence
        that ``N`` starts, so calls give different samples and a model loaded again with ``N`` gives the same ones
        in the same order. A Sampling object given whole names its seed only when it is not the random one."""
        if other := next((k for k in kw if k in OTHER_LIBRARIES), None):
            raise InvalidArgument(f"{other}={kw[other]!r}: {OTHER_LIBRARIES[other]}")
        s = Sampling.of(sampling, **kw)
        named = "seed" in kw or (isinstance(sampling, Mapping) and "seed" in sampling)
        if named or s.seed != RANDOM_SEED or self.engine.config.seed in (None, -1, RANDOM_SEED):
            return s
        if self._seeds is None:
            self._seeds = random.Random(self.engine.config.seed)
        return dataclasses.replace(s, seed=self._seeds.randrange(2**32 - 1))  # not 0xFFFFFFFF: that one is random

    def _check_open(self) -> None:
        """A closed model is an error when it is asked for something (a stream: when asked, not when read)."""
        if self._turns.closed:
            raise self._turns.closed_error(self)

    def _turn(self, make: Callable[[], Iterator[Generation]]) -> Iterator[Generation]:
        """``make()``'s records, read in this model's turn (:class:`~ondevice.engine.turns.Turns`)."""
        return self._turns.read(self, make)

    def _stream(self, tokens: list[int], s: Sampling) -> Iterator[Generation]:
        if s.draft == "model" and self.generator.drafter is None:
            raise InvalidArgument("draft='model' needs a draft model; load with ondevice.load(..., "
                                  "draft_model=NAME) or use draft='lookup'")
        yield from self.generator.stream(Request(tokens=list(tokens), sampling=with_prompt_stops(s, tokens)))

    @property
    def generator(self) -> BatchGenerator:
        """The one-slot generator over sequence 0 (kept: its slot remembers the cached tokens)."""
        self._check_open()
        if self._generator is None:
            self._generator = BatchGenerator(self.engine, seqs=[0], slot_ctx=self.engine.n_ctx,
                                             draft_engine=self.draft_engine)
        return self._generator

    def reset(self) -> None:
        """Forget the cached conversation (the next call recomputes its whole prompt)."""
        with self._turns.hold(self):
            self.engine.reset()
            if self._generator is not None:
                self._generator.reset()
            if self.draft_engine is not None:
                self.draft_engine.reset()

    def save_prompt_cache(self, path: str | Path, n_tokens: int | None = None) -> int:
        """Write what the model holds in its KV cache (the last prompt and reply; ``n_tokens``: only that many of
        them, e.g. the prompt's ``prompt_tokens``) to ``path``, atomically, as llama.cpp's sequence-state file
        (llama-server's slot file); returns how many tokens it holds. See :mod:`ondevice.engine.slotfile`."""
        from . import slotfile

        with self._turns.hold(self):
            gen = self.generator
            return slotfile.save(gen, 0, path, keep=n_tokens, ads=slotfile.default_adapters(gen), what="n_tokens")[0]

    def load_prompt_cache(self, path: str | Path) -> list[int]:
        """Load a file written by :meth:`save_prompt_cache` (or llama-server's slot save, same model and KV type)
        in place of what the model holds: a prompt that begins with its tokens then computes only the rest.
        Returns those tokens; a file that does not fit this model is a :class:`SlotFileError` that says why."""
        from . import slotfile

        if not Path(path).exists():  # the server's words ("save a slot under that name") are not this API's
            raise slotfile.SlotFileError(f"{path}: no such file; write one with model.save_prompt_cache({str(path)!r})")
        with self._turns.hold(self):
            gen = self.generator
            slotfile.restore(gen, 0, path, slotfile.default_adapters(gen))
            return list(gen.slots[0].cached)

    def generate(self, prompt: Prompt, *, chat_template: bool | None = None, tools: list | None = None,
                 sampling: Sampling | dict | None = None, **sampling_kw) -> Result:
        """Run to completion; the text and the timing record of the last token. Arguments as :meth:`stream`'s
        (``max_tokens``, ``temp``, ``stop``, ``seed``, ... are :class:`Sampling` fields)."""
        parts, toks, last = [], [], None
        for g in self.stream(prompt, chat_template=chat_template, tools=tools, sampling=sampling, **sampling_kw):
            parts.append(g.text)
            if g.token >= 0:
                toks.append(g.token)
            last = g
        return Result(text="".join(parts), tokens=toks, finish_reason=(last.finish_reason if last else "length"),
                      last=last, peak_rss_bytes=peak_rss_bytes())

    def embed(self, text: str | Sequence[str], *, normalize: bool = True) -> list[float] | list[list[float]]:
        """The pooled embedding of ``text`` (a list of floats), or one per text of a list, as llama-cpp-python's
        ``Llama.embed`` gives them and ``ondevice serve``'s /v1/embeddings computes them: mean pooling (or the
        ``pooling`` given to ``load``), each input alone, unit length unless ``normalize=False``. They come from
        an embeddings context of the same weights, made at the first call (``close()`` frees it too)."""
        import numpy as np

        from .embed import embed_many

        texts = [text] if isinstance(text, str) else list(text) if isinstance(text, (list, tuple)) else []
        if not texts or not all(isinstance(t, str) and t for t in texts):
            raise InvalidArgument(f"embed: {text!r} is not a text or a list of texts; give a non-empty string or a "
                                  f"list of them")
        self._check_open()
        tokens = [self.engine.tokenize(t, add_special=True, parse_special=True) for t in texts]
        with self._turns.hold(self):
            vecs = embed_many(self._embeddings_context(max(map(len, tokens))), tokens)
        if normalize:
            vecs = vecs / np.maximum(np.linalg.norm(vecs, axis=1, keepdims=True), 1e-12)
        out = vecs.astype(float).tolist()
        return out[0] if isinstance(text, str) else out

    def _embeddings_context(self, longest: int) -> Engine:
        """An embeddings context (engine/embed.py's, as serve's) that takes inputs of ``longest`` tokens: the one
        made before when it does, else a larger one in its place."""
        from ..errors import ContextOverflow
        from .embed import capacity, embedding_config
        from .llama import LlamaEngine

        limit = self.engine.n_ctx_train
        if longest > limit:
            raise ContextOverflow(longest, limit, "input", f"shorten it (the model was trained on {limit} tokens)")
        if self._embedder is not None and capacity(self._embedder)[0] >= longest:
            return self._embedder
        if self._embedder is not None:
            self._embedder.close()
            self._embedder = None
        cfg = self.engine.config
        same = {k: getattr(cfg, k) for k in ("n_threads", "key_source", "restore", "amx", "repack", "use_mmap")}
        self._embedder = LlamaEngine(self.path, embedding_config(longest, cfg.pooling or "mean", **same))
        return self._embedder

    @property
    def closed(self) -> bool:
        return self._turns.closed

    def close(self) -> None:
        """Free the model's memory now (also at the end of a ``with`` block); safe to call twice. A generation
        running in another thread ends its step first; an open stream is ended (reading it raises
        :class:`~ondevice.errors.ModelClosed`). Using the model afterwards is an error."""
        self._turns.close(self)


def _check_chat_args(chat_template: bool | None, tools: list | None) -> None:
    if chat_template is not None and not isinstance(chat_template, bool):  # HF's is a Jinja text: not taken
        raise InvalidArgument(f"chat_template={chat_template!r} must be True, False (raw text completion) or None "
                              f"(the model's own template when it has one); a template of your own is given to "
                              f"ondevice.load(name, chat_template=...)")
    if tools is not None and (not isinstance(tools, (list, tuple)) or not all(isinstance(t, Mapping) for t in tools)):
        raise InvalidArgument(f"tools={tools!r} must be a list of tool schemas "
                              f"([{{'type': 'function', 'function': {{'name': ..., 'parameters': ...}}}}])")


def load(name: str | None = None, *, n_ctx: int = 0, n_threads: int | None = None, draft_model: str | None = None,
         chat_template: str | None = None, **config) -> Model:
    """Load a model by catalog name, stored variant name or ``.gguf`` path (None: the default model).

    ``draft_model`` loads a second, smaller model with the same vocabulary for speculative decoding
    (``Sampling(draft="model")``). ``chat_template`` replaces the file's chat template: a built-in name
    (``chatml``, ``llama3``, ``gemma``, ``phi3``) or Jinja text, as llama.cpp's ``--chat-template``. Extra keyword
    arguments are :class:`EngineConfig` fields (``n_batch``, ...); ``seed`` seeds every call that gives no seed of
    its own, as llama-cpp-python's ``Llama(seed=...)`` (each call the next seed of the sequence it starts). A
    variant stored by ``ondevice fit --knobs`` loads with the runtime knobs that fit measured on this machine
    (threads, flash attention, micro-batch) where no keyword sets them; ``Model.knobs_note`` says which.
    """
    from ..models import resolve
    from ..protect.container import is_container
    from .llama import LlamaEngine

    if err := fields.unknown("load", config, {"name", "n_ctx", "n_threads", "draft_model", "chat_template",
                                              *EngineConfig.__dataclass_fields__}):
        raise err
    template = None if chat_template is None else chat_templates.template_from(chat_template)  # before the load
    if config.get("seed") is not None:  # the default seed of the model's calls: checked as a call's own is
        Sampling(seed=config["seed"])
    if name is not None and not isinstance(name, (str, Path)):
        raise InvalidArgument(f"load: the model {name!r} is not a name or a path; give a catalog name, a "
                              f"stored variant's name or a .gguf path")
    ref = resolve(name)
    if not is_container(ref.path):  # an encrypted container is authenticated chunk by chunk instead (protect/)
        _ = ref.info  # validates the GGUF before llama.cpp sees it: a corrupt file is an error, not a crash
    from ..models.runtime_knobs import fitted_knobs  # a fitted variant: the knobs its fit measured here

    knobs, knobs_note = fitted_knobs(ref.path, {**config, **({} if n_threads is None else {"n_threads": n_threads})})
    n_threads = knobs.pop("n_threads", n_threads)
    engine = LlamaEngine(ref.path, EngineConfig(n_ctx=n_ctx, n_threads=n_threads, **config, **knobs))
    draft = None
    if draft_model is not None:
        dref = resolve(draft_model)
        _ = dref.info
        draft_config = {k: v for k, v in config.items() if k != "adapters"}  # an adapter is for the target only
        draft = LlamaEngine(dref.path, EngineConfig(n_ctx=engine.n_ctx, n_threads=n_threads, **draft_config))
        check_same_vocab(engine, draft, ref.name, dref.name)
    return Model(name=ref.name, path=ref.path, engine=engine,
                 template=chat_templates.model_template(template, engine, ref.name), draft_engine=draft,
                 knobs_note=knobs_note)


def check_same_vocab(target: Engine, draft: Engine, target_name: str, draft_name: str) -> None:
    """A draft model must tokenize as the target does: same size, same special tokens, same pieces."""
    same = (target.n_vocab == draft.n_vocab and target.eos_tokens == draft.eos_tokens
            and all(target.token_bytes(t, special=True) == draft.token_bytes(t, special=True)
                    for t in range(0, target.n_vocab, max(1, target.n_vocab // 2048))))
    if not same:
        draft.close()
        raise InvalidArgument(f"draft model {draft_name} does not share {target_name}'s vocabulary; pick a draft "
                              f"of the same family (e.g. a smaller quantization of it) or use --draft lookup")
