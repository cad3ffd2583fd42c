"""Split GGUF models (llama.cpp's ``llama-gguf-split``): ``NAME-00001-of-00003.gguf`` and the shards beside it.

llama.cpp loads a split model from its first shard and finds the others by their names; only the first holds
the model's metadata, each shard its share of the tensors (``split.no``, ``split.count`` in every header).
So a model is always named by its first shard: another shard gets an error naming the first, a missing or
foreign shard one naming the file, and the first shard's summary counts every shard's size and tensors.
Readers of tensor bytes by offset (adapt, protect) take one file: :func:`refuse_split` says how to merge.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

from ..errors import NOT_THERE, InvalidModelFile, path_problem

SHARD_SUFFIX = r"-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$"  # llama_split_path's
SHARD_NAME = re.compile(rf"^(?P<prefix>.+){SHARD_SUFFIX}")
_KEEP_TOGETHER = "keep every shard of a split model in one folder under the names llama-gguf-split gave them"


class Shard(NamedTuple):
    """One of the other files of a split model: its size, tensors, their shapes and metadata (``split.*`` only)."""

    path: Path
    file_size: int
    tensors: list
    shapes: dict[str, tuple[int, ...]]
    metadata: dict[str, Any]


def shard_path(shard: Path, no: int, count: int) -> Path:
    """The path of shard ``no`` (0-based) beside ``shard`` (any shard of the model), as llama.cpp derives it."""
    m = SHARD_NAME.match(shard.name)
    assert m is not None
    return shard.with_name(f"{m['prefix']}-{no + 1:05d}-of-{count:05d}.gguf")


def sibling_shards(path: Path) -> list[Path]:
    """The other shards beside ``path`` when it is the first of a split model's files (by their names): listed and
    removed with it in the store."""
    m = SHARD_NAME.match(path.name)
    if m is None or int(m["no"]) != 1:
        return []
    return [p for i in range(1, int(m["count"])) if (p := shard_path(path, i, int(m["count"]))).is_file()]


def total_size(path: Path) -> int:
    """The bytes of the model ``path`` names: with a split model's other shards beside it."""
    return sum(p.stat().st_size for p in (path, *sibling_shards(path)))


def first_of(path: Path) -> Path | None:
    """The first shard beside ``path`` when ``path`` is shard 2, 3, ... of a split model (which it stands for)."""
    m = SHARD_NAME.match(path.name)
    if m is None or int(m["no"]) < 2:
        return None
    first = shard_path(path, 0, int(m["count"]))
    return first if first.is_file() else None


def shard_urls(url: str) -> tuple[int, list[str]] | None:
    """``(this shard's number, every shard's address in order)`` when ``url`` names a shard of a split model by its
    file name (a query string kept); None otherwise."""
    base, q, query = url.partition("?")
    m = re.search(SHARD_SUFFIX, base)
    if m is None:
        return None
    count = int(m["count"])
    return int(m["no"]), [f"{base[:m.start()]}-{k:05d}-of-{count:05d}.gguf{q}{query}" for k in range(1, count + 1)]


def split_shards(path: Path, metadata: dict[str, Any], read: Callable[[Path], Shard]) -> list[Shard]:
    """The other shards of the split model whose first shard is ``path`` (none for a single file), each read
    with ``read``; raises :class:`InvalidModelFile` for a shard that is not the first, and for one missing or
    not of this model."""
    no, count = metadata.get("split.no"), metadata.get("split.count")
    if no is None and count is None:
        return []
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (no, count)) or not 0 <= no < count:
        raise InvalidModelFile(f"{path}: corrupt metadata: split.no {no!r} of split.count {count!r}; the file is "
                               f"damaged: re-download it or split the model again")
    named = SHARD_NAME.match(path.name)
    if no > 0:
        first = shard_path(path, 0, count).name if named else f"the one with split.no 0 of the {count}"
        raise InvalidModelFile(f"{path}: this is shard {no + 1} of a model split in {count} files, which loads "
                               f"from its first shard; pass {first} (llama.cpp finds the others beside it)")
    if count == 1:
        return []
    if not named or int(named["count"]) != count:
        raise InvalidModelFile(f"{path}: the first shard of a model split in {count} files, but its name does not "
                               f"end in -00001-of-{count:05d}.gguf, so the others cannot be found; "
                               f"{_KEEP_TOGETHER}")
    shards = []
    for i in range(1, count):
        p = shard_path(path, i, count)
        problem = path_problem(p)
        if problem is not None:
            what = "is not beside it" if problem in NOT_THERE else f"is {problem}"
            raise InvalidModelFile(f"{path}: shard {i + 1} of {count}, {p.name}, {what}; {_KEEP_TOGETHER}")
        shard = read(p)
        if (shard.metadata.get("split.no"), shard.metadata.get("split.count")) != (i, count):
            raise InvalidModelFile(f"{p}: not shard {i + 1} of {count} of {path.name} (its header says split.no "
                                   f"{shard.metadata.get('split.no')!r} of {shard.metadata.get('split.count')!r}); "
                                   f"{_KEEP_TOGETHER}")
        shards.append(shard)
    return shards


def refuse_split(info, what: str) -> None:
    """Raise for a split model where ``what`` needs the model in one file, naming how to merge it."""
    from ..errors import InvalidArgument

    if info.split_paths:
        merged = SHARD_NAME.match(info.path.name)["prefix"] + ".gguf"
        raise InvalidArgument(f"{info.path.name} is split in {len(info.split_paths) + 1} files and {what} needs "
                              f"the model in one: merge them with `ondevice quantize {info.path} "
                              f"{info.path.with_name(merged)} COPY` (or llama.cpp's llama-gguf-split --merge) and "
                              f"pass that file")
