"""Training data: JSONL of ``{"messages": [...]}`` or ``{"input": ..., "target": ...}``, tokenized by the same
llama.cpp vocabulary and chat template the adapter will be served with (no torch here).

The loss is on the answer only: the tokens of the last assistant message, its end-of-turn marker included (so
the model learns to stop), never on the prompt. Tool calls (OpenAI's ``tool_calls``, and the line's ``tools``)
render as inference renders them (``Model``'s conversation, engine/chat.py): through a template that shows them,
else as the JSON the server asks such a model to write; a last assistant message that is a call is the answer.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

from ..errors import InvalidArgument


class Conversation(list):
    """A line's messages (dicts a chat template renders), with the line's ``tools`` and where it is (``file:N``)."""

    def __init__(self, messages=(), tools: list | None = None, where: str = ""):
        super().__init__(messages)
        self.tools, self.where = tools, where


@dataclass
class Example:
    tokens: list[int]
    n_prompt: int  # tokens[:n_prompt] are the prompt, the rest the answer (the loss)


def read_jsonl(path: str | Path) -> list[Conversation]:
    """Each line as a conversation ending with the assistant's answer. Errors name the line and the fix."""
    p = Path(path)
    if not p.is_file():
        raise InvalidArgument(f"{p}: no such data file; give a JSONL file, one {{\"messages\": [...]}} or "
                              f"{{\"input\": ..., \"target\": ...}} object per line")
    out = []
    with open(p, encoding="utf-8-sig", errors="strict") as f:  # a BOM (Notepad, PowerShell) is no JSON error
        try:
            lines = list(f)
        except UnicodeDecodeError as e:
            raise InvalidArgument(f"{p}: not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{p}:{n}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            # pretty-printed JSON (or an array's "["): the value goes on past the line's end
            spread = " (it does not end on this line: JSONL has each object whole on one line)" \
                if e.pos >= len(line.rstrip()) else ""
            raise InvalidArgument(f"{where}: not valid JSON ({e.msg} at column {e.colno}); one JSON object "
                                  f"per line{spread}") from None
        conv = _conversation(obj, where)
        if not conv[-1]["content"].strip() and not conv[-1].get("tool_calls"):  # it would teach to stop at once
            raise InvalidArgument(f"{where}: the answer (the last assistant message or \"target\") is empty; give "
                                  f"the text the model should learn to answer, or drop the line")
        out.append(conv)
    if not out:
        raise InvalidArgument(f"{p}: no examples (the file is empty)")
    return out


# other tools' line formats a user brings (axolotl, TRL, FastChat): named with the way to write them here
_FOREIGN = (
    ({"instruction", "output"}, ('Alpaca\'s instruction/input/output: write {"input": instruction and input, '
                                 '"target": output}')),
    ({"prompt", "completion"}, 'prompt/completion: write {"input": prompt, "target": completion}'),
    ({"conversations"}, ('ShareGPT\'s conversations of from/value: write {"messages": [{"role": "user", '
                         '"content": ...}, {"role": "assistant", "content": ...}]}')),
    ({"text"}, ('TRL\'s plain text: adapt trains a chat model on answers to prompts, not on running text; write '
                '{"input": the prompt, "target": the answer}')),
)


def _keys_hint(obj: dict) -> str:
    """The keys a line has, and how to write it when they are another tool's format."""
    got = ", ".join(map(repr, obj)) or "none"
    hint = next((h for keys, h in _FOREIGN if keys <= obj.keys()), None)
    return f"got {got}" + (f" ({hint})" if hint else "")


def _conversation(obj, where: str) -> list[dict]:
    if not isinstance(obj, dict):
        array = " (a JSON array: put each of its objects on a line of its own, JSONL)" if isinstance(obj, list) else ""
        raise InvalidArgument(f"{where}: expected a JSON object, got {type(obj).__name__}{array}")
    if "messages" in obj:
        msgs = obj["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise InvalidArgument(f"{where}: \"messages\" must be a non-empty list of {{\"role\", \"content\"}}")
        for i, m in enumerate(msgs):
            calls = isinstance(m, dict) and m.get("role") == "assistant" and bool(m.get("tool_calls"))
            content = m.get("content") if isinstance(m, dict) else None
            if not (isinstance(m, dict) and isinstance(m.get("role"), str) and (isinstance(content, str)
                                                                                  or calls and content is None)):
                raise InvalidArgument(f"{where}: message {i} needs a string \"role\" and a string \"content\" "
                                      f"(null only for an assistant message with \"tool_calls\")")
        from ..engine.chat import validate_messages  # the roles a chat template takes, checked in one place

        try:
            validate_messages(msgs)
        except InvalidArgument as e:
            raise InvalidArgument(f"{where}: {e}") from None
        if msgs[-1]["role"] != "assistant":
            raise InvalidArgument(f"{where}: the last message must be the assistant's answer (role "
                                  f"\"assistant\"), got role {msgs[-1]['role']!r}")
        if len(msgs) < 2:
            raise InvalidArgument(f"{where}: needs a prompt message before the assistant's answer")
        return Conversation([_message(m, i, where) for i, m in enumerate(msgs)], _tools(obj.get("tools"), where),
                            where)
    if "input" in obj or "target" in obj:
        for k in ("input", "target"):
            if k not in obj:  # an Alpaca line has "input" too: say what the line holds, not only what it lacks
                raise InvalidArgument(f"{where}: \"{k}\" must be a string, and the line has none: {_keys_hint(obj)}")
            if not isinstance(obj[k], str):
                raise InvalidArgument(f"{where}: \"{k}\" must be a string")
        extra = [k for k in obj if k not in ("input", "target")]
        if extra:  # a half-converted Alpaca line would train without its instruction, a "system" without it
            raise InvalidArgument(f"{where}: an \"input\"/\"target\" line takes those two keys only, and this one "
                                  f"also has {', '.join(map(repr, extra))}, which would be dropped; put what they say "
                                  f"into \"input\", or write the line as {{\"messages\": [...]}} (a \"system\" "
                                  f"message first)")
        return Conversation([{"role": "user", "content": obj["input"]},
                             {"role": "assistant", "content": obj["target"]}], where=where)
    raise InvalidArgument(f"{where}: expected \"messages\" or \"input\"/\"target\" keys, {_keys_hint(obj)}")


def _message(m: dict, i: int, where: str) -> dict:
    """A line's message as a chat template takes it: a call's arguments parsed (as serve's ``message_dicts``)."""
    out = {"role": m["role"], "content": m.get("content") or ""}
    for k in ("name", "tool_call_id"):
        if isinstance(m.get(k), str):
            out[k] = m[k]
    if m["role"] == "assistant" and m.get("tool_calls"):
        calls = m["tool_calls"]
        fix = (f"{where}: message {i}'s \"tool_calls\" must be a list of {{\"type\": \"function\", \"id\": ..., "
               f"\"function\": {{\"name\": ..., \"arguments\": JSON text}}}} (OpenAI's format)")
        if not isinstance(calls, list) or not all(isinstance(c, dict) and isinstance(c.get("function"), dict)
                                                  and isinstance(c["function"].get("name"), str) for c in calls):
            raise InvalidArgument(fix)
        out["tool_calls"] = []
        for c in calls:
            args = c["function"].get("arguments")
            if isinstance(args, str):
                try:
                    args = json.loads(args or "{}")
                except json.JSONDecodeError as e:
                    raise InvalidArgument(f"{where}: message {i}'s tool call {c['function']['name']!r} has arguments "
                                          f"that are not JSON ({e.msg}); give \"arguments\" as a JSON object's text, "
                                          f"as OpenAI's format has it") from None
            out["tool_calls"].append({"type": "function", "id": c.get("id"),
                                      "function": {"name": c["function"]["name"], "arguments": args or {}}})
    return out


def _tools(tools, where: str) -> list | None:
    """The line's ``tools`` (OpenAI's list of function schemas), as a request's are given to the template."""
    if tools is None:
        return None
    if not (isinstance(tools, list) and all(isinstance(t, dict) and isinstance(t.get("function"), dict)
                                            and isinstance(t["function"].get("name"), str) for t in tools)):
        raise InvalidArgument(f"{where}: \"tools\" must be a list of {{\"type\": \"function\", \"function\": "
                              f"{{\"name\": ..., \"parameters\": ...}}}} (OpenAI's format)")
    return tools or None


def _rendered(model, conv: Conversation) -> tuple[list[dict], list | None]:
    """The conversation's messages and tools as inference renders them: what ``Model.tokenize_prompt`` gives a
    template, with the tools described in the system message (the server's note) for one that does not show them."""
    from ..engine.toolcalls import template_shows_tools, tools_note

    tools = conv.tools
    note = None
    if tools and not template_shows_tools(model.template):  # what a request with these tools gets by default
        note = tools_note([t["function"] for t in tools], parallel=True, allow_text=True)
    return model._conversation(list(conv), None, tools, note)


def _check_calls_shown(model, msgs: list[dict], tools: list | None, kw: dict, where: str) -> None:
    """A template that renders ``tool_calls`` its own way must show them: rendered without them, the text differs
    (else a call would train as an empty turn)."""
    from ..engine import chat

    if not any(m.get("tool_calls") for m in msgs):
        return
    kw = {k: v for k, v in kw.items() if k in ("bos_token", "eos_token", "n_ctx")}
    bare = [{k: v for k, v in m.items() if k != "tool_calls"} for m in msgs]
    if chat.render(model.template, msgs, tools=tools, add_generation_prompt=False, **kw) == \
            chat.render(model.template, bare, tools=tools, add_generation_prompt=False, **kw):
        raise InvalidArgument(f"{where}: {model.name}'s chat template does not render the assistant's tool calls "
                              f"(it drops tool_calls), so the line would train on empty turns; write the call as "
                              f"that message's \"content\" text, drop the line, or adapt a model whose template "
                              f"renders tool calls")


def tokenize(model, conversations: list[Conversation], max_len: int) -> list[Example]:
    """Tokenize with ``model`` (an ``ondevice.Model``: its llama.cpp vocabulary and chat template).

    An example longer than ``max_len`` keeps its answer and loses the start of its prompt; one whose
    answer alone is longer is cut at ``max_len``.
    """
    from ..engine import chat

    eng = model.engine
    kw = dict(specials=eng.control_tokens(), **model._template_kw(),
              tokenize=lambda text, bos: eng.tokenize(text, add_special=bos, parse_special=False))
    out, lost_prompt, lost_end, longest = [], 0, 0, 0
    for conv in conversations:
        if model.template is None:
            raise InvalidArgument(f"{model.name} has no chat template; adapt an instruct model")
        where = getattr(conv, "where", "") or "a line"
        msgs, tools = _rendered(model, conv if isinstance(conv, Conversation) else Conversation(conv))
        try:
            _check_calls_shown(model, msgs, tools, kw, where)
            prompt = chat.encode(model.template, msgs[:-1], add_generation_prompt=True, tools=tools, **kw)
            full = chat.encode(model.template, msgs, add_generation_prompt=False, tools=tools, **kw)
        except InvalidArgument as e:
            if not (tools or any(m.get("tool_calls") for m in msgs)):
                raise
            raise InvalidArgument(f"{where}: {model.name}'s chat template cannot render this line's tool calls ({e}); "
                                  f"write the calls as the messages' \"content\" text, drop the line, or adapt a "
                                  f"model whose template renders tool calls") from None
        if full[:len(prompt)] != prompt:  # a template that renders the prompt differently once answered
            raise InvalidArgument(f"{model.name}'s chat template does not render the prompt as a prefix of the "
                                  f"answered conversation; ondevice adapt cannot find the answer tokens")
        eot = next((i for i in range(len(prompt), len(full)) if full[i] in eng.eos_tokens), len(full) - 1)
        full = full[:eot + 1]  # the answer up to and including its end-of-turn token
        n_prompt = len(prompt)
        longest = max(longest, len(full))
        if len(full) > max_len:
            cut = min(len(full) - max_len, n_prompt - 1)
            lost_end += len(full) - cut > max_len
            lost_prompt += 1
            full, n_prompt = full[cut:][:max_len], n_prompt - cut
        out.append(Example(tokens=full, n_prompt=n_prompt))
    if lost_prompt:  # said once: an answer cut short loses its end-of-turn token and teaches no stop
        ends = (f", and {lost_end} also the end of {'its' if lost_end == 1 else 'their'} answer (which then teaches "
                f"no stop)") if lost_end else ""
        warnings.warn(f"{lost_prompt} of {len(out)} examples are longer than --max-len {max_len} tokens: they lose "
                      f"the start of their prompt{ends}; --max-len {longest} keeps every example whole", stacklevel=2)
    return out

