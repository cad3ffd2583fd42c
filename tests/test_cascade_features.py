"""The cascade's confidence features of the answer's text against the request, and the combiner over them.

Fast behaviour tests (no model): the serve path (:class:`TokenStats` over ``Generation`` records) and the
eval path (``row_features`` over a stored row) must compute the same features, whole and on a prefix.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from ondevice.cascade.confidence import (
    FEATURES,
    FIT_FEATURES,
    TEXT_FEATURES,
    TOKEN_FEATURES,
    Combiner,
    TokenStats,
    features,
    request_text,
    text_features,
    weights_for,
)
from ondevice.engine.records import Generation
from ondevice.errors import InvalidArgument

REQUEST = ("Rewrite the message below in a formal, professional tone. Keep the meaning. Reply with the "
           "rewritten message only.\n\nMessage: the meeting room's booked, use the one on floor 3")


def test_a_rewrite_that_returns_the_message_unchanged_is_flagged():
    f = text_features(REQUEST, "The meeting room's booked, use the one on floor 3.")
    assert f["unchanged"] == 1.0  # case and punctuation aside, nothing was rewritten
    assert f["copied_bigrams"] == 1.0 and f["kept_bigrams"] == 1.0
    assert f["length_ratio"] == 0.0
    g = text_features(REQUEST, "The meeting room is booked; please use the one on the third floor.")
    assert g["unchanged"] == 0.0 and 0 < g["copied_bigrams"] < 1 and 0 < g["kept_bigrams"] < 1


def test_chatter_instead_of_a_rewrite_copies_little_and_echoes_the_instruction():
    good = text_features(REQUEST, "The meeting room is booked; please use the room on floor 3.")
    chat = text_features(REQUEST, "I'm sorry, but I can help you write a formal, professional message instead.")
    assert chat["copied_bigrams"] < good["copied_bigrams"]
    assert chat["kept_bigrams"] < good["kept_bigrams"]
    assert chat["instruction_echo"] > 0.2 and good["instruction_echo"] == 0.0  # "formal", "professional"


def test_length_repetition_truncation_and_empty_answers():
    short = text_features(REQUEST, "Room booked; use floor 3.")
    long = text_features(REQUEST, "The meeting room has been booked already, so please use the other one on floor 3 "
                                  "instead, which is free all afternoon for everyone.")
    assert short["length_ratio"] < 0 < long["length_ratio"]
    loop = text_features(REQUEST, "please use floor 3 please use floor 3 please use floor 3 please use floor 3")
    assert loop["distinct_bigrams"] < 0.5 < short["distinct_bigrams"] == 1.0
    assert text_features(REQUEST, "Room booked", "length")["truncated"] == 1.0
    assert text_features(REQUEST, "Room booked", "stop")["truncated"] == 0.0
    empty = text_features(REQUEST, "")
    assert empty["copied_bigrams"] == 0.0 and empty["unchanged"] == 0.0
    assert empty["length_ratio"] == pytest.approx(math.log(1 / 11))  # 10 words in the message
    one = text_features("Summarise in one word.", "Fine")  # one paragraph: the whole request is the text
    assert set(one) == set(TEXT_FEATURES) and all(math.isfinite(v) for v in one.values())


def test_request_text_is_the_last_user_message():
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "first"},
            {"role": "assistant", "content": "ok"},
            {"role": "user", "content": [{"type": "text", "text": "Shorten:"}, {"type": "image_url"},
                                         {"type": "text", "text": "hello there"}]}]
    assert request_text(chat) == "Shorten:\nhello there"
    assert request_text("a prompt") == "a prompt"
    assert request_text(None) == "" and request_text([{"role": "system", "content": "x"}]) == ""


def _records(pieces: list[str], finish: str) -> list[Generation]:
    out = []
    for i, text in enumerate(pieces):
        out.append(Generation(text=text, token=i, index=i, t=0.01 * (i + 1), ttft=0.01, prompt_tokens=5,
                              prompt_time=0.01, prompt_tps=500.0, generation_tokens=i + 1, generation_tps=100.0,
                              finish_reason=finish if i == len(pieces) - 1 else None, logprob=-0.1 * (i + 1),
                              entropy=0.2 * i))
    return out


def test_serve_and_eval_paths_compute_the_same_features_whole_and_on_a_prefix():
    from ondevice.eval.cascade_curve import row_features

    pieces = ["The", " meeting", " room", " is", " booked", ",", " use", " floor", " 3", "."]
    gen = _records(pieces, "length")
    chat = [{"role": "user", "content": REQUEST}]
    whole = TokenStats(chat)
    for g in gen:
        whole.add(g)
    assert whole.text == "".join(pieces) and whole.finish_reason == "length"
    f = whole.features()
    assert set(f) == set(FEATURES) and f["truncated"] == 1.0
    assert f == features([g.logprob for g in gen], [g.entropy for g in gen], REQUEST, "".join(pieces), "length")
    row = {"logprobs": whole.logprobs, "entropies": whole.entropies, "pieces": whole.pieces,
           "finish_reason": whole.finish_reason, "request": whole.request}
    assert row_features(row) == f
    for n in (3, 9):  # streaming decides on the first n tokens: the answer is not finished yet
        prefix = TokenStats(chat)
        for g in gen[:n]:
            prefix.add(g)
        assert row_features(row, prefix=n) == prefix.features()
        assert prefix.features()["truncated"] == 0.0
    assert row_features(row, prefix=len(pieces)) == f


def test_weights_make_the_fit_care_about_answers_where_the_choice_matters():
    # two kinds of bad answers: many that lose little (short, x1 low) and a few that lose a lot (x2 low);
    # unweighted the fit follows the many, weighted by |cloud - device| it ranks the costly ones first
    rng = np.random.default_rng(3)
    feats, labels, dev, cloud = [], [], [], []
    for i in range(120):
        kind = ("good", "cheap_bad", "costly_bad")[0 if i < 60 else 1 if i < 105 else 2]
        x1 = rng.normal(-1.0 if kind == "cheap_bad" else 0.0, 0.5)
        x2 = rng.normal(-1.0 if kind == "costly_bad" else 0.0, 0.5)
        f = dict.fromkeys(FEATURES, 0.0) | {"copied_bigrams": x1, "kept_bigrams": x2}
        feats.append(f)
        d, c = (0.5, 0.5) if kind == "good" else (0.45, 0.5) if kind == "cheap_bad" else (0.0, 1.0)
        dev.append(d)
        cloud.append(c)
        labels.append(int(d >= c))
    w = weights_for(dev, cloud)
    assert w[0] == pytest.approx(0.05) and w[-1] == pytest.approx(1.05)
    use = ("copied_bigrams", "kept_bigrams")
    plain = Combiner.fit(feats, labels, features=use, l2=1.0)
    weighted = Combiner.fit(feats, labels, features=use, weights=w, l2=1.0)
    assert weighted.features == use and weighted.meta["weighted"] and not plain.meta["weighted"]
    assert abs(weighted.weights[1]) > abs(weighted.weights[0])  # the costly signal leads when weighted
    assert abs(plain.weights[0]) > abs(plain.weights[1])  # ... and the frequent one when not
    with pytest.raises(InvalidArgument, match="unknown combiner features"):
        Combiner.fit(feats, labels, features=("nope",))
    with pytest.raises(InvalidArgument, match="weights"):
        Combiner.fit(feats, labels, weights=[0.0] * len(labels))


def test_a_token_only_combiner_file_still_loads_and_predicts(tmp_path):
    rng = np.random.default_rng(4)
    feats = [features(list(rng.normal(-1, 0.5, 5)), list(rng.random(5)), REQUEST, "Room booked.", "stop")
             for _ in range(40)]
    labels = [int(f["mean_logprob"] > -1) for f in feats]
    old = Combiner.fit(feats, labels, features=TOKEN_FEATURES)
    d = old.to_dict()
    assert d["features"] == list(TOKEN_FEATURES)
    back = Combiner.load(old.save(tmp_path / "old.json"))
    assert back.predict(feats[0]) == pytest.approx(old.predict(feats[0]))
    new = Combiner.load(Combiner.fit(feats, labels, features=FEATURES).save(tmp_path / "new.json"))
    assert new.features == FEATURES and len(new.weights) == len(FEATURES)
    assert Combiner.fit(feats, labels).features == FIT_FEATURES == TEXT_FEATURES  # the default
