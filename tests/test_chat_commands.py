"""`ondevice chat`'s Ollama commands beyond /set and /show's first three: /set format json | noformat, /show template
| license, /load MODEL (the real models, the chat read from stdin as a pipe gives it)."""

from __future__ import annotations

import json

from ondevice.models import resolve


def test_format_json_template_license_and_load(cli):
    lines = ["/set format json", 'Reply with a JSON object whose key "ok" is true.', "/show parameters", "/show template", "/show license",
             "/load gemma3-270m", "/show info", "/load no-such-model", "/show info", "/set format yaml", "/set noformat",
             "/show parameters", "/bye"]
    r = cli("chat", "-n", "256", "--temp", "0", input="\n".join(lines) + "\n")
    assert r.returncode == 0, r.stderr
    assert isinstance(json.loads(r.stdout), dict), r.stdout  # the whole answer is one JSON object
    err = r.stderr
    assert "answers are JSON objects" in err and ", format json" in err
    assert resolve("smollm2").info.chat_template in err  # /show template
    assert "\nApache-2.0\n" in err  # /show license: the catalog's word for it, as `ondevice models --license`
    assert "(now gemma3-270m; conversation cleared); gemma3-270m has no chat template (a base model)" in err
    assert err.count("model: gemma3-270m (base model, no chat template)") == 2  # a failed /load keeps it
    assert "ondevice chat: error: unknown model 'no-such-model'" in err and "(gemma3-270m stays)" in err
    assert "/set format takes json" in err and "answers are free text" in err
    assert err.rstrip().endswith("frequency_penalty 0.0, max_tokens 256")  # no format after /set noformat


def test_load_takes_the_new_models_template_and_noformat_keeps_the_command_lines_grammar(cli):
    lines = ["/set format json", "/set noformat", "/show parameters", "Hi", "/load smollm2-135m-instruct",
             "/show template", "/bye"]
    r = cli("chat", "--chat-template", "phi3", "--grammar", 'root ::= "yes"', "-n", "8", "--temp", "0",
            input="\n".join(lines) + "\n")
    assert r.returncode == 0, r.stderr
    assert "answers follow the command line's grammar again" in r.stderr
    assert "grammar (the command line's)" in r.stderr
    assert r.stdout.splitlines()[0] == "yes"  # the command line's grammar, after /set noformat
    # /load: the phi3 template given for the first model is not the new one's: it gets its own, with no warning
    assert resolve("smollm2").info.chat_template in r.stderr.split("(now smollm2-135m-instruct")[1]
