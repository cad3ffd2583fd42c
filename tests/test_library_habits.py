"""The Python library called as a llama-cpp-python user calls it (the real embedded model, greedy and short)."""

from __future__ import annotations

import re

import pytest

from ondevice.errors import InvalidArgument

Q = "Is the sky blue? Answer yes or no."


def test_max_tokens_minus_one_or_none_runs_until_the_end(smol):
    # as `run -n -1` and chat's /set max_tokens -1; llama-cpp-python's max_tokens=None (or <= 0) means no limit
    ends = [smol.generate(Q, temp=0, max_tokens=n) for n in (-1, -2, None)]
    assert all(r.finish_reason == "stop" for r in ends), [r.finish_reason for r in ends]
    assert len({r.text for r in ends}) == 1 and ends[0].text, [r.text for r in ends]


def test_load_seed_seeds_every_call_that_names_none(smol, smol_path):
    # llama-cpp-python's Llama(seed=42): each completion reseeds from the last seed, so calls give different
    # samples and a new Llama(seed=42) gives the same ones in the same order (every call was one sample before)
    import ondevice

    story = {"temp": 1.0, "max_tokens": 12}
    runs = []
    for _ in range(2):
        with ondevice.load(str(smol_path), n_ctx=256, n_threads=2, seed=42) as m:
            runs.append([m.generate("Write a story.", **story).text for _ in range(3)])
            assert m.generate("Write a story.", seed=7, **story).text == smol.generate(
                "Write a story.", seed=7, **story).text  # the call's own seed wins
    assert runs[0] == runs[1] and len(set(runs[0])) > 1, runs
    with pytest.raises(InvalidArgument, match="seed"):
        ondevice.load(str(smol_path), seed=2**40)


def test_embed_gives_unit_vectors_as_serve_and_llama_cpp_python(smol):
    # llama-cpp-python's Llama.embed(text | list); serve's /v1/embeddings: mean pooling, unit length
    import math

    one = smol.embed("hello world")
    both = smol.embed(["hello world", "a cat sat on the mat"])
    assert len(one) == len(both[0]) == smol.engine.ll.llama_model_n_embd(smol.engine.model)
    assert math.isclose(math.hypot(*one), 1, abs_tol=1e-5) and math.isclose(math.hypot(*both[1]), 1, abs_tol=1e-5)
    assert max(abs(x - y) for x, y in zip(one, both[0])) < 1e-4  # an input is embedded alone, batched or not
    assert math.hypot(*smol.embed("hello world", normalize=False)) > 1.5  # the raw mean of the token vectors
    with pytest.raises(InvalidArgument, match="embed: .* give a non-empty string or a list of them"):
        smol.embed([""])


def test_tokenize_add_bos_and_detokenize_special_as_llama_cpp_python():
    # llama-cpp-python's chat handlers: tokenize(prompt, add_bos=False, special=True); detokenize(special=True)
    import ondevice
    from ondevice.errors import OndeviceError
    from ondevice.models import resolve

    try:
        resolve("gemma3-270m")
    except OndeviceError as e:
        pytest.skip(f"gemma3-270m not installed: {e}")  # a model whose vocabulary adds a BOS
    with ondevice.load("gemma3-270m", n_ctx=256, n_threads=2) as m:
        bos, turn = m.engine.bos_token, m.tokenize("<start_of_turn>user")
        assert turn[0] == bos and len(turn) == 3  # BOS, the turn marker (parsed), "user"
        assert m.tokenize("<start_of_turn>user", add_bos=False) == turn[1:]
        assert m.tokenize("<start_of_turn>user", special=False, add_bos=True)[0] == bos
        assert m.detokenize(turn[1:]) == "user"
        assert m.detokenize(turn[1:], special=True) == "<start_of_turn>user"


@pytest.mark.parametrize(("kw", "said"), [({"stream": True}, "model.stream(prompt, ...) yields a record per token"),
                                          ({"logprobs": 3}, "token_stats=True) carries its token's logprob")])
def test_other_libraries_call_arguments_say_what_to_use(smol, kw, said):
    with pytest.raises(InvalidArgument, match=re.escape(said)):
        smol.generate("Hi", max_tokens=2, **kw)


def test_chat_template_false_with_messages_is_refused_not_ignored(smol):
    messages = [{"role": "user", "content": "Hi"}]
    for call in (smol.render, smol.generate):
        with pytest.raises(InvalidArgument, match="chat_template=False makes a raw completion of a string"):
            call(messages, chat_template=False)
    assert smol.render("Hi", chat_template=False) == ("Hi", True)  # a string: the raw completion it asks
