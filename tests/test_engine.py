"""The engine and Model on the real embedded SmolLM2 (llama.cpp backend)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from ondevice import Sampling
from ondevice.errors import ContextOverflow, InvalidArgument

GREEDY = dict(temp=0, max_tokens=24)


def test_greedy_is_deterministic_across_runs(smol):
    # both runs start from an empty cache: a prompt prefilled after a reused prefix is computed in other batch
    # shapes than a whole prefill, and llama.cpp's kernels are not bit-identical across shapes (near-ties flip)
    smol.reset()
    a = smol.generate("List three fruits.", **GREEDY)
    smol.reset()
    b = smol.generate("List three fruits.", **GREEDY)
    assert a.tokens == b.tokens and a.text == b.text
    assert len(a.tokens) > 0 and a.text.strip()


def test_stream_records_are_consistent(smol):
    smol.reset()
    recs = list(smol.stream("Count from one to ten in words.", temp=0, max_tokens=16))
    tokens = [g for g in recs if g.token >= 0]
    assert [g.index for g in tokens] == list(range(len(tokens)))
    assert [g.generation_tokens for g in tokens] == list(range(1, len(tokens) + 1))
    times = [g.t for g in recs]
    assert times == sorted(times)
    assert all(g.ttft == recs[0].ttft and g.ttft <= g.t for g in recs)
    assert all(g.finish_reason is None for g in recs[:-1])
    assert recs[-1].finish_reason in ("stop", "length")
    if recs[-1].finish_reason == "length":
        assert len(tokens) == 16
    assert all(g.prompt_tokens == recs[0].prompt_tokens > 5 for g in recs)
    assert recs[-1].prompt_tps > 0 and recs[-1].generation_tps > 0
    # the record's text is exactly the detokenized stream
    assert "".join(g.text for g in recs) == smol.engine.detokenize([g.token for g in tokens])


def test_chat_template_rendering_matches_chatml(smol):
    text, add_special = smol.render([{"role": "system", "content": "Be brief."},
                                     {"role": "user", "content": "Hi"}])
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                    "<|im_start|>assistant\n")
    assert add_special is False
    # no system message: SmolLM2's template inserts its default one
    text, _ = smol.render("Hi")
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    raw, add_special = smol.render("Hi", chat_template=False)
    assert raw == "Hi" and add_special is True


def test_kv_save_restore_reproduces_continuation(smol):
    eng = smol.engine
    smol.reset()
    prompt = eng.tokenize("The quick brown fox jumps over the lazy dog. Then the fox", add_special=True)
    eng.prefill(prompt)
    state = eng.save_state()
    first = [g.token for g in eng.stream_tokens([], Sampling(temp=0, max_tokens=12))]
    eng.reset()
    eng.prefill(eng.tokenize("Something unrelated entirely.", add_special=True))  # dirty the cache
    eng.reset()
    eng.load_state(state)
    assert eng.n_past() == len(prompt)
    # logits are not part of the state: drop the last position and recompute it from the restored KV
    eng.truncate(len(prompt) - 1)
    second = [g.token for g in eng.stream_tokens([prompt[-1]], Sampling(temp=0, max_tokens=12))]
    assert first == second
    smol.reset()


def test_prefix_reuse_gives_the_same_answer(smol):
    smol.reset()
    msgs = [{"role": "user", "content": "What colour is the sky on a clear day?"}]
    cold = list(smol.stream(msgs, temp=0, max_tokens=12))
    warm = list(smol.stream(msgs, temp=0, max_tokens=12))
    assert [g.token for g in cold] == [g.token for g in warm]
    assert cold[0].cached_tokens == 0
    assert warm[0].cached_tokens == warm[0].prompt_tokens  # the whole prompt and the logits after it


def test_raw_logits_are_finite_and_match_greedy(smol):
    smol.reset()
    eng = smol.engine
    toks = eng.tokenize("Paris is the capital of", add_special=True)
    eng.prefill(toks)
    logits = eng.logits()
    assert logits.shape == (eng.n_vocab,) and np.isfinite(logits).all()
    g = next(iter(eng.stream_tokens([], Sampling(temp=0, max_tokens=1))))
    assert g.token == int(np.argmax(logits))
    smol.reset()


def test_prompt_longer_than_context_is_a_clear_error(smol):
    smol.reset()
    long = "word " * 2000
    with pytest.raises(ContextOverflow) as e:
        smol.generate(long, chat_template=False, max_tokens=4)
    msg = str(e.value)
    assert "1024" in msg and str(e.value.n_prompt) in msg and e.value.n_prompt > 1024


def test_stop_strings_are_cut(smol):
    smol.reset()
    full = smol.generate("Count: one, two, three, four, five, six", chat_template=False, temp=0, max_tokens=20).text
    assert "," in full
    cut = smol.generate("Count: one, two, three, four, five, six", chat_template=False, temp=0, max_tokens=20,
                        stop=[","])
    assert cut.finish_reason == "stop" and "," not in cut.text
    assert full.startswith(cut.text)


@pytest.mark.parametrize("kw, flag", [(dict(temp=-1), "--temp"), (dict(top_p=1.5), "--top-p"),
                                      (dict(top_k=-3), "--top-k"), (dict(max_tokens=-3), "--max-tokens"),
                                      (dict(presence_penalty=3), "--presence-penalty"),
                                      (dict(frequency_penalty=-2.5), "--frequency-penalty")])
def test_invalid_sampling_names_the_flag(kw, flag):
    with pytest.raises(InvalidArgument, match=flag):
        Sampling(**kw)


def test_seeded_sampling_is_reproducible(smol):
    a = smol.generate("Tell me a word.", temp=1.0, seed=42, max_tokens=12)
    b = smol.generate("Tell me a word.", temp=1.0, seed=42, max_tokens=12)
    assert a.tokens == b.tokens


def test_base_model_chat_warns_and_falls_back():
    import ondevice
    from ondevice.engine.model import BaseModelWarning

    try:
        model = ondevice.load("gemma3-270m", n_ctx=256, n_threads=2)
    except ondevice.OndeviceError as e:
        pytest.skip(f"gemma3-270m not installed: {e}")  # the [models] extra is installed by `make test`
    assert not model.is_chat
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        r = model.generate([{"role": "user", "content": "Hello"}], temp=0, max_tokens=4)
    assert any(issubclass(x.category, BaseModelWarning) for x in w)
    assert r.last is not None
    model.close()


@pytest.mark.parametrize("ignore_eos", [False, True])
def test_greedy_argmax_path_matches_the_native_chain(smol, ignore_eos):
    eng = smol.engine
    smol.reset()
    for text in ("The capital of France is", "1, 2, 3, 4,", "<|im_start|>user\nHi<|im_end|>\n"):
        eng.reset()
        eng.prefill(eng.tokenize(text, add_special=True))
        fast = eng.make_sampler(Sampling(temp=0, ignore_eos=ignore_eos))
        native = eng.make_sampler(Sampling(temp=0, ignore_eos=ignore_eos))
        native.argmax_ok = False  # force llama.cpp's greedy sampler chain
        assert fast.argmax_ok
        assert eng.sample(fast) == eng.sample(native)
    # at an end-of-text position, ignore_eos must never return an EOS token
    eng.reset()
    eng.prefill(eng.tokenize("<|im_start|>user\nSay OK.<|im_end|>\n<|im_start|>assistant\nOK.", add_special=True))
    if ignore_eos:
        assert eng.sample(eng.make_sampler(Sampling(temp=0, ignore_eos=True))) not in eng.eos_tokens
    smol.reset()


def test_logit_bias_bans_and_forces_tokens(smol):
    eng = smol.engine
    eng.reset()
    eng.prefill(eng.tokenize("The capital of France is", add_special=True))
    top = eng.sample(eng.make_sampler(Sampling(temp=0)))
    banned = eng.sample(eng.make_sampler(Sampling(temp=0, logit_bias=((top, float("-inf")),))))
    assert banned != top
    forced = eng.sample(eng.make_sampler(Sampling(temp=0, logit_bias=((1234, 100.0),))))
    assert forced == 1234
    with pytest.raises(InvalidArgument, match="logit_bias"):
        eng.make_sampler(Sampling(temp=0, logit_bias=((eng.n_vocab + 5, 1.0),)))
    smol.reset()


def test_presence_and_frequency_penalties_curb_repetition(smol):
    prompt = "la la la la la la la la la la la la"
    plain = smol.generate(prompt, chat_template=False, temp=0, max_tokens=24, ignore_eos=True)
    for kw in (dict(presence_penalty=2.0), dict(frequency_penalty=2.0)):
        pen = smol.generate(prompt, chat_template=False, temp=0, max_tokens=24, ignore_eos=True, **kw)
        most = max(plain.tokens, key=plain.tokens.count)
        assert pen.tokens.count(most) < plain.tokens.count(most), (kw, plain.text, pen.text)


def test_use_mmap_false_reads_the_weights_into_anonymous_memory(smol):
    """use_mmap chooses llama.cpp's load mode: the weights are file-backed pages, or a private copy."""
    import subprocess
    import sys

    code = ("import sys; from ondevice.engine.base import EngineConfig; from ondevice.engine.llama import LlamaEngine; "
            "from ondevice.device.info import proc_kib_fields; "
            "e = LlamaEngine(sys.argv[1], EngineConfig(n_ctx=64, n_threads=1, use_mmap=sys.argv[2] == '1')); "
            "f = proc_kib_fields(); print(f['RssFile'], f['RssAnon'])")
    size_kib = smol.path.stat().st_size / 1024
    out = {}
    for mmap in ("1", "0"):
        r = subprocess.run([sys.executable, "-c", code, str(smol.path), mmap], capture_output=True, text=True,
                           timeout=120, check=True)
        out[mmap] = [int(x) for x in r.stdout.split()]
    assert out["1"][0] > 0.8 * size_kib  # mapped: the weights count as file-backed
    assert out["0"][1] > out["1"][1] + 0.8 * size_kib  # read: they moved to anonymous memory


def test_params_refuses_a_field_the_struct_lacks():
    import llama_cpp

    from ondevice.engine.llama import set_fields
    from ondevice.errors import OndeviceError

    p = set_fields(llama_cpp.llama_context_default_params(), n_ctx=123)
    assert p.n_ctx == 123
    with pytest.raises(OndeviceError, match="use_mmap"):  # the field an older llama-cpp-python had
        set_fields(llama_cpp.llama_model_default_params(), use_mmap=True)


@pytest.mark.parametrize("name", [None, "gemma3-270m"])
def test_the_end_of_generation_set_read_from_the_load_log_is_llamas_whole_set(name):
    """eos_tokens comes from llama.cpp's load log (one "EOG token = N" line per member), not from asking
    llama_vocab_is_eog of all 49k/262k tokens: it must be exactly the set that asking every token gives."""
    from ondevice.engine.base import EngineConfig
    from ondevice.engine.llama import LlamaEngine
    from ondevice.models import resolve

    eng = LlamaEngine(resolve(name).path, EngineConfig(n_ctx=64))
    try:
        assert eng._eog_logged, "llama.cpp's load log named no EOG token: the full scan ran instead"
        every = frozenset(t for t in range(eng.n_vocab) if eng.ll.llama_vocab_is_eog(eng.vocab, t))
        assert eng.eos_tokens == every and len(every) >= 2
    finally:
        eng.close()


def test_ctrl_c_while_llama_cpp_loads_stops_the_load(smol_path, monkeypatch):
    """Python delivers Ctrl-C in whatever Python code runs next; during a load that is llama.cpp's log callback,
    where ctypes swallowed it ("Exception ignored on calling ctypes callback") and the run went on to the end
    with exit 0. The interrupt now stops the load once llama.cpp returns, and a later load works."""
    import contextlib

    from ondevice.engine import llama, native
    from ondevice.engine.base import EngineConfig

    class InterruptedLog(list):
        def append(self, line):
            if len(self) == 20:  # a Ctrl-C lands while llama.cpp logs its 21st line
                raise KeyboardInterrupt
            super().append(line)

    @contextlib.contextmanager
    def interrupted_log(quiet=False):
        native._log_capture = lines = InterruptedLog()
        try:
            yield lines
        finally:
            native._log_capture = None

    monkeypatch.setattr(native, "load_log", interrupted_log)
    with pytest.raises(KeyboardInterrupt):
        llama.LlamaEngine(smol_path, EngineConfig(n_ctx=256, n_threads=1, warmup=False))
    monkeypatch.undo()
    eng = llama.LlamaEngine(smol_path, EngineConfig(n_ctx=256, n_threads=1, warmup=False))
    eng.prefill(eng.tokenize("Hello"))
    assert np.isfinite(eng.logits()).all()
    eng.close()


def test_the_trained_context_warning_counts_one_sequence_share(smol_path):
    """A server's -c is shared by its slots (llama-server -np 8 -c 16384: 2048 a slot): no warning unless a
    sequence can reach past the model's trained context (8192 for SmolLM2)."""
    from ondevice.engine.base import EngineConfig
    from ondevice.engine.llama import LlamaEngine

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        LlamaEngine(smol_path, EngineConfig(n_ctx=16384, n_seq_max=8, n_threads=1, warmup=False)).close()
    assert not [w for w in seen if "trained with" in str(w.message)], [str(w.message) for w in seen]
    with pytest.warns(UserWarning, match=r"n_ctx=16384 is more than the 8192 tokens"):
        LlamaEngine(smol_path, EngineConfig(n_ctx=16384, n_seq_max=1, n_threads=1, warmup=False)).close()
    with pytest.warns(UserWarning, match=r"n_ctx=32768 \(16384 per sequence\) is more than the 8192 tokens"):
        LlamaEngine(smol_path, EngineConfig(n_ctx=32768, n_seq_max=2, n_threads=1, warmup=False)).close()


def test_a_sampler_cut_short_in_its_init_is_collected_quietly():
    """Ctrl-C while a Sampler is being built (before its chain exists): its collection prints no traceback."""
    import sys

    from ondevice.engine.sampler import Sampler

    seen = []
    old, sys.unraisablehook = sys.unraisablehook, seen.append
    try:
        s = Sampler.__new__(Sampler)  # what __del__ finds when __init__ was interrupted at its first line
        del s
    finally:
        sys.unraisablehook = old
    assert seen == []
