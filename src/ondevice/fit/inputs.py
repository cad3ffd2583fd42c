"""What a fit starts from: its settings, checked before anything is measured; the F16 reference; the
calibration and held-out texts."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import InvalidArgument
from .measure import fit_dir


def check_settings(*, imatrix: str, transform: str, speed_tests: tuple[str, ...], calib_ctx: int, eval_ctx: int,
                   calib_chunks: int, eval_chunks: int, threads: int | None, name: str | None, validate: int,
                   repetitions: int) -> None:
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
        raise InvalidArgument(f"--threads {threads} must be >= 0 (0: the profile's or the default)")
    if name is not None:
        from ..models.catalog import check_variant_name

        check_variant_name(name, "--name")
    if validate < 1:
        raise InvalidArgument(f"--validate {validate} must be >= 1")
    if repetitions < 1:
        raise InvalidArgument(f"--repetitions {repetitions} must be >= 1 (bench rounds)")


def reference_for(src, ref: str | os.PathLike[str] | None, say) -> tuple[object, str]:
    """The F16 reference (given, stored, or made now from the shipped file) and a note on what it is."""
    from ..models.catalog import resolve, store_variants
    from ..quant.api import quantize
    from ..quant.quantize import default_name, weight_types

    if ref is not None:
        r = resolve(ref)
        _ = r.info
        return r, f"the reference {r.name}"
    quantized = sorted({t for t in weight_types(src.path).values() if t not in ("F16", "F32", "BF16")})
    if not quantized:
        return src, f"{src.name} itself (unquantized)"
    name = default_name(src.name, "F16")
    note = (f"{name}, dequantized from the shipped {src.info.quant_summary} file: a reference for that file, "
            f"not the original weights")
    if name in store_variants():
        return resolve(name), note
    say(f"making the reference {name} (dequantizing {src.name})")
    return quantize(src, "F16", name, allow_requantize=True), note


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
