"""Runtime knobs of a fitted variant: threads, flash attention, micro-batch and KV cache type, by the real bench.

The weights are only half of what runs: llama.cpp's thread count, flash attention and micro-batch change
its speed on a given CPU without changing its output (beyond float rounding), so ``ondevice fit --knobs``
times them on the chosen file, one knob at a time from the default (a grid would cost every combination),
takes each one that is faster than the default by more than the bench's own spread, and benches the
combination once more: what is reported is that measurement, never a sum of gains. A quantized KV cache
(q8_0, which needs flash attention for V) is timed and shown too, but not chosen: it changes the output,
and the fit's KLD does not measure it. Under a device profile every trial runs under it, and thread counts
above the profile's are not tried (that device does not have them).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

_FA = {None: "auto", True: "on", False: "off"}  # -fa's words


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
        """The run/serve flags that set the knobs that differ from ``default`` (nothing applies them for you)."""
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


def tune(path: str | Path, threads: int, tests: tuple[str, ...], repetitions: int, key: str = "tg",
         say=print, profile=None) -> dict:
    """Time ``path`` at the default knobs and one knob changed at a time; bench the chosen combination.

    ``key``: what "faster" means (``tg`` decode or ``pp`` prompt tok/s); ``profile``: a ``fit.profile.FitProfile``
    the benches run under. Returns ``{"rows": [(what, knobs,
    speed)], "chosen": knobs dict, "measured": speed}``.
    """
    import ondevice

    from ..engine.resources import physical_cores
    from .measure import speed_of

    def run(k: Knobs) -> dict:
        s = k.settings()
        if profile is not None and profile.spec:
            s["profile"] = profile.spec
        return speed_of(ondevice.bench([str(path)], ",".join(tests), repetitions=repetitions, store=False,
                                       roofline=False, **{n: [v] for n, v in s.items()}))

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
    say(f"runtime knobs on the chosen file (one at a time from the default; {key} decides):")
    say(f"  {'knobs':58s} {'tg t/s':>7} {'pp t/s':>7}")
    say(f"  {'default: ' + default.describe():58s} {base['tg']:7.1f} {base['pp']:7.1f}")
    best, gain = asdict(default), {}
    for what, k in trials:
        s = run(k)
        rows.append((what, k, s))
        take = k.type_kv == "f16" and _faster(s, base, key)
        say(f"  {what:58s} {s['tg']:7.1f} {s['pp']:7.1f}" + ("  (faster)" if take else ""))
        if take:  # each trial changes one knob; of two faster values (threads) the faster one stays
            ((name, value),) = [(f, v) for f, v in asdict(k).items() if v != getattr(default, f)]
            if s[key] > gain.get(name, 0.0):
                best[name], gain[name] = value, s[key]
    chosen = Knobs(**best)
    measured = base if chosen == default else run(chosen)
    if chosen != default and not _faster(measured, base, key):  # knobs that win alone may not together
        say(f"  {'together: ' + chosen.describe():58s} {measured['tg']:7.1f} {measured['pp']:7.1f}  (measured: not "
            f"faster than the default)")
        chosen, measured = default, base
        say("  chosen: the default (the faster knobs, benched together, were not faster)")
    elif chosen != default:
        say(f"  {'chosen: ' + chosen.describe():58s} {measured['tg']:7.1f} {measured['pp']:7.1f}  (measured)")
        say(f"  they are not applied when the variant loads: give them to run/serve ({chosen.flags(default)})")
    else:
        say("  chosen: the default (no knob was faster by more than the bench's spread)")
    return {"rows": [(w, asdict(k), s) for w, k, s in rows], "chosen": asdict(chosen), "measured": measured,
            "flags": chosen.flags(default)}
