"""Engines (llama.cpp first), the per-token Generation record, chat templates and ``load``."""

from .base import Engine, EngineConfig
from .model import Model, load
from .records import Generation, Result, Sampling

__all__ = ["Engine", "EngineConfig", "Generation", "Model", "Result", "Sampling", "load"]
