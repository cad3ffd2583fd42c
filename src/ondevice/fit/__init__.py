"""Fit a model to this device under a budget: measured per-type speed, per-group sensitivity, a plan on
the predicted Pareto front, validated for real (``ondevice fit``, :func:`fit`)."""

from .api import FitResult, fit
from .budget import Budget, parse_budget

__all__ = ["Budget", "FitResult", "fit", "parse_budget"]


# ``ondevice.fit`` is both this package and the library function in ``ondevice/__init__`` (as ``bench``):
# importing the package rebinds the attribute to the module, so the module stays callable.
import sys as _sys
import types as _types


class _CallableModule(_types.ModuleType):
    def __call__(self, *args, **kw):
        return fit(*args, **kw)


_sys.modules[__name__].__class__ = _CallableModule
