"""The function-calling format: calls read bare, fenced or in ``<tool_call>`` tags, the call grammar, chat
templates that render tools (and the calls in their own format), and the function-calling eval suite, whose
prompts and grammars must equal agent_bench's. Split out of tests/test_agent.py (the agent itself)."""

from __future__ import annotations

import pytest

pytest.importorskip("pydantic")

from test_agent import book_table  # a typed tool: restaurant, people, time

from ondevice.agent import Tool, call_turn, fcsuite
from ondevice.agent.calls import (
    TEXT_RULE,
    Call,
    answer_decided,
    call_grammar,
    call_prompt,
    read_calls,
    wraps_calls,
)


def test_function_calling_suite_data_and_scoring():
    items, cat = fcsuite.items(), fcsuite.catalog()
    assert len(cat) >= 100 and 80 <= len(items) <= 120
    assert {i["category"] for i in items} == set(fcsuite.CATEGORIES)
    for it in items:
        assert all(n in cat for n in it["tools"]) and all(e["name"] in it["tools"] for e in it["expected"])
    item = {"tools": ["set_alarm"], "expected": [{"name": "set_alarm",
                                                  "arguments": {"time": ["07:30"], "label": [None, "gym"]}}]}
    ok = fcsuite.score_reply('{"name": "set_alarm", "arguments": {"time": "07:30", "label": " GYM."}}', item, True)
    assert ok["correct"] == ok["valid"] == 1.0
    assert fcsuite.score_reply('{"name": "set_alarm", "arguments": {"time": "07:30"}}', item, True)["correct"] == 1
    assert fcsuite.score_reply('{"name": "set_alarm", "arguments": {"time": "7:31"}}', item, True)["correct"] == 0
    bad = fcsuite.score_reply('{"name": "set_alarm", "arguments": {}}', item, True)
    assert bad["valid"] == 0 and "time" in bad["problem"]
    free = fcsuite.score_reply('Sure! <tool_call>{"name": "set_alarm", "arguments": {"time": "07:30"}}</tool_call>',
                               item, False)
    assert free["correct"] == 1  # unconstrained replies: the first JSON in the text
    two = [Call("f", {"x": 1}), Call("f", {"x": 2.0})]
    exp = [{"name": "f", "arguments": {"x": [2]}}, {"name": "f", "arguments": {"x": ["1"]}}]
    assert fcsuite.calls_match(two, exp) and not fcsuite.calls_match(two[:1], exp)
    assert fcsuite.calls_match(None, []) and not fcsuite.calls_match(two, [])
    assert read_calls("I cannot do that.", lenient=False) == (None, "a plain answer (no call)")


def test_calls_are_read_bare_fenced_or_in_tool_call_tags():
    one, two = '{"name": "a", "arguments": {"x": 1}}', '{"name": "b", "arguments": {}}'
    want = [Call("a", {"x": 1}), Call("b", {})]
    for text in (f"[{one}, {two}]", f"<tool_call>\n{one}\n</tool_call>\n<tool_call>\n{two}\n</tool_call>",
                 f"```json\n{one}\n```\n```\n{two}\n```"):
        assert read_calls(text, lenient=False) == (want, None), text
        assert read_calls(text, lenient=True)[0] == want, text
    # strict: only calls; an unclosed block or text after the call is not a call
    assert read_calls(f"<tool_call>\n{one}\n", lenient=False)[0] is None
    assert read_calls(f"{one} done", lenient=False)[0] is None
    # lenient (unconstrained): the model's <tool_call> blocks anywhere, else the first JSON
    assert read_calls(f"Sure.\n<tool_call>\n{one}\n</tool_call>", lenient=True)[0] == want[:1]
    assert read_calls(f"Here: ```json\n{one}\n```", lenient=True)[0] == want[:1]


# Qwen2.5's tool rendering (its GGUF template, shortened to the parts a first turn uses)
HERMES_TEMPLATE = (
    "{% if tools %}<|im_start|>system\n{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}"
    "{% else %}You are a helpful assistant.{% endif %}\n\n# Tools\n\n<tools>{% for tool in tools %}\n"
    "{{ tool | tojson }}{% endfor %}\n</tools>\n\nFor each function call, return a json object with function "
    "name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, "
    "\"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n{% endif %}"
    "{% for message in messages %}{% if message.role != 'system' %}<|im_start|>{{ message.role }}\n"
    "{{ message.content }}<|im_end|>\n{% endif %}{% endfor %}<|im_start|>assistant\n")


def test_a_template_that_renders_tools_gets_them_and_calls_in_its_own_format(smol_path):
    import ondevice

    m = ondevice.load(smol_path, n_threads=1)
    try:
        t = Tool.from_function(book_table)
        user = [{"role": "user", "content": "Book a table for 4 at Luigi's at 20:00."}]
        assert not wraps_calls(m) and call_prompt(m, user, [t], parallel=False, allow_text=True)[1] is None
        m.template = HERMES_TEMPLATE
        msgs, shown = call_prompt(m, user, [t], parallel=False, allow_text=True)
        assert wraps_calls(m) and msgs == user and shown == [{"type": "function", "function": t.spec()}]
        text, _ = m.render(msgs, tools=shown)
        assert '<tools>{"type": "function", "function": {"name": "book_table"' in text  # trim_blocks, as in HF
        turn = call_turn(m, user, [t], constrained=True, max_tokens=120)
        assert turn.text.startswith(("<tool_call>\n{", "```", "{")) and turn.calls, turn.text
        assert turn.calls[0].name == "book_table"
        t.validate(turn.calls[0].arguments)
        # the same tools, another request: the prompt up to the request is reused from the KV
        again = call_turn(m, [{"role": "user", "content": "Book a table for 2 at Nobu."}], [t], constrained=True,
                          max_tokens=120)
        assert again.meta["cached_tokens"] > 100
    finally:
        m.close()


def test_the_call_grammar_allows_calls_in_every_format_and_text_that_does_not_start_like_one():
    from llama_cpp import LlamaGrammar

    tools = [fcsuite.catalog()[n] for n in ("set_alarm", "lock_door")]
    assert TEXT_RULE == "ondevice-text ::= [^{[<` \\t\\r\\n] .*"  # a plain answer starts like no call
    # so the first character decides (the suite stops a plain answer there); every call format starts a call
    assert answer_decided("Sure") and not answer_decided("")
    assert not any(answer_decided(t[:1]) for t in ("{", "[", "<tool_call>", "```json"))
    for wrapped in (False, True):
        for parallel in (False, True):
            g = call_grammar(tools, parallel=parallel, allow_text=True, wrapped=wrapped)
            LlamaGrammar.from_string(g, verbose=False)  # llama.cpp parses it
            assert g.endswith("root ::= ondevice-tool-call | ondevice-text\n" + TEXT_RULE + "\n")
            assert ("<tool_call>" in g) == wrapped and "ondevice-fenced ::=" in g
            assert ("{0,3}" in g) == (wrapped and parallel)


def test_function_calling_is_an_eval_suite_with_both_modes():
    from ondevice.eval.suites import load_suite, score

    s = load_suite("function-calling")
    assert len(s.items) == 2 * len(fcsuite.items())
    assert {i.category for i in s.items} == {"constrained", "unconstrained"}
    con = next(i for i in s.items if i.id == "single-001/constrained")
    assert con.input == [{"role": "user", "content": fcsuite.items()[0]["query"]}]  # the request alone
    assert con.meta == {"tools": [fcsuite.catalog()["set_alarm"].spec()], **fcsuite.POLICY, "constrained": True,
                        "unit": "single-001", "stratum": "single"}
    assert next(i for i in s.items if i.id == "single-001/unconstrained").meta["constrained"] is False
    assert score(con, '{"name": "set_alarm", "arguments": {"time": "06:45"}}') == \
        {"tool_calls": 1.0, "tool_calls_valid": 1.0}


def test_a_subset_of_the_function_calling_suite_asks_each_request_both_ways():
    """--limit 16 drew constrained and unconstrained items on their own: 1 request of 8 was asked both ways, so
    the comparison the suite is for was made on different requests."""
    from ondevice.eval.suites import load_suite

    s = load_suite("function-calling", limit=16, seed=3)
    ids = {m: {i.id.split("/")[0] for i in s.items if i.meta["constrained"] is (m == "c")} for m in "cu"}
    assert len(s.items) == 16 and ids["c"] == ids["u"] and len(ids["c"]) == 8
    assert {i.meta["stratum"] for i in s.items} == {"single", "choose", "parallel", "none"}  # every category


def test_eval_and_agent_bench_give_the_same_prompt_and_grammar(smol_path):
    """``ondevice eval --suite function-calling`` and agent_bench (fcsuite.run_item) make one request per item."""
    import ondevice
    from ondevice.eval.runner import item_request
    from ondevice.eval.suites import load_suite

    items = {i.id: i for i in load_suite("function-calling").items}
    m = ondevice.load(smol_path, n_threads=1)
    try:
        for template in (m.template, HERMES_TEMPLATE):  # SmolLM2's own (no tools), then Qwen2.5's tool part
            m.template = template
            for it in fcsuite.items()[::7]:
                for mode in fcsuite.MODES:
                    msgs, shown, grammar = fcsuite.request(m, it, constrained=mode == "constrained")
                    toks, g = item_request(m, items[f"{it['id']}/{mode}"])
                    assert toks == m.tokenize_prompt(msgs, tools=shown) and g == grammar
                    assert (g is None) == (mode == "unconstrained")
            toks, g = item_request(m, items["single-001/constrained"])
            text = m.engine.detokenize(toks)
            assert ("<tools>" in text and "<tool_call>" in g) if template == HERMES_TEMPLATE else \
                ("You can call these tools" in text and "<tool_call>" not in g)
    finally:
        m.close()


def test_a_value_at_the_call_grammars_bound_is_refused_not_run(monkeypatch):
    """The grammar bounds free strings and arrays so that every call ends; a value that reached the bound was
    cut (an email body, a guest list) and was run as it was, cut at 80 characters or 6 items, exit 0."""
    import ondevice.agent.agent as agent_mod
    from ondevice.agent import Agent, Toolbox
    from ondevice.agent.calls import Turn, call_grammar, cut_value

    sent = []

    def send_email(to: str, body: str) -> str:
        """Send an email."""
        sent.append(body)
        return "sent"

    cut = Call("send_email", {"to": "bob@example.com", "body": "x" * 80})
    assert cut_value(cut) == ("send_email: body reached the call grammar's bound (80 characters per string, 6 items "
                              "per list): the value was cut, not finished, so the call did not run; raise it with "
                              "--max-arg-chars / --max-arg-items")
    assert "names reached" in cut_value(Call("invite", {"names": ["a"] * 6}))
    assert cut_value(Call("invite", {"names": ["a"] * 5})) is None
    assert cut_value(Call("fetch", {"url": "https://example.com/" + "x" * 90})) is None  # longer: a format's, unbounded
    body = "Hi Bob, the quarterly review moved from Tuesday to Thursday at 3pm in room 4B; bring the budget."
    script = iter([{"to": "bob@example.com", "body": body[:80]}] * 3)  # a stand-in for the actor, cut each time

    def turn(*args, **kw):
        return Turn(text="", calls=[Call("send_email", next(script))], constrained=True)

    monkeypatch.setattr(agent_mod, "call_turn", turn)
    run = Agent(Toolbox([send_email]), actor=object(), answer_tokens=0).run("mail bob", plan=False)
    assert not run.ok and not sent and "body reached the call grammar's bound" in run.nodes[0].error
    long = Agent(Toolbox([send_email]), actor=object(), answer_tokens=0, max_arg_chars=400)
    assert cut_value(Call("send_email", {"to": "b", "body": body}), long.bounds) is None
    tools = list(Toolbox([send_email]).tools.values())
    assert call_grammar(tools, parallel=False, allow_text=False, bounds=long.bounds) != call_grammar(
        tools, parallel=False, allow_text=False)  # the grammar lets the longer value through
    from ondevice.errors import InvalidArgument

    with pytest.raises(InvalidArgument, match="give 1 to 1000 characters"):
        Agent(Toolbox([send_email]), actor=object(), max_arg_chars=5000)


def test_no_plan_with_every_try_invalid_is_a_failed_run_not_a_crash(monkeypatch):
    """--no-plan: when the last try's call was invalid too, the run ended in `AssertionError: unreachable`."""
    import ondevice.agent.agent as agent_mod
    from ondevice.agent import Agent, Toolbox
    from ondevice.agent.calls import Turn

    ran = []

    def transfer(to: str, amount: int) -> str:
        """Transfer money."""
        ran.append(amount)
        return "done"

    tries = []

    def turn(*args, **kw):  # a stand-in for the actor: an invalid call every time
        tries.append(1)
        return Turn(text="", calls=[Call("transfer", {"to": "bob", "amount": "five"})], constrained=True)

    monkeypatch.setattr(agent_mod, "call_turn", turn)
    run = Agent(Toolbox([transfer]), actor=object(), answer_tokens=0, max_retries=1).run("Send 5 to bob", plan=False)
    assert len(tries) == 2 and not ran and not run.ok
    (n,) = run.nodes
    assert n.status == "failed" and n.result.kind == "invalid" and "amount" in n.error
    assert [a["ok"] for a in n.attempts] == [False]


def test_a_draft_07_tuple_schema_validates_and_an_unreadable_one_is_an_invalid_call():
    """zod-to-json-schema (most TypeScript MCP servers) sends draft-07, where a tuple's "items" is a list; the
    2020-12 validator crashed on it (AttributeError traceback) on the first call."""
    from ondevice.agent import Toolbox

    schema = {"$schema": "http://json-schema.org/draft-07/schema#", "type": "object", "required": ["point"],
              "properties": {"point": {"type": "array", "minItems": 2, "maxItems": 2,
                                       "items": [{"type": "number"}, {"type": "number"}]}}}
    moved = []
    box = Toolbox([Tool("move_to", "Move the robot.", schema, lambda point: moved.append(point) or "ok")])
    assert box.call("move_to", {"point": [3, 4]}).ok and moved == [[3, 4]]
    bad = box.call("move_to", {"point": [3, "x"]})
    assert not bad.ok and bad.kind == "invalid" and "point.1" in bad.error
    broken = Toolbox([Tool("odd", "", {"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}}, lambda a: a)])
    r = broken.call("odd", {"a": 1})
    assert not r.ok and r.kind == "invalid" and "its input schema cannot be checked" in r.error


def test_a_partial_is_a_tool_named_after_its_function():
    """A functools.partial in TOOLS crashed the agent (AttributeError: no __name__)."""
    import functools

    from ondevice.errors import InvalidArgument

    def power(base: float, exp: int = 2) -> float:
        """Raise base to a power."""
        return base ** exp

    t = Tool.from_function(functools.partial(power, exp=3))
    assert (t.name, t.description) == ("power", "Raise base to a power.")
    assert t.parameters["properties"]["exp"]["default"] == 3

    class Callable:
        def __call__(self, x: int) -> int:
            return x

    with pytest.raises(InvalidArgument, match="has no name; register a function, or give one"):
        Tool.from_function(Callable())


def test_no_plan_words_instead_of_a_corrected_call_keep_the_failure(monkeypatch):
    """After a failed call the actor answered in words ("Done, it ran fine."): the failed call vanished from the
    run, which said ok (exit 0) with a false answer."""
    import ondevice.agent.agent as agent_mod
    from ondevice.agent import Agent, Toolbox
    from ondevice.agent.calls import Turn

    def boom() -> str:
        """Fails."""
        raise RuntimeError("disk on fire")

    replies = iter([Turn(text="", calls=[Call("boom", {})], constrained=True),
                    Turn(text="Done, the boom tool ran fine.", calls=None, constrained=True)])
    monkeypatch.setattr(agent_mod, "call_turn", lambda *a, **k: next(replies))
    run = Agent(Toolbox([boom]), actor=object(), answer_tokens=0).run("run boom", plan=False)
    assert not run.ok and [n.status for n in run.nodes] == ["failed"] and "disk on fire" in run.nodes[0].error
