"""llama.cpp's ``--chat-template NAME|JINJA`` and ``--chat-template-file FILE`` (run, chat, serve) and
``load(chat_template=...)``: the template given replaces the model file's, a base model gets a real chat format,
and mistakes are said before the model loads. Real models, a real server on loopback, the openai client."""

from __future__ import annotations

import json
import urllib.request
import warnings

import pytest
from conftest import serve_process

import ondevice
from ondevice.engine.chat import render
from ondevice.engine.chat_templates import BUILTIN, template_from
from ondevice.errors import InvalidArgument

MSGS = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]


def test_builtin_names_render_their_families_format():
    two = [*MSGS, {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}]
    got = {n: render(template_from(n), two, bos_token="<s>") for n in BUILTIN}
    assert got["chatml"] == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>"
                             "assistant\nHello.<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n")
    assert got["llama3"] == ("<s><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|><|start_header_id|>"
                             "user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
                             "Hello.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nBye<|eot_id|>"
                             "<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert got["gemma"] == ("<s><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello."
                            "<end_of_turn>\n<start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n")
    assert got["phi3"] == ("<|system|>\nBe brief.<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>\nHello.<|end|>\n"
                           "<|user|>\nBye<|end|>\n<|assistant|>\n")
    assert template_from(" ChatML ") == template_from("chatml")


def test_mistakes_are_said(tmp_path):
    with pytest.raises(InvalidArgument, match=r"^--chat-template foo: not a template name \(chatml, llama3, gemma, "
                                              r"phi3\) nor Jinja text"):
        template_from("foo")
    (tmp_path / "bad.jinja").write_text("{{ broken")
    with pytest.raises(InvalidArgument, match=r"^--chat-template-file .*bad.jinja: it does not render a plain "
                                              r"conversation: .*unexpected end of template"):
        template_from(file=tmp_path / "bad.jinja")
    with pytest.raises(InvalidArgument, match=r"^--chat-template-file .*nope.jinja: No such file or directory"):
        template_from(file=tmp_path / "nope.jinja")
    with pytest.raises(InvalidArgument, match=r"^--chat-template: it renders a conversation without the messages' "
                                              r"text"):
        template_from("{% for m in messages %}x{% endfor %}")
    with pytest.raises(InvalidArgument, match="give one"):
        template_from("chatml", tmp_path / "bad.jinja")
    (tmp_path / "latin1.jinja").write_bytes("{{ 'caf\xe9' }}".encode("latin-1"))
    with pytest.raises(InvalidArgument, match="not UTF-8 text"):
        template_from(file=tmp_path / "latin1.jinja")


def test_load_with_a_template_renders_with_it(smol_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # chatml is SmolLM2's family: no warning
        model = ondevice.load(str(smol_path), chat_template="chatml", n_ctx=256, n_threads=2)
    try:
        text, _ = model.render(MSGS)
        assert text == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        own = ondevice.load(str(smol_path), n_ctx=256, n_threads=2)
        try:  # the file's own template adds SmolLM2's default system turn to a chat without one: not this one
            assert own.render([MSGS[1]])[0] != model.render([MSGS[1]])[0]
        finally:
            own.close()
        out = model.generate(MSGS, max_tokens=16, temp=0)
        assert out.text and out.finish_reason in ("stop", "length")
    finally:
        model.close()


def test_a_template_of_another_family_warns(smol_path):
    with pytest.warns(UserWarning, match=r"the llama3 chat template's markers <\|start_header_id\|>, "
                                         r"<\|end_header_id\|>, <\|eot_id\|> are not special tokens of "):
        ondevice.load(str(smol_path), chat_template="llama3", n_ctx=128, n_threads=2).close()
    with pytest.raises(InvalidArgument, match="not a template name"):
        ondevice.load(str(smol_path), chat_template="llama-3")


def test_a_base_model_gets_a_chat_format():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no base-model warning (it has a template now), no marker warning
        model = ondevice.load("gemma3-270m", chat_template="gemma", n_ctx=256, n_threads=2)
    try:
        assert model.is_chat
        assert model.render([MSGS[1]])[0] == "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"
        toks = model.tokenize_prompt([MSGS[1]])
        turn = model.engine.control_tokens()["<start_of_turn>"]
        assert toks[:2] == [model.engine.bos_token, turn] and toks.count(turn) == 2  # markers are special tokens
        out = model.generate([MSGS[1]], max_tokens=24, temp=0)
        assert "<start_of_turn>" not in out.text and "<end_of_turn>" not in out.text
    finally:
        model.close()


def test_verbose_prompt_shows_the_base_models_turns_as_special_tokens(cli):
    got = cli("run", "gemma3-270m", "--chat-template", "gemma", "-p", "Hi", "-n", "2", "--temp", "0", "--verbose-prompt")
    assert got.returncode == 0, got.stderr
    assert "prompt: '<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n'" in got.stderr, got.stderr
    assert "number of tokens in prompt = 10\n     2 -> '<bos>'\n   105 -> '<start_of_turn>'\n" in got.stderr
    assert "warning" not in got.stderr  # gemma's markers are special tokens of Gemma 3, its turn end ends it


def test_run_and_chat_flags(cli, tmp_path):
    f = tmp_path / "t.jinja"
    f.write_text(BUILTIN["chatml"][0])
    got = cli("run", "--chat-template-file", str(f), "--jinja", "-p", "Hi", "-n", "4", "--temp", "0")
    assert got.returncode == 0 and got.stdout.strip(), got.stderr
    got = cli("chat", "--chat-template", "llama3", "-n", "2", input="Hi\n")
    assert got.returncode == 0 and "ondevice chat: warning: the llama3 chat template's markers" in got.stderr
    got = cli("run", "--chat-template", "nope", "-p", "Hi")
    assert got.returncode == 2 and "ondevice run: error: --chat-template nope: not a template name" in got.stderr


def test_serve_renders_with_the_given_template(tmp_path):
    f = tmp_path / "t.jinja"
    f.write_text("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}[assistant] ")
    with serve_process(tmp_path, "--chat-template-file", str(f), "--jinja") as (_, url, _log):
        base = url.removesuffix("/v1")
        req = urllib.request.Request(f"{base}/apply-template", data=json.dumps({"messages": MSGS}).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
        with urllib.request.urlopen(req, timeout=30) as r:
            prompt = json.load(r)["prompt"]
        from openai import OpenAI

        reply = OpenAI(base_url=url, api_key="none").chat.completions.create(
            model="any", messages=MSGS, max_tokens=4, temperature=0)
    assert prompt == "[system] Be brief.\n[user] Hi\n[assistant] "
    assert reply.choices[0].message.content is not None and reply.usage.prompt_tokens > 0
