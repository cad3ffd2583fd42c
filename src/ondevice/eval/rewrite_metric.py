"""``rewrite_check``: a deterministic score for message rewrites (the ``rewrite`` suite).

In the spirit of MessageRewriteEval ("Towards an On-device Agent for Text Rewriting"), a rewrite is good
when it reads like the reference *and* obeys the instruction. The target is a JSON object::

    {"reference": "Could you please send me the slides?", "keep": ["slides"], "avoid": ["hey"], "max_words": 12}

and the score is ``0.5 * ROUGE-L(prediction, reference) + 0.5 * share of checks passed``, where the checks
are: each ``keep`` term is present (the key facts survive: names, times, objects), each ``avoid`` term is
absent (the tone changed: no "gonna" in a formal rewrite), and the word count is at most ``max_words``
when given. With no checks the score is ROUGE-L alone. Matching is case-insensitive on whole words
(``keep`` terms may be followed by more letters or digits: "10" matches "10am").
"""

from __future__ import annotations

import json
import re

from ..errors import InvalidArgument
from .metrics import METRICS, metric, rouge_l


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", text.replace("\u2019", "'").replace("\u2018", "'").lower()).strip()


def _has(text: str, term: str, whole: bool) -> bool:
    t = re.escape(_norm(term).strip())
    return re.search(rf"(?<!\w){t}" + (r"(?!\w)" if whole else ""), text) is not None


def parse_target(target: str) -> dict:
    try:
        d = json.loads(target)
    except json.JSONDecodeError:
        d = None
    if not isinstance(d, dict) or not isinstance(d.get("reference"), str):
        raise InvalidArgument('a rewrite_check target must be a JSON object with a "reference" string (and '
                              'optional "keep", "avoid" lists and "max_words"); JSON-encode it into "target"')
    return d


def checks(prediction: str, spec: dict) -> list[bool]:
    """One boolean per check of ``spec`` (keep terms, avoid terms, word limit)."""
    text = _norm(prediction)
    out = [_has(text, k, whole=False) for k in spec.get("keep", [])]
    out += [not _has(text, a, whole=True) for a in spec.get("avoid", [])]
    if spec.get("max_words"):
        out.append(0 < len(prediction.split()) <= int(spec["max_words"]))
    return out


if "rewrite_check" not in METRICS:  # importing twice (reload, tests) must not re-register

    @metric("rewrite_check")
    def rewrite_check(prediction: str, target: str) -> float:
        """0.5 ROUGE-L against the reference + 0.5 share of the instruction's checks passed (see module doc)."""
        spec = parse_target(target)
        pred = prediction.strip().strip('"').strip()
        r = rouge_l(pred, spec["reference"])
        passed = checks(pred, spec)
        return r if not passed else 0.5 * r + 0.5 * sum(passed) / len(passed)
