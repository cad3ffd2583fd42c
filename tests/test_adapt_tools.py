"""Tool calls in training data: OpenAI's ``tool_calls`` (what ``ondevice cascade export`` writes for a deferred
agent turn, and what OpenAI's fine-tuning format and TRL take) and a line's ``tools`` render as inference renders
them, and the loss stays on the last assistant turn, a call included. The reader used to drop ``tool_calls``
(refusing a call's null content, or training on its empty content)."""

from __future__ import annotations

import json

import pytest

from ondevice.adapt import data
from ondevice.errors import InvalidArgument

CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
CITY = {"type": "object", "properties": {"city": {"type": "string"}}}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather", "parameters": CITY}}]
AGENT_TURN = {"messages": [{"role": "user", "content": "Weather in Paris?"},
                           {"role": "assistant", "content": None, "tool_calls": [CALL]},
                           {"role": "tool", "tool_call_id": "call_1", "content": "18 C, sunny"},
                           {"role": "assistant", "content": "It is 18 C and sunny in Paris."}]}
A_CALL = {"messages": [{"role": "user", "content": "Weather in Paris?"},
                       {"role": "assistant", "content": None, "tool_calls": [CALL]}], "tools": TOOLS}


def _write(tmp_path, *lines) -> str:
    p = tmp_path / "t.jsonl"
    p.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return str(p)


def test_a_call_in_the_history_is_in_the_prompt_as_inference_renders_it(tmp_path, smol):
    (conv,) = data.read_jsonl(_write(tmp_path, AGENT_TURN))
    (ex,) = data.tokenize(smol, [conv], max_len=512)
    prompt = smol.engine.detokenize(ex.tokens[:ex.n_prompt], special=True)
    assert '{"name": "get_weather", "arguments": {"city": "Paris"}}' in prompt  # the call, as the server renders it
    assert "<|im_start|>tool\n18 C, sunny<|im_end|>" in prompt
    assert smol.engine.detokenize(ex.tokens[ex.n_prompt:-1]) == "It is 18 C and sunny in Paris."  # the loss
    msgs = [dict(m) for m in AGENT_TURN["messages"][:-1]]
    msgs[1] = {"role": "assistant", "content": "",
               "tool_calls": [{"type": "function", "id": "call_1",
                               "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]}
    assert ex.tokens[:ex.n_prompt] == smol.tokenize_prompt(msgs)  # what generation is given after that turn


def test_a_call_as_the_answer_is_what_the_loss_is_on_with_the_tools_as_a_request_gives_them(tmp_path, smol):
    from ondevice.engine.toolcalls import tools_note

    (conv,) = data.read_jsonl(_write(tmp_path, A_CALL))
    (ex,) = data.tokenize(smol, [conv], max_len=512)
    answer = ex.tokens[ex.n_prompt:]
    assert smol.engine.detokenize(answer[:-1]) == '{"name": "get_weather", "arguments": {"city": "Paris"}}'
    assert answer[-1] in smol.engine.eos_tokens
    # the server's prompt for a request with these tools (SmolLM2's template shows none: the note describes them)
    note = tools_note([t["function"] for t in TOOLS], parallel=True, allow_text=True)
    assert ex.tokens[:ex.n_prompt] == smol.tokenize_prompt(A_CALL["messages"][:1], tools=TOOLS, system_note=note)


def test_a_template_that_drops_tool_calls_or_bad_calls_are_refused_by_line(tmp_path, smol_path):
    import ondevice

    drops = ("{% for m in messages %}{% if m.tool_calls %}{% endif %}<|im_start|>{{ m.role }}\n{{ m.content }}"
             "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    m = ondevice.load(str(smol_path), n_ctx=256, n_threads=1, chat_template=drops, warmup=False)
    try:
        path = _write(tmp_path, {"input": "a", "target": "b"}, AGENT_TURN)
        with pytest.raises(InvalidArgument, match=r"t\.jsonl:2: .* chat template does not render the assistant's "
                                                  r"tool calls \(it drops tool_calls\).*; write the call as"):
            data.tokenize(m, data.read_jsonl(path), max_len=256)
    finally:
        m.close()
    bad = json.loads(json.dumps(AGENT_TURN))
    bad["messages"][1]["tool_calls"][0]["function"]["arguments"] = "{city: Paris}"
    with pytest.raises(InvalidArgument, match=r"t\.jsonl:1: message 1's tool call 'get_weather' has arguments that "
                                              r"are not JSON"):
        data.read_jsonl(_write(tmp_path, bad))
    with pytest.raises(InvalidArgument, match=r"t\.jsonl:1: \"tools\" must be a list of"):
        data.read_jsonl(_write(tmp_path, {**A_CALL, "tools": {"name": "x"}}))
    empty = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None}]}
    with pytest.raises(InvalidArgument, match=r"t\.jsonl:1: message 1 needs a string \"role\" and a string "
                                              r"\"content\" \(null only for an assistant message with"):
        data.read_jsonl(_write(tmp_path, empty))


def test_adapt_trains_on_a_file_with_tool_calls(cli, tmp_path):
    pytest.importorskip("torch")
    path = _write(tmp_path, AGENT_TURN, A_CALL)
    r = cli("adapt", path, "-o", str(tmp_path / "t.gguf"), "--steps", "1", "--batch", "2", "--max-len", "256",
            "--modules", "attn_q", "--layers", "29", "--rank", "2", "-t", "1")
    assert r.returncode == 0, r.stderr
    assert "1 step = 1 epoch of 2 examples" in r.stdout, r.stdout
