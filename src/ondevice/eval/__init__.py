"""Quality: perplexity and KL divergence (``ppl``), task suites (``suites``, ``runner``, ``metrics``)."""

from __future__ import annotations


def evaluate(*args, **kw):
    """See :func:`ondevice.eval.api.evaluate`."""
    from .api import evaluate as _evaluate

    return _evaluate(*args, **kw)


__all__ = ["evaluate"]
