"""The start of every GGUF rewrite (an adapter merged in, fit's equivalent transform): a gguf-py writer
that carries over the source file's architecture, byte order, alignment and metadata; and a file spliced
from the tensors of others (fit's plans)."""

from __future__ import annotations

import os
from pathlib import Path


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


def splice(base, others: dict, pick: dict[str, str], dst: str | os.PathLike[str]) -> None:
    """Write at ``dst`` the file of ``base`` (a ``gguf.GGUFReader``) with each tensor named in ``pick`` taken
    from ``others[pick[name]]`` (readers of files with the same tensors), bytes as they are; every key and
    every other tensor is ``base``'s. Nothing is left at ``dst`` if it fails."""
    from ..errors import OndeviceError

    by_name = {k: {x.name: x for x in r.tensors} for k, r in others.items()}
    picked = []
    for x in base.tensors:
        y = by_name[pick[x.name]].get(x.name) if x.name in pick else x
        if y is None:
            raise OndeviceError(f"cannot splice {x.name}: {others[pick[x.name]].data.filename} does not hold it")
        picked.append(y)
    try:
        w = writer_like(base, dst)
        for y in picked:
            w.add_tensor_info(y.name, y.data.shape, y.data.dtype, y.data.nbytes, y.tensor_type)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for y in picked:
            w.write_tensor_data(y.data, tensor_endianess=base.endianess)
        w.close()
    except BaseException:
        Path(dst).unlink(missing_ok=True)
        raise
