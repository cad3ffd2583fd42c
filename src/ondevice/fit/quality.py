"""``ondevice fit --quality ppl|SUITE``: what the validated candidates are worth besides their KLD.

KLD says how far a variant's next-token distribution is from the reference's; a user may rather judge by
perplexity or by a task. ``ppl``: the held-out perplexity of each candidate and of the reference, from the
very eval that measures the held-out KLD (no extra run). ``SUITE``: an ``ondevice eval`` suite (a built-in
name or a JSONL path) run greedily on each validated candidate and on the reference, on ``limit`` items (a
stratified subset, so it stays affordable on a small CPU); its score is printed beside the KLD and speed,
stored in the provenance, and may be bounded by ``--budget score>=X`` (or ``score>=0.9x``: 0.9 times the
reference's score). A score is never predicted, so it bounds the validated candidates only.
"""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from ..errors import InvalidArgument
from .budget import Budget
from .measure import Cache, Meter, fit_dir, quality_section


@dataclass(frozen=True)
class Quality:
    kind: str | None = None  # None (KLD only), "ppl" or "suite"
    suite: str | None = None  # the suite's name or JSONL path
    limit: int | None = None  # items of the suite (None: all)
    seed: int = 0  # the stratified subset's seed (eval's default)

    def describe(self) -> str:
        if self.kind == "suite":
            return f"suite {self.suite}" + (f" ({self.limit} items)" if self.limit else " (all items)")
        return self.kind or "KLD only"

    def header(self) -> str:
        return {"ppl": f" {'ppl held':>9}", "suite": f" {'score':>6}"}.get(self.kind or "", "")

    def cell(self, m: dict) -> str:
        if self.kind == "ppl":
            return f" {m['ppl']:9.3f}"
        if self.kind == "suite":  # None: no item of the subset fitted the context window
            return f" {m['score']:6.3f}" if m.get("score") is not None else f" {'-':>6}"
        return ""

    def to_dict(self) -> dict:
        return {"kind": self.kind, "suite": self.suite, "limit": self.limit, "seed": self.seed}


def parse_quality(quality: str | None, limit: int | None, budget: Budget) -> Quality:
    """``--quality``/``--quality-limit`` checked before anything runs (an unknown suite: the eval's one-line
    error, listing the suites)."""
    if limit is not None and limit < 1:
        raise InvalidArgument(f"--quality-limit {limit} must be >= 1 (items of the suite)")
    q = (quality or "").strip()
    if not q or q.lower() == "kld":
        out = Quality()
    elif q.lower() == "ppl":
        out = Quality("ppl")
    else:
        from ..eval.suites import load_suite

        load_suite(q, limit=limit)
        out = Quality("suite", q, limit)
    if (budget.score is not None or budget.score_rel is not None) and out.kind != "suite":
        raise InvalidArgument("--budget score>=... bounds a suite's score: pass --quality SUITE too "
                              "(e.g. --quality smartbench --quality-limit 20)")
    return out


def measure(q: Quality, meter: Meter, picks, results: list[dict], files: list[Path], reference, ref_sha: str,
            held_q) -> dict:
    """Put each candidate's ``ppl`` or ``score`` into its ``measured``; returns the reference's figures."""
    if q.kind == "ppl":
        ref_ppl = None
        for c, r in zip(picks, results):
            held = r["kld"][1]
            c.measured.update(ppl=held["ppl"], ppl_err=held.get("ppl_err"))
            ref_ppl = ref_ppl or held.get("ppl_ref")
        if ref_ppl is None:  # held-out measurements cached before the eval's record was read for it
            cache, text, ctx, chunks = held_q
            ref_ppl = meter.kld(cache, "reference", Path(reference.path), text, ctx, chunks)["ppl"]
        return {"ppl": ref_ppl}
    if q.kind != "suite":
        return {}
    path = Path(q.suite)
    ident = f"suite:{q.suite}" if not path.is_file() else f"suite-file:{hashlib.sha256(path.read_bytes()).hexdigest()}"
    cache = Cache(fit_dir() / "kld.json", quality_section(ref_sha, ident, q.limit or 0, q.seed))
    jobs = [("reference", Path(reference.path))] + [(_file_key(f), f) for f in files]
    with ThreadPoolExecutor(max(1, meter.jobs)) as ex:
        got = list(ex.map(lambda kf: meter.score(cache, kf[0], kf[1], q.suite, q.limit), jobs))
    for c, s in zip(picks, got[1:]):
        c.measured.update(score=s["score"], score_items=s.get("n_items"))
    return {"score": got[0]["score"], "n_items": got[0].get("n_items")}


def _file_key(path: Path) -> str:
    """A candidate's cache key: its file's sha256 (a plan and its imatrix make the same file every time)."""
    from ..models.store import cached_sha256

    return "sha256:" + cached_sha256(path)
