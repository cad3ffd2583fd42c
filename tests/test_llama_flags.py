"""llama.cpp's common flags in copied llama-cli / llama-server commands: taken (load settings), ignored with a
note (GPU offload, colours, logs), or refused by name; never misread (argparse alone read `-ngl 99` as `-n gl`)."""

from __future__ import annotations

import pytest
from conftest import serve_process

from ondevice.cli import build_parser
from ondevice.engine.llama_flags import load_config
from ondevice.errors import InvalidArgument

ASK = ["-p", "The capital of France is", "-n", "6", "--temp", "0"]


def test_load_settings_reach_the_engine_config():
    args = build_parser("run").parse_args(["run", "-b", "64", "-ub", "32", "-tb", "1", "-ctk", "q8_0", "-ctv", "q4_0",
                                           "--no-mmap", "--mlock", "--no-warmup", "Hi"])
    assert load_config(args) == {"n_batch": 64, "n_ubatch": 32, "n_threads_batch": 1, "type_k": "q8_0",
                                 "type_v": "q4_0", "use_mmap": False, "mlock": True, "warmup": False}
    assert load_config(build_parser("run").parse_args(["run", "Hi"])) == {}
    with pytest.raises(InvalidArgument, match=r"^-tb 0 must be >= 1, or -1 for the default \(as many as --threads\)$"):
        load_config(build_parser("run").parse_args(["run", "-tb", "0", "Hi"]))
    with pytest.raises(InvalidArgument, match=r"^-b -1 must be >= 1$"):
        load_config(build_parser("run").parse_args(["run", "-b", "-1", "Hi"]))
    assert load_config(build_parser("run").parse_args(["run", "-tb", "-1", "Hi"])) == {}  # llama.cpp's default


def test_a_copied_llama_cli_command_runs(cli):
    plain = cli("run", *ASK)
    copied = cli("run", "-ngl", "99", "--mlock", "-co", "-no-cnv", "-dev", "none", "--log-disable", "-b", "64",
                 "-ub", "32", "-tb", "2", "-ctk", "f16", "-ctv", "f16", "--no-mmap", "--no-warmup",
                 "-md", "smollm2", "--draft-n", "4", "--draft-min", "1", "-fit", "on", "--no-context-shift",
                 "--swa-full", "--log-format", "text", "-nr", *ASK)  # a draft model: the same text
    assert plain.returncode == 0 and copied.returncode == 0, copied.stderr
    assert copied.stdout == plain.stdout  # the same greedy text
    for note in ("-ngl 99 is ignored: ondevice runs on the CPU", "-co is ignored", "-no-cnv is ignored: run answers once",
                 "-dev none is ignored", "-fit on is ignored: ondevice runs on the CPU", "--no-context-shift is ignored",
                 "--swa-full is ignored", "--log-format text is ignored"):
        assert f"ondevice run: note: {note}" in copied.stderr, copied.stderr


def test_llama_cli_sampling_flags_reach_the_sampler(cli):
    """llama-cli's --temperature, -l/--logit-bias and --samplers/--sampling-seq were 'unrecognized arguments'."""
    plain, ask = cli("run", *ASK), ASK[:4]  # the prompt and -n, without --temp
    first = cli("run", "-n", "1", "--temp", "0", "-p", "Hi")
    assert plain.returncode == 0 == first.returncode and first.stdout.strip()
    assert cli("run", *ask, "--temperature", "0").stdout == plain.stdout
    # the greedy first token banned: another reply (llama.cpp's TOKEN_ID-inf)
    from ondevice import load

    with load() as m:
        tok = m.tokenize(first.stdout.strip())[0]
    banned = cli("run", "-n", "1", "--temp", "0", "-l", f"{tok}-inf", "-p", "Hi")
    assert banned.returncode == 0 and banned.stdout.strip() != first.stdout.strip(), banned.stderr
    # top-k 1 then temperature, the rest off: greedy whatever the seed and temperature
    for flags in (["--samplers", "top-k;temperature"], ["--sampling-seq", "kt"]):
        got = cli("run", *flags, "--top-k", "1", "--temp", "1.5", "--seed", "7", *ask)
        assert got.returncode == 0 and got.stdout == plain.stdout, (flags, got.stderr)


@pytest.mark.parametrize(("verb", "flags", "said"), [
    ("run", ["--keep", "10"], "--keep is llama.cpp's and does not apply here: the context here is not shifted"),
    ("run", ["--context-shift"], "--context-shift is llama.cpp's and does not apply here: the context here is not"),
    ("run", ["-l", "15043x1"], "-l '15043x1': give a token id, + or -, and the bias, e.g. 15043+1"),
    ("run", ["--samplers", "temperature;top_k"], "--samplers: they apply in llama.cpp's order (penalties, dry"),
    ("run", ["--sampling-seq", "kq"], "--sampling-seq: 'q' is not one of penalties"),
    ("run", ["--in-prefix", "User:"], "--in-prefix is llama.cpp's and does not apply here: the chat template frames"),
    ("run", ["-ctk", "q3_k"], "argument -ctk/--cache-type-k: invalid choice: 'q3_k'"),
    ("chat", ["-no-cnv"], "-no-cnv is llama.cpp's and does not apply here: chat converses; for one answer"),
    ("serve", ["--reranking"], "--reranking is llama.cpp's and does not apply here: there is no /rerank route"),
    ("eval", ["--ppl", "-ot", "x"], "-ot is llama.cpp's and does not apply here: every tensor is on the CPU here"),
    # argparse alone read these as a known one-letter flag and a value (-sp: a system prompt 'p'; -hfd: --help)
    ("run", ["-sp", "hi"], "unrecognized argument -sp: not a flag of `ondevice run`"),
    ("run", ["-hfd", "o/r", "hi"], "unrecognized argument -hfd: not a flag of `ondevice run`"),
    ("chat", ["-rea", "off"], "-rea is llama.cpp's and does not apply here: the reply is given as the model writes"),
    ("run", ["--mmproj", "x.gguf"], "--mmproj is llama.cpp's and does not apply here: ondevice runs text models only"),
    ("run", ["--rope-freq-base", "1e4"], "--rope-freq-base is llama.cpp's and does not apply here: the model file's"),
    ("serve", ["--ssl-cert-file", "c.pem"], "--ssl-cert-file is llama.cpp's and does not apply here: the server"),
    # llama.cpp's --draft N is how many tokens to draft: --draft-max here (--draft/-md names the drafter)
    ("run", ["--draft", "16"], "llama.cpp's --draft N, the most tokens per draft, is --draft-max 16 here"),
    ("serve", ["--draft", "8"], "llama.cpp's --draft N, the most tokens per draft, is --draft-max 8 here"),
    ("run", ["-s", "42", "hi"], "-s 42: a system prompt of a number alone; -s/--system is the system prompt here"),
    ("run", ["-cnv"], "-cnv is llama.cpp's and does not apply here: run answers once; `ondevice chat` converses"),
    ("serve", ["-s", "42"], "-s is llama.cpp's and does not apply here: each request gives its seed"),
    ("serve", ["-n", "64"], "-n is llama.cpp's and does not apply here: each request gives its max_tokens"),
    ("serve", ["--temp", "0.2"], "--temp is llama.cpp's and does not apply here: each request gives its sampling"),
    ("eval", ["--kl-divergence-base", "x"], "give the reference model with --ref MODEL"),
    ("eval", ["-f", "README.md", "--corpus", "pydoc"], "--corpus pydoc and -f README.md both give the text; give one"),
    ("serve", ["-ctk", "q8_0", "-ctv", "f16"], "serve keeps K and V in one type"),
    ("serve", ["-f", "4"], "unrecognized argument -f: not a flag of `ondevice serve`"),  # argparse: -fa 4
    # an error names the flag as it was typed (--lora, not --adapter; -f, not --text)
    ("run", ["--lora", "nope", "hi"], "error: --lora nope: no such adapter file"),
    ("eval", ["-f", "/nonexistent.txt"], "error: -f '/nonexistent.txt' is not a file"),
    ("quantize", ["smollm2", "--type", "q4_0", "--output-tensor-type", "q9", "-o", "/nonexistent/x.gguf"],
     "error: --output-tensor-type q9: not a type llama.cpp quantizes weights to; use one of F32, F16"),
    ("run", ["hf.co/o/r:Q4_1:latest"], "one tag after the repository, not 'Q4_1:latest': hf.co/o/r:Q4_1 (a quant)"),
])
def test_refused_by_name(cli, verb, flags, said):
    got = cli(verb, *flags, *(["-p", "Hi"] if verb == "run" and "hi" not in flags else ["--port", "0"]
                              if verb == "serve" else []), input="", timeout=120)
    assert got.returncode == 2 and said in got.stderr, got.stderr


def test_a_copied_llama_server_command_serves(tmp_path):
    from openai import OpenAI

    flags = ["-ngl", "99", "-cb", "--metrics", "--no-webui", "-b", "256", "-ub", "128", "-tb", "1", "--no-mmap",
             "-a", "mine", "-to", "120", "-ctk", "q8_0", "-ctv", "q8_0", "--jinja", "-md", "smollm2", "--draft-n", "4",
             "--threads-http", "2", "-c", "4096", "--cache-reuse", "256"]
    with serve_process(tmp_path, *flags) as (_, url, log):
        client = OpenAI(base_url=url, api_key="none")
        ids = [m.id for m in client.models.list().data]
        reply = client.completions.create(model="mine", prompt="The capital of France is", max_tokens=4,
                                          temperature=0)
        import httpx

        slot = httpx.get(url.removesuffix("/v1") + "/slots").json()[0]
    assert ids == ["mine"] and slot["speculative"] is True  # -md: the draft model is the server's default
    assert reply.choices[0].text and reply.usage.completion_tokens == 4
    text = log.read_text()
    assert "ondevice serve: note: -ngl 99 is ignored: ondevice runs on the CPU" in text
    assert "ondevice serve: note: -cb is ignored: batching is always continuous" in text
    assert "ondevice serve: note: --cache-reuse 256 is ignored: a prompt's cached prefix is always reused" in text
    # -c 4096 with 4 slots: llama-server would split it, so the memory differs, and it is said
    assert "note: -c 4096 is each slot's context here, so the KV cache holds 4 x 4096 tokens; llama-server splits -c " \
           "over -np (4096 / 4 = 1024 each): -c 1024 gives its memory" in text


def test_a_copied_llama_perplexity_command_runs(cli):
    got = cli("eval", "-ngl", "99", "--ppl", "--chunks", "1", "--no-store")
    assert got.returncode == 0 and "PPL = " in got.stdout, got.stderr
    assert "ondevice eval: note: -ngl 99 is ignored: ondevice runs on the CPU" in got.stderr


def test_llama_perplexity_s_f_measures_that_text(cli, tmp_path):
    text = tmp_path / "wiki.txt"
    from pydoc_data import topics

    text.write_text("".join(list(topics.topics.values())[:20]), encoding="utf-8")
    got = cli("eval", "-m", "smollm2", "-f", str(text), "-c", "128", "--chunks", "2", "--no-store")
    assert got.returncode == 0, got.stderr
    assert "2 chunks x 128 ctx" in got.stdout and "PPL = " in got.stdout  # -f alone is a perplexity asked for


def test_mlock_locks_the_weights_in_ram(smol_path):
    """--mlock (llama.cpp's): the model's pages are locked (VmLck), as llama-cli --mlock; without it, none."""
    import ondevice

    def locked_kb() -> int:
        with open("/proc/self/status") as f:
            return int(next(x for x in f if x.startswith("VmLck:")).split()[1])

    before = locked_kb()
    model = ondevice.load(str(smol_path), mlock=True, n_ctx=128, n_threads=2)
    try:
        assert locked_kb() - before > 0.8 * smol_path.stat().st_size / 1024
    finally:
        model.close()
    assert locked_kb() == before  # unlocked with the model


def test_reverse_prompt_and_color_as_llama_cli(cli):
    raw = ["--raw", "-p", "The capital of France is", "-n", "8", "--temp", "0"]
    plain = cli("run", *raw)
    cut = cli("run", "-r", ".", "--color", "on", *raw)  # -r: llama-cli's stop; --color takes on|off|auto
    assert plain.returncode == 0 and cut.returncode == 0, cut.stderr
    assert "." in plain.stdout and cut.stdout == plain.stdout.split(".")[0] + "\n"
    assert "ondevice run: note: --color on is ignored" in cut.stderr


def test_colour_and_log_flags_as_llama_cli_takes_them_keep_the_prompt(cli):
    """llama-cli's older `--color` took no value and its newer one takes on/off/auto: neither eats the prompt;
    its log and display flags are noted, `--no-show-timings` drops the timings line, `--offline` downloads
    nothing."""
    plain = cli("run", "-n", "6", "--temp", "0", "The capital of France is")
    bare = cli("run", "-n", "6", "--temp", "0", "--color", "The capital of France is")
    worded = cli("run", "-n", "6", "--temp", "0", "-co", "on", "--log-file", "x.log", "-lv", "3", "--perf",
                 "--log-colors", "auto", "--display-prompt", "--no-show-timings", "The capital of France is")
    assert plain.returncode == bare.returncode == worded.returncode == 0, (bare.stderr, worded.stderr)
    assert bare.stdout == worded.stdout == plain.stdout  # the prompt was not taken as the colour
    assert "note: --color is ignored" in bare.stderr and "note: -co on is ignored" in worded.stderr
    for note in ("--log-file x.log", "-lv 3", "--perf", "--log-colors auto", "--display-prompt"):
        assert f"note: {note} is ignored" in worded.stderr, worded.stderr
    assert "tok/s" in plain.stderr and "tok/s" not in worded.stderr  # the timings line
    offline = cli("run", "--offline", "hf.co/someone/repo:Q4_K_M", "Hi")
    assert offline.returncode == 2 and "--offline forbids downloading it" in offline.stderr, offline.stderr
