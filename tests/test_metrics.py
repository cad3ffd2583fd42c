"""Metrics on hand-made cases whose values are worked out by hand in the comments."""

from __future__ import annotations

import itertools
import random

import pytest

from ondevice.errors import InvalidArgument
from ondevice.eval import metrics as m


def test_registry_has_every_metric_and_decorator_registers():
    for name in (
        "exact_match",
        "char_f1",
        "token_f1",
        "field_f1",
        "kendall_tau",
        "rouge_l",
        "choice_accuracy",
        "function_call",
        "correction_em",
    ):
        assert name in m.METRICS
    with pytest.raises(ValueError):
        m.metric("rouge_l")(lambda p, t: 0.0)

    @m.metric("_test_len_ratio")
    def ratio(p: str, t: str) -> float:
        return len(p) / len(t)

    try:
        assert m.get_metric("_test_len_ratio")("ab", "abcd") == 0.5
    finally:
        del m.METRICS["_test_len_ratio"]
    with pytest.raises(InvalidArgument, match="unknown metric 'nope'.*rouge_l"):
        m.get_metric("nope")


def test_tokens_split_cjk_per_character_and_words_lowercased():
    assert m.tokens("Hello, World! 你好，世界 abc123") == ["hello", "world", "你", "好", "世", "界", "abc123"]


def test_exact_match_options():
    assert m.exact_match("  Paris. ", "paris") == 1.0
    assert m.exact_match("Paris", "paris", ignore_case=False) == 0.0
    assert m.exact_match("Paris.", "Paris", ignore_punct=False) == 0.0
    assert m.exact_match("New   York", "new york") == 1.0
    assert m.exact_match("New   York", "New York", collapse_ws=False) == 0.0
    assert m.exact_match("商业电台。", "商业 电台") == 1.0  # spaces between CJK characters mean nothing
    assert m.exact_match("Paris", "London") == 0.0
    assert m.METRICS["exact_match_strict"]("Paris.", "Paris") == 0.0


def test_char_f1_chinese():
    # pred 在商业电台光明顶 (8 chars), ref 商业电台光明顶 (7), common 7: P=7/8, R=1, F1=14/15
    assert m.char_f1("在商业电台光明顶", "商业电台光明顶") == pytest.approx(14 / 15)
    assert m.char_f1("篮球。", "篮球") == 1.0
    assert m.char_f1("足球", "篮球") == pytest.approx(0.5)  # 球 shared: P=R=1/2
    assert m.char_f1("", "") == 1.0 and m.char_f1("", "篮球") == 0.0


def test_token_f1_is_squad_f1():
    # articles dropped: pred {cinnamon, roll, is, best}, ref {cinnamon, roll}: P=2/4, R=1, F1=2/3
    assert m.token_f1("The cinnamon roll is best", "the cinnamon roll") == pytest.approx(2 / 3)
    assert m.token_f1("8 am", "8 AM.") == 1.0
    assert m.token_f1("x x y", "x y y") == pytest.approx(2 / 3)  # multiset: common {x, y}: P=R=2/3
    assert m.token_f1("nine", "ten") == 0.0


def test_lcs_bit_parallel_matches_textbook_dp():
    rng = random.Random(7)
    for _ in range(500):
        a = [rng.choice("abcde") for _ in range(rng.randint(0, 40))]
        b = [rng.choice("abcde") for _ in range(rng.randint(0, 40))]
        assert m.lcs_length(a, b) == m.lcs_length_reference(a, b)
    assert m.lcs_length_reference("ABCBDAB", "BDCABA") == 4  # CLRS example


def test_rouge_l_word_and_char_level():
    # ref "the cat sat on the mat" (6 words), pred "the cat on the mat" (5): LCS 5, P=1, R=5/6, F=10/11
    assert m.rouge_l("the cat on the mat", "the cat sat on the mat") == pytest.approx(10 / 11)
    # char level: ref 今天天气很好 (6), pred 天气很好 (4): LCS 4, P=1, R=2/3, F=0.8
    assert m.rouge_l("天气很好", "今天天气很好。") == pytest.approx(0.8)
    assert m.rouge_l("good day", "day good") == pytest.approx(0.5)  # order matters: LCS 1
    assert m.rouge_l("", "") == 1.0 and m.rouge_l("x", "") == 0.0


def test_parse_choice_and_choice_accuracy():
    assert m.parse_choice("Answer: (B)") == "B"
    assert m.parse_choice("C. Paris is the capital") == "C"
    assert m.parse_choice("答案是D。") == "D"
    assert m.parse_choice("a cat sat") is None  # lower-case "a" is an article, not choice A
    assert m.parse_choice("I think C is right") == "C"  # "I" is never a choice
    assert m.choice_accuracy("The answer is B", "B") == 1.0
    assert m.choice_accuracy("The answer is A", "B") == 0.0


def test_field_f1_key_value_lines_with_multiple_values():
    target = "日期与时间：12月30日，30日\n地点：台湾，南非\n人名：钱其琛\n机构名：无"
    # pred has 3 of 5 target pairs plus 1 wrong one: P=3/4, R=3/5, F1=2/3
    pred = "日期与时间：12月30日\n地点：南非，北京\n人名：钱其琛\n机构名：无"
    assert m.field_f1(pred, target) == pytest.approx(2 / 3)
    assert m.field_f1(target, target) == 1.0


def test_field_f1_json_events_and_relation_triples():
    ev = '[{"事件名": "乘机提醒", "属性": {"航班": "YZ1234", "出发地": "北京"}}]'
    pred = '```json\n[{"事件名": "乘机提醒", "属性": {"航班": "yz1234", "出发地": "上海"}}]\n```'
    assert m.field_f1(pred, ev) == pytest.approx(2 / 3)  # 2 of 3 pairs on both sides
    triples = '[["小华", "摄影", "兴趣爱好"], ["李明", "烹饪", "兴趣爱好"]]'
    assert m.field_f1('[["李明", "烹饪", "兴趣爱好"]]', triples) == pytest.approx(2 / 3)  # P=1, R=1/2
    # a whole triple is one fact: the right entities under the wrong relation earn nothing
    assert m.field_f1('[["小华", "摄影", "职业"]]', '[["小华", "摄影", "兴趣爱好"]]') == 0.0
    # null and [] both mean "not mentioned"
    tgt = '{"date": "Friday", "time": null, "people": ["Anna", "Ben"], "place": null}'
    assert (
        m.field_f1('{"date": "friday", "people": ["Ben", "Anna"], "place": null, "time": null}', tgt) == 1.0
    )
    assert m.field_f1("no json here", tgt) == 0.0


def test_kendall_tau_b_against_independent_formula():
    # no ties: tau = (C - D) / (n(n-1)/2)
    rng = random.Random(3)
    for n in range(2, 7):
        for _ in range(20):
            x, y = list(range(n)), rng.sample(range(n), n)
            c = d = 0
            for i, j in itertools.combinations(range(n), 2):
                s = (x[i] - x[j]) * (y[i] - y[j])
                c, d = c + (s > 0), d + (s < 0)
            assert m.kendall_tau_b(x, y) == pytest.approx((c - d) / (n * (n - 1) / 2))
    # with ties, a value computed by hand: x=[1,2,3,4], y=[1,1,2,3]: C=5, D=0, tie in y only: 1
    # tau-b = 5 / sqrt((5+0+0)*(5+0+1)) = 5/sqrt(30)
    assert m.kendall_tau_b([1, 2, 3, 4], [1, 1, 2, 3]) == pytest.approx(5 / 30**0.5)
    assert m.kendall_tau_b([1, 1], [1, 2]) == 0.0  # undefined -> 0


def test_kendall_tau_rankings():
    assert m.kendall_tau(["a", "b", "c"], ["a", "b", "c"]) == 1.0
    assert m.kendall_tau(["c", "b", "a"], ["a", "b", "c"]) == -1.0
    assert m.kendall_tau([], ["a", "b", "c"]) == 0.0
    # only "a" found: a first, b and c tied last; concordant pairs (a,b), (a,c), tie in pred for (b,c)
    assert m.kendall_tau(["a"], ["a", "b", "c"]) == pytest.approx(2 / (3 * 2) ** 0.5)


NOTIFS = (
    "2024.02.05-14:35\n李明发来的微信消息：[语音通话]\n\n"
    "2024.02.05-14:28\n低电量提醒：您的手机电量仅剩10%，请及时充电。\n\n"
    "2024.02.05-14:25\n美团外卖：餐厅正在准备您的餐品，预计14:40送达。\n\n"
    "2024.02.05-14:30\n银行卡消费提醒：您的银行卡支出12.5元，余额1024元。"
)


def test_ranking_parser_on_smartbench_shape():
    items = m.ranking_items(NOTIFS)
    assert len(items) == 4
    assert m.kendall_tau_text(NOTIFS, NOTIFS) == 1.0
    blocks = NOTIFS.split("\n\n")
    assert m.kendall_tau_text("\n\n".join(reversed(blocks)), NOTIFS) == -1.0
    # a model that drops the timestamps and numbers the messages is still understood
    no_ts = "\n".join(f"{i}. {b.splitlines()[1]}" for i, b in enumerate(blocks, 1))
    assert m.kendall_tau_text(no_ts, NOTIFS) == 1.0
    # timestamps with different spacing ("2024.02.05 - 14:28") still match
    swapped = "\n\n".join([blocks[1].replace("-", " - ", 1), blocks[0], blocks[2], blocks[3]])
    assert m.parse_ranking(swapped, items) == [1, 0, 2, 3]
    # one adjacent swap of 4: C=5, D=1 -> tau = 4/6
    assert m.kendall_tau_text(swapped, NOTIFS) == pytest.approx(4 / 6)
    assert m.kendall_tau_text("我不知道", NOTIFS) == 0.0


def test_ranking_items_other_shapes():
    assert m.ranking_items('["x", "y"]') == ["x", "y"]
    assert m.ranking_items("1. call mum\n2. pay rent\n3. gym") == ["call mum", "pay rent", "gym"]
    assert m.kendall_tau_text(
        "gym, then call mum, then pay rent", "1. call mum\n2. pay rent\n3. gym"
    ) == pytest.approx(-1 / 3)  # order (2, 0, 1) vs (0, 1, 2): C=1, D=2


def test_function_call_metric():
    tgt = '{"name": "send_message", "arguments": {"contact": "Mum", "text": "happy birthday!"}}'
    assert (
        m.function_call(
            'Sure!\n```json\n{"name": "send_message", "arguments": {"contact": "mum", "text": "Happy birthday"}}\n```',
            tgt,
        )
        == 1.0
    )
    assert m.function_call('{"name": "call", "arguments": {"contact": "Mum"}}', tgt) == 0.0
    assert (
        m.function_call(
            '{"name": "send_message", "arguments": {"contact": "Dad", "text": "happy birthday"}}', tgt
        )
        == 0.0
    )
    assert m.function_call('{"name": "send_message", "arguments": {"contact": "Mum"}}', tgt) == 0.0
    assert m.function_call("I would send a message", tgt) == 0.0
    # OpenAI style: arguments as a JSON string; numbers and booleans compared by value
    assert (
        m.function_call(
            '{"function": {"name": "set_volume", "arguments": "{\\"level\\": \\"40\\"}"}}',
            '{"name": "set_volume", "arguments": {"level": 40}}',
        )
        == 1.0
    )
    assert (
        m.function_call(
            '{"tool": "toggle", "parameters": {"setting": "wifi", "on": "false"}}',
            '{"name": "toggle", "arguments": {"setting": "wifi", "on": false}}',
        )
        == 1.0
    )
    with pytest.raises(InvalidArgument):
        m.function_call("{}", "not a call")


def test_correction_em_uses_corrected_sentence():
    tgt = "纠正后文本：让农民工流血、流汗不再流泪\n纠正内容：“在”纠正为“再”"
    assert m.correction_em("纠正后文本：让农民工流血、流汗不再流泪\n纠正内容：在改为再", tgt) == 1.0
    assert m.correction_em("纠正后文本：让农民工流血、流汗不在流泪\n纠正内容：无", tgt) == 0.0
    # the unchanged sentence is nearly identical by characters, which is why char F1 is not primary
    assert m.char_f1("纠正后文本：让农民工流血、流汗不在流泪\n纠正内容：无", tgt) > 0.8
