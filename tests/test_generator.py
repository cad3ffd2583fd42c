"""The batch generator (engine/generator.py) driven directly, no HTTP: the real SmolLM2 through llama.cpp."""

from __future__ import annotations

import re

import pytest

from ondevice.engine.base import EngineConfig
from ondevice.engine.generator import BatchGenerator, Request
from ondevice.engine.llama import LlamaEngine
from ondevice.engine.records import Generation, Sampling

PROMPTS = ["The capital of France is", "Once upon a time, in a small village,", "def fibonacci(n):",
           "The three primary colours are"]


@pytest.fixture(scope="module")
def eng(smol_path):
    e = LlamaEngine(smol_path, EngineConfig(n_ctx=4 * 512, n_seq_max=4, n_threads=2))
    yield e
    e.close()


def _run(gen: BatchGenerator, reqs: list[Request]) -> dict[int, list[Generation]]:
    """Insert every request (as slots free up) and step until all have finished; records per request."""
    out: dict[int, list[Generation]] = {id(r): [] for r in reqs}
    todo = list(reqs)
    while todo or gen.busy:
        while todo and gen.free:
            gen.insert(todo.pop(0))
        for r, ev in gen.step():
            if isinstance(ev, Generation):
                out[id(r)].append(ev)
    return out


def _req(eng, prompt: str, **kw) -> Request:
    kw.setdefault("temp", 0)
    kw.setdefault("max_tokens", 16)
    return Request(tokens=eng.tokenize(prompt), sampling=Sampling(**kw), logprobs=5)


def _same_or_near_tie(a: list[Generation], b: list[Generation]) -> bool:
    """Equal greedy tokens, or equal up to a first difference that is a near-tie in ``b``'s distribution.

    llama.cpp's CPU kernels are not batch-invariant (a matmul over >= 4 rows takes another path than over
    1-3 rows), so the top two tokens of a near-tie can swap between a batch of one and a batch of four.
    """
    ta, tb = [g.token for g in a], [g.token for g in b]
    if ta == tb:
        return True
    i = next(k for k, (x, y) in enumerate(zip(ta, tb)) if x != y)
    alt = dict(b[i].top_logprobs)
    assert ta[i] in alt and b[i].logprob - alt[ta[i]] < 0.5, (i, ta[i], tb[i], alt)
    return False


def test_batch_equals_single_for_greedy(eng):
    gen = BatchGenerator(eng)
    eng.reset()
    gen.reset()
    single = [_run(gen, [r])[id(r)] for r in (_req(eng, p) for p in PROMPTS)]
    eng.reset()
    gen.reset()
    reqs = [_req(eng, p) for p in PROMPTS]
    batch = _run(gen, reqs)
    exact = sum(_same_or_near_tie(s, batch[id(r)]) for s, r in zip(single, reqs))
    assert exact >= 2
    for recs in batch.values():
        assert recs[-1].finish_reason in ("stop", "length") and all(g.finish_reason is None for g in recs[:-1])
        assert [g.index for g in recs if g.token >= 0] == list(range(sum(g.token >= 0 for g in recs)))


def test_prefix_reuse_same_slot_and_copied_from_another(eng):
    gen = BatchGenerator(eng)
    eng.reset()
    gen.reset()
    long = "Here is a long shared preamble about the weather in spring, the flowers and the birds. " * 3
    a = _run(gen, [_req(eng, long + "Question one:")])
    r_again = _req(eng, long + "Question one:")
    again = _run(gen, [r_again])[id(r_again)]
    assert again[0].cached_tokens == len(r_again.tokens)  # the whole prompt, and the logits that followed it
    assert [g.token for g in again] == [g.token for g in next(iter(a.values()))]
    r_other = _req(eng, long + "Question zero:")  # the same preamble only: its last tokens are computed
    other = _run(gen, [r_other])[id(r_other)]
    assert len(eng.tokenize(long + "Question ")) - 2 <= other[0].cached_tokens < len(r_other.tokens)
    # a request still running in one slot lends its KV to a new request in an idle slot (a copy)
    r1 = _req(eng, long + "Question two: why?", max_tokens=30)
    r2 = _req(eng, long + "Question three: how?", max_tokens=4)
    gen.insert(r1)
    gen.step()  # r1 prefilled, decoding
    for s in gen.slots:  # the slot that held the first prompt forgets it: only r1's slot can lend
        if s.req is None:
            s.cached = []
            eng.truncate(0, s.seq)
    n = gen.insert(r2)
    shared = len(eng.tokenize(long + "Question "))
    assert n >= shared - 2
    while gen.busy:
        gen.step()


def test_stop_string_across_token_boundaries(eng):
    gen = BatchGenerator(eng)
    r = _req(eng, "Count: one, two, three, four, five, six", max_tokens=24)
    recs = _run(gen, [r])[id(r)]
    pieces = [g.text for g in recs]
    text = "".join(pieces)
    # a stop string made of the end of one token and the start of the next
    i = next(k for k in range(1, len(pieces) - 1) if len(pieces[k]) >= 3 and pieces[k + 1])
    stop = pieces[i][-2:] + pieces[i + 1][:2]  # e.g. "en," from " seven" + ","
    assert text.find(stop) == len("".join(pieces[:i + 1])) - 2  # its first occurrence spans the boundary
    cut = text[:text.find(stop)]
    r2 = _req(eng, "Count: one, two, three, four, five, six", max_tokens=24, stop=(stop,))
    got = _run(gen, [r2])[id(r2)]
    assert "".join(g.text for g in got) == cut
    assert got[-1].finish_reason == "stop"


def _grammar_first_greedy(eng, tokens: list[int], grammar: str, n: int) -> list[int]:
    """Reference: llama.cpp's grammar applied to the whole vocabulary before each greedy pick (the slow path)."""
    ll = eng.ll
    chain = ll.llama_sampler_chain_init(ll.llama_sampler_chain_default_params())
    ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_grammar(eng.vocab, grammar.encode(), b"root"))
    ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_greedy())
    out = []
    try:
        eng.reset()
        eng.prefill(tokens)
        for _ in range(n):
            tok = ll.llama_sampler_sample(chain, eng.ctx, -1)
            if tok in eng.eos_tokens:
                break
            out.append(tok)
            eng.decode(tok)
    finally:
        ll.llama_sampler_free(chain)
        eng.reset()
    return out


GRAMMAR = r'''root ::= "{" ws "\"colour\":" ws "\"" [a-z]{1,12} "\"" ws "," ws "\"count\":" ws [0-9]{1,4} ws "}"
ws ::= [ \n]?'''
GRAMMAR_RE = re.compile(r'\{ ?\n?"colour": ?\n?"[a-z]{1,12}" ?\n?, ?\n?"count": ?\n?[0-9]{1,4} ?\n?\}')


def test_grammar_greedy_equals_grammar_first_and_output_is_valid(eng):
    gen = BatchGenerator(eng)
    gen.reset()
    prompt = "Describe a sky in JSON with a colour and a count of clouds.\n"
    r = _req(eng, prompt, grammar=GRAMMAR, max_tokens=40)
    recs = _run(gen, [r])[id(r)]
    text = "".join(g.text for g in recs)
    assert GRAMMAR_RE.fullmatch(text), text
    assert recs[-1].finish_reason == "stop"
    ref = _grammar_first_greedy(eng, r.tokens, GRAMMAR, 40)
    gen.reset()
    assert [g.token for g in recs if g.token >= 0] == ref


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_grammar_sampled_output_is_valid(eng, seed):
    gen = BatchGenerator(eng)
    r = _req(eng, "Write anything at all:", grammar=GRAMMAR, max_tokens=60, temp=1.5, top_k=0, top_p=1.0,
             min_p=0.0, seed=seed)
    text = "".join(g.text for g in _run(gen, [r])[id(r)])
    assert GRAMMAR_RE.fullmatch(text), text


def test_bad_request_does_not_take_a_slot(eng):
    gen = BatchGenerator(eng)
    with pytest.raises(Exception, match="grammar"):
        gen.insert(_req(eng, "hi", grammar="root ::= ???"))
    assert gen.busy == 0


def test_logits_rows_follow_items(eng):
    """Sampling row i of a mixed batch uses the logits of item i (decode + prefill chunks together)."""
    gen = BatchGenerator(eng, prefill_chunk=3)
    eng.reset()
    gen.reset()
    reqs = [_req(eng, p, max_tokens=6) for p in PROMPTS[:2]]
    got = _run(gen, reqs)
    for r in reqs:
        ref = Request(tokens=r.tokens, sampling=r.sampling, logprobs=5)
        eng.reset()
        gen.reset()
        alone = _run(BatchGenerator(eng), [ref])[id(ref)]
        _same_or_near_tie(alone, got[id(r)])  # asserts that any difference is a near-tie


def _firsts(eng, prompts: list[str], max_tokens: int, **admission) -> tuple[list[int], list[list[Generation]]]:
    """The prompts inserted at once into a generator with these admission settings: the step of each one's
    first token, and each one's records."""
    gen = BatchGenerator(eng, **admission)
    eng.reset()
    gen.reset()
    reqs = [_req(eng, p, max_tokens=max_tokens) for p in prompts]
    for r in reqs:
        gen.insert(r)
    first, toks, step = {}, {id(r): [] for r in reqs}, 0
    while gen.busy:
        step += 1
        for r, ev in gen.step():
            if isinstance(ev, Generation):
                first.setdefault(id(r), step)
                toks[id(r)].append(ev)
    return [first[id(r)] for r in reqs], [toks[id(r)] for r in reqs]


def test_prefill_batch_gives_a_burst_its_first_tokens_in_arrival_order(eng):
    """Three short prompts inserted at once: without ``prefill_batch`` all are prefilled in one step; with it,
    one new prompt per step, first tokens in arrival order, and the same greedy tokens as before."""
    together, plain = _firsts(eng, PROMPTS[:3], 6, prefill_batch=None)
    staggered, spread = _firsts(eng, PROMPTS[:3], 6, prefill_batch=1)
    assert together == [1, 1, 1]
    assert staggered == [1, 2, 3]
    for a, b in zip(spread, plain):
        _same_or_near_tie(a, b)  # a batch of one vs three: equal up to a near-tie (see the helper)


def test_prefill_share_starts_half_the_waiting_prompt_tokens_per_step(eng):
    """Four prompts of one length inserted at once with ``prefill_share`` 0.5: the first step starts two (half
    the waiting tokens), the next one of the two left, then the last; the greedy tokens are those of a batch of
    one."""
    prompts = [f"The capital of {c} is" for c in ("France", "Spain", "Italy", "Japan")]
    assert len({len(_req(eng, p).tokens) for p in prompts}) == 1
    steps, got = _firsts(eng, prompts, 4, prefill_batch=1, prefill_share=0.5)
    assert steps == [1, 1, 2, 3]
    for p, toks in zip(prompts, got):
        _same_or_near_tie(_firsts(eng, [p], 4)[1][0], toks)


def _first_step(gen: BatchGenerator, req: Request) -> tuple[int, Generation]:
    """Insert ``req``, step until its first token; that step's decoded tokens and the record."""
    gen.insert(req)
    while True:
        evs = [ev for r, ev in gen.step() if r is req and isinstance(ev, Generation)]
        if evs:
            return gen.last_batch, evs[0]


def _finish(gen: BatchGenerator, req: Request, first: Generation) -> list[Generation]:
    out = [first]
    while any(s.req is req for s in gen.slots):
        out += [ev for r, ev in gen.step() if r is req and isinstance(ev, Generation)]
    return out


@pytest.mark.parametrize("sampling", [{"temp": 0}, {"temp": 0.9, "seed": 11}], ids=["greedy", "sampled"])
def test_the_same_prompt_again_takes_its_first_token_from_saved_logits(eng, sampling):
    """A prompt a slot already holds, with the logits that followed it, needs no decode for its first token;
    the output is the one computing the prompt gives (the same seed: the same tokens)."""
    eng.reset()
    gen = BatchGenerator(eng, seqs=[0])
    prompt = "Write one sentence about the sea."
    n_first, a0 = _first_step(gen, r1 := _req(eng, prompt, max_tokens=12, **sampling))
    a = _finish(gen, r1, a0)
    assert n_first == len(r1.tokens) and a0.cached_tokens == 0
    n_again, b0 = _first_step(gen, r2 := _req(eng, prompt, max_tokens=12, **sampling))
    b = _finish(gen, r2, b0)
    assert n_again == 0 and b0.cached_tokens == len(r2.tokens)  # no decode before the first token
    assert [g.token for g in b] == [g.token for g in a]
    # echo logprobs need every prompt position's logits: computed again, never from the saved row
    r3 = Request(tokens=r1.tokens, sampling=Sampling(temp=0, max_tokens=2), prompt_logprobs=1)
    n_echo, c0 = _first_step(gen, r3)
    assert n_echo == len(r3.tokens) and c0.cached_tokens == 0
    _finish(gen, r3, c0)


def test_saved_logits_are_lent_with_the_kv_and_dropped_with_it(eng):
    eng.reset()
    gen = BatchGenerator(eng, seqs=[0, 1])
    prompt = "List three fruits:"
    ra = _req(eng, prompt, max_tokens=20)
    _, a0 = _first_step(gen, ra)  # ra keeps its slot, decoding
    rb = _req(eng, prompt, max_tokens=6)
    n = gen.insert(rb)  # the other slot is empty: ra's slot lends its KV and its saved logits
    assert n == len(rb.tokens)
    b = [ev for r, ev in gen.step() if r is rb and isinstance(ev, Generation)]
    assert b[0].cached_tokens == len(rb.tokens) and b[0].token == a0.token
    a = _finish(gen, ra, a0)
    b = _finish(gen, rb, b[0])
    assert _same_or_near_tie(a[:len(b)], b)
    # a request that saves no logits (echo) cuts the slot's KV: the logits saved for the old prompt go with it
    gen = BatchGenerator(eng, seqs=[0])
    eng.reset()
    n_p, p0 = _first_step(gen, rp := _req(eng, prompt, max_tokens=2))
    _finish(gen, rp, p0)
    echo = Request(tokens=eng.tokenize("A different text entirely."), sampling=Sampling(temp=0, max_tokens=1),
                   prompt_logprobs=1)
    _finish(gen, echo, _first_step(gen, echo)[1])
    assert gen.slots[0].saved is None
    n_again, again = _first_step(gen, _req(eng, prompt, max_tokens=1))
    assert n_again == n_p and again.token == p0.token  # computed again, not sampled from stale logits


def test_the_same_prompt_admitted_together_is_computed_once(eng):
    """n choices of one prompt: one slot computes it, the others wait and copy its KV and logits."""
    eng.reset()
    gen = BatchGenerator(eng)
    prompt = "Name a colour of the rainbow and say why you like it."
    reqs = [_req(eng, prompt, max_tokens=8, ignore_eos=True) for _ in range(3)]
    for r in reqs:
        gen.insert(r)
    first = {id(r): ev for r, ev in gen.step() if isinstance(ev, Generation)}
    assert gen.last_batch == len(reqs[0].tokens)  # the prompt once, not three times
    assert len(first) == 3 and {g.token for g in first.values()} == {first[id(reqs[0])].token}
    assert sorted(g.cached_tokens for g in first.values()) == [0, len(reqs[0].tokens), len(reqs[0].tokens)]
    outs = [[first[id(r)]] for r in reqs]
    while gen.busy:
        for r, ev in gen.step():
            outs[reqs.index(r)].append(ev)
    assert [len(o) for o in outs] == [8, 8, 8]
    assert all(_same_or_near_tie(outs[0], o) for o in outs[1:])
    # the slot computing the prompt is cancelled before its decode: the others compute it themselves
    eng.reset()
    gen.reset()
    reqs = [_req(eng, prompt, max_tokens=4, ignore_eos=True) for _ in range(2)]
    for r in reqs:
        gen.insert(r)
    gen.remove(reqs[0])
    evs = []
    for _ in range(10):  # bounded: a request left waiting for a slot that is gone would never finish
        evs += [ev for r, ev in gen.step() if r is reqs[1] and isinstance(ev, Generation)]
    assert len(evs) == 4 and evs[0].cached_tokens == 0
    assert _same_or_near_tie(outs[0][:4], evs)


def test_an_interrupt_right_after_llama_decode_leaves_the_model_usable(smol):
    """Ctrl-C lands in Python just after a ``llama_decode`` returns, before the cache's bookkeeping: the next
    turn (its prompt extends the interrupted one) still runs, and as it would from a fresh cache."""
    msgs = [{"role": "user", "content": "Tell me a long story about a lighthouse."}]
    ll = smol.engine.ll
    real, calls = ll.llama_decode, []

    def decode_then_interrupt(ctx, batch):
        rc = real(ctx, batch)
        calls.append(rc)
        if len(calls) == 6:
            raise KeyboardInterrupt
        return rc

    smol.reset()
    parts = []
    ll.llama_decode = decode_then_interrupt
    try:
        with pytest.raises(KeyboardInterrupt):
            for g in smol.stream(msgs, temp=0, max_tokens=40):
                parts.append(g.text)
    finally:
        ll.llama_decode = real
    msgs += [{"role": "assistant", "content": "".join(parts)}, {"role": "user", "content": "Thanks. Shorter?"}]
    after = smol.generate(msgs, temp=0, max_tokens=12)
    smol.reset()
    assert after.tokens == smol.generate(msgs, temp=0, max_tokens=12).tokens
