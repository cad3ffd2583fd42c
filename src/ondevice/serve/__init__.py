"""``ondevice serve``: an OpenAI-compatible local server with continuous batching and a prefix cache.

FastAPI + uvicorn (the ``server`` extra). :class:`ServeSettings` holds every knob (flags and ``ONDEVICE_*``
env vars); :func:`serve` runs in the foreground, :class:`BackgroundServer` in a thread.
"""

from __future__ import annotations

from .settings import ServeSettings

__all__ = ["BackgroundServer", "ServeSettings", "serve"]


def __getattr__(name: str):
    if name in ("BackgroundServer", "serve"):
        from . import server

        return getattr(server, name)
    raise AttributeError(name)
