"""Speculative decoding (engine/generator.py): the output is plain decoding's, greedy and in distribution."""

from __future__ import annotations

import collections
import json
from importlib import resources

import pytest

import ondevice
from ondevice.engine.generator import BatchGenerator, Request
from ondevice.engine.records import Generation, Sampling


def _rewrite_items(n: int) -> list[str]:
    rows = [json.loads(line) for line in
            resources.files("ondevice.data").joinpath("assistant_en.jsonl").read_text().splitlines() if line]
    return [r["input"] for r in rows if r["category"] == "rewriting"][:n]


def _cold(model, prompt, **kw):
    """Generate from an empty cache. (A prompt whose prefix is reused recomputes only its last token, in a
    batch of one instead of within the whole prompt's batch: its KV then differs in the last bits, which can
    flip a later near-tie. Speculation adds no error of its own, test_rejected_drafts_leave_no_trace; a row
    verified in a batch equals a single decode where llama.cpp computes both by one path, as at these lengths.)"""
    model.reset()
    return model.generate(prompt, **kw)


class _Costs(BatchGenerator):
    """The generator with a fixed cost curve for a step of n items instead of the one it measures here (whose
    shape depends on the machine and its load: on 2 busy cores a 4-item step costs ~2.7 single ones)."""

    slope = 0.0

    def _cost(self, n: int) -> float:
        return 1.0 + self.slope * (n - 1)

    def _trusted(self, base: int, top: int) -> int:  # the whole curve is known
        return top


@pytest.fixture()
def costs(smol):
    """``costs(slope)``: smol's generator with that cost curve (0: extra rows are free, as when memory-bound)."""

    def use(slope: float) -> None:
        g = _Costs(smol.engine, seqs=[0], slot_ctx=smol.engine.n_ctx, draft_engine=smol.draft_engine)
        g.slope = slope
        smol._generator = g

    yield use
    smol._generator = None


@pytest.mark.parametrize("prompt", _rewrite_items(3))
def test_lookup_greedy_equals_plain(smol, prompt):
    plain = _cold(smol, prompt, temp=0, max_tokens=48)
    spec = _cold(smol, prompt, temp=0, max_tokens=48, draft="lookup")
    assert spec.text == plain.text and spec.tokens == plain.tokens
    assert spec.finish_reason == plain.finish_reason
    # plain: one decode per token (the one whose logits gave only the end-of-text token is not a step)
    assert plain.last.draft_tokens == 0 and plain.last.tokens_per_step == 1.0  # an end-of-text alone is no step


def test_lookup_copies_in_fewer_steps(smol, costs):
    """A reply that copies the prompt is verified several tokens per decode (where bigger steps cost little)."""
    costs(0.05)
    prompt = ("Repeat the following text exactly, word for word:\n\nThe committee met on Tuesday to review the "
              "budget for the new library, the park renovation and the summer festival, and agreed to publish its "
              "decision next week.")
    plain = _cold(smol, prompt, temp=0, max_tokens=60)
    spec = _cold(smol, prompt, temp=0, max_tokens=60, draft="lookup", draft_max=8)
    assert spec.tokens == plain.tokens
    last = spec.last
    assert last.draft_accepted > 5 and last.decode_steps < 0.75 * last.generation_tokens, last
    assert 0 < last.acceptance <= 1 and last.tokens_per_step > 1.3


def test_lookup_backs_off_when_drafts_miss(smol, costs):
    """Drafts that miss lower the request's acceptance estimate until drafting no longer pays; where bigger
    steps cost as much as the tokens in them, it never pays."""
    costs(0.1)
    prompt = "Write one sentence about the sea."
    last = _cold(smol, prompt, temp=0, max_tokens=48, draft="lookup").last
    assert last.draft_tokens <= last.generation_tokens // 2, last
    costs(1.0)
    last = _cold(smol, _rewrite_items(1)[0], temp=0, max_tokens=48, draft="lookup").last
    assert last.draft_tokens == 0


class _Junk(BatchGenerator):
    """Drafts ``junk`` (never the greedy token here) ``k`` at a time, whatever the cost: every draft is rejected."""

    junk, k = 0, 3

    def _draft(self, s, base: int, room: int) -> list[int]:
        return [self.junk] * min(self.k, s.req.sampling.max_tokens - s.n_gen - 1, room)


def test_rejected_drafts_leave_no_trace(smol_path):
    """A verify step's rows before a draft never see it, and a rejected draft's KV is dropped: two runs whose
    drafts differ only in their (rejected) tokens give the same logits bit for bit, at a long context too. (Against
    plain decoding the comparison is not bit for bit everywhere: llama.cpp's CPU kernels compute a lone token and a
    batch's first row by different paths at some context lengths, README.)"""
    m = ondevice.load(str(smol_path), n_ctx=2048, n_threads=2)
    try:
        prompt = " ".join(_rewrite_items(12) * 4) + "\n\nRewrite the first request above in your own words."
        assert len(m.tokenize(prompt)) > 600
        runs = []
        for junk in (m.tokenize("¤")[-1], m.tokenize(" zebra")[-1]):
            m._generator = g = _Junk(m.engine, seqs=[0], slot_ctx=m.engine.n_ctx)
            g.junk = junk
            m.reset()
            recs = list(m.stream(prompt, temp=0, max_tokens=24, draft="lookup", token_stats=True))
            assert recs[-1].draft_tokens > 20 and recs[-1].draft_accepted == 0, recs[-1]  # drafted, all rejected
            runs.append([(g.token, g.logprob) for g in recs if g.token >= 0])
        assert all(lp is not None for _, lp in runs[0]) and runs[0] == runs[1]
    finally:
        m._generator = None
        m.close()


def test_draft_model_greedy_equals_plain(smol, smol_path):
    """A draft model with the target's vocabulary (the target itself here: every catalog pair differs in
    vocabulary, see benchmarks/spec_bench.py): same output, and its drafts are nearly all accepted."""
    m = ondevice.load(str(smol_path), n_ctx=1024, n_threads=2, draft_model=str(smol_path))
    m._generator = _Costs(m.engine, seqs=[0], slot_ctx=m.engine.n_ctx, draft_engine=m.draft_engine)
    try:
        prompt = _rewrite_items(1)[0]
        plain = _cold(smol, prompt, temp=0, max_tokens=32)
        spec = _cold(m, prompt, temp=0, max_tokens=32, draft="model", draft_max=4)
        assert spec.tokens == plain.tokens
        assert spec.last.draft_tokens > 0 and spec.last.acceptance > 0.8
    finally:
        m.close()


def test_draft_model_needs_same_vocabulary(smol):
    with pytest.raises(ondevice.OndeviceError, match="draft='model' needs a draft model"):
        _cold(smol, "hi", draft="model")


def _chi2_same(a: collections.Counter, b: collections.Counter) -> tuple[float, int]:
    """Two-sample chi-square statistic over the categories (rare ones pooled) and its degrees of freedom."""
    na, nb = sum(a.values()), sum(b.values())
    cats = [c for c in set(a) | set(b) if a[c] + b[c] >= 10]
    rest = (na - sum(a[c] for c in cats), nb - sum(b[c] for c in cats))
    rows = [(a[c], b[c]) for c in cats] + ([rest] if sum(rest) else [])
    stat = 0.0
    for x, y in rows:
        tot = x + y
        ex, ey = tot * na / (na + nb), tot * nb / (na + nb)
        stat += (x - ex) ** 2 / ex + (y - ey) ** 2 / ey
    return stat, len(rows) - 1


def _chi2_quantile_999(df: int) -> float:
    """The 99.9% quantile of chi-square with ``df`` degrees of freedom (Wilson-Hilferty, z = 3.09)."""
    c = 2 / (9 * df)
    return df * (1 - c + 3.09 * c ** 0.5) ** 3


class _FixedDrafts(BatchGenerator):
    """The real verification path with drafts chosen by the test (the same two tokens after the first)."""

    drafts: list[int] = []

    def _draft(self, s, base, room):
        return list(self.drafts) if s.n_gen == 1 else []


def test_sampled_speculation_keeps_the_distribution(smol):
    """Sampling with drafts gives plain sampling's distribution (the rejection rule, for one-point drafts).

    Two fixed draft tokens are verified after the first sampled token. Verified rows are numerically the
    rows a plain decode computes, and each output token takes one random draw either way, so with the same
    seed the output is the same token for token; over other seeds, the 2nd and 3rd tokens' empirical
    distributions agree with plain decoding's (chi-square below its 99.9% quantile), while the drafts were
    both accepted and rejected.
    """
    eng = smol.engine
    prompt = eng.tokenize("The capital of France is", add_special=True)
    greedy = _cold(smol, "The capital of France is", chat_template=False, temp=0, max_tokens=3).tokens
    gen = _FixedDrafts(eng, seqs=[0], slot_ctx=eng.n_ctx)
    gen.drafts = greedy[1:3]  # likely but far from certain at temp 1

    def run(seed: int, draft: str | None) -> Generation:
        s = Sampling(temp=1.0, top_k=0, top_p=1.0, min_p=0.0, max_tokens=3, seed=seed, draft=draft)
        return list(gen.stream(Request(tokens=list(prompt), sampling=s)))

    n = 40
    plain = [tuple(g.token for g in run(seed, None) if g.token >= 0) for seed in range(n)]
    matched = [run(seed, "lookup") for seed in range(n)]
    assert [tuple(g.token for g in r if g.token >= 0) for r in matched] == plain
    other = [run(n + seed, "lookup") for seed in range(2 * n)]
    drafted = sum(r[-1].draft_tokens for r in matched + other)
    accepted = sum(r[-1].draft_accepted for r in matched + other)
    assert 0 < accepted < drafted, (accepted, drafted)
    plain += [tuple(g.token for g in run(2 * n + seed, None) if g.token >= 0) for seed in range(n)]
    spec = [tuple(g.token for g in r if g.token >= 0) for r in other]
    for pos in (1, 2):
        stat, df = _chi2_same(collections.Counter(t[pos] for t in plain if len(t) > pos),
                              collections.Counter(t[pos] for t in spec if len(t) > pos))
        assert df >= 1 and stat < _chi2_quantile_999(df), (pos, stat, df)


def test_sampling_rejects_a_bad_draft_setting():
    with pytest.raises(ondevice.OndeviceError, match="draft"):
        Sampling(draft="ngram")
    with pytest.raises(ondevice.OndeviceError, match="draft-max"):
        Sampling(draft="lookup", draft_max=0)


def test_drafts_grow_by_doubling_from_measured_step_sizes():
    """Before a plain step was measured no draft is weighed; then a draft at most doubles the largest step size
    measured, so a cost curve guessed between a one-token step and a prompt chunk costs one probe, not seven."""
    from ondevice.engine.drafters import StepCosts

    c = StepCosts()
    c.observe(64, 0.30)  # a prompt chunk
    assert c.trusted(1, 17) == 1  # a plain step's cost is still a guess
    c.observe(1, 0.02)
    assert c.trusted(1, 17) == 2  # not 17: the chunk lies beyond the range drafts are weighed in
    c.observe(2, 0.045)
    assert c.trusted(1, 17) == 4
    c.observe(4, 0.08)
    assert c.trusted(1, 17) == 8 and c.trusted(1, 5) == 5
    assert c.trusted(3, 17) == 3  # a step of 3 (three slots) was never measured


def test_one_stalled_step_does_not_make_drafting_look_cheap():
    from ondevice.engine.drafters import StepCosts

    c = StepCosts()
    for _ in range(4):
        c.observe(1, 0.020)
    c.observe(1, 0.200)  # the host stalled once
    assert c(1) == 0.020
    for _ in range(9):  # the machine really got slower: the window follows it
        c.observe(1, 0.030)
    assert c(1) == 0.030
