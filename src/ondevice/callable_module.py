"""``ondevice.bench``, ``ondevice.fit`` and ``ondevice.adapt`` are library functions and packages at once:
importing the package rebinds the attribute on ``ondevice`` to the module, so the module itself is made
callable, and ``ondevice.adapt(...)`` keeps working after the first import."""

from __future__ import annotations

import importlib
import inspect
import sys
import types


def make_callable(package: str, target: str) -> None:
    """Calling the module ``package`` calls ``target`` ("module:function", imported on the first call)."""
    mod_name, func = target.split(":")

    class _CallableModule(types.ModuleType):
        def __call__(self, *args, **kw):
            return self.__wrapped__(*args, **kw)

        @property
        def __wrapped__(self):  # the function: inspect.signature(ondevice.bench) gives its keywords
            return getattr(importlib.import_module(mod_name), func)

        @property
        def __doc__(self):  # help(ondevice.fit), inspect.getdoc, Jupyter's `?`: the function's, then the package's
            f = self.__wrapped__
            return (f"{func}{inspect.signature(f)}\n\n{inspect.getdoc(f) or ''}\n\n"
                    f"(the package {package}:)\n{self.__dict__.get('__doc__') or ''}")

    sys.modules[package].__class__ = _CallableModule
