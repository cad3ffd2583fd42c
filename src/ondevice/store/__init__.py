"""SQLite store of bench and eval records."""

from .db import Store, default_path

__all__ = ["Store", "default_path"]
