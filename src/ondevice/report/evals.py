"""``ondevice report --eval``: the stored eval records (perplexity, KL divergence, suite scores) as a table, or
exported (``-o csv|json|jsonl|sql``) — what ``ondevice eval`` printed, read back from the store."""

from __future__ import annotations

from datetime import UTC, datetime

from .formats import md_row
from .quality import kld_lower_bound


def _when(r: dict) -> str:
    c = r.get("created") or r.get("_created")
    if isinstance(c, (int, float)):  # records before 2026-12-03 hold time.time()
        return datetime.fromtimestamp(c, UTC).strftime("%Y-%m-%d %H:%M")
    return str(c or "")[:16].replace("T", " ")


def _figure(r: dict) -> str:
    """The headline figure of a record, as `ondevice eval` prints it."""
    test = r.get("test", "")
    if test.startswith("kld:") and r.get("kld_mean") is not None:
        lower = kld_lower_bound(r.get("kld_exact"), r.get("ref_tail_mass_mean"))
        kld = f"KLD {'>= ' if lower else ''}{r['kld_mean']:.6f} ± {r.get('kld_err') or 0:.6f}"
        top1 = f", same top-1 {100 * r['top1_agree']:.2f}%" if r.get("top1_agree") is not None else ""
        return f"{kld}{top1} vs {r.get('ref_model') or '?'}"
    if r.get("ppl") is not None:
        return f"PPL {r['ppl']:.4f} ± {r.get('ppl_err') or 0:.4f}"
    if r.get("score") is not None:
        return f"score {r['score']:.3f} ({r.get('n_scored') or 0} items)"
    return "-"


def eval_markdown(records: list[dict]) -> str:
    """One row per stored eval record, oldest first; kernels: the extra CPU buffer types the model used (they
    move the figures a little; "?": a record from before they were kept)."""
    rows = [md_row(["created (UTC)", "model", "test", "ctx", "kernels", "result"]), md_row(["---"] * 6)]
    for r in records:
        rows.append(md_row([_when(r), r.get("model") or "", r.get("test") or "", str(r.get("n_ctx") or "-"),
                            r.get("kernels") or "?", _figure(r)]))
    return "\n".join(rows) + "\n"
