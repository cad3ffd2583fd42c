"""Equivalent transformations before quantizing (AWQ / SmoothQuant / MobileQuant), kept only where they help.

A pre-norm transformer multiplies each matrix's input by something it can absorb: RMSNorm's output is
``x / rms(x) * g``, so dividing ``g`` by a per-channel scale ``s`` and multiplying the columns of the matrices
that read that output (``attn_q/k/v`` after ``attn_norm``, ``ffn_gate/up`` after ``ffn_norm``) by ``s``
computes exactly the same function. Two more pairs are linear in the channel too: SwiGLU's ``silu(gate) * up``
is linear in ``up`` (``ffn_up`` rows / ``s`` and ``ffn_down`` columns * ``s``), and attention's output is a
convex combination of V rows per head (``attn_v`` rows / ``s`` and the ``attn_output`` columns of every query
head sharing that KV head * ``s``). The function is unchanged; the *weights* are not: with
``s = act^alpha / w^(1 - alpha)`` (``act``: the RMS of each input channel from the importance matrix, ``w``:
the largest weight in that column; normalised to geometric mean 1), channels with large activations get
larger weights and so a smaller relative rounding error when the matrix is quantized.

The importance matrix (mean ``x^2`` per input column) of the transformed model is the old one / ``s^2``:
:func:`transform_imatrix` gives it, so imatrix quantization of the transformed file weights the same
activations. Whether the transform helps at all is measured, never assumed: :func:`choose` builds the
transformed reference for a small grid of ``alpha``, picks the alpha with the least KLD on the calibration
text at the fit's lowest plan, and keeps it only when it lowers the held-out KLD of that plan against the
UNtransformed reference by the same rule ``--imatrix auto`` uses (:func:`~ondevice.fit.imatrix.lowers_kld`).

Only the ``llama`` architecture (SmolLM2, Llama, ...) is transformed: other architectures (Gemma-3's
sandwich norms, Qwen2's q/k/v biases, ...) may hide a non-linearity or bias between a norm and its matrices,
and an equivalence that is not checked on them is refused rather than assumed.
"""

from __future__ import annotations

import hashlib
import io
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from ..errors import InvalidArgument, OndeviceError
from ..models.gguf_copy import writer_like

ARCHS = ("llama",)
PARTS = ("norms", "down", "v")  # which equivalences are applied: norm->matmuls, up->down, v->output
ALPHAS = (0.25, 0.5)  # the grid ``choose`` measures
CLIP = 64.0  # scales are clipped to [1/CLIP, CLIP] (geometric mean 1) so no F16 weight can overflow


def _arch(reader) -> str:
    f = reader.fields.get("general.architecture")
    return f.contents() if f is not None else "?"


def check_arch(path: str | os.PathLike[str]) -> str:
    """The file's architecture (a fast header walk), refused unless it is one the transform is checked on."""
    from ..models.gguf_check import validate_gguf

    arch = validate_gguf(path).architecture
    if arch not in ARCHS:
        raise InvalidArgument(f"--transform: {Path(path).name} is a {arch!r} model; the equivalent transform is "
                              f"only implemented for {', '.join(ARCHS)} (its norms, biases and attention are not "
                              f"checked for other architectures); use --transform off")
    return arch


def _tensors(reader) -> dict[str, np.ndarray]:
    """Every weight as float32 ``(out, in)`` (numpy order); refuses quantized matrices."""
    from gguf import GGMLQuantizationType as Q

    out = {}
    for t in reader.tensors:
        if t.tensor_type not in (Q.F16, Q.F32, Q.BF16):
            raise InvalidArgument(f"--transform needs an unquantized reference; {t.name} is {t.tensor_type.name} "
                                  f"(give --ref an F16 file or use --transform off)")
        out[t.name] = t.data
    return out


def _colmax(*ws: np.ndarray) -> np.ndarray:
    return np.max([np.abs(w.astype(np.float32)).max(axis=0) for w in ws], axis=0)


def _scale(act2: np.ndarray, wmax: np.ndarray, alpha: float) -> np.ndarray:
    """``act^alpha / w^(1-alpha)``, geometric mean 1, clipped to [1/CLIP, CLIP]."""
    act = np.sqrt(np.maximum(act2.astype(np.float64), 0.0))
    act = np.maximum(act, max(act.max(), 1e-30) * 1e-5)
    w = np.maximum(wmax.astype(np.float64), max(wmax.max(), 1e-30) * 1e-5)
    log_s = alpha * np.log(act) - (1.0 - alpha) * np.log(w)
    return np.exp(np.clip(log_s - log_s.mean(), -np.log(CLIP), np.log(CLIP)))


def _heads(reader) -> tuple[int, int]:
    arch = _arch(reader)
    n_head = int(reader.fields[f"{arch}.attention.head_count"].contents())
    kv = reader.fields.get(f"{arch}.attention.head_count_kv")
    return n_head, int(kv.contents()) if kv is not None else n_head


def scales(reader, stats: dict[str, np.ndarray], alpha: float, parts: tuple[str, ...] = PARTS) -> dict[str, np.ndarray]:
    """Per layer and part, the scale vector: ``blk.N.attn`` / ``blk.N.ffn`` (norm channels), ``blk.N.down``
    (ffn channels), ``blk.N.v`` (KV channels). ``stats``: the importance matrix (mean x^2 per input column)."""
    w = _tensors(reader)
    n_head, n_kv = _heads(reader)
    out: dict[str, np.ndarray] = {}
    layers = sorted({int(n.split(".")[1]) for n in w if n.startswith("blk.")})

    def need(name: str) -> np.ndarray:
        if name not in stats:
            raise OndeviceError(f"the importance matrix has no entry for {name}; collect it on this reference")
        return stats[name]

    for i in layers:
        b = f"blk.{i}."
        if "norms" in parts:
            qkv = [w[b + f"attn_{x}.weight"] for x in "qkv"]
            out[b + "attn"] = _scale(need(b + "attn_q.weight"), _colmax(*qkv), alpha)
            out[b + "ffn"] = _scale(need(b + "ffn_up.weight"), _colmax(w[b + "ffn_gate.weight"], w[b + "ffn_up.weight"]),
                                    alpha)
        if "down" in parts:
            out[b + "down"] = _scale(need(b + "ffn_down.weight"), _colmax(w[b + "ffn_down.weight"]), alpha)
        if "v" in parts:
            o = w[b + "attn_output.weight"]
            hd = o.shape[1] // n_head
            group = n_head // n_kv  # query heads per KV head: their output columns share one V channel
            act2 = need(b + "attn_output.weight").reshape(n_kv, group, hd).mean(axis=1).reshape(-1)
            wmax = _colmax(o).reshape(n_kv, group, hd).max(axis=1).reshape(-1)
            out[b + "v"] = _scale(act2, wmax, alpha)
    return out


def _o_cols(s_v: np.ndarray, n_head: int, n_kv: int) -> np.ndarray:
    """The KV-channel scale expanded to attn_output's columns (query head h reads KV head h // group)."""
    hd = s_v.size // n_kv
    return np.repeat(s_v.reshape(n_kv, 1, hd), n_head // n_kv, axis=1).reshape(-1)


def _effects(sc: dict[str, np.ndarray], n_head: int, n_kv: int) -> dict[str, tuple[np.ndarray | None, np.ndarray | None]]:
    """tensor name -> (row divisor, column multiplier); a norm weight is a row of one."""
    eff: dict[str, list] = {}

    def add(name: str, rows=None, cols=None) -> None:
        r, c = eff.setdefault(name, [None, None])
        eff[name] = [r if rows is None else (rows if r is None else r * rows),
                     c if cols is None else (cols if c is None else c * cols)]

    for key, s in sc.items():
        b, part = key.rsplit(".", 1)
        b += "."
        if part == "attn":
            add(b + "attn_norm.weight", rows=s)
            for x in "qkv":
                add(b + f"attn_{x}.weight", cols=s)
        elif part == "ffn":
            add(b + "ffn_norm.weight", rows=s)
            add(b + "ffn_gate.weight", cols=s)
            add(b + "ffn_up.weight", cols=s)
        elif part == "down":
            add(b + "ffn_up.weight", rows=s)
            add(b + "ffn_down.weight", cols=s)
        elif part == "v":
            add(b + "attn_v.weight", rows=s)
            add(b + "attn_output.weight", cols=_o_cols(s, n_head, n_kv))
    return {k: (v[0], v[1]) for k, v in eff.items()}


def transform_imatrix(stats: dict[str, np.ndarray], sc: dict[str, np.ndarray], n_head: int, n_kv: int
                      ) -> dict[str, np.ndarray]:
    """The importance matrix of the transformed model: each input column's mean x^2 divided by its scale^2."""
    out = {k: v.copy() for k, v in stats.items()}
    for name, (_, cols) in _effects(sc, n_head, n_kv).items():
        if cols is not None and name in out:
            out[name] = (out[name] / cols.astype(np.float64) ** 2).astype(np.float32)
    return out


def load_imatrix(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def save_imatrix(stats: dict[str, np.ndarray], path: str | os.PathLike[str]) -> Path:
    from ..models.store import atomic_write

    buf = io.BytesIO()
    np.savez(buf, **stats)
    with atomic_write(Path(path)) as f:
        f.write(buf.getvalue())
    return Path(path)


def write(reader, stats: dict[str, np.ndarray], dst: str | os.PathLike[str], alpha: float,
          parts: tuple[str, ...] = PARTS) -> dict[str, np.ndarray]:
    """Write the transformed copy of the model behind ``reader`` (architecture checked by the caller) to ``dst`` (temp file, then rename): every
    metadata key and untouched tensor copied, the touched ones scaled in float32 and stored in their own
    type. Returns the scales."""
    sc = scales(reader, stats, alpha, parts)
    eff = _effects(sc, *_heads(reader))
    dst = Path(dst)
    tmp = dst.with_name(f".{dst.name}.part")
    try:
        w = writer_like(reader, tmp)
        w.add_string("ondevice.transform.alpha", f"{alpha:g}")
        w.add_string("ondevice.transform.parts", ",".join(parts))
        for t in reader.tensors:
            w.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for t in reader.tensors:
            if t.name not in eff:
                w.write_tensor_data(t.data, tensor_endianess=reader.endianess)
                continue
            rows, cols = eff[t.name]
            x = np.asarray(t.data, dtype=np.float32)
            if rows is not None:
                x = x / rows.astype(np.float32).reshape((-1,) + (1,) * (x.ndim - 1))
            if cols is not None:
                x = x * cols.astype(np.float32)
            y = x.astype(t.data.dtype)
            if not np.all(np.isfinite(y.astype(np.float32))):
                raise OndeviceError(f"the transform overflows {t.name} in {t.tensor_type.name}; lower alpha")
            w.write_tensor_data(y, tensor_endianess=reader.endianess)
        w.close()
        os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return sc


def transform(src: str | os.PathLike[str], imatrix: str | os.PathLike[str], dst: str | os.PathLike[str], *,
              alpha: float = 0.5, parts: tuple[str, ...] = PARTS, imatrix_out: str | os.PathLike[str] | None = None
              ) -> dict[str, np.ndarray]:
    """Transform the GGUF at ``src`` with scales from the importance matrix ``imatrix`` (``.npz``) into
    ``dst``; also write the transformed importance matrix to ``imatrix_out`` when given. Returns the scales."""
    import gguf

    bad = [p for p in parts if p not in PARTS]
    if bad:
        raise InvalidArgument(f"transform part {bad[0]!r}: use some of {', '.join(PARTS)}")
    check_arch(src)
    reader = gguf.GGUFReader(str(src))
    stats = load_imatrix(imatrix)
    sc = write(reader, stats, dst, alpha, parts)
    if imatrix_out is not None:
        save_imatrix(transform_imatrix(stats, sc, *_heads(reader)), imatrix_out)
    return sc


# --- the fit's decision ----------------------------------------------------------------------------------


@dataclass
class Choice:
    """What ``choose`` decided: ``used`` and, when used, the transformed reference every variant is built from,
    its importance matrix (None when the fit quantizes without one) and the cache tag of its measurements."""

    used: bool
    info: dict
    source: Path | None = None
    imatrix: Path | None = None
    imatrix_sha: str | None = None
    tag: str = ""
    files: list[Path] = field(default_factory=list)

    def quality(self, q: tuple) -> tuple:
        """A ``(cache, text, ctx, chunks)`` whose cache section is this transform's own: the same plan built
        from the transformed reference is a different file."""
        from .measure import Cache

        cache, *rest = q
        return (Cache(cache.path, f"{cache.section}-t{self.tag}"), *rest)


def _tag(alpha: float, parts: tuple[str, ...], stats_sha: str) -> str:
    return hashlib.sha256(f"{alpha:g}|{','.join(parts)}|{stats_sha}".encode()).hexdigest()[:12]


def choose(mode: str, meter, reference, low: dict[str, str], stats: str | Path | None, calib_q: tuple, held_q: tuple,
           imatrix: Path | None, imatrix_sha: str | None, workdir: Path, say, *,
           alphas: tuple[float, ...] | None = None, parts: tuple[str, ...] = PARTS) -> Choice:
    """Decide ``--transform auto|on|off`` at the fit's lowest plan ``low``: for each alpha, build the
    transformed reference (and its importance matrix when the fit uses one, ``imatrix``), quantize ``low``
    from it and score it against the untransformed reference; alpha is picked on the calibration text, the
    decision is taken on the held-out text by :func:`~ondevice.fit.imatrix.lowers_kld`. ``alphas``: the grid
    (default :data:`ALPHAS`)."""
    import gguf

    from .imatrix import lowers_kld
    from .measure import Item

    if mode not in ("auto", "on", "off"):
        raise InvalidArgument(f"--transform {mode!r} must be auto, on or off")
    if mode == "off":
        return Choice(False, {"used": False, "why": "off"})
    try:
        check_arch(reference.path)
    except InvalidArgument:
        if mode == "on":
            raise
        why = f"not tried: {Path(reference.path).name} is not a {'/'.join(ARCHS)} model"
        say(f"equivalent transform: {why}")
        return Choice(False, {"used": False, "why": why})
    if stats is None:
        raise OndeviceError("the equivalent transform needs the importance matrix's activations; none was collected")
    stats = Path(stats)
    reader = gguf.GGUFReader(str(reference.path))
    stats_sha = hashlib.sha256(stats.read_bytes()).hexdigest()
    base_stats = load_imatrix(stats)
    heads = _heads(reader)
    def one(a: float) -> tuple[float, Choice, list[dict], object]:
        c = Choice(True, {}, workdir / f"transform-{_tag(a, parts, stats_sha)}.gguf", tag=_tag(a, parts, stats_sha))
        c.files.append(c.source)
        sc = write(reader, base_stats, c.source, a, parts) if not c.source.is_file() else scales(
            reader, base_stats, a, parts)
        if imatrix is not None:
            c.imatrix = save_imatrix(transform_imatrix(base_stats, sc, *heads), workdir / f"imatrix-t{c.tag}.npz")
            c.imatrix_sha = hashlib.sha256(c.imatrix.read_bytes()).hexdigest()
            c.files.append(c.imatrix)
        sub = workdir / f"t-{c.tag}"  # its variants' file names are the untransformed ones'
        sub.mkdir(exist_ok=True)
        tm = replace(meter, source=c.source, workdir=sub, built=0, reused=0)
        r = tm.measure([Item(low, [c.quality(calib_q), c.quality(held_q)], c.imatrix, c.imatrix_sha)])[0]["kld"]
        sub.rmdir()
        return a, c, r, tm

    # the untransformed plan and each alpha at once: builds overlap evals, as in ``Meter.measure``
    with ThreadPoolExecutor(max(1, meter.jobs)) as ex:
        fut = ex.submit(meter.measure, [Item(low, [calib_q, held_q], imatrix, imatrix_sha)])
        runs = list(ex.map(one, alphas or ALPHAS))
        without = fut.result()[0]["kld"]
    tried: list[tuple[float, Choice, list[dict]]] = []
    for a, c, r, tm in runs:
        meter.built, meter.reused = meter.built + tm.built, meter.reused + tm.reused
        tried.append((a, c, r))
        say(f"  transform alpha {a:g}: KLD calib {r[0]['kld']:.4f} (without {without[0]['kld']:.4f}), "
            f"held-out {r[1]['kld']:.4f} (without {without[1]['kld']:.4f})")
    alpha, best, r = min(tried, key=lambda x: x[2][0]["kld"])
    for _, c, _ in tried:
        if c is not best:
            for f in c.files:
                f.unlink(missing_ok=True)
    helps = lowers_kld(without[1], r[1])
    used = mode == "on" or helps
    best.used = used
    best.info = {"used": used, "alpha": alpha, "parts": list(parts), "plan": low, "kld_without": without[1]["kld"],
                 "kld_with": r[1]["kld"], "grid": {f"{a:g}": {"calib": x[0]["kld"], "held": x[1]["kld"]}
                                                   for a, _, x in tried},
                 "imatrix": imatrix_sha, "tag": best.tag}
    say(f"equivalent transform on the lowest plan (alpha {alpha:g} chosen on the calibration text): held-out KLD "
        f"{without[1]['kld']:.4f} without, {r[1]['kld']:.4f} with -> {'used' if used else 'not used'}"
        + (" (forced on)" if mode == "on" and not helps else ""))
    if not used:
        for f in best.files:
            f.unlink(missing_ok=True)
    return best


def keep_where_it_helps(vmeter, cands: list, items: list, res: list[dict], plain: tuple, say) -> None:
    """``--transform auto`` on the validated candidates: the decision at the lowest plan says whether to try the
    transform at all, but a plan of other types can lose by it (at Q4_1 and Q4_K it cost KLD: README). So each
    candidate is also built from the untransformed reference (``plain``: its source, importance matrix and
    sha, calibration and held-out quality tuples) and keeps the transform only where it lowers that
    candidate's held-out KLD by :func:`~ondevice.fit.imatrix.lowers_kld`; otherwise its untransformed file,
    KLDs (and ``res`` entry: the perplexity comes with it) replace the transformed ones. The two files hold
    the same types, so the speed measured stays. Each candidate's ``measured["transform"]`` says which."""
    from .imatrix import lowers_kld
    from .measure import Item

    source, imatrix, imatrix_sha, calib_q, held_q = plain
    pm = replace(vmeter, source=source, built=0, reused=0, spliced=0)
    pitems = [Item(it.plan, [calib_q, held_q], imatrix, imatrix_sha, it.keep.with_name(f"{it.keep.stem}-plain.gguf"))
              for it in items]
    pres = pm.measure(pitems)
    vmeter.built, vmeter.reused, vmeter.spliced = (vmeter.built + pm.built, vmeter.reused + pm.reused,
                                                   vmeter.spliced + pm.spliced)
    for c, it, r, pit, pr in zip(cands, items, res, pitems, pres):
        with_, without = r["kld"][1], pr["kld"][1]
        used = lowers_kld(without, with_)
        c.measured["transform"] = {"used": used, "kld_with": with_["kld"], "kld_without": without["kld"],
                                   "kld_err_with": with_["kld_err"], "kld_err_without": without["kld_err"]}
        say(f"  {c.summary()}: the transform is {'kept' if used else 'not kept'} (held-out KLD "
            f"{with_['kld']:.4f} with it, {without['kld']:.4f} without)")
        if used:
            pit.keep.unlink(missing_ok=True)
            continue
        os.replace(pit.keep, it.keep)  # the candidate's file is the untransformed one from here on
        r["kld"] = pr["kld"]
        c.measured.update(kld=without["kld"], kld_calib=pr["kld"][0]["kld"], kld_err=without["kld_err"],
                          size=it.keep.stat().st_size)
