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
    from .engine import Generation, Model, Result, Sampling, load

_ENGINE_NAMES = ("Generation", "Model", "Result", "Sampling", "load")


def __getattr__(name: str):
    # the engine (numpy, llama_cpp) is imported on first use: the `ondevice` command's supervising parent
    # imports this package only to start its child, and should not pay for numpy
    if name in _ENGINE_NAMES:
        from . import engine

        return getattr(engine, name)
    raise AttributeError(f"module 'ondevice' has no attribute {name!r}")


def __dir__() -> list[str]:  # help(ondevice) and dir() list the lazily imported names too
    return sorted(set(globals()) | set(_ENGINE_NAMES))


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


def Cascade(device_model=None, cloud_url: str | None = None, **kw):  # a class, imported lazily
    """A device -> cloud cascade (see :class:`ondevice.cascade.Cascade`)."""
    from .cascade import Cascade as _Cascade

    return _Cascade(device_model, cloud_url, **kw)


def pull(address: str, name: str | None = None, **kw):
    """Download a model into the store and return its path: ``hf.co/OWNER/REPO:QUANT``, ``hf://OWNER/REPO/FILE.gguf``
    or an http(s) URL (what ``ondevice pull`` takes; keyword arguments: ``sha256``, ``force``, ``retries``,
    ``timeout``, ``progress``). The library never downloads on its own: after this, ``ondevice.load(address)`` finds
    the model in the store with no network (see :func:`ondevice.models.pull`)."""
    from .models.hub import pull as _pull

    return _pull(address, name, **kw)


def bench(*args, **kw):
    """Run benchmark configurations and return their records (see :func:`ondevice.bench.api.bench`)."""
    from .bench.api import bench as _bench

    return _bench(*args, **kw)


def quantize(*args, **kw):
    """Make a quantized (or F16 reference) variant with llama.cpp (see :func:`ondevice.quant.api.quantize`)."""
    from .quant.api import quantize as _quantize

    return _quantize(*args, **kw)


def fit(*args, **kw):
    """The best variant of a model for this device under a budget (see :func:`ondevice.fit.api.fit`)."""
    from .fit.api import fit as _fit

    return _fit(*args, **kw)


def adapt(*args, **kw):
    """Train a LoRA adapter on the CPU and export it for llama.cpp (see :func:`ondevice.adapt.adapt`)."""
    from .adapt import adapt as _adapt

    return _adapt(*args, **kw)


def evaluate(*args, **kw):
    """Perplexity / KLD / task suites (see :func:`ondevice.eval.api.evaluate`)."""
    from .eval.api import evaluate as _evaluate

    return _evaluate(*args, **kw)


__all__ = ["Cascade", "Generation", "Model", "OndeviceError", "Result", "Sampling", "__version__", "adapt", "bench",
           "evaluate", "fit", "generate", "load", "pull", "quantize", "stream"]
