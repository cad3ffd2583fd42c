"""ondevice: fit language models to the device in hand.

    >>> import ondevice
    >>> model = ondevice.load()                       # the embedded SmolLM2-135M-Instruct
    >>> for g in model.stream("Hello!", temp=0): print(g.text, end="")
"""

from __future__ import annotations

__version__ = "0.1.0"

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

from .errors import OndeviceError

if TYPE_CHECKING:
    from . import adapt, bench, fit
    from .cascade import Cascade
    from .engine import Generation, Model, Result, Sampling, load
    from .eval.api import evaluate
    from .models.hub import pull
    from .quant.api import quantize

# name -> (module, attribute; None: the module itself), imported on first use: the `ondevice` command's supervising
# parent imports this package only to start its child, and should not pay for numpy or llama_cpp. Each is the real
# function (its own signature and help); bench, fit and adapt are packages that are callable (callable_module.py)
_LAZY = {**{n: (".engine", n) for n in ("Generation", "Model", "Result", "Sampling", "load")},
         "bench": (".bench", None), "fit": (".fit", None), "adapt": (".adapt", None),
         "quantize": (".quant.api", "quantize"), "evaluate": (".eval.api", "evaluate"), "pull": (".models.hub", "pull"),
         "Cascade": (".cascade", "Cascade")}  # the class itself: isinstance() and its signature work


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        mod = importlib.import_module(module, __name__)
        return mod if attr is None else getattr(mod, attr)
    raise AttributeError(f"module 'ondevice' has no attribute {name!r}")


def __dir__() -> list[str]:  # help(ondevice) and dir() list the lazily imported names too
    return sorted(set(globals()) | set(_LAZY))


def _one_shot(model: str | None, kw: dict):
    """The model loaded for a one-shot call, and the call's own keyword arguments: :class:`Sampling` fields
    go to the call, the rest (``n_ctx``, ``n_threads``, ...) to :func:`load`."""
    from dataclasses import fields

    from . import fields as checked
    from .engine import EngineConfig, Sampling, load

    sampling = {f.name for f in fields(Sampling)} | {"sampling", "chat_template", "tools"}
    if err := checked.unknown("a one-shot call", kw, sampling | {"draft_model", *EngineConfig.__dataclass_fields__}):
        raise err
    return (load(model, **{k: v for k, v in kw.items() if k not in sampling}),
            {k: v for k, v in kw.items() if k in sampling})


def generate(prompt, model: str | None = None, **kw) -> Result:
    """One-shot: load ``model`` (the default model if None), generate, free the model. Keyword arguments are
    :class:`Sampling` fields and :func:`load`'s (``n_ctx``, ``n_threads``, ...). To call a model more than
    once, ``ondevice.load`` it and keep it (``with ondevice.load() as m: ...``)."""
    m, call_kw = _one_shot(model, kw)
    with m:
        return m.generate(prompt, **call_kw)


def stream(prompt, model: str | None = None, **kw) -> Iterator[Generation]:
    """One-shot streaming with a freshly loaded model, freed when the stream ends or is closed. The model and
    the arguments are checked now, as :meth:`Model.stream` checks its own; the generation starts when the
    iterator is first read."""
    m, call_kw = _one_shot(model, kw)
    try:
        it = m.stream(prompt, **call_kw)
    except BaseException:
        m.close()
        raise
    return _OneShotStream(m, it)


class _OneShotStream(Iterator):
    """A one-shot stream's records; its model is closed when they end or fail, or when the stream is closed
    (even unread, which a generator's ``close`` would not run) or dropped."""

    def __init__(self, model: Model, it: Iterator[Generation]) -> None:
        self._model, self._it = model, it

    def __next__(self) -> Generation:
        try:
            return next(self._it)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        self._it.close()
        if not self._model.closed:
            self._model.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # at interpreter exit llama.cpp may be gone first
            self.close()


__all__ = ["Cascade", "Generation", "Model", "OndeviceError", "Result", "Sampling", "__version__", "adapt", "bench",
           "evaluate", "fit", "generate", "load", "pull", "quantize", "stream"]
