"""Chat templates from GGUF metadata, rendered in a Jinja sandbox (as llama.cpp / transformers do)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from functools import lru_cache

from ..errors import InvalidArgument

Message = dict  # {"role": "system"|"user"|"assistant"|"tool", "content": str, ...}


def _raise(msg: str):
    from jinja2.exceptions import TemplateError

    raise TemplateError(msg)


@lru_cache(maxsize=16)
def _compile(source: str):
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=False)
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.filters["tojson"] = _tojson
    return env.from_string(source)


def _tojson(value, indent=None, ensure_ascii=False, **_):
    import json

    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii)


def validate_messages(messages: Sequence[Message]) -> list[Message]:
    if not messages:
        raise InvalidArgument("messages is empty; give at least one {'role': 'user', 'content': ...}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m:
            raise InvalidArgument(f"messages[{i}] must be a dict with 'role' and 'content'")
        if m["role"] not in ("system", "user", "assistant", "tool", "developer"):
            raise InvalidArgument(f"messages[{i}].role {m['role']!r} is not one of system, user, assistant, tool")
        out.append(dict(m, content=m.get("content") or ""))
    return out


def render(template: str, messages: Sequence[Message], *, bos_token: str = "", eos_token: str = "",
           add_generation_prompt: bool = True, tools: list | None = None, **extra) -> str:
    """Render ``messages`` with a GGUF chat template (Jinja, sandboxed)."""
    from jinja2.exceptions import TemplateError

    try:
        return _compile(template).render(
            messages=validate_messages(messages), bos_token=bos_token, eos_token=eos_token,
            add_generation_prompt=add_generation_prompt, tools=tools, **extra)
    except TemplateError as e:
        raise InvalidArgument(f"the model's chat template failed: {e}") from e


def plain_prompt(messages: Sequence[Message]) -> str:
    """Fallback for base models (no template): the conversation as plain text, ready to continue."""
    parts = []
    for m in validate_messages(messages):
        role = {"system": "", "user": "User: ", "assistant": "Assistant: "}.get(m["role"], f"{m['role']}: ")
        parts.append(f"{role}{m['content']}")
    if messages and messages[-1].get("role") != "assistant":
        parts.append("Assistant:")
    return "\n".join(parts)
