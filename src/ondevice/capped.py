"""Reading a file the user names, bounded: ``/dev/zero``, a FIFO or a wrong multi-GB file given where a prompt,
template or key belongs is an error naming the limit, never a read until the memory is gone."""

from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO


def read_capped(source: str | os.PathLike[str] | BinaryIO, limit: int) -> bytes | None:
    """The bytes of ``source`` (a path, ``~`` expanded, or an open binary stream), or None when it holds more than
    ``limit`` bytes (only ``limit + 1`` are read to tell). A path's ``OSError`` is the caller's to word."""
    if isinstance(source, (str, os.PathLike)):
        with open(Path(source).expanduser(), "rb") as f:
            return read_capped(f, limit)
    data = source.read(limit + 1)
    return None if len(data) > limit else data


def size_text(n: int) -> str:
    """``limit`` as the errors say it: ``1 MiB``, ``16 MiB``, ``4096 bytes``."""
    return f"{n >> 20} MiB" if n >= 1 << 20 and not n % (1 << 20) else f"{n} bytes"
