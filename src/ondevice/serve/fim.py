"""Fill-in-the-middle prompts in a code model's own FIM tokens: llama-server's /infill (repo-level, with other
files as context) and the plain form that Ollama's code-model templates and OpenAI's completions ``suffix`` use."""

from __future__ import annotations

import functools

from ..errors import InvalidArgument


class NoInfill(Exception):
    """The model has no fill-in-the-middle tokens: llama-server's 501."""


def fim_tokens(state) -> tuple[int, int, int, int, int]:
    """The model's fill-in-the-middle tokens: prefix, suffix, middle (required: :class:`NoInfill` without them),
    repo name and file separator (-1 where it has none)."""
    ll, v = state.engine.ll, state.engine.vocab
    pre, suf, mid, rep, sep = (ll.llama_vocab_fim_pre(v), ll.llama_vocab_fim_suf(v), ll.llama_vocab_fim_mid(v),
                               ll.llama_vocab_fim_rep(v), ll.llama_vocab_fim_sep(v))
    missing = [what for what, t in (("prefix", pre), ("suffix", suf), ("middle", mid)) if t < 0]
    if missing:
        raise NoInfill(f"Infill is not supported by this model ({state.model_id}): it has no fill-in-the-middle "
                       f"{', '.join(missing)} token; use a code model that has them (qwen2.5-coder-0.5b-instruct)")
    return pre, suf, mid, rep, sep


def infill_prompt(state, body: dict) -> list[int]:
    """llama-server's /infill prompt (``format_prompt_infill``): the repo-level pattern where the model has its
    tokens, ``[FIM_REP]myproject\\n[FIM_SEP]file\\nextra...[FIM_SEP]filename\\n`` (other models: each extra chunk
    after a "--- snippet ---" line), then ``[FIM_PRE]prefix prompt[FIM_SUF]suffix[FIM_MID]``; the prefix's last
    3/4 of a batch and the suffix's first 1/4 are kept, and as much of the extra context as the slot leaves."""
    pre, suf, mid, rep, sep = fim_tokens(state)
    for key in ("input_prefix", "input_suffix"):
        if not isinstance(body.get(key), str):
            raise InvalidArgument(f"{key} is required: the code {'before' if key == 'input_prefix' else 'after'} "
                                  f"the cursor, as a string")
    prompt, extra = body.get("prompt") or "", body.get("input_extra") or []
    if not isinstance(prompt, str):
        raise InvalidArgument("prompt must be a string: text to continue after input_prefix")
    if not isinstance(extra, list) or not all(isinstance(c, dict) and isinstance(c.get("text"), str)
                                              and isinstance(c.get("filename", ""), str) for c in extra):
        raise InvalidArgument("input_extra must be a list of {\"filename\": string, \"text\": string}")

    toks = functools.partial(_text_tokens, state)
    head: list[int] = [rep, *toks("myproject\n")] if rep >= 0 else []
    for c in extra:
        head += [sep, *toks(c.get("filename", "tmp") + "\n")] if sep >= 0 else toks("\n\n--- snippet ---\n\n")
        head += toks(c["text"])
    if sep >= 0:
        head += [sep, *toks("filename\n")]
    n_batch, n_ctx = state.settings.batch, state.settings.ctx
    before, after = toks(body["input_prefix"]), toks(body["input_suffix"])
    middle = state.tokenize(prompt, add_special=False, parse_special=True) if prompt else []
    before = before[len(before) - min(len(before), 3 * (n_batch // 4)):]
    after = after[:max(0, n_batch // 4 - (2 + len(middle)))]
    n_extra = min(max(0, n_ctx - n_batch + 2), len(head))  # llama-server's: n_ctx - n_batch - 2 * n_predict (-1)
    return [*head[len(head) - n_extra:], *_bos(state), pre, *before, *middle, suf, *after, mid]


def fim_prompt(state, prefix: str, suffix: str) -> list[int]:
    """``<|fim_prefix|>prefix<|fim_suffix|>suffix<|fim_middle|>`` in the model's FIM tokens (a request's
    ``suffix``); a model without them is a 400 that says so."""
    try:
        pre, suf, mid, _, _ = fim_tokens(state)
    except NoInfill as e:
        raise InvalidArgument(f"suffix: this model does not support insert: {e}") from None
    return [*_bos(state), pre, *_text_tokens(state, prefix), suf, *_text_tokens(state, suffix), mid]


def _text_tokens(state, text: str) -> list[int]:
    """Text as plain text: no BOS, and special-token names in it stay text."""
    return state.tokenize(text, add_special=False, parse_special=False)


def _bos(state) -> list[int]:
    """The BOS token where the model adds one (as llama-server puts it before the FIM prefix)."""
    eng = state.engine
    return [eng.bos_token] if eng.add_bos and eng.bos_token >= 0 else []
