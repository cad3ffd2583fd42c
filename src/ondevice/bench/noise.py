"""Is a measurement trustworthy? The CPU other processes used while it ran, its spread, and waiting for quiet.

The load average is a poor witness for a sweep: a 1-minute average still holds the sweep's own previous
test. So the record's ``load`` is measured instead: cores kept busy by *other* work during the timed runs,
from ``/proc/stat`` (machine-wide busy time, VM steal included) minus this process's own CPU time.
In a container with a CPU quota the cause may instead be the quota: the seconds the kernel throttled the
cgroup during the timed runs (``cpu.stat``, see ``device.cgroup.cpu_throttled``) are kept as the record's
``meta.throttled_s``, and the reason then names the quota, not other processes.
A record is flagged ``noisy`` when that load, that throttling or the coefficient of variation of its t/s is
too high.
"""

from __future__ import annotations

import os
import sys
import time

NOISY_MARK = "(!)"  # after a t/s: a figure not to trust (the record's "noise" says why)
NOISY_CV = 0.05  # t/s std / mean over the repetitions; llama-bench's runs on a quiet machine stay near 1-2%
NOISY_LOAD = 0.25  # cores busy with other work during the timed runs
NOISY_THROTTLED = 0.05  # seconds the CPU quota throttled the cgroup, per second of the timed runs
_HZ = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def busy_seconds() -> float | None:
    """CPU seconds the whole machine has spent busy (all cores, VM steal included); None off Linux."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    # user nice system idle iowait irq softirq steal [guest guest_nice: already inside user/nice]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / _HZ


def other_load(busy_before: float | None, busy_after: float | None, own_cpu_s: float, wall_s: float) -> float | None:
    """Cores kept busy by other work over ``wall_s``: machine busy time minus ours, per second."""
    if busy_before is None or busy_after is None or wall_s <= 0:
        return None
    return max(0.0, (busy_after - busy_before - own_cpu_s) / wall_s)


def throttled_between(before: dict[str, float], after: dict[str, float]) -> float | None:
    """Seconds the CPU quota throttled this process's cgroup between two ``cpu_throttled`` readings: the most
    any one level grew (None: no cpu.stat to read)."""
    grew = [after[k] - v for k, v in before.items() if k in after]
    return max(0.0, *grew) if grew else None


def assess(mean: float | None, std: float | None, load: float | None, throttled_s: float | None = None,
           wall_s: float | None = None) -> list[str]:
    """Why a record with t/s ``mean`` ± ``std``, measured while other work kept ``load`` cores busy and the
    container's CPU quota throttled it ``throttled_s`` seconds of ``wall_s``, should not be trusted (empty when
    it looks clean): high CV of t/s, the quota's throttling (named instead of other processes: inside a
    container the CPU it lacked was the quota's), or a busy machine."""
    why = []
    if mean and std is not None and std / mean > NOISY_CV:
        why.append(f"t/s varies {100 * std / mean:.0f}% between repetitions (over {100 * NOISY_CV:.0f}%)")
    if throttled_s and throttled_s > NOISY_THROTTLED * (wall_s or 0):
        why.append(f"the container's CPU quota throttled it for {throttled_s:.2f} s during the runs (its "
                   f"processes wanted more CPU than the quota gives: fewer -t, or a larger quota)")
    elif load is not None and load > NOISY_LOAD:
        why.append(f"other processes kept {load:.2f} cores busy during the runs (over {NOISY_LOAD})")
    return why


def machine_load(window_s: float = 1.0) -> float | None:
    """Cores busy over the next ``window_s`` seconds (this process included: it sleeps meanwhile)."""
    b0, t0 = busy_seconds(), time.monotonic()
    time.sleep(window_s)
    b1 = busy_seconds()
    if b0 is None or b1 is None:
        return None
    return max(0.0, (b1 - b0) / (time.monotonic() - t0))


def wait_idle(max_wait_s: float, quiet_s: float = 3.0, threshold: float = NOISY_LOAD,
              show: bool = True) -> dict:
    """Wait (at most ``max_wait_s``) until the machine has been quiet for ``quiet_s`` seconds in a row.

    Returns ``{"waited_s", "load", "quiet"}``: ``quiet`` False when it gave up (the run then goes ahead,
    and its records are flagged if the load stays high).
    """
    t0 = time.monotonic()
    calm, load = 0.0, None
    while True:
        load = machine_load(1.0)
        if load is None:  # no /proc/stat: nothing to wait for
            return {"waited_s": 0.0, "load": None, "quiet": True}
        calm = calm + 1.0 if load <= threshold else 0.0
        waited = time.monotonic() - t0
        if calm >= quiet_s:
            return {"waited_s": round(waited, 1), "load": round(load, 2), "quiet": True}
        if waited >= max_wait_s:
            if show:
                print(f"\nondevice bench: the machine is still busy after {waited:.0f} s (load {load:.2f} "
                      f"cores); measuring anyway, noisy records are flagged", file=sys.stderr)
            return {"waited_s": round(waited, 1), "load": round(load, 2), "quiet": False}
