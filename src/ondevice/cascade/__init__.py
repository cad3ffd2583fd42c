"""Device -> cloud cascade: answer on the device, defer to an OpenAI-compatible cloud only when unsure.

- ``confidence``: the answer's features (its tokens; its text against the request) and the logistic combiner
  fitted on a dev split (``ondevice cascade fit``);
- ``policy``: threshold, per-request overrides (``never_defer``), the deferral budget per window;
- ``cloud``: the cloud tier through the official ``openai`` client, with timeouts and classified failures;
- ``core``: one decision and its result (:class:`Cascade` is the library door);
- ``serve``: ``ondevice serve --cascade URL``; ``samples``: hard samples exported as JSONL;
- the deferral curve lives with the other evaluations, in ``ondevice.eval.cascade_curve``.
"""

from __future__ import annotations

from .confidence import Combiner, GeometricMean, features, text_features
from .core import Cascade, CascadeResult
from .policy import Budget, Policy, RequestPolicy
from .samples import export_hard_samples

__all__ = ["Budget", "Cascade", "CascadeResult", "Combiner", "GeometricMean", "Policy", "RequestPolicy",
           "export_hard_samples", "features", "text_features"]
