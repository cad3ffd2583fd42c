"""Runtime knobs of a fitted variant: threads, flash attention, micro-batch and KV cache type, by the real bench.

The weights are only half of what runs: llama.cpp's thread count, flash attention and micro-batch change
its speed on a given CPU without changing its output (beyond float rounding), so ``ondevice fit --knobs``
times them on the chosen file, one knob at a time from the default (a grid would cost every combination),
takes each one that is faster than the default by more than the bench's own spread, and benches the
combination once more: what is reported is that measurement, never a sum of gains. A quantized KV cache
(q8_0, which needs flash attention for V) is timed and shown too, but not chosen: it changes the output,
and the fit's KLD does not measure it. Under a device profile every trial runs under it, and thread counts
above the profile's are not tried (that device does not have them).

Every trial also decodes at a KV depth (``depth``, 1024 by default: a chat with some history), because the fit's
own tests start from an empty cache where flash attention's cost does not show: on an Intel Xeon (AVX-512, AMX)
llama.cpp's CPU flash attention decoded SmolLM2 within 3% of it off at depth 0 and at 0.48x at depth 1024. Where
decode decides, a knob is judged on both decode tests together: their harmonic mean, the mean time per token of a
reply from an empty cache and one at depth (the prompt test is shown, not weighed: ``pp`` decides when the
budget bounds only prompt speed).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import InvalidArgument
from ..models.runtime_knobs import FA_WORDS as _FA  # -fa's words


@dataclass(frozen=True)
class Knobs:
    threads: int
    flash_attn: bool | None = None  # None: llama.cpp decides (auto), as run and serve do unless told
    n_ubatch: int = 512
    type_kv: str = "f16"

    def describe(self) -> str:
        return (f"threads {self.threads}, flash attention {_FA[self.flash_attn]}, "
                f"ubatch {self.n_ubatch}, KV {self.type_kv}")

    def flags(self, default: Knobs) -> str:
        """The run/serve flags that set the knobs that differ from ``default`` (a stored variant loads with them on
        the machine that measured them: ``fitted_knobs``)."""
        out = [f"-t {self.threads}"] if self.threads != default.threads else []
        out += [f"-fa {_FA[self.flash_attn]}"] if self.flash_attn != default.flash_attn else []
        out += [f"-ub {self.n_ubatch}"] if self.n_ubatch != default.n_ubatch else []  # serve's (run has no -ub)
        return " ".join(out)

    def settings(self) -> dict:
        return {"threads": self.threads, "flash_attn": self.flash_attn, "n_ubatch": self.n_ubatch,
                "type_k": self.type_kv, "type_v": self.type_kv}


def _faster(a: dict, b: dict, key: str) -> bool:
    """``a`` is faster than ``b`` on ``key`` by more than twice the larger spread of the two benches."""
    spread = max(a.get(f"{key}_std") or 0.0, b.get(f"{key}_std") or 0.0, 0.01 * b[key])
    return a[key] - b[key] > 2 * spread


def _decode(s: dict) -> tuple[float, float]:
    """Decode tok/s over a reply from an empty cache and one at depth (the harmonic mean of ``tg`` and ``deep``:
    the mean time per token of the two) and its spread, propagated from theirs."""
    a, b = s["tg"], s["deep"]
    h = 2.0 / (1.0 / a + 1.0 / b)
    return h, ((h * h / (2 * a * a) * (s.get("tg_std") or 0.0)) ** 2
               + (h * h / (2 * b * b) * (s.get("deep_std") or 0.0)) ** 2) ** 0.5


def deep_test(tests: tuple[str, ...], depth: int) -> str | None:
    """The decode test the knobs are also timed on: the fit's own at KV depth ``depth`` (None: 0, or the fit's
    decode test is already at that depth)."""
    (tg,) = [t for t in tests if t.startswith("tg")]
    m = re.match(r"tg(\d+)(?:@d(\d+))?$", tg)
    if depth <= 0 or (m and int(m.group(2) or 0) >= depth):
        return None
    return f"tg{m.group(1) if m else 64}@d{depth}"


def tune(path: str | Path, threads: int, tests: tuple[str, ...], repetitions: int, key: str = "tg",
         say=print, profile=None, depth: int = 1024, what: str = "the chosen file",
         floors: dict[str, float] | None = None) -> dict:
    """Time ``path`` at the default knobs and one knob changed at a time; bench the chosen combination.

    ``key``: what "faster" means (``tg`` decode or ``pp`` prompt tok/s); every trial also decodes at KV depth
    ``depth`` (0: not), and ``tg`` then decides on ``decode``, the harmonic mean of the two decode tests;
    ``profile``: a ``fit.profile.FitProfile`` the benches run under; ``what``: the file, as the table names it;
    ``floors``: the budget's speed bounds (``{"tg": 110.2}``): knobs that measure below one are not taken (flash
    attention off can decode faster at depth and slower from an empty cache, which is what a ``tg`` bound bounds).
    Returns ``{"rows": [(what, knobs, speed)],
    "chosen": knobs dict, "measured": speed, "flags": run/serve flags, "deep_test": the depth test or None}``; a
    speed has ``tg`` and ``pp`` tok/s and, with a depth, ``deep`` and ``decode``.
    """
    import ondevice

    from ..engine.resources import physical_cores
    from .measure import speed_of

    deep = deep_test(tests, depth)

    def run(k: Knobs) -> dict:
        s = k.settings()
        if profile is not None and profile.spec:
            s["profile"] = profile.spec
        recs = [r if isinstance(r, dict) else r.to_dict()
                for r in ondevice.bench([str(path)], ",".join(tests + ((deep,) if deep else ())),
                                        repetitions=repetitions, store=False, roofline=False,
                                        **{n: [v] for n, v in s.items()})]
        if deep and any(r.get("status") == "oom" for r in recs):  # one load for all tests: sized for the deepest
            where = f"under the device profile {profile.spec!r}" if profile is not None and profile.spec else \
                "on this machine"
            raise InvalidArgument(f"the knobs' benches, whose context holds the decode at KV depth {depth} ({deep}), "
                                  f"ran out of memory {where}: give a smaller --knobs-depth (0: none)")
        out = speed_of([r for r in recs if r["test"] != deep])
        if deep:
            d = speed_of([r for r in recs if r["test"] == deep])
            out["deep"], out["deep_std"] = d["tg"], d["tg_std"]
            out["noisy"] = out["noisy"] or d["noisy"]
            out["decode"], out["decode_std"] = _decode(out)
        return out

    width = max(9, len(f"{deep} t/s")) if deep else 0

    def row(label: str, s: dict) -> str:
        return f"  {label:58s} {s['tg']:7.1f} {s['pp']:7.1f}" + (f" {s['deep']:{width}.1f} {s['decode']:10.1f}"
                                                                  if deep else "")

    default = Knobs(threads)
    most = physical_cores()
    if profile is not None and (profile.profile.threads or profile.profile.cpu_affinity):
        most = min(most, profile.profile.resolved_threads())
    trials = [(f"threads {t}", Knobs(t)) for t in range(1, most + 1) if t != threads]
    trials += [("flash attention on", Knobs(threads, flash_attn=True)),
               ("flash attention off", Knobs(threads, flash_attn=False)),
               ("ubatch 128", Knobs(threads, n_ubatch=128)),
               ("KV q8_0 (+ flash attention; output changes: not chosen)", Knobs(threads, True, 512, "q8_0"))]
    base = run(default)
    rows = [("default", default, base)]
    decides = f"{key} decides"
    if deep and key == "tg":  # a decode knob is judged on a reply from an empty cache and one at depth together
        key, decides = "decode", f"decode over tg and {deep} decides: their mean time per token"
    say(f"runtime knobs on {what} (one at a time from the default; {decides}):")
    say(f"  {'knobs':58s} {'tg t/s':>7} {'pp t/s':>7}" + (f" {deep + ' t/s':>{width}} {'decode t/s':>10}"
                                                           if deep else ""))
    say(row("default: " + default.describe(), base))
    best, gain = asdict(default), {}

    def below(s: dict) -> str:  # the budget's speed bounds this measurement misses, as the table says it
        return ", ".join(f"{m} {s[m]:.1f} < {lim:.1f}" for m, lim in (floors or {}).items() if s[m] < lim)

    for what, k in trials:
        s = run(k)
        rows.append((what, k, s))
        faster = k.type_kv == "f16" and _faster(s, base, key)
        take = faster and not below(s)
        say(row(what, s) + ("  (faster)" if take else f"  (faster, but under the budget: {below(s)})" if faster
                            else ""))
        if take:  # each trial changes one knob; of two faster values (threads) the faster one stays
            ((name, value),) = [(f, v) for f, v in asdict(k).items() if v != getattr(default, f)]
            if s[key] > gain.get(name, 0.0):
                best[name], gain[name] = value, s[key]
    chosen = Knobs(**best)
    measured = base if chosen == default else run(chosen)
    if chosen != default and (not _faster(measured, base, key) or below(measured)):  # knobs that win alone may not
        # together, and together they may miss a bound each met alone
        miss = below(measured)
        say(row("together: " + chosen.describe(), measured)
            + (f"  (measured: under the budget: {miss})" if miss else "  (measured: not faster than the default)"))
        chosen, measured = default, base
        say(f"  chosen: the default (the faster knobs, benched together, were "
            f"{f'under the budget: {miss}' if miss else 'not faster'})")
    elif chosen != default:
        say(row("chosen: " + chosen.describe(), measured) + "  (measured)")
        say(f"  as flags of run, chat and serve: {chosen.flags(default)}")
    else:
        say("  chosen: the default (no knob was faster by more than the bench's spread)")
    return {"rows": [(w, asdict(k), s) for w, k, s in rows], "chosen": asdict(chosen), "measured": measured,
            "flags": chosen.flags(default), "deep_test": deep}


def runtime_record(rt: dict) -> dict:
    """What a fit stores of ``tune``'s result (``measured["runtime"]`` in the variant's provenance)."""
    speeds = ("tg", "pp", "deep", "decode") if rt["deep_test"] else ("tg", "pp")
    return {"knobs": rt["chosen"], "flags": rt["flags"], "deep_test": rt["deep_test"],
            **{k: rt["measured"][k] for k in speeds},
            "trials": [{"what": w, **k, **{n: sp[n] for n in speeds}} for w, k, sp in rt["rows"]]}


def knobs_note(runtime: dict | None) -> str:
    """The fit's ``chosen:`` line's note on the knobs (empty where the default was kept)."""
    if not runtime or not runtime.get("flags"):
        return ""
    if runtime.get("deep_test"):  # decided on decode over both tests: the empty-cache tg alone may be lower
        return (f" (decode {runtime['decode']:.1f} tok/s over tg and {runtime['deep_test']} with its knobs, "
                f"{runtime['trials'][0]['decode']:.1f} without: {runtime['flags']})")
    return f" (tg {runtime['tg']:.1f} with its knobs: {runtime['flags']})"
