"""A generated task the small base model is weak at: a fixed output format (a date in a sentence -> ISO 8601).

Used by the tests and benchmarks/adapt_bench.py to show an adapter teaching a format; generated from a seed so
train and held-out splits are reproducible and disjoint. With ``context_words`` the date sentence sits inside a
longer message (an e-mail of ordinary office sentences without dates or digits), the long-input setting in which training
memory grows with the tokens kept for the backward pass.
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
PROMPT_LONG = "Give the date in this message as YYYY-MM-DD, nothing else.\n"
FILLER = [  # written for ondevice: no dates, digits or month names, so the message holds exactly one date
    "Thanks again for sending the notes from last week.", "I have copied the rest of the team on this thread.",
    "Please let me know if anything in the agenda should change.", "The room on the second floor is booked for us.",
    "We still need someone to take the minutes.", "Coffee and sandwiches will be provided as usual.",
    "If you cannot attend, send a short summary of your progress instead.",
    "The slides from the previous session are in the shared folder.", "Parking is free in the evening.",
    "Remember to bring your badge, since reception has changed its rules.",
    "The budget questions will be handled by the finance team separately.",
    "I will send the dial-in details to the people joining remotely.",
    "Our manager asked us to keep the discussion short and focused.",
    "The draft report needs one more round of review before it goes out.",
    "Several customers asked about the new pricing, so expect questions.",
    "The printer near the kitchen is broken again, so print your copies early.",
    "Let us agree on the main goals before we discuss the details.",
    "Feel free to forward this message to anyone who should be there.",
    "The catering company needs the final number of guests soon.",
    "Travel requests must be approved by your team lead first.",
    "There is construction work at the main entrance, so use the side door.",
    "We will also celebrate the end of a very busy quarter.",
    "Bring any open questions about the migration to the new system.",
    "The legal team has reviewed the contract and had only small comments.",
]


def iso_dates(n: int, seed: int, context_words: int = 0) -> list[dict]:
    """``n`` examples ``{"input", "target"}``: a sentence with a date written out, and the date as YYYY-MM-DD.
    With ``context_words`` > 0 the sentence is placed among filler sentences of at least that many words."""
    if context_words < 0:
        raise ValueError("context_words must be >= 0")
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        y, mo, d = rng.randint(1990, 2035), rng.randint(1, 12), rng.randint(1, 28)
        style = rng.randrange(3)
        when = (f"{MONTHS[mo - 1]} {d}, {y}" if style == 0 else f"{d} {MONTHS[mo - 1]} {y}" if style == 1
                else f"the {d}{_suffix(d)} of {MONTHS[mo - 1]} {y}")
        sentence = f"{rng.choice(EVENTS)} {rng.choice(VERBS)} {when}."
        if context_words:
            sentence, prompt = _message(rng, sentence, context_words), PROMPT_LONG
        else:
            prompt = PROMPT
        out.append({"input": prompt + sentence, "target": f"{y:04d}-{mo:02d}-{d:02d}"})
    return out


def _message(rng: random.Random, sentence: str, words: int) -> str:
    """``sentence`` at a random place among filler sentences (drawn without repeats while they last) of at least
    ``words`` words."""
    filler: list[str] = []
    pool: list[str] = []
    while sum(len(f.split()) for f in filler) < words:
        if not pool:
            pool = rng.sample(FILLER, len(FILLER))
        filler.append(pool.pop())
    filler.insert(rng.randrange(len(filler) + 1), sentence)
    return "Hi all,\n" + " ".join(filler) + "\nBest regards,\nSam"


def _suffix(d: int) -> str:
    return "th" if 10 <= d % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(d % 10, "th")


def write_jsonl(rows: list[dict], path: str | Path) -> Path:
    p = Path(path)
    p.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return p
