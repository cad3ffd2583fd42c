"""A generated task the small base model is weak at: a fixed output format (a date in a sentence -> ISO 8601).

Used by the tests and benchmarks/adapt_bench.py to show an adapter teaching a format; generated from a seed so
train and held-out splits are reproducible and disjoint.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
EVENTS = ["The meeting", "Her flight", "The concert", "Our launch", "The exam", "His birthday party", "The audit",
          "The wedding", "The workshop", "The deadline", "The match", "The release", "The interview", "The trip"]
VERBS = ["is on", "was moved to", "takes place on", "is scheduled for", "happens on", "falls on"]
PROMPT = "Give the date in this sentence as YYYY-MM-DD, nothing else.\n"


def iso_dates(n: int, seed: int) -> list[dict]:
    """``n`` examples ``{"input", "target"}``: a sentence with a date written out, and the date as YYYY-MM-DD."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        y, mo, d = rng.randint(1990, 2035), rng.randint(1, 12), rng.randint(1, 28)
        style = rng.randrange(3)
        when = (f"{MONTHS[mo - 1]} {d}, {y}" if style == 0 else f"{d} {MONTHS[mo - 1]} {y}" if style == 1
                else f"the {d}{_suffix(d)} of {MONTHS[mo - 1]} {y}")
        sentence = f"{rng.choice(EVENTS)} {rng.choice(VERBS)} {when}."
        out.append({"input": PROMPT + sentence, "target": f"{y:04d}-{mo:02d}-{d:02d}"})
    return out


def _suffix(d: int) -> str:
    return "th" if 10 <= d % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(d % 10, "th")


def write_jsonl(rows: list[dict], path: str | Path) -> Path:
    p = Path(path)
    p.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return p
