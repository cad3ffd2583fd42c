"""``quantize(model, type)``: a thin wrapper over llama.cpp's ``llama_model_quantize``.

What it adds to the C call, and nothing more:

- names: ``type`` is a ``LLAMA_FTYPE_MOSTLY_*`` suffix (``Q8_0``, ``Q4_K_M``, ``F16``...; ``F32`` is
  ``LLAMA_FTYPE_ALL_F32``), per-tensor overrides are ``REGEX=GGML_TYPE`` strings;
- per-tensor overrides go through ``llama_model_quantize_params.tt_overrides``: a C array of
  ``llama_model_tensor_override {const char *pattern; enum ggml_type type;}`` ended by a NULL pattern.
  llama.cpp (src/llama-quant.cpp) compiles each pattern with ``std::regex`` and applies the first one
  that ``regex_search``-es the tensor name, *only when the target type is a quantized one*: with F16,
  BF16 or F32 targets it ignores them, so we refuse overrides there rather than silently drop them;
- requantization: a source whose weights are already quantized needs ``allow_requantize`` (quality loss
  compounds; llama.cpp refuses otherwise). Making an F16 "reference" from a Q4_1 file is allowed this way
  too: it dequantizes exactly what Q4_1 holds, so it is a reference *for that file*, not the original;
- safety: the C call runs in a child process (``python -m ondevice.quant.worker``), because llama.cpp
  may ``abort()`` on input it does not expect; the CLI then prints an error instead of dying. The child
  dies with its parent (:func:`run_worker`), so a killed ``ondevice quantize`` or ``fit`` leaves no
  quantization running on and no partial file; a SIGTERM or SIGHUP after the child is done still removes
  the temp file, and one during the rename into the store waits for it (:mod:`.stop`);
- the output is written to a temporary file next to its destination, read back with our bounds-checked
  header walk (``validate_gguf``: a parser other than llama.cpp's, cross-checked against gguf-py's
  ``GGUFReader`` by the tests) to confirm the tensor types, and only then renamed into the model store and
  registered as a named variant with its provenance. ``GGUFReader`` itself would take ~4 s per file
  (it parses the tokenizer's metadata item by item), several times the quantization of a small model.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import time
import unicodedata
from collections import Counter
from pathlib import Path

from ..errors import InvalidArgument, OndeviceError
from ..supervise import python

_FLOAT_TYPES = {"F32", "F16", "BF16"}
COPY = "COPY"  # llama-quantize's: every tensor copied as it is, into one file (a split model merged)
_MOE = "MXFP4_MOE"  # a file type whose main type (MXFP4) only MoE expert tensors get
_NAME_MAX = 128  # models.catalog's variant names: [A-Za-z0-9][A-Za-z0-9._+-]{0,127}
_SUFFIX = re.compile(r"[-._](?:i?q\d\w*|f16|f32|bf16|tq\d_\d|mxfp4\w*)$", re.IGNORECASE)


def ftypes() -> dict[str, int]:
    """Quantization type name -> ``LLAMA_FTYPE`` value, as this llama-cpp-python build exposes them."""
    import llama_cpp as ll

    out = {n.removeprefix("LLAMA_FTYPE_MOSTLY_"): getattr(ll, n) for n in dir(ll)
           if n.startswith("LLAMA_FTYPE_MOSTLY_")}
    out["F32"] = ll.LLAMA_FTYPE_ALL_F32
    return dict(sorted(out.items(), key=lambda kv: kv[1]))


def ggml_types() -> dict[str, int]:
    """ggml tensor type name -> id (from gguf-py, which tracks ggml's enum)."""
    import gguf

    return {t.name: int(t) for t in gguf.GGMLQuantizationType}


# ggml types that are no weight format (integers, f64) or only activations' (Q8_1, Q8_K): llama.cpp aborts on them
NOT_WEIGHT_TYPES = frozenset({"I8", "I16", "I32", "I64", "F64", "Q8_1", "Q8_K"})
ALIASES = {"Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M", "Q3_K": "Q3_K_M"}  # llama-quantize's own aliases


def is_weight_type(typ: str) -> bool:
    """Whether ``typ`` (any case) is a ggml type llama.cpp quantizes weights to."""
    return typ.strip().upper() in ggml_types() and typ.strip().upper() not in NOT_WEIGHT_TYPES


def weight_types_hint() -> str:
    """'use one of F32, F16, ...': the types llama.cpp quantizes weights to."""
    return f"use one of {', '.join(k for k in ggml_types() if k not in NOT_WEIGHT_TYPES)}"


def file_type(word: str | int) -> str | None:
    """The llama.cpp file type ``word`` names (``Q4_K_M``, ``q8_0``, llama-quantize's number or alias such as
    ``Q4_K``), else None."""
    w = str(word).strip().upper()
    if w.isdigit():
        return {v: k for k, v in ftypes().items()}.get(int(w))
    w = ALIASES.get(w, w)
    return w if w in (*ftypes(), COPY) else None


# llama-quantize's repacked ARM/AVX types, gone since llama.cpp repacks Q4_0 at load (CPU_REPACK)
_REPACKED_TYPES = ("Q4_0_4_4", "Q4_0_4_8", "Q4_0_8_8")


def check_not_repacked_type(word: str | int) -> None:
    """A one-line error for a repacked type an older llama-quantize guide names (``Q4_0_4_4``...)."""
    w = str(word).strip().upper()
    if w in _REPACKED_TYPES:
        raise InvalidArgument(f"{w}: {', '.join(_REPACKED_TYPES)} are gone from llama.cpp; quantize to Q4_0 "
                              f"(--type Q4_0): llama.cpp repacks it for this CPU's kernels at load (CPU_REPACK)")


def ftype_id(type_name: str) -> int:
    """``LLAMA_FTYPE`` value of ``type_name`` (case-insensitive), or an error listing the valid names."""
    table = ftypes()
    key = type_name.strip().upper()
    if key == COPY:
        return table["F32"]  # as llama-quantize passes it, with only_copy set
    check_not_repacked_type(key)
    if key not in table:
        raise InvalidArgument(f"--type {type_name!r} is not a llama.cpp quantization type; use one of "
                              f"{', '.join(table)} (or {COPY})")
    return table[key]


def main_type(type_name: str) -> str:
    """The ggml type most weights get under a file type: Q4_K_M -> Q4_K, Q2_K_S -> Q2_K, Q8_0 -> Q8_0; MXFP4_MOE
    -> MXFP4 (its MoE expert tensors' type)."""
    key = type_name.upper()
    if key == _MOE:
        return "MXFP4"
    m = re.fullmatch(r"(Q\d_K)_(?:S|M|L)", key)
    if m:
        return m.group(1)
    m = re.fullmatch(r"(IQ\d)_(?:S|M)", key)  # IQ3_M / IQ2_M mix around IQ3_S / IQ2_S
    return f"{m.group(1)}_S" if m else key


def parse_overrides(overrides: list[str] | dict[str, str] | None) -> list[tuple[str, str]]:
    """``["REGEX=TYPE", ...]`` or ``{REGEX: TYPE}`` -> validated ``[(regex, GGML_TYPE), ...]`` in order."""
    if not overrides:
        return []
    pairs = list(overrides.items()) if isinstance(overrides, dict) else []
    if not isinstance(overrides, dict):
        for o in overrides:
            pat, sep, typ = str(o).rpartition("=")
            if not sep or not pat or not typ:
                raise InvalidArgument(f"--override {o!r} is not REGEX=TYPE; e.g. --override 'ffn_down=Q8_0'")
            pairs.append((pat, typ))
    out = []
    for pat, typ in pairs:
        t = typ.strip().upper()
        if not is_weight_type(t):
            what = "is not a type llama.cpp quantizes weights to" if t in ggml_types() else "is not a ggml tensor type"
            raise InvalidArgument(f"--override {pat}={typ}: {typ!r} {what}; {weight_types_hint()}")
        try:
            re.compile(pat)
        except re.error as e:
            raise InvalidArgument(f"--override {pat}={typ}: the pattern is not a valid regex ({e}); fix it "
                                  f"(it is searched in tensor names such as blk.0.ffn_down.weight)") from None
        out.append((pat, t))
    return out


def default_name(source_name: str, type_name: str) -> str:
    """``smollm2-135m-instruct-q4_1`` + Q8_0 -> ``smollm2-135m-instruct-q8_0``; a file name the store
    cannot hold (``My Modèl 模型.gguf``: spaces, accents, other scripts, 200 characters) is folded to one it
    can (``my-model-q8_0``), since no ``--name`` was given to blame for it."""
    from ..models.gguf_split import SHARD_NAME

    base = Path(source_name).name.removesuffix(".gguf")
    base = m["prefix"] if (m := SHARD_NAME.match(base + ".gguf")) else base  # a split model: its name
    base = unicodedata.normalize("NFKD", _SUFFIX.sub("", base)).encode("ascii", "ignore").decode().lower()
    suffix = f"-{type_name.lower()}"
    base = re.sub(r"[^a-z0-9_+-]+", "-", base.replace(".", "-")).strip("-_+")[:_NAME_MAX - len(suffix)]
    return f"{base.rstrip('-_+') or 'model'}{suffix}"


def weight_types(path: str | Path, independent: bool = True) -> dict[str, str]:
    """Matrix name -> ggml type name (tensors of 2+ dims: the ones quantization touches), read with
    gguf-py's reference ``GGUFReader`` rather than our own header walk, as a check independent of both;
    with ``independent=False``, with our walk, 40x faster (gguf-py parses the tokenizer's metadata item by
    item: 4.5 s for SmolLM2). The walk suffices wherever the file was written by another parser's code:
    gguf-py (the fit's spliced plans) or llama.cpp (``quantize``'s output)."""
    refuse_container(path)  # gguf-py would raise "GGUF magic invalid" at it
    if not independent:
        from ..models.gguf_check import validate_gguf

        info = validate_gguf(path)
        shapes = {n: tuple(reversed(s)) for n, s in info.tensor_shapes.items()}  # gguf-py's order, as below
        return {t.name: t.type_name for t in info.tensors if len(shapes[t.name]) >= 2 and min(shapes[t.name][:2]) > 1}
    import gguf

    reader = gguf.GGUFReader(str(path))
    return {t.name: t.tensor_type.name for t in reader.tensors if len(t.shape) >= 2 and min(t.shape[:2]) > 1}


def refuse_container(path: str | Path) -> None:
    """One line for an encrypted container where a plain GGUF must be read (llama.cpp's quantizer, gguf-py)."""
    from ..protect.container import is_container

    if is_container(path):
        raise InvalidArgument(f"{path} is an encrypted container (ondevice protect): llama.cpp's quantizer reads "
                              f"only a plain GGUF, and ondevice never writes decrypted weights to disk; give the "
                              f".gguf it was encrypted from, then `ondevice protect encrypt` the variant made of it")


def check_requantize(source_types: dict[str, str], allow_requantize: bool) -> list[str]:
    """The quantized types in the source; an error when there are some and requantizing is not allowed."""
    quantized = sorted({t for t in source_types.values() if t not in _FLOAT_TYPES})
    if quantized and not allow_requantize:
        raise InvalidArgument(
            f"the source model is already quantized ({', '.join(quantized)}); requantizing compounds the "
            f"error, so it must be asked for: pass --allow-requantize (allow_requantize=True), or quantize "
            f"from an F16/F32 file")
    return quantized


def verify(weights: dict[str, str], type_name: str, overrides: list[tuple[str, str]]) -> dict:
    """Check the written matrix types against the request; what was found (and any mismatch)."""
    mix = Counter(weights.values())
    expected = main_type(type_name)
    problems = []
    override_hits: dict[str, dict] = {}
    for pat, typ in overrides:
        rx = re.compile(pat)
        # llama.cpp applies the first matching pattern; mirror that to know which tensors each one owns
        owned = [n for n in weights if rx.search(n) and next(p for p, _ in overrides if re.search(p, n)) == pat]
        got = Counter(weights[n] for n in owned)
        override_hits[pat] = {"type": typ, "tensors": len(owned), "got": dict(got)}
        if not owned:
            first = next((p for p, _ in overrides if any(re.search(p, n) for n in weights if rx.search(n))), None)
            problems.append(f"override {pat}={typ} matched no tensor" if first is None else
                            f"override {pat}={typ} set no tensor: an earlier one, {first}, matches them first "
                            f"(the first match wins, as in llama-quantize)")
        elif set(got) != {typ}:
            problems.append(f"override {pat}={typ}: tensors got {dict(got)} (llama.cpp falls back when a "
                            f"tensor's row size does not fit the type's block size)")
    moe = type_name.upper() == _MOE  # only the MoE expert tensors get MXFP4: the rest stay at Q8_0, by design
    if expected in ggml_types() and expected not in mix:
        problems.append(f"no weight tensor is {expected} (got {dict(mix)}): " + (
            f"{_MOE} quantizes only MoE expert tensors (the others to Q8_0), and this model has none; pick another "
            f"--type" if moe else f"llama.cpp fell back to other types for every tensor (row sizes that do not fit "
            f"{expected}'s block size)"))
    elif expected in ggml_types() and mix[expected] < len(weights) / 2 and not moe:
        import gguf

        block = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[expected]][0]
        problems.append(f"{len(weights) - mix[expected]} of {len(weights)} tensors are not {expected} (llama.cpp "
                        f"fell back where a row does not fit its {block}-value blocks, or its mix chose others): "
                        f"see the matrices line")
    return {"quant_mix": dict(mix.most_common()), "main_type": expected, "overrides": override_hits,
            "warnings": problems}


def run_worker(src: Path, dst: Path, ftype: int, overrides: list[tuple[str, str]], allow_requantize: bool,
               threads: int, timeout: float | None = None, imatrix: str | Path | None = None,
               only_copy: bool = False) -> float:
    """Run ``llama_model_quantize`` in a child process; seconds taken, or an error naming llama.cpp's reason.

    ``imatrix``: a file of tensor name -> per-column importance (:mod:`.imatrix_file`), passed as
    ``llama_model_quantize_params.imatrix``; the quantizer then weights each column's rounding error by it.
    ``only_copy``: tensors copied as they are (llama-quantize's ``COPY``).

    The child dies with this process: its stdin is a pipe only we hold open, so when we are gone (SIGTERM,
    SIGKILL, a crash) it reads EOF, removes its half-written ``dst`` and exits (``worker._die_with_parent``).
    If we are interrupted here (Ctrl-C, a timeout, any exception), ``subprocess.run`` kills and reaps it,
    and ``dst`` is removed: a failed run never leaves a partial file.
    """
    job = {"src": str(src), "dst": str(dst), "ftype": ftype, "allow_requantize": allow_requantize,
           "nthread": threads, "overrides": [[p, ggml_types()[t]] for p, t in overrides],
           "imatrix": str(imatrix) if imatrix else None, "only_copy": only_copy, "parent": os.getpid()}
    t0 = time.perf_counter()
    lifeline, keep_open = os.pipe()
    try:
        proc = subprocess.run(python("-m", "ondevice.quant.worker", json.dumps(job)),
                              stdin=lifeline, capture_output=True, text=True, timeout=timeout, check=False)
        failure = _failure(proc, src.name, dst)
        if failure:
            raise failure
    except subprocess.TimeoutExpired:
        dst.unlink(missing_ok=True)
        raise OndeviceError(f"quantizing took longer than {timeout:.0f} s and was stopped; retry with more time")
    except BaseException:
        dst.unlink(missing_ok=True)
        raise
    finally:
        os.close(lifeline)
        os.close(keep_open)
    return time.perf_counter() - t0


def _failure(proc: subprocess.CompletedProcess, src_name: str, dst: Path) -> OndeviceError | None:
    """The error for a worker that crashed or failed (llama.cpp's reason from its log), or None."""
    log = proc.stderr.splitlines()
    reason = next((ln.split("failed to quantize:", 1)[1].strip() for ln in reversed(log)
                   if "failed to quantize:" in ln), None)
    if proc.returncode < 0:
        sig = signal.Signals(-proc.returncode).name
        tail = " | ".join(log[-3:])
        return OndeviceError(f"llama.cpp crashed ({sig}) while quantizing {src_name}: {tail or 'no output'}; "
                             f"check that the model file is valid and the type suits its architecture")
    if proc.returncode != 0 or reason:
        why = reason or " | ".join(log[-3:]) or f"exit code {proc.returncode}"
        if "iostream error" in why:  # llama.cpp's std::ofstream failed a write: all it says is this
            return OndeviceError(f"llama.cpp could not write the quantized {src_name} to {dst.parent} "
                                 f"({_written_and_free(dst)}): the disk is full, or a quota or file-size limit "
                                 f"was hit; free some space there, or set ONDEVICE_HOME to a folder on a disk "
                                 f"with room for the variant")
        hint = ""
        if "is different from tensor size" in why:  # an importance matrix was given, of another model's shapes
            hint = ("; the importance matrix does not fit this model (collected from another one?): collect one "
                    "for it with `ondevice fit`")
        elif "importance matrix" in why or "imatrix" in why:
            hint = ("; this type needs an importance matrix: pass --imatrix FILE (ondevice fit collects one) "
                    "or pick a K-quant or Q4_0/Q8_0")
        return OndeviceError(f"llama.cpp could not quantize {src_name}: {why}{hint}")
    return None


def _written_and_free(dst: Path) -> str:
    """"93.0 MB written, 0.0 MB free there" for a failed write of ``dst`` (what can be read of it)."""
    parts = []
    with contextlib.suppress(OSError):
        parts.append(f"{dst.stat().st_size / 1e6:.1f} MB written")
    with contextlib.suppress(OSError):
        st = os.statvfs(dst.parent)
        parts.append(f"{st.f_bavail * st.f_frsize / 1e6:.1f} MB free there")
    return ", ".join(parts) or "nothing could be read of it"
