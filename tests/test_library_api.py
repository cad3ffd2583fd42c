"""The Python API as a program embedding it uses it: a closed model, two threads on one model, one-shot calls
that free what they load, and wrong arguments that are errors naming the field, not TypeErrors from inside."""

from __future__ import annotations

import gc
import re
import threading
import time

import pytest

import ondevice
from ondevice.errors import InvalidArgument, ModelClosed, StreamAbandoned


def _rss_mib() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 >> 20


def test_a_closed_model_is_an_error_not_a_crash(smol_path):
    m = ondevice.load(str(smol_path), n_ctx=256, warmup=False)
    it = m.stream("Count to ten.", temp=0, max_tokens=20)
    next(it)
    m.close()  # under its own open stream
    with pytest.raises(ModelClosed):
        next(it)
    m.close()  # twice is fine
    for call in (lambda: m.generate("hi", max_tokens=2), lambda: m.tokenize("hi"), m.reset,
                 lambda: m.engine.tokenize("hi"), lambda: m.engine.decode(1)):
        with pytest.raises(ModelClosed, match="closed"):
            call()
    again = f"was closed; load it again with ondevice.load('{smol_path}')"  # every door says it the same way
    for call in (lambda: m.render("hi"), lambda: m.tokenize_prompt("hi"), lambda: m.generator, m.__enter__):
        with pytest.raises(ModelClosed, match=re.escape(again)):
            call()
    assert m.closed


def test_a_model_is_made_by_load_and_says_so_when_constructed_directly(tmp_path):
    with pytest.raises(InvalidArgument, match=r"Model\(engine=None\) is not a loaded engine; a Model is made by "
                                              r"ondevice.load\(name or path\)"):
        ondevice.Model(name="x", path=tmp_path / "x.gguf", engine=None, template=None)


def test_with_block_frees_the_model_and_dropping_it_frees_it_without_gc(smol_path):
    with ondevice.load(str(smol_path), n_ctx=256, warmup=False) as m:
        assert m.generate("Hi", temp=0, max_tokens=2).text
    assert m.closed
    gc.collect()
    gc.disable()
    try:
        base = _rss_mib()
        for _ in range(3):  # a model whose last reference goes is freed at once (no reference cycle)
            m = ondevice.load(str(smol_path), n_ctx=256, warmup=False)
            m.generate("Hi", max_tokens=2)
            del m
        grew = _rss_mib() - base
    finally:
        gc.enable()
    assert grew < 60, f"RSS grew {grew} MiB over three loads of a 98 MB model"


def test_one_shot_calls_free_their_model_and_take_load_options(smol_path, monkeypatch):
    closed = []
    real_close = ondevice.Model.close
    monkeypatch.setattr(ondevice.Model, "close", lambda self: (closed.append(self.name), real_close(self)))
    r = ondevice.generate("Hi", str(smol_path), n_ctx=128, n_threads=1, temp=0, max_tokens=3)
    assert r.text and len(closed) == 1
    it = ondevice.stream("Hi", str(smol_path), n_ctx=128, temp=0, max_tokens=20)
    next(it)
    it.close()  # abandoned: the model goes with it
    assert len(closed) == 2
    with pytest.raises(InvalidArgument, match="'temperature' \\(did you mean 'temp'\\?\\)"):
        ondevice.generate("Hi", str(smol_path), temperature=0)


def test_two_threads_on_one_model_take_turns_and_get_their_own_answers(smol_path):
    prompts = ["Count from 1 to 20.", "Name some colours."]
    with ondevice.load(str(smol_path), n_ctx=512, n_threads=1, warmup=False) as m:
        want = {p: m.generate(p, temp=0, max_tokens=10).text for p in prompts}
    for _ in range(4):  # fresh models: the first call also builds the special-token table
        with ondevice.load(str(smol_path), n_ctx=512, n_threads=1, warmup=False) as m:
            bar, got, errors = threading.Barrier(2), {}, []

            def work(p, m=m, bar=bar, got=got, errors=errors):
                bar.wait()
                try:
                    got[p] = m.generate(p, temp=0, max_tokens=10).text
                except Exception as e:  # noqa: BLE001 — collected for the assertion
                    errors.append(e)

            threads = [threading.Thread(target=work, args=(p,)) for p in prompts]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert not errors and got == want


def test_a_stream_left_unread_is_ended_for_the_call_that_waits_on_it(smol):
    want = smol.generate("Hi", temp=0, max_tokens=4).text
    smol.idle_timeout = 0.3
    try:
        it = smol.stream("Count to ten.", temp=0, max_tokens=20)
        next(it)  # then forgotten (a REPL, a client that left): the next call waits 0.3 s, then takes over
        t0 = time.monotonic()
        assert smol.generate("Hi", temp=0, max_tokens=4).text == want
        assert time.monotonic() - t0 >= 0.3
        with pytest.raises(StreamAbandoned, match="was not read for 0.3 s"):
            next(it)
    finally:
        smol.idle_timeout = 10.0


def test_a_call_waits_for_a_stream_that_is_being_read(smol):
    want = smol.generate("Name some colours.", temp=0, max_tokens=6).text
    smol.idle_timeout = 5.0
    got, texts = {}, []
    try:
        it = smol.stream("Count to ten.", temp=0, max_tokens=12)
        texts.append(next(it).text)
        waiter = threading.Thread(target=lambda: got.update(t=smol.generate("Name some colours.", temp=0,
                                                                             max_tokens=6).text))
        waiter.start()
        for g in it:  # a slow reader, well within idle_timeout: it keeps its turn to the end
            time.sleep(0.05)
            texts.append(g.text)
        waiter.join(60)
        assert got["t"] == want and "".join(texts) == smol.generate("Count to ten.", temp=0, max_tokens=12).text
    finally:
        smol.idle_timeout = 10.0


def test_close_ends_an_open_stream_quietly(smol_path):
    import subprocess
    import sys

    code = ("import ondevice\n"
            f"with ondevice.load({str(smol_path)!r}, n_ctx=256, warmup=False) as m:\n"
            "    it = m.stream('Count to ten.', temp=0, max_tokens=20)\n"
            "    next(it)\n"
            "try:\n"
            "    next(it)\n"
            "except ondevice.OndeviceError as e:\n"
            "    print(type(e).__name__)\n"
            "del it\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 0 and r.stdout.strip() == "ModelClosed", r.stdout + r.stderr
    assert "Exception ignored" not in r.stderr, r.stderr


def test_close_from_another_thread_ends_a_running_generation_at_its_next_token(smol_path):
    """close() waited for the whole generation (400 tokens, ~10 s here), though its docstring says a generation
    in another thread ends its step first: the generating thread won the lock back at every token."""
    m = ondevice.load(str(smol_path), n_ctx=2048, n_threads=2, warmup=False)
    said: list = []
    steps: list[str] = []  # llama_decode calls: the prompt's, then one a token
    for name in ("decode", "decode_batch"):
        real = getattr(m.engine, name)
        setattr(m.engine, name, lambda *a, _real=real, _name=name: (steps.append(_name), _real(*a))[1])

    def generate() -> None:
        try:
            said.append(m.generate("Tell me a long story.", max_tokens=1500, temp=0, ignore_eos=True))
        except ModelClosed as e:
            said.append(e)

    t = threading.Thread(target=generate)
    t.start()
    deadline = time.monotonic() + 120
    while len(steps) < 4 and time.monotonic() < deadline:  # a few tokens in: far from 1500
        time.sleep(0.01)
    m.close()
    t.join(120)
    assert m.closed and len(said) == 1 and isinstance(said[0], ModelClosed), said
    assert 4 <= len(steps) < 1000, len(steps)  # it stopped a token after close(), far from its 1500


@pytest.mark.parametrize(("kw", "match"), [
    ({"temp": "0"}, "temp='0' must be a number"),
    ({"max_tokens": 2.5}, "max_tokens=2.5 must be an integer"),
    ({"max_tokens": -3}, r"max_tokens=-3 must be >= 0, or -1 \(or None\): until the text or the context ends"),
    ({"temp": -1}, "temp=-1 must be a finite number >= 0"),
    ({"logit_bias": [1, 2]}, "logit_bias=.* is not token ids with biases"),
    ({"max_new_tokens": 3}, "did you mean 'max_tokens'"),
    ({"sampling": 0.5}, "sampling=0.5 is a float"),
])
def test_wrong_sampling_arguments_name_the_field(smol, kw, match):
    with pytest.raises(InvalidArgument, match=match):
        smol.generate("Hi", **kw)


def test_sampling_takes_the_shapes_other_libraries_use(smol):
    plain = smol.generate("Hi", temp=0, max_tokens=4).text
    assert smol.generate("Hi", sampling={"temp": 0, "max_tokens": 4}).text == plain
    assert smol.generate("Hi", temp=0, max_tokens=4, stop=None).text == plain
    assert smol.generate("Hi", temp=0, max_tokens=4, seed=None).text == plain  # OpenAI's "no seed"
    assert ondevice.Sampling(seed=-1).seed == ondevice.Sampling().seed == 0xFFFFFFFF  # llama.cpp's -1: random
    with pytest.raises(InvalidArgument, match=r"seed=-2 must be in \[0, 2\*\*32-1\], or -1 for a random one"):
        smol.generate("Hi", seed=-2)
    first = smol.tokenize(plain, special=False)[0]
    banned = smol.generate("Hi", temp=0, max_tokens=4, logit_bias={str(first): -100}).text  # OpenAI's shape
    assert not banned.startswith(plain)


@pytest.mark.parametrize(("kw", "match"), [
    ({"model": "x"}, "no argument 'model' \\(did you mean 'name'\\?\\)"),
    ({"n_ctx": "512"}, "n_ctx='512' must be an integer"),
    ({"ctx_size": 512}, "did you mean 'n_ctx'"),
])
def test_wrong_load_arguments_name_the_field(kw, match):
    with pytest.raises(InvalidArgument, match=match):
        ondevice.load(**kw)


@pytest.mark.parametrize(("call", "match"), [
    (lambda: ondevice.Sampling(temperature=0.2), r"^Sampling has no argument 'temperature' \(did you mean 'temp'\?\)"),
    (lambda: ondevice.quantize("smollm2", "Q8_0", outptu="x.gguf"),
     r"^ondevice.quantize\(\) has no argument 'outptu' \(did you mean 'output'\?\); it takes allow_requantize, "),
    (lambda: ondevice.fit("smollm2", validat=1), r"^ondevice.fit\(\) has no argument 'validat' \(did you mean "
                                                 r"'validate'\?\)"),
    (lambda: ondevice.adapt("x.jsonl", epochz=1), r"^ondevice.adapt\(\) has no argument 'epochz' \(did you mean "
                                                  r"'epochs'\?\); it takes .*\bforce\b"),
    (lambda: ondevice.Cascade(None, "http://127.0.0.1:9/v1", polcy=None), r"^Cascade has no argument 'polcy' "
                                                                          r"\(did you mean 'policy'\?\)"),
])
def test_a_misspelt_keyword_names_the_one_meant_in_every_public_call(call, match):
    """Each checks its keywords before any work (no model is loaded, no file read): the error is an
    InvalidArgument, and a TypeError as Python's own for an unexpected keyword."""
    with pytest.raises(InvalidArgument, match=match) as e:
        call()
    assert isinstance(e.value, TypeError)


def test_the_checked_calls_keep_their_signatures_and_positional_use():
    import inspect

    assert "output" in inspect.signature(ondevice.quantize).parameters
    assert "policy" in inspect.signature(ondevice.Cascade).parameters
    assert ondevice.Sampling(0.3).temp == 0.3 and ondevice.Sampling(temp=0.1, top_k=5).top_k == 5
    with pytest.raises(InvalidArgument, match=r"models=123 is not a name or a path; give a catalog name"):
        ondevice.bench(123, store=False)


def test_library_functions_stay_callable_after_their_package_is_imported(tmp_path):
    import ondevice.adapt.data  # rebinds ondevice.adapt to the package
    import ondevice.bench
    import ondevice.fit

    for _ in range(2):
        with pytest.raises(InvalidArgument, match="no such data file"):
            ondevice.adapt(str(tmp_path / "missing.jsonl"))
    assert callable(ondevice.bench) and callable(ondevice.fit)
    assert {"load", "Model", "Sampling"} <= set(dir(ondevice))  # help(ondevice) shows the lazy names


def test_a_grammar_that_does_not_parse_says_why_without_llama_cpp_noise(smol, capfd):
    with pytest.raises(InvalidArgument, match="does not parse \\(GBNF\\): Undefined rule identifier 'foo'"):
        smol.generate("Hi", grammar="root ::= foo", max_tokens=2)
    assert "error parsing grammar" not in capfd.readouterr().err
    assert smol.generate("Hi", grammar='root ::= "yes" | "no"', temp=0, max_tokens=4).text in ("yes", "no")


def test_a_reply_cut_inside_a_character_drops_its_bytes_as_llama_server_does(smol):
    for n in (1, 2, 4, 5):  # the globe emoji is three tokens here
        r = smol.generate("🌍🌍🌍🌍🌍🌍🌍🌍", chat_template=False, temp=0, max_tokens=n)
        assert "\ufffd" not in r.text and r.text == "🌍" * (n // 3) and len(r.tokens) == n


def test_token_ids_outside_the_vocabulary_and_thread_counts_out_of_range_are_errors(smol, smol_path):
    for bad in ([-1], [10**9], ["a"]):  # llama.cpp aborts the process on these
        with pytest.raises(InvalidArgument, match="not in the vocabulary"):
            smol.detokenize(bad)
    with pytest.raises(InvalidArgument, match="--threads / n_threads=100000 must be 1 to"):
        ondevice.load(str(smol_path), n_threads=100_000)  # llama.cpp would start them all (or bad_alloc)


def test_messages_take_openai_text_parts_and_name_content_that_is_not_text(smol):
    plain = smol.generate([{"role": "user", "content": "Say\nhi"}], temp=0, max_tokens=4).text
    parts = [{"type": "text", "text": "Say"}, {"type": "text", "text": "hi"}]  # joined by a newline
    assert smol.generate([{"role": "user", "content": parts}], temp=0, max_tokens=4).text == plain
    with pytest.raises(InvalidArgument, match="content is 5; give a string"):
        smol.generate([{"role": "user", "content": 5}], max_tokens=2)
    with pytest.raises(InvalidArgument, match="'image_url' part; text parts only"):
        smol.generate([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}])
    with pytest.raises(InvalidArgument, match="stop=\\(1,\\) must be strings"):
        smol.generate("Hi", stop=[1])


def test_a_context_whose_kv_cache_cannot_fit_is_refused_before_it_is_allocated(smol_path, monkeypatch):
    from ondevice.eval import window

    monkeypatch.setattr(window, "available_memory_bytes", lambda: 64 << 20)  # a small device: 64 MiB free
    with pytest.raises(InvalidArgument, match="needs 180.0 MiB for the KV cache and this machine has 64.0 MiB "):
        ondevice.load(str(smol_path), n_ctx=8192)
    monkeypatch.undo()
    with pytest.warns(UserWarning, match="more than the 8192 tokens"):
        ondevice.load(str(smol_path), n_ctx=8448, warmup=False).close()  # past its trained context: warned
