"""Bench workloads: a registry of test kinds (llama-bench's pp/tg/pg plus chat-shaped ones).

A test spec is text: ``pp512`` (prefill 512 tokens), ``tg128`` (decode 128), ``pg512,128`` or
``pp512+tg128`` (both, timed together), any of them ``@d1024`` (after 1024 tokens already in the KV
cache) and ``chat`` / ``chat64`` (real multi-turn prompts through the chat template, 32/64 tokens each).
Adding a workload is adding a class with ``@workload``.

pp/tg/pg use random token ids, as llama-bench does (the speed of a dense model does not depend on the
ids); the first token is BOS when the model adds one. Every timed run goes through the engine's
``stream_tokens`` and reads its :class:`~ondevice.engine.records.Generation` records, so bench times
exactly what the CLI and server see. Greedy sampling with ``ignore_eos`` keeps the length fixed.
"""

from __future__ import annotations

import itertools
import json
import random
import re
from dataclasses import dataclass, field
from importlib import resources
from typing import ClassVar

from ..errors import InvalidArgument

WORKLOADS: dict[str, type[Workload]] = {}


def workload(cls: type[Workload]) -> type[Workload]:
    """Register a workload class under ``cls.kind``."""
    WORKLOADS[cls.kind] = cls
    return cls


@dataclass(frozen=True)
class TestSpec:
    """One test: its canonical name, its kind (registry key) and its sizes."""

    __test__ = False  # not a pytest class, despite the name

    name: str
    kind: str
    n_prompt: int = 0
    n_gen: int = 0
    n_depth: int = 0
    params: dict = field(default_factory=dict, hash=False, compare=False)

    def to_dict(self) -> dict:
        return {"name": self.name, "kind": self.kind, "n_prompt": self.n_prompt, "n_gen": self.n_gen,
                "n_depth": self.n_depth, "params": dict(self.params)}

    @staticmethod
    def from_dict(d: dict) -> TestSpec:
        return TestSpec(d["name"], d["kind"], d.get("n_prompt", 0), d.get("n_gen", 0), d.get("n_depth", 0),
                        dict(d.get("params") or {}))


@dataclass
class Sample:
    """One timed repetition.

    ``time_s`` and ``n_tokens`` define the test's headline ``t/s`` as llama-bench does
    (pp: prompt tokens / prefill time; tg: generated tokens / time of all their decodes; pg: both).
    """

    time_s: float
    n_tokens: int
    ttft_s: float | None = None
    prefill_tokens: int = 0
    prefill_s: float = 0.0
    decode_tokens: int = 0  # tokens whose decode time is in decode_s
    decode_s: float = 0.0
    itl_s: list[float] = field(default_factory=list)  # inter-token latencies
    energy_tokens: int | None = None  # tokens the run's energy is divided by (default n_tokens)


class Workload:
    """Base class: ``parse`` a spec, ``setup`` once, ``warmup``, then ``run`` once per repetition."""

    kind: ClassVar[str]
    help: ClassVar[str] = ""

    def __init__(self, spec: TestSpec, model, seed: int = 42):
        self.spec, self.model, self.engine = spec, model, model.engine
        self.rng = random.Random(seed)

    @classmethod
    def parse(cls, text: str) -> TestSpec | None:
        raise NotImplementedError

    @classmethod
    def ctx_needed(cls, spec: TestSpec) -> int:
        return spec.n_depth + spec.n_prompt + spec.n_gen + 1

    @classmethod
    def phases(cls, spec: TestSpec) -> list[tuple[str, int, int]]:
        """(``prefill``|``decode``, tokens, depth at start) for the roofline."""
        out = []
        if spec.n_prompt:
            out.append(("prefill", spec.n_prompt, spec.n_depth))
        if spec.n_gen:
            out.append(("decode", spec.n_gen, spec.n_depth + spec.n_prompt))
        return out

    @property
    def tokens_note(self) -> str:
        return "random token ids (as llama-bench), greedy sampling with ignore_eos"

    def setup(self) -> None:
        """Untimed preparation: fill the KV cache to ``n_depth`` once (each run truncates back to it)."""
        self.engine.reset()
        if self.spec.n_depth:
            self.engine.prefill(self._random_tokens(self.spec.n_depth, bos=True))

    def warmup(self) -> None:
        raise NotImplementedError

    def run(self) -> Sample:
        raise NotImplementedError

    # helpers ------------------------------------------------------------------------------------
    def _random_tokens(self, n: int, bos: bool) -> list[int]:
        eng = self.engine
        toks = [self.rng.randrange(eng.n_vocab) for _ in range(n)]
        if bos and n and eng.add_bos:
            toks[0] = eng.bos_token
        return toks

    def _rewind(self) -> None:
        self.engine.truncate(self.spec.n_depth)

    def _stream(self, tokens: list[int], max_tokens: int) -> list:
        from ..engine.records import Sampling

        return list(self.engine.stream_tokens(tokens, Sampling(temp=0.0, max_tokens=max_tokens, ignore_eos=True)))


def _itl(gens: list) -> list[float]:
    return [b.t - a.t for a, b in itertools.pairwise(gens)]


_PP = re.compile(r"^pp(\d+)(?:@d(\d+))?$")
_TG = re.compile(r"^tg(\d+)(?:@d(\d+))?$")
_PG = re.compile(r"^(?:pg(\d+),(\d+)|pp(\d+)\+tg(\d+))(?:@d(\d+))?$")
_CHAT = re.compile(r"^chat(\d+)?(?:x(\d+))?$")


def _depth_suffix(d: int) -> str:
    return f"@d{d}" if d else ""


@workload
class Prompt(Workload):
    """``ppN[@dD]``: prefill N random tokens in n_batch chunks; timed from the first decode to the end."""

    kind = "pp"
    help = "prompt processing: ppN[@dD]"

    @classmethod
    def parse(cls, text: str) -> TestSpec | None:
        m = _PP.match(text)
        if not m:
            return None
        n, d = int(m.group(1)), int(m.group(2) or 0)
        return TestSpec(f"pp{n}{_depth_suffix(d)}", cls.kind, n_prompt=n, n_depth=d)

    @classmethod
    def ctx_needed(cls, spec: TestSpec) -> int:
        return spec.n_depth + spec.n_prompt + 1

    def warmup(self) -> None:
        # like llama-bench: one full prompt run (weights paged in, threads started, kernels picked)
        self._rewind()
        self._stream(self._random_tokens(self.spec.n_prompt, bos=not self.spec.n_depth), 1)

    def run(self) -> Sample:
        self._rewind()
        g = self._stream(self._random_tokens(self.spec.n_prompt, bos=not self.spec.n_depth), 1)[0]
        # prompt_time runs from stream start to the end of the last prefill chunk (sampling excluded)
        return Sample(time_s=g.prompt_time, n_tokens=self.spec.n_prompt, ttft_s=g.ttft,
                      prefill_tokens=self.spec.n_prompt, prefill_s=g.prompt_time)


@workload
class Generate(Workload):
    """``tgN[@dD]``: decode N tokens one at a time (the first from one token, BOS on an empty cache)."""

    kind = "tg"
    help = "text generation: tgN[@dD]"

    @classmethod
    def parse(cls, text: str) -> TestSpec | None:
        m = _TG.match(text)
        if not m:
            return None
        n, d = int(m.group(1)), int(m.group(2) or 0)
        return TestSpec(f"tg{n}{_depth_suffix(d)}", cls.kind, n_gen=n, n_depth=d)

    def _first(self) -> list[int]:
        return self._random_tokens(1, bos=not self.spec.n_depth)

    def warmup(self) -> None:
        self._rewind()
        self._stream(self._first(), 1)

    def run(self) -> Sample:
        # N llama_decode calls of one token each, as llama-bench's tg: the 1-token "prompt" then N-1
        # decodes; every record's t is when its token was sampled, so t of the N-th record covers them all.
        self._rewind()
        n = self.spec.n_gen
        gens = self._stream(self._first(), n)
        return Sample(time_s=gens[-1].t, n_tokens=n, ttft_s=gens[0].ttft, decode_tokens=n,
                      decode_s=gens[-1].t, itl_s=_itl(gens))


@workload
class PromptGenerate(Workload):
    """``pgP,N`` (= ``ppP+tgN``): prefill P tokens then decode N; t/s = (P + N) / total time."""

    kind = "pg"
    help = "prompt then generation: pgP,N or ppP+tgN [@dD]"

    @classmethod
    def parse(cls, text: str) -> TestSpec | None:
        m = _PG.match(text)
        if not m:
            return None
        p = int(m.group(1) or m.group(3))
        n = int(m.group(2) or m.group(4))
        d = int(m.group(5) or 0)
        # as llama-bench names them: pg0,N is tgN and pgP,0 is ppP. Timed as pg, pg0,N would sample its first
        # token from the logits of an earlier run (no prompt to prefill): a TTFT of ~0 and a free token
        if p and not n:
            return Prompt.parse(f"pp{p}{_depth_suffix(d)}")
        if n and not p:
            return Generate.parse(f"tg{n}{_depth_suffix(d)}")
        return TestSpec(f"pp{p}+tg{n}{_depth_suffix(d)}", cls.kind, n_prompt=p, n_gen=n, n_depth=d)

    def warmup(self) -> None:
        self._rewind()
        self._stream(self._random_tokens(self.spec.n_prompt, bos=not self.spec.n_depth), 2)

    def run(self) -> Sample:
        # N + 1 records: the first comes from the prefill's logits; then N decodes (as llama-bench's pg)
        self._rewind()
        p, n = self.spec.n_prompt, self.spec.n_gen
        gens = self._stream(self._random_tokens(p, bos=not self.spec.n_depth), n + 1)
        last = gens[-1]
        return Sample(time_s=last.t, n_tokens=p + n, ttft_s=gens[0].ttft, prefill_tokens=p,
                      prefill_s=gens[0].prompt_time, decode_tokens=n, decode_s=last.t - gens[0].ttft,
                      itl_s=_itl(gens))


def chat_conversations(n: int = 3) -> list[list[dict]]:
    """``n`` two-turn conversations built from real prompts and reference answers (assistant_en.jsonl).

    Conversation i takes prompts from two different categories: user asks A, the assistant gives A's
    reference answer, user asks B. Deterministic, so every run measures the same prompts.
    """
    text = resources.files("ondevice.data").joinpath("assistant_en.jsonl").read_text(encoding="utf-8")
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    by_cat: dict[str, list[dict]] = {}
    for r in rows:
        by_cat.setdefault(r["category"], []).append(r)
    cats = sorted(by_cat)
    convs = []
    for i in range(n):
        a = by_cat[cats[i % len(cats)]][i]
        b = by_cat[cats[(i + 1) % len(cats)]][i]
        answer = a["target"] if isinstance(a["target"], str) else json.dumps(a["target"])
        convs.append([{"role": "user", "content": a["input"]}, {"role": "assistant", "content": answer},
                      {"role": "user", "content": b["input"]}])
    return convs


@workload
class Chat(Workload):
    """``chat[N][xC]``: C (3) real two-turn conversations through the chat template; TTFT and decode speed.

    Each conversation starts from an empty cache (the whole rendered prompt is prefilled, so TTFT is the
    cold-start figure) and generates N tokens (default 32). t/s is the decode speed.
    """

    kind = "chat"
    help = "chat-shaped: chat[N][xC] (C real 2-turn prompts, default 3, N generated tokens each, default 32)"
    N_CONV = 3

    @classmethod
    def parse(cls, text: str) -> TestSpec | None:
        m = _CHAT.match(text)
        if not m:
            return None
        n = int(m.group(1) or 32)
        c = int(m.group(2) or cls.N_CONV)
        if not 1 <= c <= 20:
            raise InvalidArgument(f"test {text!r}: the number of conversations must be 1-20, e.g. chat32x3")
        name = ("chat" if n == 32 else f"chat{n}") + (f"x{c}" if c != cls.N_CONV else "")
        return TestSpec(name, cls.kind, n_gen=n, params={"conversations": c})

    @classmethod
    def ctx_needed(cls, spec: TestSpec) -> int:
        return 1024 + spec.n_gen  # the rendered prompts are < 400 tokens; checked again at run time

    @classmethod
    def phases(cls, spec: TestSpec) -> list[tuple[str, int, int]]:
        return []  # prompt lengths vary; the worker reports them and the parent costs each phase

    @property
    def tokens_note(self) -> str:
        return f"{self._n_conv} real 2-turn conversations (assistant_en.jsonl) through the chat template"

    @property
    def _n_conv(self) -> int:
        return int(self.spec.params.get("conversations", self.N_CONV))

    def setup(self) -> None:
        self.engine.reset()
        if not self.model.is_chat:
            raise InvalidArgument(f"{self.model.name} has no chat template; drop the chat test for base models")
        self.prompts = [self.model.tokenize_prompt(c) for c in chat_conversations(self._n_conv)]
        longest = max(map(len, self.prompts))
        if longest + self.spec.n_gen + 1 > self.engine.n_ctx:
            raise InvalidArgument(f"the chat prompts need a context of {longest + self.spec.n_gen + 1} tokens; "
                                  f"raise -c (it is {self.engine.n_ctx})")
        self.prompt_lengths = [len(p) for p in self.prompts]

    def warmup(self) -> None:
        self.engine.reset()
        self._stream(self.prompts[0], 2)

    def run(self) -> Sample:
        n = self.spec.n_gen
        ttfts, itl, pre_t, dec_t, dec_n = [], [], 0.0, 0.0, 0
        for toks in self.prompts:
            self.engine.reset()
            gens = self._stream(toks, n)
            ttfts.append(gens[0].ttft)
            pre_t += gens[0].prompt_time
            dec_t += gens[-1].t - gens[0].t
            dec_n += len(gens) - 1  # decodes between the first and the last sampled token
            itl += _itl(gens)
        return Sample(time_s=dec_t, n_tokens=dec_n, ttft_s=sum(ttfts) / len(ttfts),
                      prefill_tokens=sum(self.prompt_lengths), prefill_s=pre_t, decode_tokens=dec_n,
                      decode_s=dec_t, itl_s=itl, energy_tokens=n * len(self.prompts))


def parse_tests(specs: str | list[str] | None) -> list[TestSpec]:
    """Parse a comma list (or list) of test specs; ``pg512,128`` keeps its second number."""
    if specs is None:
        return []
    items = specs.split(",") if isinstance(specs, str) else [s for x in specs for s in str(x).split(",")]
    items = [s.strip().lower() for s in items if s.strip()]
    merged: list[str] = []
    for s in items:
        # "pg512,128" arrives split at the comma; "128" or "128@d512" belongs to the pg before it
        if merged and re.fullmatch(r"\d+(@d\d+)?", s) and re.fullmatch(r"pg\d+", merged[-1]):
            merged[-1] += "," + s
        else:
            merged.append(s)
    out = []
    for s in merged:
        spec = next((sp for cls in WORKLOADS.values() if (sp := cls.parse(s)) is not None), None)
        if spec is None:
            raise InvalidArgument(f"unknown test {s!r}; use " + ", ".join(c.help for c in WORKLOADS.values()))
        if spec.n_prompt < 0 or spec.n_gen < 0 or spec.n_prompt + spec.n_gen == 0:  # pp0, tg0, chat0, pg0,0
            raise InvalidArgument(f"test {s!r} has no tokens to time; use e.g. pp512 or tg128")
        if spec.kind == "chat" and spec.n_gen < 2:  # its t/s is the decode after the first token: none with one
            raise InvalidArgument(f"test {s!r}: a chat test's t/s is its decode after the first token, so it needs "
                                  f"at least 2 tokens; use e.g. chat32 (its TTFT is measured either way)")
        out.append(spec)
    return out
