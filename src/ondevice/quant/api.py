"""``ondevice.quant.quantize``: make a quantized (or F16 reference) variant and register it in the store."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from .. import fields
from ..errors import InvalidArgument, OndeviceError
from ..stop_signals import StopOnSignals
from ..store.record import created_now
from .quantize import (
    COPY,
    check_requantize,
    default_name,
    file_type,
    ftype_id,
    parse_overrides,
    refuse_container,
    run_worker,
    verify,
    weight_types,
)

_UNQUANTIZED_TARGETS = {"F32", "F16", "BF16"}


@fields.keywords("ondevice.quantize()")
def quantize(model: str | os.PathLike[str] | None, type: str | int, name: str | None = None,
             overrides: list[str] | dict[str, str] | None = None, *, allow_requantize: bool = False,
             threads: int | None = None, force: bool = False, timeout: float | None = None,
             imatrix: str | os.PathLike[str] | None = None, output: str | os.PathLike[str] | None = None):
    """Quantize ``model`` to ``type`` (a ``LLAMA_FTYPE_MOSTLY_*`` name, or ``COPY``: every tensor as it is, which
    makes one file of a split model) and store it as variant ``name``.

    ``overrides`` are ``"REGEX=GGML_TYPE"`` strings (or a ``{regex: type}`` dict) applied to tensor names.
    Returns the :class:`~ondevice.models.catalog.ModelRef` of the new variant; its provenance (source
    sha256, type, overrides, llama.cpp version, the tensor types read back) is in ``ref.provenance``.
    ``imatrix``: an importance matrix (tensor name -> per-column mean squared activation) that weights the rounding
    error per column: the ``.npz`` ``ondevice.fit.imatrix.collect`` writes, or llama-imatrix's ``imatrix.gguf`` or
    legacy ``.dat`` (:mod:`.imatrix_file`).
    ``output``: write the file there instead of storing a variant (as llama-quantize does; ``force`` replaces a
    file that is there); the returned ref is that file, its provenance in ``ref.provenance`` only.
    """
    from ..engine.resources import check_threads, physical_cores
    from ..eval.api import model_sha256
    from ..models.catalog import ModelRef, check_variant_name, register_variant, resolve, store_variants
    from ..models.store import make_parent, models_dir, temp_file

    type_name = file_type(type) or str(type).strip().upper()  # 7 or "7" (llama-quantize's numbers), Q4_K (its alias)
    ftype = ftype_id(type_name)
    ovr = parse_overrides(overrides)
    only_copy = type_name == COPY
    if ovr and (type_name in _UNQUANTIZED_TARGETS or only_copy):
        raise InvalidArgument(f"--override (overrides=) has no effect with --type {type_name}: llama.cpp applies "
                              f"per-tensor overrides only when the target type is quantized; drop them or pick a "
                              f"quantized --type")
    src = resolve(model)
    out = _output_path(output, src.path, force, name, type_name) if output is not None else None
    refuse_container(src.path)  # before src.info, which would ask for a key that quantize cannot use
    src_info = src.info  # validates the source before llama.cpp reads it
    src_types = weight_types(src.path, independent=False)  # the walk src.info just did (cached)
    requantized_from = [] if only_copy else check_requantize(src_types, allow_requantize)
    if out is None:
        name = name or default_name(src.name, type_name)
        check_variant_name(name, "--name")  # before the temp file: its name is built from it
        if name in store_variants() and not force:
            raise InvalidArgument(f"a variant named {name!r} already exists in {models_dir()}; pass --name NEW "
                                  f"(name=) or --force (force=True) to replace it")
    else:
        name = out.name
    n_threads = check_threads(threads or physical_cores(), "--threads / threads")
    if imatrix is not None:  # read as the worker will; one collected on another model is refused now
        from .imatrix_file import check_covers, read

        check_covers(read(imatrix), src_types, imatrix)
    with StopOnSignals(str(out) if out else f"the variant {name}") as stop:  # a `kill` leaves no temp file either
        if out is not None:
            make_parent(out, "give another --output")
        tmp = temp_file(out.parent if out else models_dir(), f".{name}.", ".gguf.tmp")
        try:
            seconds = run_worker(src.path, tmp, ftype, ovr, allow_requantize, n_threads, timeout, imatrix, only_copy)
            types = weight_types(tmp, independent=False)  # llama.cpp wrote it: our walk is independent of it
            check = verify(types, type_name, ovr)
            import llama_cpp

            provenance = {
                "made_by": "ondevice quantize", "source": src.name, "source_path": str(src.path),
                "source_sha256": model_sha256(src), "source_quant": src_info.quant_summary,
                "type": type_name, "ftype": ftype, "overrides": [f"{p}={t}" for p, t in ovr],
                "allow_requantize": allow_requantize, "requantized_from": requantized_from,
                "llama_cpp_python": llama_cpp.__version__, "llama_cpp": "vendored in llama-cpp-python "
                f"{llama_cpp.__version__}", "threads": n_threads, "seconds": round(seconds, 3),
                "tensor_types": check, "file_size": tmp.stat().st_size,
                "imatrix": str(imatrix) if imatrix else None,
                "created": created_now(),
            }
            if requantized_from and type_name in _UNQUANTIZED_TARGETS:
                provenance["note"] = (f"dequantized from {', '.join(requantized_from)}: a reference for the source "
                                      f"file, not the original unquantized weights")
            with stop.finishing():  # the rename and its record: whole, even if told to stop now
                if out is None:
                    ref = register_variant(name, tmp, provenance)
                else:
                    os.replace(tmp, out)
                    ref = ModelRef(out.stem, out, "local", made=provenance)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            raise
    if not ref.path.is_file():
        raise OndeviceError(f"the variant {name} was not written to {ref.path}")
    return ref


def _output_path(output: str | os.PathLike[str], source: Path, force: bool, name: str | None, type_name: str) -> Path:
    """Where ``--output`` writes: a file that can be written (its missing folders are made), not the source, not a
    file there unless forced."""
    import re

    from ..models.store import check_writable

    out = Path(output).expanduser()
    example = re.sub(r"[.-](I?Q\d\w*|B?F16|F32)$", "", source.stem, flags=re.IGNORECASE) + f".{type_name}.gguf"
    if name is not None:
        raise InvalidArgument("--name (name=) names a stored variant and --output (output=) a file: give one of them")
    if out.is_dir() or str(output).endswith(("/", os.sep)):  # `-o newdir/` asks for a folder (Path drops the /)
        raise InvalidArgument(f"--output {str(output)!r} is a folder{'' if out.is_dir() else ' (it ends in /)'}; "
                              f"give the file to write, e.g. "
                              f"{out / example}")
    check_writable(out, "give another --output")  # a missing folder is made, as every other writer here does
    if out.exists() and out.resolve() == source.resolve():
        raise InvalidArgument(f"--output {str(output)!r} is the model being quantized; write to another file")
    if out.exists() and not force:
        raise InvalidArgument(f"--output {str(output)!r} exists; pass --force (force=True) to replace it")
    return out
