"""llama.cpp's other samplers (llama-server's request fields, llama-cli's flags), each checked by what it must do
to the real model's tokens. By hand, each was also compared with llama-server 0.3.36's build on the same request
and seed (SmolLM2 Q4_1, /v1/completions, seeds 1-3, 24-48 tokens): byte-identical for every one of them."""

from __future__ import annotations

import openai
import pytest
from test_serve import _model_path

from ondevice.errors import InvalidArgument
from ondevice.serve import BackgroundServer, ServeSettings

STORY = "Once upon a time, in a small village,"  # SmolLM2's next token: " there" 0.71, " a" 0.15, " the" 0.02, ...
SEEDS = (1, 2, 3, 4, 5)
COUNT = "one two three four one two three four one two three"  # greedy: " four"


def _gen(smol, prompt=STORY, n=8, **kw):
    return smol.generate(prompt, chat_template=False, max_tokens=n, **kw).text


def test_samplers_that_leave_one_token_sample_the_same_whatever_the_seed(smol):
    """top_n_sigma 0.01 keeps only the top logit and Mirostat v2 with target 0 only the likeliest token: greedy at
    temperature 1; typical_p near 0 keeps the one most typical token: one text for every seed."""
    greedy = _gen(smol, temp=0)
    plain = {_gen(smol, temp=1.0, seed=s) for s in SEEDS}
    assert len(plain) > 1 and plain != {greedy}  # without them the seeds do differ
    assert {_gen(smol, temp=1.0, seed=s, top_n_sigma=0.01) for s in SEEDS} == {greedy}
    assert {_gen(smol, temp=1.0, seed=s, mirostat=2, mirostat_tau=0.0) for s in SEEDS} == {greedy}
    assert len({_gen(smol, temp=1.0, seed=s, typical_p=1e-6) for s in SEEDS}) == 1


def test_xtc_removes_the_likeliest_tokens_but_the_last_above_its_threshold(smol):
    # " there" (0.71) and " a" (0.15) are above 0.05: XTC at probability 1 removes " there" every time
    firsts = {_gen(smol, n=1, temp=1.0, seed=s, xtc_probability=1.0, xtc_threshold=0.05) for s in SEEDS}
    assert " there" not in firsts and firsts == {" a"}  # " a" is the least likely above 0.05; min_p drops the rest
    assert " there" in {_gen(smol, n=1, temp=1.0, seed=s) for s in SEEDS}


def test_penalties_look_back_over_the_prompt_and_repeat_last_n_sets_how_far(smol):
    greedy = _gen(smol, COUNT, n=1, temp=0)
    assert greedy == " four"
    # llama-server's penalties count the prompt's tokens: " four" is penalised from the first token on
    assert _gen(smol, COUNT, n=1, temp=0, repeat_penalty=3.0) != " four"
    assert _gen(smol, COUNT, n=1, temp=0, repeat_penalty=3.0, repeat_last_n=0) == " four"  # no window, no penalty
    assert _gen(smol, COUNT, n=1, temp=0, repeat_penalty=3.0, mirostat=2) == " four"  # llama.cpp: Mirostat has none


def test_dry_penalises_the_token_that_extends_a_repeat(smol):
    assert _gen(smol, COUNT, n=1, temp=0, dry_multiplier=4.0) != " four"
    # a breaker inside the repeat cuts it short of the allowed length: no penalty
    assert _gen(smol, COUNT, n=1, temp=0, dry_multiplier=4.0, dry_sequence_breakers=[" three"]) == " four"


def test_dynamic_temperature_changes_what_is_sampled(smol):
    plain = [_gen(smol, temp=0.8, seed=s) for s in SEEDS]
    assert [_gen(smol, temp=0.8, seed=s, dynatemp_range=0.8) for s in SEEDS] != plain


@pytest.mark.parametrize(("kw", "match"), [
    ({"mirostat": 3}, r"--mirostat / mirostat=3 must be 0 \(off\), 1 or 2"),
    ({"typical_p": 1.5}, r"--typical-p / typical_p=1.5 must be in \[0, 1\]"),
    ({"repeat_last_n": -2}, r"--repeat-last-n / repeat_last_n=-2 must be >= -1"),
    ({"dry_base": 0.5}, r"--dry-base / dry_base=0.5 must be a finite number >= 1"),
    ({"dry_sequence_breakers": [""]}, r"--dry-sequence-breakers / dry_sequence_breakers=\(''\,\) must be non-empty"),
])
def test_bad_sampler_settings_name_the_flag(smol, kw, match):
    with pytest.raises(InvalidArgument, match=match):
        _gen(smol, **kw)


def test_the_server_takes_llama_servers_sampler_fields():
    settings = ServeSettings(model=str(_model_path()), port=0, parallel=1, ctx=256, threads=2, embeddings=False)
    with BackgroundServer(settings) as s:
        client = openai.OpenAI(base_url=s.base_url + "/v1", api_key="unused", max_retries=0, timeout=300)

        def text(seed, **extra):
            return client.completions.create(model="m", prompt=STORY, max_tokens=8, temperature=1.0, seed=seed,
                                             extra_body=extra).choices[0].text

        greedy = client.completions.create(model="m", prompt=STORY, max_tokens=8, temperature=0).choices[0].text
        assert {text(seed, top_n_sigma=0.01) for seed in (1, 2, 3)} == {greedy}
        # the first token sampled from the prompt's saved logits row too (a sampler that moves the array's start)
        assert {text(seed, xtc_probability=1.0, xtc_threshold=0.05)[:2] for seed in (1, 2, 3)} == {" a"}
        assert text(1, dry_multiplier=0.8, dry_base=0.5) == text(1, dry_multiplier=0.8)  # base < 1: the default
        with pytest.raises(openai.BadRequestError, match="mirostat"):
            text(1, mirostat=3)
        with pytest.raises(openai.BadRequestError, match="dry_sequence_breakers"):
            text(1, dry_sequence_breakers=[])


def test_run_takes_llama_clis_sampler_flags(cli):
    base = ("run", "--raw", "-n", "6", "-t", "2", "--timings", "none")
    greedy = cli(*base, "--temp", "0", STORY)
    for flags in (("--top-nsigma", "0.01"), ("--mirostat", "2", "--mirostat-ent", "0")):
        r = cli(*base, "--temp", "1", "--seed", "3", *flags, STORY)
        assert r.returncode == 0 and r.stdout == greedy.stdout, r.stderr
    r = cli(*base, "--temp", "0", "--dry-multiplier", "4", "--dry-sequence-breaker", "none", COUNT)
    assert r.returncode == 0 and not r.stdout.startswith(" four"), r.stdout
    r = cli(*base, "--temp", "0", "--dry-multiplier", "4", "--dry-sequence-breaker", " three", COUNT)
    assert r.returncode == 0 and r.stdout.startswith(" four"), r.stdout
    r = cli(*base, "--dry-sequence-breaker", "", COUNT)
    assert r.returncode == 2 and "--dry-sequence-breaker / dry_sequence_breakers=('',) must be non-empty" in r.stderr
