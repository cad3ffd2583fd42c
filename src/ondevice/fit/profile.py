"""``ondevice fit --profile``: fit for the device a profile describes (``ondevice bench``'s profiles).

The speed table, the validation benches and the knob trials run in the bench's own worker under the profile
(threads, CPU affinity, a memory cap by cgroup or RLIMIT_AS: ``device.limits``), so their tok/s are the
profile's; the KLD and the task scores do not depend on the device and run as they would without one.
The speed cache is kept per profile (``measure.device_section``) and the profile's thread count is the
fit's default.

A memory cap also bounds the file. A file larger than the cap can never load, so a fit whose smallest
variant is larger is refused before anything is measured. Once the all-base variant has run under the
cap, what the runtime needs besides the weights is measured (its peak RSS less the model's mapped pages
at the fit's bench shapes; a longer context needs more), and the largest file that fits is the cap less
that: ``Budget.fits``, a bound every plan and every validated candidate is checked against.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..device.profile import BUILTIN_PROFILES, DeviceProfile, parse_profile
from ..errors import InvalidArgument


@dataclass(frozen=True)
class FitProfile:
    """A parsed ``--profile``: the profile, and the spec the bench worker parses (None: the host)."""

    profile: DeviceProfile
    spec: str | None

    @property
    def name(self) -> str:
        return self.profile.name

    def cache_id(self) -> dict | None:
        """What the speed cache is keyed by (None for the host: its sections are as before profiles)."""
        return None if self.spec is None else self.profile.to_dict()

    def threads(self, threads: int | None) -> int:
        """``threads`` when given, else the profile's (its threads, else one per CPU it pins), else the physical
        cores this process may use, as run and serve default to."""
        p = self.profile
        if threads and threads != -1:  # -1: the default, as 0 and None (and in llama.cpp)
            return threads
        if p.threads or p.cpu_affinity:
            return p.resolved_threads()
        from ..engine.resources import physical_cores

        return physical_cores()  # what run and serve use unless told (it was 2: under taskset -c 0 too)

    def check_smallest(self, smallest: int, types: tuple[str, ...]) -> None:
        """Refuse at once when even the smallest variant is larger than the memory cap."""
        cap = self.profile.mem_limit_bytes
        if cap is not None and smallest > cap:
            raise InvalidArgument(f"--profile {self.name}: its memory cap ({cap / 2**20:.0f} MiB) holds no variant "
                                  f"of this model: the smallest with types {','.join(types)} is "
                                  f"{smallest / 2**20:.0f} MiB; use a profile with more memory or a smaller model")

    def fits(self, speed: dict, smallest: int = 0) -> tuple[int | None, str]:
        """(largest file that fits, a note) from the all-base variant's bench under the profile; refused at
        once when not even the ``smallest`` variant fits (before the sensitivity runs)."""
        cap = self.profile.mem_limit_bytes
        if cap is None:
            return None, ""
        # the runtime's own memory is its anonymous RSS at the peak (KV cache, compute and repack buffers, the
        # interpreter): peak RSS less the model's mapped pages took two moments apart, and under the cap the
        # model's pages are evicted in between (81 MiB at a 250 MiB cap, 153 MiB at 160 MiB: above the cap)
        rss, model, anon = speed.get("peak_rss"), speed.get("rss_model"), speed.get("rss_anon")
        other = anon if anon else max(0, rss - model) if rss and model is not None else 0
        how = (f"less the {other / 2**20:.0f} MiB the runtime used besides the weights under it"
               if rss or anon else "(the runtime's own memory was not measured)")
        mech = (speed.get("limits") or {}).get("mem_mechanism", "?")
        room = (f"files up to {(cap - other) / 1e6:.1f} MB fit" if cap > other else
                "no model file fits beside it")
        note = f"memory cap {cap / 2**20:.0f} MiB ({mech}) {how}: {room}"
        if smallest > cap - other:
            raise InvalidArgument(f"--profile {self.name}: {note}, and the smallest variant is "
                                  f"{smallest / 1e6:.1f} MB; use a profile with more memory or a smaller model")
        return cap - other, note

    def describe(self) -> str:
        p = self.profile
        bits = [f"threads {p.threads}" if p.threads else None,
                f"cpus {','.join(map(str, p.cpu_affinity))}" if p.cpu_affinity else None,
                f"memory {p.mem_limit_bytes / 2**20:.0f} MiB" if p.mem_limit_bytes else None]
        return f"{p.name} ({', '.join(b for b in bits if b) or 'no limits'})"

    def to_dict(self) -> dict:
        return {**self.profile.to_dict(), "spec": self.spec}


def _spec(p: DeviceProfile) -> str:
    """A spec the bench worker parses back into ``p`` (for a ``DeviceProfile`` given to ``fit``)."""
    for name, b in BUILTIN_PROFILES.items():
        if b == p:
            return name
    items = [f"threads={p.threads}" if p.threads else None,
             f"cpus={';'.join(map(str, p.cpu_affinity))}" if p.cpu_affinity else None,
             f"mem={p.mem_limit_bytes}" if p.mem_limit_bytes else None,
             f"watts={p.watts_per_core}" if p.watts_per_core else None,
             f"name={p.name}" if not any(c in p.name for c in ",=") else None]
    return ",".join(i for i in items if i) or "host"


def fit_profile(spec: str | DeviceProfile | None) -> FitProfile:
    """Parse ``--profile`` (a bad spec is ``parse_profile``'s one-line error)."""
    p = parse_profile(spec)
    if p == BUILTIN_PROFILES["host"]:
        return FitProfile(p, None)
    return FitProfile(p, spec.strip() if isinstance(spec, str) else _spec(p))
