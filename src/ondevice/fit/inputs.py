"""What a fit starts from: its settings, checked before anything is measured; the F16 reference; the
calibration and held-out texts."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import InvalidArgument
from .measure import fit_dir


def check_settings(*, imatrix: str, transform: str, speed_tests: tuple[str, ...], calib_ctx: int, eval_ctx: int,
                   calib_chunks: int, eval_chunks: int, threads: int | None, name: str | None, validate: int,
                   repetitions: int, knobs_depth: int = 0) -> None:
    """Refuse settings that would fail later (after minutes of measuring, or after the whole fit), each with a
    one-line error naming the flag."""
    for flag, mode in (("imatrix", imatrix), ("transform", transform)):
        if mode not in ("auto", "on", "off"):
            raise InvalidArgument(f"--{flag} {mode!r} must be auto, on or off")
    if sorted(t[:2] for t in speed_tests) != ["pp", "tg"]:
        raise InvalidArgument(f"--tests {','.join(speed_tests)!r} must be one prompt and one decode test, "
                              f"e.g. pp128,tg64")
    from ..bench.workloads import parse_tests

    parse_tests(list(speed_tests))  # a test with no tokens fails here, not after the first bench
    for flag, n, least in (("--calib-ctx", calib_ctx, 8), ("--eval-ctx", eval_ctx, 8),
                           ("--calib-chunks", calib_chunks, 1), ("--eval-chunks", eval_chunks, 1)):
        if n < least:  # KLD chunks as llama-perplexity's (eval.ppl.make_chunks)
            raise InvalidArgument(f"{flag} {n} must be >= {least}")
    if threads is not None and threads < 0:
        raise InvalidArgument(f"--threads {threads} must be >= 1 (0 or -1: the profile's or the default)")
    if name is not None:
        from ..models.catalog import check_variant_name

        check_variant_name(name, "--name")
    if validate < 1:
        raise InvalidArgument(f"--validate {validate} must be >= 1")
    if repetitions < 1:
        raise InvalidArgument(f"--repetitions {repetitions} must be >= 1 (bench rounds)")
    if knobs_depth < 0:
        raise InvalidArgument(f"--knobs-depth {knobs_depth} must be >= 0 (tokens of KV cache; 0: none)")


def reference_for(src, ref: str | os.PathLike[str] | None, say) -> tuple[object, str, bool]:
    """The F16 reference (given, stored, the one a variant was made from, or made now from the shipped file), a
    note on what it is, and whether it is the shipped file dequantized (against it, that file's KLD is 0)."""
    from ..models.catalog import resolve, store_variants
    from ..quant.api import quantize
    from ..quant.quantize import default_name, weight_types

    if ref is not None:
        r = resolve(ref)
        _ = r.info
        return r, f"the reference {r.name}", False
    quantized = sorted({t for t in weight_types(src.path).values() if t not in ("F16", "F32", "BF16")})
    if not quantized:
        return src, f"{src.name} itself (unquantized)", False
    made_from = _made_from(src)
    if made_from is not None:  # a fitted or quantized variant: its own reference, not its lossy self dequantized
        return made_from, f"{made_from.name}, the unquantized model {src.name} was made from", False
    name = default_name(src.name, "F16")
    note = (f"{name}, dequantized from the shipped {src.info.quant_summary} file: a reference for that file, "
            f"not the original weights")
    if name in store_variants():
        return resolve(name), note, True
    say(f"making the reference {name} (dequantizing {src.name})")
    return quantize(src, "F16", name, allow_requantize=True), note, True


def _made_from(src):
    """The unquantized model a stored variant (``ondevice fit`` or ``quantize``) was made from, where its
    provenance names one that is still there: fitting a fitted variant dequantized the variant itself (a lossy
    reference, and another 270 MB file in the store)."""
    from ..models.catalog import read_provenance, resolve
    from ..quant.quantize import weight_types

    prov = (read_provenance(src.path) or {}).get("provenance") or {}
    path = prov.get("source_path")
    if prov.get("made_by") not in ("ondevice fit", "ondevice quantize") or not path or not Path(path).is_file():
        return None
    if any(t not in ("F16", "F32", "BF16") for t in weight_types(path).values()):
        return None
    return resolve(path)


def texts(text: str | os.PathLike[str] | None) -> tuple[Path, Path, dict]:
    """(calibration file, held-out file, description): the first and last thirds of the text."""
    from ..eval.corpora import load_corpus

    corpus = load_corpus(None, text)
    third = len(corpus.text) // 3
    d = fit_dir() / "texts"
    d.mkdir(exist_ok=True)
    out = []
    for part, body in (("calib", corpus.text[:third]), ("heldout", corpus.text[-third:])):
        p = d / f"{corpus.sha256[:12]}-{part}.txt"
        if not p.is_file():
            from ..models.store import atomic_write

            with atomic_write(p, "w", encoding="utf-8") as f:
                f.write(body)
        out.append(p)
    return out[0], out[1], {**corpus.describe(), "calibration": "first third", "held_out": "last third"}
