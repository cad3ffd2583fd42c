"""Fit a model to this device under a budget: measured per-type speed, per-group sensitivity, a plan on
the predicted Pareto front, validated for real (``ondevice fit``, :func:`fit`)."""

from .api import FitResult, fit
from .budget import Budget, parse_budget

__all__ = ["Budget", "FitResult", "fit", "parse_budget"]


from ..callable_module import make_callable as _make_callable

_make_callable(__name__, "ondevice.fit.api:fit")  # ondevice.fit(...) after the import, too
