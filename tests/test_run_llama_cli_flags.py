"""`ondevice run` with the flags a llama-cli user types (-sys, -sysf, -n -1, escapes in -p, --grammar, -j),
Ctrl-C as llama-cli handles it, and the hints for an Ollama user's words (real CLI subprocesses, the real
embedded model)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

BASE = ("--temp", "0", "-t", "2", "--timings", "json")


def _rec(stderr: str) -> dict:
    return json.loads(stderr.strip().splitlines()[-1])


def test_sys_and_sysf_are_the_system_prompt_as_in_llama_cli(cli, tmp_path):
    # before, argparse read "-sys X" as "-s ys" and sent X as the prompt's first words
    s = cli("run", *BASE, "-n", "6", "-s", "You are a pirate.", "Hi")
    sys_ = cli("run", *BASE, "-n", "6", "-sys", "You are a pirate.", "Hi")
    (tmp_path / "sys.txt").write_text("You are a pirate.\n")
    sysf = cli("run", *BASE, "-n", "6", "-sysf", str(tmp_path / "sys.txt"), "Hi")
    assert s.returncode == sys_.returncode == sysf.returncode == 0, s.stderr + sys_.stderr + sysf.stderr
    assert sys_.stdout == s.stdout == sysf.stdout
    assert _rec(sys_.stderr)["prompt_tokens"] == _rec(s.stderr)["prompt_tokens"] == _rec(sysf.stderr)["prompt_tokens"]
    r = cli("run", "-sysf", str(tmp_path / "none.txt"), "Hi")
    assert r.returncode == 2 and "check the path given to -sysf/--system-prompt-file" in r.stderr


def test_n_minus_one_generates_until_the_context_ends(cli):
    r = cli("run", *BASE, "--raw", "--ignore-eos", "-n", "-1", "-c", "48", "1, 2, 3,")
    assert r.returncode == 0, r.stderr
    assert "stopped at the end of the 48-token context window" in r.stderr
    rec = _rec(r.stderr)
    assert rec["finish_reason"] == "length" and rec["prompt_tokens"] + rec["generation_tokens"] >= 47
    r = cli("run", *BASE, "--raw", "--ignore-eos", "-n", "-2", "-c", "48", "1, 2, 3,")  # llama.cpp's "until full"
    assert r.returncode == 0 and "stopped at the end of the 48-token context window" in r.stderr, r.stderr
    r = cli("run", "-n", "-5", "Hi")
    assert r.returncode == 2 and "must be >= 0, or -1 (or None): until the text or the context ends" in r.stderr


def test_escapes_in_p_are_processed_unless_no_escape(cli):
    typed = cli("run", *BASE, "--raw", "-n", "1", "-p", r"Line1\nLine2")
    real = cli("run", *BASE, "--raw", "-n", "1", "-p", "Line1\nLine2")
    kept = cli("run", *BASE, "--raw", "-n", "1", "--no-escape", "-p", r"Line1\nLine2")
    assert typed.returncode == real.returncode == kept.returncode == 0, typed.stderr + kept.stderr
    assert _rec(typed.stderr)["prompt_tokens"] == _rec(real.stderr)["prompt_tokens"]
    assert _rec(kept.stderr)["prompt_tokens"] != _rec(real.stderr)["prompt_tokens"]  # a backslash and an 'n'


def test_unescape_is_llama_cpps():
    from ondevice.engine.args import unescape

    assert unescape(r"a\nb\tc\rd\\e\'f\"g\x41h\qi\x4") == "a\nb\tc\rd\\e'f\"gAh\\qi\\x4"


def test_grammar_and_json_schema_constrain_the_reply(cli, tmp_path):
    r = cli("run", *BASE, "-n", "8", "--grammar", 'root ::= "yes" | "no"', "Is the sky blue?")
    assert r.returncode == 0 and r.stdout.strip() in ("yes", "no"), r.stdout + r.stderr
    (tmp_path / "g.gbnf").write_text('root ::= "maybe"\n')
    r = cli("run", *BASE, "-n", "8", "--grammar-file", str(tmp_path / "g.gbnf"), "Is the sky blue?")
    assert r.returncode == 0 and r.stdout.strip() == "maybe", r.stdout + r.stderr
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12}}, "required": ["name"]}
    r = cli("run", *BASE, "-n", "40", "-j", json.dumps(schema), "Give me a name as JSON")
    assert r.returncode == 0, r.stderr
    assert isinstance(json.loads(r.stdout)["name"], str)
    (tmp_path / "s.json").write_text(json.dumps(schema))
    r2 = cli("run", *BASE, "-n", "40", "-jf", str(tmp_path / "s.json"), "Give me a name as JSON")
    assert r2.returncode == 0 and r2.stdout == r.stdout, r2.stderr
    for flags, why in ((("-j", "{bad"), "-j: not JSON"),
                       (("-j", "[1]"), "-j: a JSON schema is an object, not list"),
                       (("--grammar", "root ::= foo"), "the grammar does not parse (GBNF): Undefined rule"),
                       (("--grammar", " "), "the grammar is empty"),
                       (("--grammar", "x", "-j", "{}"), "not allowed with argument")):
        r = cli("run", "-n", "2", *flags, "Hi")
        assert r.returncode == 2 and why in r.stderr, (flags, r.stderr)


def test_ctrl_c_keeps_the_reply_the_timings_and_the_prompt_cache(tmp_path):
    env = dict(os.environ, ONDEVICE_HOME=str(tmp_path / "home"))
    cache = tmp_path / "pc.bin"
    with open(tmp_path / "out", "w") as out, open(tmp_path / "err", "w") as err:
        p = subprocess.Popen([sys.executable, "-m", "ondevice.cli", "run", "-t", "2", "-n", "100000", "-c", "4096",
                              "--ignore-eos", "--prompt-cache", str(cache), "Write a long story about a cat."],
                             stdout=out, stderr=err, env=env,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # noqa: PLW1509
        deadline = time.monotonic() + 120
        while os.path.getsize(tmp_path / "out") < 40 and time.monotonic() < deadline:  # the reply has started
            time.sleep(0.1)
        p.send_signal(signal.SIGINT)
        assert p.wait(timeout=60) == 130
    text, log = (tmp_path / "out").read_text(), (tmp_path / "err").read_text()
    assert len(text) >= 40 and text.endswith("\n"), repr(text[-40:])
    assert "(interrupted)" in log and "TTFT" in log and "Traceback" not in log, log
    assert cache.stat().st_size > 0  # the prompt's KV, as llama-cli saves its session file


def test_an_ollama_users_words_get_hints(cli):
    r = cli("ls")
    assert r.returncode == 2 and "unknown verb 'ls'; did you mean 'models'?" in r.stderr
    r = cli("run", "-n", "2", "-t", "2", "--timings", "none", "llama3.2")
    assert r.returncode == 0 and "'llama3.2' is not a model here" in r.stderr, r.stderr
    r = cli("run", "-m", "hf://owner/repo/file.gguf", "Hi", env={"HF_ENDPOINT": "http://127.0.0.1:9"})
    assert r.returncode == 2, r.stderr  # an address is pulled first (as ollama run does); with no hub it says so
    assert "ondevice: hf://owner/repo/file.gguf is not in the store yet: pulling it" in r.stderr
    assert "download of hf://owner/repo/file.gguf failed" in r.stderr and "check the URL and the network" in r.stderr


def test_chat_set_max_tokens_minus_one(cli):
    r = cli("chat", "-t", "2", "--temp", "0", "-n", "4", input="/set max_tokens -1\n/show\n")
    assert r.returncode == 0, r.stderr
    assert "max_tokens = -1" in r.stdout + r.stderr and "max_tokens -1" in r.stdout + r.stderr


def test_fa_is_llama_clis_flash_attention_switch(cli):
    """``-fa on|off|auto`` (1/0 too) reaches the engine of run/chat and serve; on this CPU off decodes faster at
    depth, so a user must be able to choose (llama-cli's and llama-server's flag)."""
    from ondevice.cli import build_parser
    from ondevice.engine.args import load_from
    from ondevice.serve import ServeSettings

    for word, want in (("off", False), ("1", True), ("auto", None)):
        args = build_parser("run").parse_args(["run", "-fa", word, "-c", "64", "-t", "1", "Hi"])
        m = load_from(args)
        try:
            assert m.engine.config.flash_attn is want, word
        finally:
            m.close()
    assert ServeSettings(flash_attn="0").flash_attn == "off" and ServeSettings(flash_attn=-1).flash_attn == "auto"
    r = cli("run", "-fa", "sometimes", "Hi")
    assert r.returncode == 2 and "-fa/--flash-attn: invalid value 'sometimes': give on, off or auto" in r.stderr
    r = cli("run", "-n", "4", "-fa", "Hi")  # a bare -fa takes the prompt: said as typed, and that it needs a value
    assert r.returncode == 2 and "invalid value 'Hi': give on, off or auto (or 1, 0, -1) after the flag; it takes " \
        "a value" in r.stderr, r.stderr
    r = cli("serve", "-fa", "off", "--kv-type", "q8_0", "--port", "0")  # llama.cpp needs it for a quantized V cache
    assert r.returncode != 0 and "needs flash attention in llama.cpp" in r.stderr, r.stderr[-500:]


def test_every_kv_cache_type_llama_cli_takes_runs_here_too(cli):
    """`run -ctk q5_1` (and bf16, q4_1, q5_0, iq4_nl) was refused by run, chat and serve though llama-cli takes
    them and `ondevice bench -ctk` measured them: a copied llama-cli command failed."""
    from ondevice.cli import build_parser
    from ondevice.engine.args import load_from
    from ondevice.serve import ServeSettings

    for kv in ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1"):  # llama-cli's list
        args = build_parser("run").parse_args(["run", "-ctk", kv, "-ctv", kv, "-c", "64", "-t", "1", "Hi"])
        m = load_from(args)
        try:
            assert (m.engine.config.type_k, m.engine.config.type_v) == (kv, kv)
            assert m.generate("Hi", max_tokens=2, temp=0).text is not None
        finally:
            m.close()
        assert ServeSettings(kv_type=kv).kv_type == kv
    r = cli("run", "-ctk", "q3_k", "Hi")
    assert r.returncode == 2 and "invalid choice: 'q3_k'" in r.stderr, r.stderr


def test_eval_takes_llama_perplexitys_lora_spellings():
    """llama-perplexity's --lora FILE and --lora-scaled FILE SCALE reach eval's adapter (only --adapter did)."""
    from ondevice.cli import build_parser

    p = build_parser("eval")
    assert p.parse_args(["eval", "--lora", "a.gguf"]).adapter == "a.gguf"
    assert p.parse_args(["eval", "--lora-scaled", "a.gguf", "0.5"]).adapter == "a.gguf:0.5"
    assert p.parse_args(["eval", "--adapter", "a.gguf:2"]).adapter == "a.gguf:2"
    with pytest.raises(SystemExit):
        p.parse_args(["eval", "--lora-scaled", "a.gguf", "half"])
