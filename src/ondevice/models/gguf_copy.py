"""The start of every GGUF rewrite (an adapter merged in, fit's equivalent transform): a gguf-py writer
that carries over the source file's architecture, byte order, alignment and metadata."""

from __future__ import annotations

import os


def writer_like(reader, path: str | os.PathLike[str]):
    """A ``gguf.GGUFWriter`` at ``path`` with every metadata key of ``reader`` (a ``gguf.GGUFReader``) but
    the ``GGUF.*`` ones gguf-py writes itself; tensors are the caller's to add."""
    import gguf

    w = gguf.GGUFWriter(path, arch=reader.fields["general.architecture"].contents(), endianess=reader.endianess)
    if (al := reader.fields.get("general.alignment")) is not None:
        w.data_alignment = int(al.contents())
    for f in reader.fields.values():
        if f.name == "general.architecture" or f.name.startswith("GGUF."):
            continue
        sub = f.types[-1] if f.types[0] == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(f.name, f.contents(), f.types[0], sub_type=sub)
    return w
