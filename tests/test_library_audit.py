"""The library API as a user of llama-cpp-python, the OpenAI client or mlx-lm calls it: arguments checked when
the call is made (not when its stream is first read), the shapes those libraries take (UTF-8 bytes to tokenize,
sampling as keywords, a dict or a Sampling), and a closed model that says how to load it again."""

from __future__ import annotations

import inspect
import re

import pytest

import ondevice
from ondevice.errors import InvalidArgument, ModelClosed


@pytest.fixture
def closes(monkeypatch):
    """The names of the models closed during the test (each close, also a second one of the same model)."""
    closed = []
    real_close = ondevice.Model.close
    monkeypatch.setattr(ondevice.Model, "close", lambda self: (closed.append(self.name), real_close(self)))
    return closed


def test_a_one_shot_stream_checks_its_arguments_when_called_and_frees_its_model(smol_path, closes):
    with pytest.raises(InvalidArgument, match="temp='0' must be a number"):
        ondevice.stream("Hi", str(smol_path), n_ctx=128, temp="0")  # not read: the error comes now
    assert len(closes) == 1
    with pytest.raises(InvalidArgument, match="stream_tokens"):
        ondevice.stream([1, 2, 3], str(smol_path), n_ctx=128)
    assert len(closes) == 2
    ondevice.stream("Hi", str(smol_path), n_ctx=128, max_tokens=2).close()  # closed unread: its model goes too
    assert len(closes) == 3
    unread = ondevice.stream("Hi", str(smol_path), n_ctx=128, max_tokens=2)
    del unread  # dropped unread (a REPL's forgotten stream): freed at once, not when the collector runs
    assert len(closes) == 4
    text = "".join(g.text for g in ondevice.stream("Hi", str(smol_path), n_ctx=128, temp=0, max_tokens=4))
    assert len(closes) == 5 and text == ondevice.generate("Hi", str(smol_path), n_ctx=128, temp=0, max_tokens=4).text


@pytest.mark.parametrize(("kw", "match"), [
    ({"chat_template": "{% for m in messages %}{{ m.content }}{% endfor %}"},
     r"a template of your own is given to ondevice.load\(name, chat_template=...\)"),
    ({"chat_template": 1}, "must be True, False"),
    ({"tools": {"type": "function"}}, "must be a list of tool schemas"),
    ({"tools": ["get_weather"]}, "must be a list of tool schemas"),
])
def test_a_chat_template_or_tools_of_the_wrong_type_is_named(smol, kw, match):
    with pytest.raises(InvalidArgument, match=match):
        smol.stream("Hi", max_tokens=2, **kw)
    with pytest.raises(InvalidArgument, match=match):
        smol.generate([{"role": "user", "content": "Hi"}], max_tokens=2, **kw)


def test_detokenize_given_text_says_it_takes_ids(smol):
    with pytest.raises(InvalidArgument, match=r"detokenize takes token ids \(a list of ints\), not text: 'hello'; "
                                              r"model.tokenize\(text\) gives the ids"):
        smol.detokenize("hello")  # was: "token id 'h' is not in the vocabulary"


def test_tokenize_takes_utf8_bytes_as_llama_cpp_python_does(smol):
    text = "Grüße, 🌍!"
    assert smol.tokenize(text.encode()) == smol.tokenize(text) == smol.tokenize(bytearray(text.encode()))
    assert smol.tokenize(text.encode(), special=False) == smol.tokenize(text, special=False)
    assert smol.detokenize(smol.tokenize(text, special=False)) == text
    with pytest.raises(InvalidArgument, match="the bytes are not UTF-8"):
        smol.tokenize(b"\xff\xfe")
    with pytest.raises(InvalidArgument, match="is not text"):
        smol.tokenize(42)


@pytest.mark.parametrize("prompt", [[1, 2, 3], (1, 2, 3)])
def test_token_ids_given_as_a_prompt_point_at_stream_tokens(smol, prompt):
    with pytest.raises(InvalidArgument, match=r"token ids.*model\.stream_tokens"):
        smol.stream(prompt, max_tokens=2)
    with pytest.raises(InvalidArgument, match="stream_tokens"):
        smol.generate(prompt, max_tokens=2)


def test_a_message_without_content_is_refused_naming_its_odd_key(smol):
    """A misspelt ``contents`` was read as an empty message and answered; llama-server and OpenAI refuse it."""
    with pytest.raises(InvalidArgument, match=r"messages\[1\] \(user\) has no 'content'.*it has 'contents'"):
        smol.generate([{"role": "system", "content": "Be brief."}, {"role": "user", "contents": "Hi"}], max_tokens=2)
    with pytest.raises(InvalidArgument, match=r"messages\[0\] \(user\) has no 'content'.*\(\"\" for an empty one\)"):
        smol.generate([{"role": "user"}], max_tokens=2)
    calls = [{"type": "function", "id": "c1", "function": {"name": "f", "arguments": {}}}]
    assert smol.generate([{"role": "user", "content": "Hi"}, {"role": "assistant", "tool_calls": calls},
                          {"role": "user", "content": "Go on"}], max_tokens=2).text  # tool calls alone: fine


@pytest.mark.parametrize("prompt", [[], ()])
def test_an_empty_prompt_is_an_error_not_an_index_error(smol, prompt):
    with pytest.raises(InvalidArgument, match="messages is empty"):
        smol.generate(prompt, max_tokens=2)


def test_stream_tokens_takes_sampling_as_stream_does(smol):
    toks = smol.tokenize("The capital of France is", special=False)
    want = smol.generate("The capital of France is", chat_template=False, temp=0, max_tokens=6)
    greedy = ondevice.Sampling(temp=0, max_tokens=6)
    for stream in (smol.stream_tokens(toks, greedy),  # positional, as toolcalls and bench pass it
                   smol.stream_tokens(toks, sampling=greedy),
                   smol.stream_tokens(toks, {"temp": 0, "max_tokens": 6}),
                   smol.stream_tokens(toks, temp=0, max_tokens=6),
                   smol.stream_tokens(toks, ondevice.Sampling(temp=0.9, max_tokens=99), temp=0, max_tokens=6)):
        records = list(stream)
        assert [g.token for g in records if g.token >= 0] == want.tokens
        assert "".join(g.text for g in records) == want.text
    with pytest.raises(InvalidArgument, match="did you mean 'temp'"):
        smol.stream_tokens(toks, temperature=0)


@pytest.mark.parametrize(("tokens", "match"), [
    ([], "must be a non-empty list of token ids"),
    ("Hello", "must be a non-empty list of token ids"),
    ([1, -1], r"token ids \[-1\] are not in the vocabulary \(0 to 49151\)"),
    ([1, 49152], r"token ids \[49152\] are not in the vocabulary"),
    ([1, 2.0], r"token ids \[2\.0\] are not in the vocabulary"),
    ([True], r"token ids \[True\] are not in the vocabulary"),
])
def test_stream_tokens_refuses_ids_llama_cpp_would_abort_on_when_called(smol, tokens, match):
    with pytest.raises(InvalidArgument, match=match):
        smol.stream_tokens(tokens, max_tokens=2)  # not read: the error comes now


def test_a_closed_model_says_so_when_asked_and_names_the_path_to_load_again(smol_path):
    m = ondevice.load(str(smol_path), n_ctx=256, warmup=False)
    toks = m.tokenize("Hi")
    m.detokenize(toks)  # now cached in the engine
    m.close()
    again = re.escape(f"load it again with ondevice.load({str(smol_path)!r})")
    for call in (lambda: m.stream("Hi", max_tokens=2), lambda: m.stream_tokens(toks, max_tokens=2),
                 lambda: m.tokenize("Hi"), lambda: m.detokenize(toks), lambda: m.generate("Hi", max_tokens=2)):
        with pytest.raises(ModelClosed, match=again):  # on the call, not the first read of a stream
            call()


def test_generate_shows_its_arguments_and_passes_them_on(smol):
    params = inspect.signature(ondevice.Model.generate).parameters
    assert {"chat_template", "tools", "sampling"} <= set(params)
    assert params["chat_template"].kind is inspect.Parameter.KEYWORD_ONLY
    raw = smol.generate("Hi", chat_template=False, sampling={"temp": 0, "max_tokens": 4})
    assert raw.text == "".join(g.text for g in smol.stream("Hi", chat_template=False, temp=0, max_tokens=4))
    assert raw.text != smol.generate("Hi", temp=0, max_tokens=4).text  # the template was not used


def test_ondevice_cascade_is_the_class():
    """It was a function returning one: isinstance(c, ondevice.Cascade) raised TypeError, its keywords were **kw."""
    import inspect

    import ondevice
    from ondevice.cascade import Cascade

    assert ondevice.Cascade is Cascade and "policy" in inspect.signature(ondevice.Cascade).parameters
