"""Chat templates from GGUF metadata, rendered in a Jinja sandbox (as llama.cpp / transformers do).

A chat template is code from a model file: the sandbox (engine/chat_sandbox.py) stops it reaching Python
internals, and its limits stop it exhausting the process: a deadline checked by every loop iteration, call,
filter and operator; every value a step builds bounded before it is built (``*``, ``**``, ``~``, ``%``,
``str.format``, joins, filters); the values a render builds bounded in all; the output counted as it is
generated. Whatever a template does then ends as :class:`InvalidArgument` naming the template as the problem,
and nothing it built is kept.

Message contents are text, never control tokens: :func:`encode` swaps control-token text inside the
messages (and tools) for placeholders before rendering, then tokenizes the template's own markers as
special tokens and everything between them, contents included, as plain text.
"""

from __future__ import annotations

import json
import re
import secrets
import traceback
from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import lru_cache

from ..errors import InvalidArgument
from .chat_sandbox import CHARS_PER_CTX_TOKEN, MIN_OUTPUT_CHARS, RENDER_TIMEOUT_S, TemplateLimit, compile_template
from .chat_sandbox import limits as _limits

__all__ = ["MIN_OUTPUT_CHARS", "RENDER_TIMEOUT_S", "TemplateLimit", "encode", "render"]

Message = dict  # {"role": "system"|"user"|"assistant"|"tool", "content": str, ...}


# the template is the model file's, or one given with --chat-template / --chat-template-file / load(chat_template=)
_FIX = "fix the template, give another with --chat-template, or use a model whose template renders this conversation"


def validate_messages(messages: Sequence[Message]) -> list[Message]:
    if not messages:
        raise InvalidArgument("messages is empty; give at least one {'role': 'user', 'content': ...}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m:
            raise InvalidArgument(f"messages[{i}] must be a dict with 'role' and 'content'")
        if m["role"] not in ("system", "user", "assistant", "tool", "developer"):
            raise InvalidArgument(f"messages[{i}].role {m['role']!r} is not one of system, user, assistant, tool")
        check_has_content(m["role"], m.keys(), i)
        # OpenAI's "developer" messages are system messages to a chat template (as llama-server reads them)
        out.append(dict(m, role="system" if m["role"] == "developer" else m["role"], content=message_text(m, i)))
    return out


_MESSAGE_KEYS = ("role", "content", "name", "tool_calls", "tool_call_id", "reasoning_content", "refusal")


def check_has_content(role: str, keys, i: int | None) -> None:
    """A message other than the assistant's (whose turn may be tool calls alone) must have a ``content``, as
    llama-server and OpenAI require; a misspelt key (``contents``, ``text``) was read as an empty message."""
    if role == "assistant" or "content" in keys:
        return
    odd = [k for k in keys if k not in _MESSAGE_KEYS]
    where = f"the {role} message" if i is None else f"messages[{i}] ({role})"
    raise InvalidArgument(f"{where} has no 'content': all non-assistant messages must contain "
                          f"'content'" + (f" (it has {', '.join(map(repr, odd))}: give its text as 'content')"
                                          if odd else " (\"\" for an empty one)"))


def message_text(m: Message, i: int) -> str:
    """A message's content as text: a string, none, or OpenAI's list of ``{"type": "text", "text": ...}`` parts."""
    content = m.get("content")
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list):
        texts = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            if kind == "text" and not isinstance(part.get("text"), str):
                raise InvalidArgument(f"messages[{i}].content has a text part without a string 'text'; give "
                                      f"{{'type': 'text', 'text': '...'}}")
            if kind == "refusal" and m.get("role") == "assistant" and isinstance(part.get("refusal"), str):
                texts.append(part["refusal"])  # an earlier reply's refusal (OpenAI's shape): its text is history
                continue
            if kind != "text":
                raise InvalidArgument(f"messages[{i}].content has a {kind!r} part; text parts only "
                                      f"({{'type': 'text', 'text': ...}}): this is a text model")
            texts.append(part["text"])
        return "\n".join(texts)  # as llama-server joins them
    raise InvalidArgument(f"messages[{i}].content is {content!r}; give a string or a list of text parts")


def calls_as_text(messages: Sequence[Message]) -> list[Message]:
    """For a template that does not render ``tool_calls``: each assistant message's calls appended to its
    content as the JSON it was asked to write (one ``{"name", "arguments"}`` object, or an array of them)."""
    out = []
    for m in messages:
        calls = [c.get("function", c) for c in m.get("tool_calls") or ()]
        if calls:
            calls = [{"name": c.get("name"), "arguments": c.get("arguments")} for c in calls]
            m = {k: v for k, v in m.items() if k != "tool_calls"}
            m["content"] = (m.get("content") or "") + json.dumps(calls[0] if len(calls) == 1 else calls)
        out.append(m)
    return out


def render(template: str, messages: Sequence[Message], *, bos_token: str = "", eos_token: str = "",
           add_generation_prompt: bool = True, tools: list | None = None, n_ctx: int = 0,
           timeout: float = RENDER_TIMEOUT_S, **extra) -> str:
    """Render ``messages`` with a GGUF chat template (Jinja, sandboxed, bounded in time and output size).

    ``n_ctx`` (the context in tokens) sets the output limit; any failure of the template, its limits
    included, is an :class:`InvalidArgument` naming the template.
    """
    from jinja2.exceptions import TemplateError

    messages = validate_messages(messages)
    prefill = ""
    last = messages[-1]
    if add_generation_prompt and len(messages) > 1 and last["role"] == "assistant" and not last.get("tool_calls"):
        # a reply the caller began (an assistant prefill): continued, not closed as a turn and answered anew,
        # as llama-server, Ollama and Anthropic's API do
        prefill, messages = last["content"], messages[:-1]
    if "tool_calls" not in template:
        messages = calls_as_text(messages)
    limit = max(MIN_OUTPUT_CHARS, CHARS_PER_CTX_TOKEN * n_ctx)
    try:
        with _limits(timeout, limit):
            parts, n = [], 0
            for chunk in compile_template(template).generate(
                    messages=messages, bos_token=bos_token, eos_token=eos_token,
                    add_generation_prompt=add_generation_prompt, tools=tools, **extra):
                n += len(chunk)
                if n > limit:
                    raise TemplateLimit(f"its output passed {limit} characters ({CHARS_PER_CTX_TOKEN} per token "
                                        f"of the {n_ctx}-token context)")
                parts.append(chunk)
        return "".join(parts) + prefill
    except TemplateLimit as e:
        why, cause = f"the chat template was stopped: {e}; {_FIX}", None
        traceback.clear_frames(e.__traceback__)
    except TemplateError as e:
        why, cause = f"the chat template failed: {e}; {_FIX}", e
        traceback.clear_frames(e.__traceback__)
    except (RecursionError, MemoryError, ArithmeticError, ValueError, TypeError, LookupError, AttributeError) as e:
        why, cause = f"the chat template failed ({type(e).__name__}: {str(e)[:200]}); {_FIX}", None
        traceback.clear_frames(e.__traceback__)
    # raised here, not in an except block, and with the template's frames cleared: the error holds none of
    # the values the template built (megabytes, maybe), so nothing it built outlives this call
    raise InvalidArgument(why) from cause


# a plain transcript's turns, one a line (validate_messages allows these roles only)
PLAIN_LABELS = {"system": "System: ", "user": "User: ", "assistant": "Assistant: ", "tool": "Tool: "}
# a base model goes on past its reply with the next turn ("\nUser: ..."): any turn's label on a new line ends
# the reply, as llama.cpp's templates carry their end of turn and Ollama's plain templates a `stop` parameter
PLAIN_STOPS = tuple(f"\n{label.rstrip()}" for label in PLAIN_LABELS.values())


class PromptTokens(list):
    """A prompt's token ids and the stop strings that end a reply to it, as its rendering gives them (a plain
    transcript's next turn, :data:`PLAIN_STOPS`); generation adds them to the request's own
    (:func:`ondevice.engine.stops.with_prompt_stops`)."""

    def __init__(self, tokens: Iterable[int] = (), stops: Sequence[str] = ()):
        super().__init__(tokens)
        self.stops = tuple(stops)


def plain_prompt(messages: Sequence[Message]) -> tuple[str, tuple[str, ...]]:
    """Fallback for base models (no template): the conversation as plain text, ready to continue, and the stop
    strings that end the reply there (the next turn's label, :data:`PLAIN_STOPS`)."""
    parts = []
    for m in calls_as_text(validate_messages(messages)):
        parts.append(f"{PLAIN_LABELS[m['role']]}{m['content']}")
    if messages and messages[-1].get("role") != "assistant":
        parts.append(PLAIN_LABELS["assistant"].rstrip())
    return "\n".join(parts), PLAIN_STOPS


# -- tokenizing a rendered chat: the template's markers are special, message text never is -----------------

def _protect(value, pattern: re.Pattern, literals: dict[str, str], mark: Callable[[int], str]):
    """``value`` with the control-token text inside its strings swapped for placeholders (``literals`` maps
    each placeholder back to its text)."""
    if isinstance(value, str):
        def swap(m: re.Match) -> str:
            key = next((k for k, v in literals.items() if v == m.group()), None) or mark(len(literals))
            literals[key] = m.group()
            return key

        return pattern.sub(swap, value)
    if isinstance(value, dict):
        return {k: (v if k == "role" else _protect(v, pattern, literals, mark)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_protect(v, pattern, literals, mark) for v in value]
    return value


@lru_cache(maxsize=8)
def _specials_pattern(specials: tuple[str, ...]) -> re.Pattern:
    return re.compile("|".join(re.escape(s) for s in sorted(specials, key=len, reverse=True)))


def encode(template: str | None, messages: Sequence[Message], *, specials: Mapping[str, int],
           tokenize: Callable[[str, bool], list[int]], bos_token: str = "", eos_token: str = "",
           tools: list | None = None, n_ctx: int = 0, add_generation_prompt: bool = True) -> list[int]:
    """The token ids of a conversation: rendered with ``template`` (or as plain text when None: a
    :class:`PromptTokens` carrying the transcript's stops), with only the template's own control tokens special.

    Args:
        specials: control-token text -> id (the tokens a tokenizer matches only when parsing specials).
        tokenize: ``tokenize(text, add_bos)``, the model's tokenizer with special parsing off.
    """
    messages = validate_messages(messages)
    if template is None:  # a base model: the transcript is text, BOS added by the tokenizer; its stops with it
        text, stops = plain_prompt(messages)
        return PromptTokens(tokenize(text, True), stops)
    if not specials:
        return tokenize(render(template, messages, bos_token=bos_token, eos_token=eos_token, tools=tools,
                               n_ctx=n_ctx, add_generation_prompt=add_generation_prompt), False)
    pattern = _specials_pattern(tuple(specials))
    literals: dict[str, str] = {}
    nonce = secrets.randbelow(10**12)
    # private-use characters around digits: no tokenizer merges them, and case or whitespace filters keep them
    def mark(i: int) -> str:
        return f"\U000F0000{nonce}\U000F0001{i}\U000F0002"

    safe_messages = _protect(messages, pattern, literals, mark)
    safe_tools = _protect(tools, pattern, literals, mark) if tools else tools
    text = render(template, safe_messages, bos_token=bos_token, eos_token=eos_token, tools=safe_tools,
                  n_ctx=n_ctx, add_generation_prompt=add_generation_prompt)
    restore = re.compile("|".join(map(re.escape, literals))) if literals else None
    tokens: list[int] = []
    pos = 0
    for m in pattern.finditer(text):  # the template's markers (contents hold none: they are placeholders)
        if m.start() > pos:
            piece = text[pos:m.start()]
            tokens += tokenize(restore.sub(lambda x: literals[x.group()], piece) if restore else piece, False)
        tokens.append(specials[m.group()])
        pos = m.end()
    if pos < len(text):
        piece = text[pos:]
        tokens += tokenize(restore.sub(lambda x: literals[x.group()], piece) if restore else piece, False)
    return tokens
