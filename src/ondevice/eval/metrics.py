"""Deterministic text metrics for eval suites, in plain Python.

Every metric takes ``(prediction, target)`` and returns a float, 1.0 being a perfect answer (Kendall's tau
is the one metric that can go below 0). Adding a metric is adding a function decorated with ``@metric``::

    @metric("my_metric")
    def my_metric(prediction: str, target: str) -> float: ...

Tokenisation is shared (``tokens``): each CJK character is one token and each run of letters/digits is
one lower-cased token, so the same metric works for Chinese, English and mixed text. Punctuation and
whitespace never count. ROUGE-L is the LCS F1 of Lin (2004); the F1 metrics follow SQuAD's bag-of-tokens
definition.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections import Counter
from collections.abc import Callable, Hashable, Sequence
from typing import Any

from ondevice.errors import InvalidArgument

Metric = Callable[[str, str], float]
METRICS: dict[str, Metric] = {}


def metric(name: str) -> Callable[[Metric], Metric]:
    """Register ``fn`` in ``METRICS`` under ``name``."""

    def register(fn: Metric) -> Metric:
        if name in METRICS:
            raise ValueError(f"metric {name!r} is already registered")
        METRICS[name] = fn
        return fn

    return register


def get_metric(name: str) -> Metric:
    """The metric called ``name``; an error listing the known ones otherwise."""
    try:
        return METRICS[name]
    except KeyError:
        raise InvalidArgument(f"unknown metric {name!r}; use one of: {', '.join(sorted(METRICS))}") from None


# --- tokenisation and normalisation -------------------------------------------------------------------

# CJK ideographs, kana and hangul: languages written without spaces, scored per character.
_CJK = (
    r"\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af"
    r"\U00020000-\U0002a6df\U0002a700-\U0002ebef"
)
_TOKEN = re.compile(rf"[{_CJK}]|[^\W_{_CJK}]+", re.UNICODE)


def tokens(text: str) -> list[str]:
    """CJK characters one by one, other words lower-cased; punctuation and spaces dropped."""
    return [t.casefold() for t in _TOKEN.findall(unicodedata.normalize("NFKC", text))]


def _is_punct(ch: str) -> bool:
    return unicodedata.category(ch)[0] in "PS"


def normalize(
    text: str, *, ignore_case: bool = True, ignore_punct: bool = True, collapse_ws: bool = True
) -> str:
    """NFKC-normalise, then optionally fold case, drop punctuation/symbols and collapse whitespace."""
    text = unicodedata.normalize("NFKC", text)
    if ignore_case:
        text = text.casefold()
    if ignore_punct:
        # Punctuation becomes a space so "a,b" does not turn into the word "ab".
        text = "".join(" " if _is_punct(c) else c for c in text)
    if collapse_ws:
        text = " ".join(text.split())
        # Spaces next to CJK characters carry no meaning ("我 爱 你" == "我爱你").
        text = re.sub(rf"(?<=[{_CJK}]) | (?=[{_CJK}])", "", text)
    return text


def _f1(pred: Counter, ref: Counter) -> float:
    """Multiset F1; two empty bags agree perfectly, one empty bag scores 0."""
    if not pred and not ref:
        return 1.0
    common = sum((pred & ref).values())
    if common == 0:
        return 0.0
    p, r = common / sum(pred.values()), common / sum(ref.values())
    return 2 * p * r / (p + r)


# --- string metrics ----------------------------------------------------------------------------------


def exact_match(
    prediction: str,
    target: str,
    *,
    ignore_case: bool = True,
    ignore_punct: bool = True,
    collapse_ws: bool = True,
) -> float:
    """1.0 when the normalised strings are equal (see ``normalize`` for the options)."""
    opts = {"ignore_case": ignore_case, "ignore_punct": ignore_punct, "collapse_ws": collapse_ws}
    return float(normalize(prediction, **opts) == normalize(target, **opts))


metric("exact_match")(exact_match)


@metric("exact_match_strict")
def exact_match_strict(prediction: str, target: str) -> float:
    """Equality after stripping outer whitespace only (case and punctuation matter)."""
    return float(prediction.strip() == target.strip())


@metric("char_f1")
def char_f1(prediction: str, target: str) -> float:
    """F1 over the multiset of characters, ignoring whitespace and punctuation (the CMRC/DuReader F1)."""

    def chars(s: str) -> Counter:
        return Counter(c for c in normalize(s).replace(" ", ""))

    return _f1(chars(prediction), chars(target))


_ARTICLES = {"a", "an", "the"}


@metric("token_f1")
def token_f1(prediction: str, target: str) -> float:
    """SQuAD F1 over the multiset of words, articles dropped (CJK characters count as words)."""

    def bag(s: str) -> Counter:
        return Counter(t for t in tokens(s) if t not in _ARTICLES)

    return _f1(bag(prediction), bag(target))


def lcs_length_reference(a: Sequence[Hashable], b: Sequence[Hashable]) -> int:
    """Longest common subsequence by the textbook O(len(a)*len(b)) dynamic programme."""
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def lcs_length(a: Sequence[Hashable], b: Sequence[Hashable]) -> int:
    """Longest common subsequence, bit-parallel (Hyyrö 2004): one big-int step per element of ``b``.

    Bit i of ``v`` is 0 where the LCS row gains a match at ``a[i]``; tested against the DP reference.
    """
    if not a or not b:
        return 0
    masks: dict[Hashable, int] = {}
    for i, x in enumerate(a):
        masks[x] = masks.get(x, 0) | (1 << i)
    full = (1 << len(a)) - 1
    v = full
    for y in b:
        u = v & masks.get(y, 0)
        v = ((v + u) | (v - u)) & full
    return len(a) - v.bit_count()


def rouge_l_tokens(pred: Sequence[Hashable], ref: Sequence[Hashable]) -> float:
    """ROUGE-L F1 (beta=1, as rouge-score reports) of two token sequences."""
    if not pred and not ref:
        return 1.0
    lcs = lcs_length(ref, pred)
    if lcs == 0:
        return 0.0
    p, r = lcs / len(pred), lcs / len(ref)
    return 2 * p * r / (p + r)


@metric("rouge_l")
def rouge_l(prediction: str, target: str) -> float:
    """ROUGE-L F1: character level for Chinese, word level for English (see ``tokens``)."""
    return rouge_l_tokens(tokens(prediction), tokens(target))


# --- choices -----------------------------------------------------------------------------------------

# Letters are upper-case only (A-H: "I" is too often the pronoun) so "a cat" is not choice A.
_CHOICE = re.compile(
    r"(?i:answer|option|choice|答案|选项)\s*(?i:is|是|为)?\s*[:：]?\s*\(?([A-H])(?![A-Za-z])"
    r"|^\s*\(?([A-H])[\).:：]?(?:\s|$)"  # "B) ..." / "B." at the start of a line
    r"|\(([A-H])\)",  # "(B)" anywhere
    re.MULTILINE,
)


def parse_choice(text: str) -> str | None:
    """The first choice letter a model's answer commits to ("Answer: B", "(b)", "C. Paris"), or None."""
    m = _CHOICE.search(text)
    if m:
        return next(g for g in m.groups() if g).upper()
    bare = re.findall(r"(?<![A-Za-z])([A-H])(?![A-Za-z])", text)
    return bare[0].upper() if len(bare) == 1 else None


@metric("choice_accuracy")
def choice_accuracy(prediction: str, target: str) -> float:
    """1.0 when the choice letter parsed from the prediction equals the target letter."""
    want = parse_choice(target) or target.strip().upper()
    return float(parse_choice(prediction) == want)


# --- structured outputs ------------------------------------------------------------------------------


def first_json(text: str, kinds: tuple[type, ...] = (dict, list)) -> Any | None:
    """The first JSON value of one of ``kinds`` embedded in ``text`` (code fences and chatter ignored)."""
    decoder = json.JSONDecoder()
    for m in re.finditer(r"[\[{]", text):
        try:
            value, _ = decoder.raw_decode(text, m.start())
        except json.JSONDecodeError:
            continue
        if isinstance(value, kinds):
            return value
    return None


_EMPTY = {"", "无", "none", "null", "n/a", "na", "-", "nil", "没有"}
_VALUE_SEP = re.compile(r"[,，、;；]")
_KV_LINE = re.compile(r"^\s*(?:[-*•]\s*|\d+[.)、]\s*)?([^:：]{1,40}?)\s*[:：]\s*(.*?)\s*$")


def _norm_value(v: Any) -> str:
    return normalize(str(v)).replace(" ", "") if not isinstance(v, str) else normalize(v)


def _norm_key(k: str) -> str:
    return normalize(k, ignore_punct=False).strip(" \"'*#")


def _json_pairs(value: Any, path: str = "", in_list: bool = False) -> list[tuple[str, str]]:
    """Flatten JSON into (path, value) pairs; list order is ignored.

    A list of scalars inside a list (a relation triple like ``["A", "B", "father"]``) is one fact.
    """
    if isinstance(value, dict):
        out: list[tuple[str, str]] = []
        for k, v in value.items():
            out += _json_pairs(v, f"{path}.{_norm_key(str(k))}" if path else _norm_key(str(k)))
        return out
    if isinstance(value, list):
        if in_list and value and all(not isinstance(x, (dict, list)) for x in value):
            return [(path, "|".join(_norm_value(x) for x in value))]
        return [p for x in value for p in _json_pairs(x, path, in_list=True)]
    text = _norm_value(value)
    return [] if text in _EMPTY else [(path, text)]


def parse_fields(text: str) -> Counter:
    """Fields of an extraction answer as a multiset of (field, value) pairs.

    JSON first (objects are flattened to dotted paths, lists of triples become one pair per triple); else
    ``key: v1, v2`` lines, one pair per comma-separated value. Empty values ("无", "none", "") are dropped.
    """
    data = first_json(text)
    if data is not None:
        return Counter(_json_pairs(data))
    pairs: Counter = Counter()
    for line in text.splitlines():
        m = _KV_LINE.match(line)
        if not m:
            continue
        key = _norm_key(m.group(1))
        for v in _VALUE_SEP.split(m.group(2)):
            v = _norm_value(v)
            if v not in _EMPTY:
                pairs[(key, v)] += 1
    return pairs


@metric("field_f1")
def field_f1(prediction: str, target: str) -> float:
    """F1 over (field, value) pairs parsed from JSON or ``key: value`` lines (see ``parse_fields``)."""
    return _f1(parse_fields(prediction), parse_fields(target))


_CALL_NAME_KEYS = ("name", "function", "tool", "function_name", "tool_name")
_CALL_ARG_KEYS = ("arguments", "args", "parameters", "params", "input")


def parse_call(text: str) -> tuple[str, dict[str, Any]] | None:
    """(name, arguments) of the first JSON function call in ``text``; None when there is none.

    Accepts ``{"name": ..., "arguments": {...}}`` and the usual variants (``function``/``tool``,
    ``args``/``parameters``, OpenAI's arguments-as-a-JSON-string, ``{"function": {"name":..}}``).
    """
    obj = first_json(text, (dict,))
    if obj is None:
        return None
    for key in ("function_call", "tool_call", "call"):
        if isinstance(obj.get(key), dict):
            obj = obj[key]
    if isinstance(obj.get("function"), dict):
        obj = obj["function"]
    name = next((obj[k] for k in _CALL_NAME_KEYS if isinstance(obj.get(k), str)), None)
    if name is None:
        return None
    args: Any = next((obj[k] for k in _CALL_ARG_KEYS if k in obj), {})
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError:
            return None
    if not isinstance(args, dict):
        return None
    return name, args


def _canon(value: Any) -> Any:
    """Argument values compared loosely: case/space/outer-punctuation-folded strings, numbers by value,
    "5" == 5, "true" == True."""
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        # Outer punctuation and quotes are style ("happy birthday!" == "Happy birthday").
        s = " ".join(value.casefold().split()).strip(".,!?;:'\"“”‘’ ")
        try:
            return float(s)
        except ValueError:
            return {"true": True, "false": False}.get(s, s)
    if isinstance(value, dict):
        return {k.casefold(): _canon(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_canon(v) for v in value]
    return value


@metric("function_call")
def function_call(prediction: str, target: str) -> float:
    """1.0 when the first JSON call in the prediction has the target's name and arguments (normalised)."""
    want, got = parse_call(target), parse_call(prediction)
    if want is None:
        raise InvalidArgument(f"function_call target is not a JSON call: {target[:80]!r}")
    if got is None:
        return 0.0
    return float(
        got[0].strip().casefold() == want[0].strip().casefold() and _canon(got[1]) == _canon(want[1])
    )


# --- rankings ----------------------------------------------------------------------------------------


def kendall_tau_b(x: Sequence[float], y: Sequence[float]) -> float:
    """Kendall's tau-b of two paired score lists (ties in either list handled); 0.0 when undefined.

    O(n^2) pair counting: rankings here have a handful of items.
    """
    if len(x) != len(y):
        raise ValueError(f"kendall_tau_b needs paired lists, got {len(x)} and {len(y)} items")
    concordant = discordant = ties_x = ties_y = 0
    n = len(x)
    for i in range(n):
        for j in range(i + 1, n):
            dx, dy = x[i] - x[j], y[i] - y[j]
            if dx == 0 and dy == 0:
                continue
            if dx == 0:
                ties_x += 1
            elif dy == 0:
                ties_y += 1
            elif (dx > 0) == (dy > 0):
                concordant += 1
            else:
                discordant += 1
    denom = ((concordant + discordant + ties_x) * (concordant + discordant + ties_y)) ** 0.5
    return (concordant - discordant) / denom if denom else 0.0


def kendall_tau(predicted: Sequence[Hashable], reference: Sequence[Hashable]) -> float:
    """Tau-b between two rankings given as lists of item ids, best first.

    Only the reference's items count; those missing from ``predicted`` tie for last place, so an empty
    or unparseable answer scores 0.0 (no information) and a reversed one -1.0.
    """
    pos = {item: i for i, item in reversed(list(enumerate(predicted)))}
    last = len(predicted)
    ref_rank = list(range(len(reference)))
    pred_rank = [pos.get(item, last) for item in reference]
    return kendall_tau_b(ref_rank, pred_rank)


_TIMESTAMP_LINE = re.compile(r"^\s*\d{2,4}[./-]\d{1,2}[./-]\d{1,2}\s*-?\s*\d{1,2}:\d{2}\s*$")
_ENUM = re.compile(r"^\s*(?:\d+[.)、:：]|[-*•])\s*")


def ranking_items(text: str) -> list[str]:
    """The items of a reference ranking, best first.

    A JSON list; else blocks separated by blank lines (SmartBench notifications: a timestamp line and a
    message line); else one item per non-empty line, with list markers ("1.", "-") removed.
    """
    data = first_json(text, (list,))
    if data is not None and all(isinstance(x, (str, int, float)) for x in data):
        return [str(x).strip() for x in data]
    blocks = [b.strip() for b in re.split(r"\n\s*\n", text.strip()) if b.strip()]
    if len(blocks) > 1:
        return blocks
    return [_ENUM.sub("", line).strip() for line in text.splitlines() if line.strip()]


def _squash(s: str) -> str:
    return "".join(normalize(s).split())


def _item_keys(item: str) -> list[str]:
    """Strings that identify ``item`` in a model's answer: its timestamp, its text, the text's head."""
    lines = [line.strip() for line in item.splitlines() if line.strip()]
    keys = [_squash(line) for line in lines]
    body = [line for line in lines if not _TIMESTAMP_LINE.match(line)]
    if body:
        text = _squash(" ".join(body))
        keys += [text, text[:12]]
    return [k for k in keys if len(k) >= 2]


def parse_ranking(text: str, items: Sequence[str]) -> list[int]:
    """Indices of ``items`` in the order ``text`` first mentions them; unmentioned items are left out.

    An item is found by any of its keys (timestamp line, message text, first 12 characters of the
    message) that no other item shares, so a model that drops the timestamps is still understood.
    """
    keys = [_item_keys(it) for it in items]
    counts = Counter(k for ks in keys for k in set(ks))
    hay = _squash(text)
    found: list[tuple[int, int]] = []
    for idx, ks in enumerate(keys):
        hits = [hay.find(k) for k in ks if counts[k] == 1]
        hits = [h for h in hits if h >= 0]
        if hits:
            found.append((min(hits), idx))
    return [idx for _, idx in sorted(found)]


@metric("kendall_tau")
def kendall_tau_text(prediction: str, target: str) -> float:
    """Tau-b between the reference ranking in ``target`` and the order the prediction mentions its items."""
    items = ranking_items(target)
    return kendall_tau(parse_ranking(prediction, items), list(range(len(items))))


@metric("correction_em")
def correction_em(prediction: str, target: str) -> float:
    """Exact match of the corrected sentence (SmartBench "纠正后文本：" line, else the whole answer)."""
    return exact_match(_corrected_text(prediction), _corrected_text(target))


def _corrected_text(text: str) -> str:
    m = re.search(r"纠正后文本\s*[:：]\s*(.*)", text)
    return m.group(1).strip() if m else text.strip()
