"""Tensor groups: the units ``ondevice fit`` gives a weight type to (OHQ's per-layer bit-widths, coarsened).

A group is one kind of matrix (attention q/k, attention v, attention output, ffn gate/up, ffn down, the
token embedding, the output head), optionally split into ``bands`` of consecutive layers. ``attn_v`` is a
kind of its own because it is more sensitive than q/k (llama.cpp's own Q4_K_M gives it more bits); fits
before the split had one ``attn_qkv`` group, still accepted by ``--groups`` as both. Their cached
measurements are keyed by plan (``attn_qkv=Q4_0``), which no group is named any more: they are measured
again, never misread. Few groups keep the
fit fast: every group costs one quantize + one KLD run per candidate type. A plan gives each group a ggml
type; it becomes ``REGEX=TYPE`` overrides on top of the base file type (:data:`BASE`), which llama.cpp's
quantizer applies per tensor (``quant.quantize``).

Sizes are exact: a matrix of ``n`` weights in a type with blocks of ``b`` weights stored in ``s`` bytes takes
``n / b * s`` bytes (gguf-py's ``GGML_QUANT_SIZES``). A type only fits a matrix whose rows (``ne[0]``) are a
whole number of blocks, so K-quants (256-weight blocks) are offered only to groups whose rows allow them
(SmolLM2-135M's 576-wide rows and Gemma-3-270M's 640-wide ones take only the 32-weight block types); a
refused type becomes llama.cpp's own fallback for it (Q4_K -> Q5_0, Q6_K -> Q8_0, ...), as its quantizer
does, and the fit says so.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import InvalidArgument

BASE = "Q8_0"  # the file type every variant starts from; groups not lowered stay here
# candidate types, highest quality first; each group gets the ones its row size allows
# (few on purpose: each costs a build + KLD run per group it fits; --types widens the search)
CANDIDATES = ("Q8_0", "Q6_K", "Q5_0", "Q4_K", "IQ4_NL", "Q4_0")
KINDS: dict[str, tuple[str, ...]] = {
    "attn_qk": ("attn_q", "attn_k"),
    "attn_v": ("attn_v",),
    "attn_output": ("attn_output",),
    "ffn_gate_up": ("ffn_gate", "ffn_up"),
    "ffn_down": ("ffn_down",),
    "token_embd": ("token_embd",),
    "output": ("output",),
}
ALIASES = {"attn_qkv": ("attn_qk", "attn_v")}  # the kind before attn_v was split off
_NAME = re.compile(r"^(?:blk\.(\d+)\.)?([a-z_]+)\.weight$")


@dataclass(frozen=True, slots=True)
class Matrix:
    name: str
    n: int  # weights
    row: int  # ne[0]: weights per row (the dimension blocks run along)


@dataclass(frozen=True, slots=True)
class Group:
    name: str  # e.g. ffn_down or ffn_down@0-14
    matrices: tuple[Matrix, ...]
    compute: bool  # its weights are multiplied at every token (False: the token embedding of an untied model)
    head: bool = False  # the output head (or the tied embedding): in a prompt, only its last token's logits

    @property
    def n(self) -> int:
        return sum(m.n for m in self.matrices)

    @property
    def regex(self) -> str:
        names = "|".join(re.escape(m.name) for m in self.matrices)
        return f"^(?:{names})$"

    def bytes(self, type_name: str) -> int:
        return sum(type_bytes(m.n, type_name) for m in self.matrices)

    def fits(self, type_name: str) -> bool:
        block = quant_size(type_name)[0]
        return all(m.row % block == 0 for m in self.matrices)


# llama.cpp's quantizer (llama_tensor_get_type): the type it uses instead when a tensor's rows are not a whole
# number of the wanted type's blocks (K-quants have 256-weight blocks); F16 when that does not fit either
FALLBACK = {"Q2_K": "IQ4_NL", "Q3_K": "IQ4_NL", "IQ4_XS": "IQ4_NL", "Q4_K": "Q5_0", "Q5_K": "Q5_1",
            "Q6_K": "Q8_0"}


def fallback(type_name: str, group: Group) -> str | None:
    """What llama.cpp's quantizer gives ``group`` instead of ``type_name`` its rows refuse (None: nothing
    below F16, which a fit does not offer)."""
    alt = FALLBACK.get(type_name.upper())
    return alt if alt is not None and group.fits(alt) else None


def quant_size(type_name: str) -> tuple[int, int]:
    """(weights per block, bytes per block) of a ggml type."""
    import gguf

    try:
        return gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[type_name.upper()]]
    except KeyError:
        raise InvalidArgument(f"{type_name!r} is not a ggml weight type; use one of {', '.join(CANDIDATES)}, "
                              f"F16") from None


def type_bytes(n: int, type_name: str) -> int:
    block, size = quant_size(type_name)
    return n // block * size


@dataclass(frozen=True, slots=True)
class Layout:
    """What the planner needs of a model file: its groups, the matrices left at :data:`BASE`, the rest."""

    groups: tuple[Group, ...]
    fixed: tuple[Matrix, ...]  # matrices in no group (stay at BASE)
    overhead_bytes: int  # metadata, 1-D tensors and padding: file size minus the matrices

    def size(self, plan: dict[str, str]) -> int:
        """Predicted file size of ``plan`` (group -> type) in bytes."""
        return (self.overhead_bytes + sum(type_bytes(m.n, BASE) for m in self.fixed)
                + sum(g.bytes(plan.get(g.name, BASE)) for g in self.groups))

    def smallest(self, types: tuple[str, ...] = CANDIDATES) -> int:
        """The least size any plan over ``types`` can have (bytes)."""
        opts = self.options(types)
        return self.size({g.name: min(opts[g.name], key=g.bytes) for g in self.groups})

    def options(self, types: tuple[str, ...] = CANDIDATES) -> dict[str, list[str]]:
        """Group -> the candidate types its rows allow (always including :data:`BASE`); a type its rows refuse
        is replaced by llama.cpp's fallback for it (:func:`fallback`), dropped when that is offered already."""
        out = {}
        for g in self.groups:
            ts = [t if g.fits(t) else fallback(t, g) for t in types]
            out[g.name] = list(dict.fromkeys(t for t in ts if t)) or [BASE]
        return out

    def refused(self, types: tuple[str, ...] = CANDIDATES) -> list[str]:
        """One line per group whose rows refuse some of ``types``: what it gets instead (for the plan)."""
        lines = []
        for g in self.groups:
            bad = [t for t in types if not g.fits(t)]
            if bad:
                rows = sorted({m.row for m in g.matrices})
                lines.append(f"{g.name} ({'/'.join(map(str, rows))}-wide rows): "
                             + ", ".join(f"{t} -> {fallback(t, g) or 'not offered'}" for t in bad))
        return lines

    def overrides(self, plan: dict[str, str]) -> list[tuple[str, str]]:
        """``(regex, type)`` overrides that turn a BASE quantization into ``plan``."""
        return [(g.regex, plan[g.name]) for g in self.groups if plan.get(g.name, BASE) != BASE]

    def expected_types(self, plan: dict[str, str]) -> dict[str, str]:
        """Matrix name -> the type the plan gives it (what the built file must hold)."""
        out = {m.name: BASE for m in self.fixed}
        for g in self.groups:
            out.update({m.name: plan.get(g.name, BASE) for m in g.matrices})
        return out


def layout(path: str | Path, bands: int = 1, kinds: tuple[str, ...] | list[str] | None = None) -> Layout:
    """Read the matrices of a GGUF (gguf-py's reader) and group them by kind and ``bands`` layer bands.

    ``kinds``: fit only these kinds of :data:`KINDS` (the others stay at :data:`BASE`); None: all.
    """
    import gguf

    if bands < 1:
        raise InvalidArgument(f"--bands {bands} must be >= 1")
    if kinds:
        kinds = [k for kind in kinds for k in ALIASES.get(kind, (kind,))]
    bad = [k for k in kinds or () if k not in KINDS]
    if bad:
        raise InvalidArgument(f"--groups {bad[0]!r} is not a group kind; use some of {', '.join(KINDS)}")
    reader = gguf.GGUFReader(str(path))
    kind_of = {k: kind for kind, ks in KINDS.items() for k in ks}
    n_layers = 1 + max((int(m.group(1)) for t in reader.tensors if (m := _NAME.match(t.name)) and m.group(1)),
                       default=0)
    parts: dict[str, list[Matrix]] = {}
    fixed: list[Matrix] = []
    matrix_bytes = 0
    names = {t.name for t in reader.tensors}
    for t in reader.tensors:
        if len(t.shape) < 2 or min(int(x) for x in t.shape[:2]) <= 1:
            continue
        mat = Matrix(t.name, int(t.n_elements), int(t.shape[0]))
        matrix_bytes += int(t.n_bytes)
        m = _NAME.match(t.name)
        kind = kind_of.get(m.group(2)) if m else None
        if kind is None or (kinds and kind not in kinds):
            fixed.append(mat)
            continue
        layer = m.group(1)
        key = kind
        if layer is not None and bands > 1:
            if bands > n_layers:
                raise InvalidArgument(f"--bands {bands} is more than the {n_layers} layers of {Path(path).name}; "
                                      f"use {n_layers} or fewer (one band per layer at most)")
            b = int(layer) * bands // n_layers  # band b holds the layers L with L * bands // n_layers == b:
            lo, hi = -(-b * n_layers // bands), -(-(b + 1) * n_layers // bands) - 1  # ceil(b n / bands), ...
            key = f"{kind}@{lo}-{hi}"
        parts.setdefault(key, []).append(mat)
    tied = "output.weight" not in names
    groups = tuple(Group(k, tuple(v), compute=(not k.startswith("token_embd")) or tied,
                         head=k.startswith("output") or (k.startswith("token_embd") and tied))
                   for k, v in parts.items())
    if not groups:
        raise InvalidArgument(f"{Path(path).name} has no weight matrices of the kinds asked for "
                              f"({', '.join(kinds or KINDS)}); it cannot be fitted")
    overhead = Path(path).stat().st_size - matrix_bytes
    return Layout(groups, tuple(fixed), overhead)
