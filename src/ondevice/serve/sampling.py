"""A request's sampling: its fields as the engine's :class:`~ondevice.engine.records.Sampling`, llama-server's
``samplers`` subset, and one Sampling per choice (``n``)."""

from __future__ import annotations

import dataclasses

from ..engine.records import MORE_SAMPLERS, Sampling
from ..errors import InvalidArgument

# llama.cpp's sampler chain, in its order (common/common.h), with the request fields that turn each one off
SAMPLERS = {"penalties": {"repeat_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0},
            "dry": {"dry_multiplier": 0.0}, "top_n_sigma": {"top_n_sigma": -1.0}, "top_k": {"top_k": 0},
            "typ_p": {"typical_p": 1.0}, "top_p": {"top_p": 1.0}, "min_p": {"min_p": 0.0},
            "xtc": {"xtc_probability": 0.0}, "temperature": {"temp": 1.0}}
_LETTERS = dict(zip("edskypmxt", SAMPLERS)) | {"i": "infill"}


def sampler_names(value) -> list[str]:
    """llama-server's ``samplers`` as a list of names (a string is one letter per sampler)."""
    names = [_LETTERS.get(c, c) for c in value] if isinstance(value, str) else value
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise InvalidArgument("samplers must be a list of sampler names or a string of their letters")
    return names


def sampler_subset(value, what: str = "samplers") -> tuple[dict, bool]:
    """llama-server's ``samplers`` (names, or a string of their letters): (the Sampling fields that turn off the
    samplers it leaves out, whether it ends with llama.cpp's infill sampler). Only a subset in llama.cpp's order
    is taken (the chain is built in that order). Errors name ``what`` (the field or flag given)."""
    if value is None:
        return {}, False
    names = sampler_names(value)
    infill = bool(names) and names[-1] == "infill"
    names = names[:-1] if infill else names
    unknown = [n for n in names if n not in SAMPLERS]
    if unknown:
        raise InvalidArgument(f"{what}: {unknown[0]!r} is not one of {', '.join(SAMPLERS)} (infill: last only)")
    order = list(SAMPLERS)
    if [order.index(n) for n in names] != sorted(order.index(n) for n in names) or len(set(names)) != len(names):
        raise InvalidArgument(f"{what}: they apply in llama.cpp's order ({', '.join(SAMPLERS)}, then infill), "
                              f"each once; list a subset in that order")
    return {k: v for n, off in SAMPLERS.items() if n not in names for k, v in off.items()}, infill


def request_sampling(req, max_tokens: int, grammar: str | None = None,
              draft_default: tuple[str | None, int] = (None, 16)) -> Sampling:
    bias = req.logit_bias or {}
    if any(not -100 <= b <= 100 for b in bias.values()):
        raise InvalidArgument("logit_bias values must be in [-100, 100]; -100 bans a token, 100 forces it")
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if any(not s for s in stop):
        raise InvalidArgument("stop contains an empty string; remove it")
    if req.grammar is not None:  # llama-server's extension: a GBNF grammar of the client's own
        if grammar is not None:
            raise InvalidArgument("grammar and response_format or tools both constrain the reply; send one")
        grammar = req.grammar
    given = {"temp": req.temperature, "top_p": req.top_p, "top_k": req.top_k, "min_p": req.min_p,
             **{k: getattr(req, k) for k in MORE_SAMPLERS}}
    kw = dict({k: v for k, v in given.items() if v is not None},  # else Sampling's: llama.cpp's defaults
              repeat_penalty=req.repeat_penalty, presence_penalty=req.presence_penalty,
              frequency_penalty=req.frequency_penalty, max_tokens=max_tokens, stop=tuple(stop), grammar=grammar,
              ignore_eos=req.ignore_eos,
              # OpenAI's -100 bans a token: make it certain (a finite bias may not beat a large logit)
              logit_bias=tuple((t, float("-inf") if b <= -100 else b) for t, b in bias.items()))
    if req.seed is not None:
        kw["seed"] = req.seed
    off, kw["infill"] = sampler_subset(req.samplers)  # llama-server's: the samplers not listed are off
    kw.update(off)
    draft = draft_default[0] if req.draft is None else req.draft  # the server's default, or the request's
    kw["draft"] = None if draft == "none" else draft
    kw["draft_max"] = draft_default[1] if req.draft_max is None else req.draft_max
    return Sampling(**kw)


def choice_samplings(req, sampling: Sampling) -> list[Sampling]:
    """One Sampling per requested choice (``n``); with a seed, choice i samples with seed + i."""
    if req.seed is None:
        return [sampling] * req.n  # unseeded: each job draws its own random seed
    return [dataclasses.replace(sampling, seed=(req.seed + i) % 2**32) for i in range(req.n)]
