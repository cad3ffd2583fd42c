"""Typed records that are stored as flat JSON dicts (``BenchRecord``, ``EvalRecord``): the one round trip.

A record class is a frozen dataclass with an ``extra`` dict field. ``from_dict`` takes a stored dict: missing
keys take their defaults, keys the class does not know (a newer or older version's) go to ``extra`` and are
written back unchanged, and the store's ``_id``/``_session``/... bookkeeping is dropped. ``to_dict`` gives the
dict stored and exported; ``_keep`` says which fields it writes.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import fields
from datetime import UTC, datetime
from typing import Any, ClassVar


def created_now() -> str:
    """A record's or sidecar's ``created``: ISO 8601 in UTC, to the second ("2026-12-03T08:30:00+00:00")."""
    return datetime.now(UTC).isoformat(timespec="seconds")


def created_time(value: Any) -> float:
    """A stored ``created`` as seconds since the epoch, for ordering records by age.

    ``created`` is ISO 8601 (:func:`created_now`: bench records, sidecars) or, in records written before that
    was the one form (eval, fit, cascade), ``time.time()``; both read here, so one store may hold either. An
    ISO time without a zone counts as UTC; a missing or unreadable value is 0.0 (older than any record).
    """
    if isinstance(value, bool) or value is None:
        return 0.0
    if isinstance(value, (int, float)):
        return float(value) if math.isfinite(value) else 0.0
    text = str(value).strip()
    try:
        return float(text) if math.isfinite(float(text)) else 0.0  # an epoch read back from CSV or SQL as text
    except ValueError:
        pass
    try:
        t = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        return 0.0
    return (t if t.tzinfo else t.replace(tzinfo=UTC)).timestamp()


class FlatRecord:
    __slots__ = ()
    _tuples: ClassVar[frozenset[str]] = frozenset()  # list fields, held as tuples (the record is frozen)

    @classmethod
    def _names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))  # type: ignore[arg-type]

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]):
        names = set(cls._names()) - {"extra"}
        kw: dict[str, Any] = {}
        extra: dict[str, Any] = {}
        for k, v in d.items():
            if k in names:
                kw[k] = tuple(v) if k in cls._tuples and v is not None else v
            elif not k.startswith("_"):
                extra[k] = v
        return cls(**kw, extra=extra)

    @classmethod
    def coerce(cls, records: Iterable[Any]) -> list:
        """Records as given to a reader: typed already, or dicts read from JSON/CSV/SQLite."""
        return [r if isinstance(r, cls) else cls.from_dict(r) for r in records]

    def _keep(self, name: str, value: Any) -> bool:
        return True

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name in self._names():
            v = getattr(self, name)
            if name != "extra" and self._keep(name, v):
                out[name] = list(v) if isinstance(v, tuple) else v
        out.update(self.extra)  # type: ignore[attr-defined]
        return out
