"""``ondevice.load(name) -> Model``: a model file, its engine and its chat template, behind one object."""

from __future__ import annotations

import dataclasses
import resource
import sys
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import InvalidArgument
from . import chat
from .base import EngineConfig
from .records import Generation, Result, Sampling

Prompt = str | Sequence[dict]


class BaseModelWarning(UserWarning):
    """Chat asked of a model that has no chat template (a base model)."""


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (ru_maxrss is KiB on Linux)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


@dataclass
class Model:
    """A loaded model. ``stream``/``generate`` accept a string or a list of chat messages."""

    name: str
    path: Path
    engine: object  # LlamaEngine
    template: str | None
    _cached: list[int] = dataclasses.field(default_factory=list, repr=False)  # tokens whose KV is in seq 0

    @property
    def is_chat(self) -> bool:
        return self.template is not None

    def render(self, prompt: Prompt, *, chat_template: bool | None = None, tools: list | None = None) -> tuple[str, bool]:
        """The text to tokenize and whether special tokens (BOS) should be added by the tokenizer.

        Strings go through the chat template when the model has one, unless ``chat_template=False``
        (raw completion). Messages on a base model fall back to a plain transcript with a warning.
        """
        use_template = self.is_chat if chat_template is None else chat_template
        if isinstance(prompt, str) and not use_template:
            return prompt, True
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        if not self.is_chat:
            warnings.warn(f"{self.name} has no chat template (a base model); using a plain-text transcript "
                          f"instead — pick an instruct model for chat", BaseModelWarning, stacklevel=3)
            return chat.plain_prompt(messages), True
        eng = self.engine
        text = chat.render(self.template, messages, bos_token=eng.token_text(eng.bos_token) if eng.add_bos else "",
                           eos_token=eng.token_text(eng.eos_token), tools=tools)
        return text, False  # the template writes BOS itself when the model wants one

    def tokenize_prompt(self, prompt: Prompt, **kw) -> list[int]:
        text, add_special = self.render(prompt, **kw)
        toks = self.engine.tokenize(text, add_special=add_special, parse_special=True)
        if not toks:
            raise InvalidArgument("the prompt is empty; give some text")
        return toks

    def stream(self, prompt: Prompt, *, chat_template: bool | None = None, tools: list | None = None,
               sampling: Sampling | None = None, **sampling_kw) -> Iterator[Generation]:
        """Yield one :class:`Generation` per token. Keyword args are :class:`Sampling` fields."""
        s = sampling or Sampling(**sampling_kw)
        if sampling is not None and sampling_kw:
            s = dataclasses.replace(sampling, **sampling_kw)
        tokens = self.tokenize_prompt(prompt, chat_template=chat_template, tools=tools)
        yield from self.stream_tokens(tokens, s)

    def stream_tokens(self, tokens: list[int], s: Sampling) -> Iterator[Generation]:
        """Reuse the KV of the longest common prefix with the previous call, then stream.

        Stop strings are cut here and never shown. ``prompt_tokens`` in the records counts the
        whole prompt; ``cached_tokens`` how many of them were reused rather than recomputed (the
        engine fills both from the KV it holds).
        """
        eng = self.engine
        p = 0
        for a, b in zip(self._cached, tokens[:-1]):  # the last prompt token is always recomputed (its logits)
            if a != b:
                break
            p += 1
        eng.truncate(p)
        generated: list[int] = []
        try:
            for g in self._stream_stops(tokens[p:], s):
                if g.token >= 0:
                    generated.append(g.token)
                yield g
        finally:
            self._cached = (tokens + generated)[:eng.n_past()]

    def reset(self) -> None:
        """Forget the cached conversation (the next call recomputes its whole prompt)."""
        self.engine.reset()
        self._cached = []

    def _stream_stops(self, tokens: list[int], s: Sampling) -> Iterator[Generation]:
        eng = self.engine
        if not s.stop:
            yield from eng.stream_tokens(tokens, s)
            return
        held = ""  # text that may be the start of a stop string
        for g in eng.stream_tokens(tokens, s):
            out, held, stopped = split_stop(held + g.text, s.stop)
            if stopped:
                yield dataclasses.replace(g, text=out, finish_reason="stop")
                return
            if g.finish_reason:
                yield dataclasses.replace(g, text=out + held)
                return
            yield dataclasses.replace(g, text=out)

    def generate(self, prompt: Prompt, **kw) -> Result:
        """Run to completion; the text and the timing record of the last token."""
        parts, toks, last = [], [], None
        for g in self.stream(prompt, **kw):
            parts.append(g.text)
            if g.token >= 0:
                toks.append(g.token)
            last = g
        return Result(text="".join(parts), tokens=toks, finish_reason=(last.finish_reason if last else "length"),
                      last=last, peak_rss_bytes=peak_rss_bytes())

    def close(self) -> None:
        self.engine.close()


def split_stop(text: str, stops: Sequence[str]) -> tuple[str, str, bool]:
    """``(shown, held, stopped)`` for streamed ``text``: cut before the first stop string (``stopped``), or
    else hold back the longest suffix that may still grow into one. The one stop-string rule of the library
    and the server."""
    if not stops:
        return text, "", False
    hit = min((i for i in (text.find(x) for x in stops) if i >= 0), default=-1)
    if hit >= 0:
        return text[:hit], "", True
    keep = stop_hold(text, stops)
    return text[:len(text) - keep], text[len(text) - keep:], False


def stop_hold(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of a stop string (held back)."""
    for k in range(min(max(map(len, stops)) - 1, len(text)), 0, -1):
        tail = text[-k:]
        if any(x.startswith(tail) for x in stops):
            return k
    return 0


def load(name: str | None = None, *, n_ctx: int = 0, n_threads: int | None = None, **config) -> Model:
    """Load a model by catalog name, stored variant name or ``.gguf`` path (None: the default model).

    Extra keyword arguments are :class:`EngineConfig` fields (``n_batch``, ``type_k``, ...).
    """
    from ..models import resolve
    from ..protect.container import is_container
    from .llama import LlamaEngine

    ref = resolve(name)
    if not is_container(ref.path):  # an encrypted container is authenticated chunk by chunk instead (protect/)
        _ = ref.info  # validates the GGUF before llama.cpp sees it: a corrupt file is an error, not a crash
    engine = LlamaEngine(ref.path, EngineConfig(n_ctx=n_ctx, n_threads=n_threads, **config))
    return Model(name=ref.name, path=ref.path, engine=engine, template=engine.chat_template())
