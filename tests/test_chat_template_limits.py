"""A chat template's limits hold for every operation that can build a large string (engine/chat_sandbox.py):
``%`` formatting, ``str.format``, the ``format`` filter, printing a list, ``translate``, ``wordwrap``, nested joins,
and a loop that keeps what it builds are refused before the big value exists; the deadline stops a long loop; a
refused render keeps nothing it built. Found by an audit (helper-118): ``("%s"*2000) % ((s,)*2000)`` built 2 GB,
and a template that did so only for one message's content held a server's other chat requests for 13 s and left
it 3.4 GB larger. Rendering is pure Python (tested directly); the server's case runs a real server on loopback."""

from __future__ import annotations

import threading
import time
import tracemalloc

import httpx
import pytest
from conftest import serve_process

from ondevice.engine.chat import render
from ondevice.errors import InvalidArgument

MSGS = [{"role": "user", "content": "boom"}]
S = '{% set s = "x" * 1000000 %}'  # a 1 MB string: within the 1 MiB limit, so only what is built from it is big
BOMBS = {
    "percent": S + '{{ (("%s" * 2000) % ((s,) * 2000))|length }}',
    "percent-dict": S + '{{ ("%(a)s" * 2000) % {"a": s} }}',
    "percent-float": '{{ ("%f" * 300000) % ((1e300,) * 300000) }}',  # 330 characters each
    "percent-repr": '{{ ("%r" * 10) % (("\\x00" * 1000000,) * 10) }}',  # each character escaped to 4
    "format": S + '{{ ("{0}" * 2000).format(s)|length }}',
    "format-map": S + '{{ ("{a}" * 2000).format_map({"a": s})|length }}',
    "format-filter": S + '{{ ("%s" * 2000)|format(*((s,) * 2000)) }}',
    "print-list": S + "{{ [s] * 1000000 }}",
    "print-namespace": S + "{% set ns = namespace(a=[s] * 1000000) %}{{ ns }}",
    "translate": S + "{{ s.translate({120: s})|length }}",
    "wordwrap-string": S + "{{ s[:100000]|wordwrap(1, true, s) }}",
    "wordwrap-slow": S + "{{ s[:500000]|wordwrap(1) }}",  # textwrap: the square of the word's length
    "join-nested": S + "{{ ([[s] * 1000] * 1000)|join }}",
    "keep-building": S + "{% set ns = namespace(l=[]) %}{% for i in range(100000) %}{% set ns.l = ns.l + [s ~ i] %}"
                         "{% endfor %}",
    "bytes": '{{ "x".encode() * 1000000000 }}',
    # a block's output is captured and joined, not output: {% set %} blocks, macros, {% filter %} blocks
    "set-block": S + "{% set x %}{% for i in range(3000) %}{{ s }}{% endfor %}{% endset %}{{ x|length }}",
    "macro": S + "{% macro f() %}{% for i in range(3000) %}{{ s }}{% endfor %}{% endmacro %}{{ f()|length }}",
    "filter-block": S + "{% filter length %}{% for i in range(3000) %}{{ s }}{% endfor %}{% endfilter %}",
}


@pytest.mark.parametrize("name", BOMBS)
def test_a_template_that_would_build_a_huge_string_is_refused_before_it_does(name):
    t0 = time.monotonic()
    tracemalloc.start()
    try:
        with pytest.raises(InvalidArgument, match="^the chat template (was stopped|failed)") as e:
            render(BOMBS[name], MSGS)
        peak = tracemalloc.get_traced_memory()[1]
        kept = tracemalloc.get_traced_memory()[0]  # while the error is still held
    finally:
        tracemalloc.stop()
    assert time.monotonic() - t0 < 10, name
    assert peak < 100 << 20, f"{name} made {peak >> 20} MiB before it was refused"
    assert kept < 8 << 20, f"the error of {name} keeps {kept >> 20} MiB of what the template built"
    assert "fix the template" in str(e.value)


def test_the_deadline_stops_a_long_loop():
    t0 = time.monotonic()
    with pytest.raises(InvalidArgument, match="ran longer than 0.3 s"):
        render("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", MSGS, timeout=0.3)
    assert time.monotonic() - t0 < 3


def test_the_bounded_operations_still_give_what_jinja_gives():
    tpl = ("{% for m in messages %}{{ '%s: %s|' % (m.role, m.content) }}{{ '{0}/{r}|'.format(m.content, r=m.role) }}"
           "{{ '{a}|'.format_map({'a': m.content}) }}{{ '%s!'|format(m.content) }}{{ [m.content, 1] }}|"
           "{{ (m.content ~ ' ')|wordwrap(3) }}|{{ m.content.translate({98: 'B'}) }}|{{ [[1, 2], [3]]|join(',') }}"
           "{{ '%5.1f' % 2.25 }}{% endfor %}")
    assert render(tpl, [{"role": "user", "content": "abc"}], add_generation_prompt=False) == (
        "user: abc|abc/user|abc|abc!['abc', 1]|abc|aBc|[1, 2],[3]  2.2")


def test_a_template_that_blows_up_on_one_message_fails_that_request_only(smol_path, tmp_path):
    """Only a message saying 'boom' makes the template build 3 GB (the audit's trigger.tmpl): that request is a
    400 naming the template, at once, while another client's chat requests are answered as usual."""
    tpl = tmp_path / "trigger.jinja"
    tpl.write_text("{% for m in messages %}{% if m.content == 'boom' %}{% set s = 'x' * 1000000 %}"
                   "{% set f = '%s' * 3000 %}{% set big = f % ((s,) * 3000) %}{% endif %}<|im_start|>{{ m.role }}\n"
                   "{{ m.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
                   "{% endif %}")
    with serve_process(tmp_path, "-m", str(smol_path), "-np", "2", "--chat-template-file", str(tpl)) as (proc, url,
                                                                                                          log):
        def chat(content: str) -> httpx.Response:
            return httpx.post(url + "/chat/completions", timeout=120,
                              json={"messages": [{"role": "user", "content": content}], "max_tokens": 2})

        bad: dict = {}
        t = threading.Thread(target=lambda: bad.update(r=chat("boom"), t=time.monotonic()))
        t0 = time.monotonic()
        t.start()
        others = []
        for _ in range(3):
            s = time.monotonic()
            others.append((chat("hello").status_code, time.monotonic() - s))
        t.join()
        assert bad["r"].status_code == 400 and bad["t"] - t0 < 10, bad["r"].text
        assert "the chat template was stopped: a %-formatted string would hold" in bad["r"].json()["error"]["message"]
        assert all(code == 200 and s < 30 for code, s in others), others
        assert chat("hello again").status_code == 200 and proc.poll() is None
        assert "Traceback" not in log.read_text()
