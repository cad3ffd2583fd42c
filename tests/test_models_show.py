"""``ondevice models NAME --template | --license | -v``: what ``ollama show --template / --license / -v`` print."""

from __future__ import annotations

from ondevice.models import resolve


def test_template_license_and_metadata(cli):
    own = resolve("smollm2").info.chat_template
    r = cli("models", "smollm2", "--template")
    assert r.returncode == 0 and r.stdout == own + "\n", r.stderr
    r = cli("models", "gemma3-270m", "--template")  # a base model: nothing on stdout, why on stderr
    assert r.returncode == 0 and r.stdout == "" and "gemma3-270m has no chat template (a base model)" in r.stderr
    r = cli("models", "smollm2", "gemma3", "--license")
    assert r.returncode == 0 and r.stdout == "# smollm2-135m-instruct\nApache-2.0\n# gemma3-270m\nGemma Terms of Use\n"
    r = cli("models", "smollm2", "-v")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("NAME") and "smollm2-135m-instruct metadata:" in lines
    assert any(x.split() == ["llama.embedding_length", "576"] for x in lines)
    assert any(x.split()[:2] == ["tokenizer.ggml.tokens", "[49152"] for x in lines)  # a long array: its length
    assert any(x.split()[:2] == ["general.languages", "['en']"] for x in lines)  # a short one: its items
    assert "(368 characters: `ondevice models smollm2-135m-instruct --template`)" in r.stdout
    r = cli("models", "--template")
    assert r.returncode == 2 and "--template describes the models named: ondevice models NAME --template" in r.stderr
    r = cli("models", "smollm2", "--template", "--license")
    assert r.returncode == 2 and "not allowed with argument" in r.stderr


def test_json_asks_for_json_with_template_license_and_metadata(cli):
    """--json with --template / --license / -v prints JSON (it had printed the text)."""
    import json

    r = cli("models", "smollm2", "gemma3", "--template", "--json")
    assert r.returncode == 0 and json.loads(r.stdout) == [
        {"name": "smollm2-135m-instruct", "template": resolve("smollm2").info.chat_template},
        {"name": "gemma3-270m", "template": None}], r.stderr
    r = cli("models", "smollm2", "--license", "--json")
    assert json.loads(r.stdout) == [{"name": "smollm2-135m-instruct", "licence": "Apache-2.0"}]
    (row,) = json.loads(cli("models", "smollm2", "-v", "--json").stdout)
    assert row["metadata"]["llama.embedding_length"] == "576" and row["licence"] == "Apache-2.0"
    assert row["metadata"]["tokenizer.ggml.tokens"] == "[49152 items]"
