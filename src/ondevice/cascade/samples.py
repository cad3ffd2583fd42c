"""Hard samples: deferred inputs with the cloud's answers, exported as chat fine-tuning data.

One JSON object a line, ``{"messages": [...the input..., {"role": "assistant", "content": cloud answer}]}``,
the format most fine-tuning tools read (and ``ondevice adapt`` will): the device model can later learn from
exactly the inputs it was unsure of ("Cloud-device collaborative adaptation").
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def training_rows(samples: list[dict]) -> list[dict]:
    """Chat rows of the samples whose cloud answer has text and ended (a store kept before empty cloud replies
    were refused as ``bad_reply``, or before answers cut off by max_tokens were left out, may hold some: a model
    must not learn to answer nothing, nor to stop mid-sentence). Tool calls' arguments are JSON text, as OpenAI's
    fine-tuning format wants (a store kept before that was so may hold them parsed)."""
    from .cloud import wire_messages
    from .core import CUT_SHORT

    return [{"messages": [*wire_messages(s["messages"]), {"role": "assistant", "content": s["cloud_answer"]}]}
            for s in samples
            if (s["cloud_answer"] or "").strip() and (s.get("extra") or {}).get("finish_reason") not in CUT_SHORT]


def export_hard_samples(out: str | Path | None = None, *, store: str | Path | None = None,
                        since: float | None = None, device_sha256: str | None = None) -> int:
    """Write the kept hard samples as JSONL to ``out`` (atomically; None: stdout); the number written. With none,
    nothing is written: a file already at ``out`` (an earlier export) is not replaced by an empty one."""
    from ..models.store import atomic_write
    from ..store import Store

    with Store(store, create=store is None) as db:  # a --db that names no store is a typo, not a new store
        rows = training_rows(db.hard_samples(since=since, device_sha256=device_sha256))
    if not rows:
        return 0
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    if out is None or str(out) == "-":
        sys.stdout.write(text)
    else:
        with atomic_write(out, "w", encoding="utf-8") as f:
            f.write(text)
    return len(rows)
