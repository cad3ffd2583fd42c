"""``--budget "size<=110MB,tg>=100,kld<=0.02"``: what a fitted variant must meet.

Keys and the direction each may be bounded in:

- ``size`` (the file's bytes, not the memory it runs in) ``<=``: units B, KB/MB/GB (powers of 1000, as
  ``ondevice models`` prints sizes) or KiB/MiB/GiB and K/M/G (powers of 1024, as ``--profile mem=`` reads them);
- ``mem`` (alias ``ram``) ``<=``, same units: the variant's peak resident memory (RSS) while it runs the fit's
  bench tests (``--tests``, default pp128,tg64, at the context they need rounded up to 256 tokens: 256), in a
  process of its own: the weights as loaded plus what the runtime allocates (KV cache, compute buffers, the
  repacked copies llama.cpp's CPU_REPACK keeps beside their mapped pages of the types it has kernels for (on
  x86: Q4_0, IQ4_NL, Q4_K, Q2_K), the
  interpreter): e.g. ``mem<=200MiB`` (SmolLM2's shipped 98 MB file peaks at 174 MiB here, its all-Q8_0
  variant, 145 MB, at 218 MiB). Plans are checked on a *predicted* peak (``fit.memory``: the file's size plus
  the runtime's memory interpolated between the measured per-type variants), validated candidates on their
  *measured* one;
- ``tg`` (decode tok/s) and ``pp`` (prompt tok/s) ``>=``: a number, or ``1.1x`` = 1.1 times the shipped
  file's speed measured on this device;
- ``kld`` (mean KL divergence from the family's F16 on the calibration text) ``<=``;
- ``score`` (the ``--quality SUITE`` score, 0..1) ``>=``: a number, or ``0.9x`` = 0.9 times the reference's
  score. No plan's score is predicted: it is checked on the validated candidates only.

A memory-capped ``--profile`` adds a ceiling of its own on the file size (``fits``, not written by the user:
the cap less what the runtime measured under it needs besides the weights).

``<`` and ``>`` are accepted as ``<=`` and ``>=`` (measurements are not exact enough to tell them apart).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from ..errors import InvalidArgument

_EXAMPLE = "e.g. --budget 'size<=110MB,tg>=100,kld<=0.02' or 'mem<=300MB'"
_ITEM = re.compile(r"^\s*([a-z]+)\s*(<=|>=|<|>|=<|=>)\s*([^\s]+)\s*$", re.IGNORECASE)
_SIZE = re.compile(r"^(\d+(?:\.\d+)?)(b|kb|mb|gb|kib|mib|gib|k|m|g)?$", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30,
          "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}  # 512M: powers of 1024, as --profile mem=512M reads it
_UPPER = {"size", "mem", "kld"}  # bounded from above
_ALIASES = {"ram": "mem"}
_LOWER = {"tg", "pp", "score"}  # bounded from below


@dataclass(frozen=True, slots=True)
class Budget:
    """Bounds a variant must meet; None = unbounded. ``tg_rel``/``pp_rel``: multiples of the shipped file."""

    size: int | None = None
    mem: int | None = None  # peak RSS at the bench shapes (bytes)
    tg: float | None = None
    pp: float | None = None
    kld: float | None = None
    tg_rel: float | None = None
    pp_rel: float | None = None
    score: float | None = None
    score_rel: float | None = None
    fits: int | None = None  # the largest file the device profile's memory holds (bytes)
    text: str = ""

    def resolved(self, shipped_tg: float | None, shipped_pp: float | None) -> Budget:
        """Relative speed bounds turned into tok/s with the shipped file's measured speeds."""
        from dataclasses import replace

        out = self
        if self.tg_rel is not None and shipped_tg:
            out = replace(out, tg=max(out.tg or 0.0, self.tg_rel * shipped_tg))
        if self.pp_rel is not None and shipped_pp:
            out = replace(out, pp=max(out.pp or 0.0, self.pp_rel * shipped_pp))
        return out

    def scored(self, reference_score: float | None) -> Budget:
        """A relative score bound turned into a score with the reference's measured one."""
        from dataclasses import replace

        if self.score_rel is None or reference_score is None:
            return self
        return replace(self, score=max(self.score or 0.0, self.score_rel * reference_score))

    def violations(self, m: dict) -> list[str]:
        """The constraints ``m`` (keys size, tg, pp, kld, score, mem) breaks, as ``"tg 93.1 < 100"`` strings; a
        score bound is checked only where ``m`` has a score (measured, never predicted), a mem bound where ``m``
        has a peak RSS (predicted or measured)."""
        out = []
        if self.size is not None and m["size"] > self.size:
            out.append(f"size {m['size'] / 1e6:.1f}MB > {self.size / 1e6:.1f}MB")
        if self.mem is not None and m.get("mem") is not None and m["mem"] > self.mem:
            out.append(f"mem {m['mem'] / 2**20:.1f}MiB > {self.mem / 2**20:.1f}MiB (peak RSS)")
        if self.fits is not None and m["size"] > self.fits:
            out.append(f"size {m['size'] / 1e6:.1f}MB > {self.fits / 1e6:.1f}MB (the device profile's memory)")
        for key in ("tg", "pp"):
            lim = getattr(self, key)
            if lim is not None and m.get(key) is not None and m[key] < lim:
                out.append(f"{key} {m[key]:.1f} < {lim:.1f} tok/s")
        if self.kld is not None and m["kld"] > self.kld:
            out.append(f"kld {m['kld']:.4f} > {self.kld:g}")
        if self.score is not None and m.get("score") is not None and m["score"] < self.score:
            out.append(f"score {m['score']:.3f} < {self.score:.3f}")
        return out

    def speed_violations(self, m: dict) -> list[str]:
        """The tok/s bounds ``m`` breaks (see :meth:`violations`)."""
        return replace(self, size=None, mem=None, fits=None, kld=None, score=None).violations(m)

    def describe(self) -> str:
        return self.text or "none (least KLD)"


def shipped_meets(value: float | None, bound: float | None, figure: str) -> str:
    """"the shipped file (173 MiB) meets it: keep using it, or " where its ``value`` is within ``bound`` (the
    start of the advice of a bound no fitted variant can meet), else ""."""
    if value is None or bound is None or value > bound:
        return ""
    return f"the shipped file ({figure}) meets it: keep using it, or "


def say_if_shipped_is_better(shipped: dict, chosen: dict, bud: Budget, say) -> bool:
    """The shipped file is a candidate too: against a reference made from it, its KLD is 0, so where it also meets
    the budget, no larger and as fast (within 3%; its tok/s benched with the candidates where it was), the chosen
    variant is no gain over it (True)."""
    now = {**shipped, **(shipped.get("validation") or {})}
    mine = {"size": shipped["size"], "tg": now.get("tg"), "pp": now.get("pp"), "kld": 0.0, "mem": shipped.get("mem")}
    if bud.violations(mine) or mine["size"] > chosen["size"] or (mine["tg"] or 0) < 0.97 * chosen["tg"]:
        return False
    say(f"note: the shipped file already meets the budget and is no worse: {mine['size'] / 1e6:.1f} MB (chosen "
        f"{chosen['size'] / 1e6:.1f}), tg {mine['tg']:.1f} tok/s (chosen {chosen['tg']:.1f}), KLD 0 against the "
        f"reference made from it (chosen {chosen['kld']:.4f}); keep using it, or widen --types/--groups for a "
        f"variant that beats it")
    return True


def _number(key: str, raw: str) -> float:
    try:
        v = float(raw)
    except ValueError:
        raise InvalidArgument(f"--budget {key}: {raw!r} is not a number; {_EXAMPLE}") from None
    if not (0 < v < float("inf")):
        raise InvalidArgument(f"--budget {key}: {raw!r} must be a positive number; {_EXAMPLE}")
    return v


def parse_budget(text: str | Budget | None) -> Budget:
    """Parse ``"size<=110MB,tg>=100,kld<=0.02"`` (any subset, comma-separated) into a :class:`Budget`; ``none``
    (or nothing): no bound, the least KLD."""
    if isinstance(text, Budget):
        return text
    if text is None or str(text).strip().lower() in ("", "none"):
        return Budget()
    fields: dict = {}
    for part in str(text).split(","):
        if not part.strip():
            raise InvalidArgument(f"--budget {text!r} has an empty item (two commas?); {_EXAMPLE}")
        m = _ITEM.match(part)
        if not m:
            raise InvalidArgument(f"--budget item {part.strip()!r} is not KEY<=VALUE or KEY>=VALUE; {_EXAMPLE}")
        key, op, raw = m.group(1).lower(), m.group(2).replace("=<", "<=").replace("=>", ">="), m.group(3)
        key = _ALIASES.get(key, key)
        if key not in _UPPER | _LOWER:
            raise InvalidArgument(f"--budget key {key!r} is unknown; use size (file bytes), mem (peak RSS), tg, pp, "
                                  f"kld or score; {_EXAMPLE}")
        if key in fields or f"{key}_rel" in fields:
            raise InvalidArgument(f"--budget bounds {key} twice; give each key once")
        if key in _UPPER and op.startswith(">") or key in _LOWER and op.startswith("<"):
            want = "<=" if key in _UPPER else ">="
            raise InvalidArgument(f"--budget {part.strip()!r}: {key} can only be bounded as {key}{want}VALUE "
                                  f"(a {'ceiling' if key in _UPPER else 'floor'})")
        if key in ("size", "mem"):
            sm = _SIZE.match(raw)
            if not sm:
                raise InvalidArgument(f"--budget {key}: {raw!r} is not a size; use e.g. 110MB, 100MiB or 0.1GB")
            fields[key] = int(_number(key, sm.group(1)) * _UNITS[(sm.group(2) or "b").lower()])
        elif key in _LOWER and raw.lower().endswith("x"):
            fields[f"{key}_rel"] = _number(key, raw[:-1])
        else:
            fields[key] = _number(key, raw)
    return Budget(**fields, text=str(text).strip())
