"""Built-in hardware probe: measured memory bandwidth (GB/s) and peak float32 compute (GFLOP/s).

These are the two roofs of the roofline (``roofline.py``). Both run in a fresh subprocess per thread count,
so the BLAS thread count is set (``OPENBLAS_NUM_THREADS`` & co.) before numpy loads:

* bandwidth: ``n`` threads each ``np.sum`` a slice of a float32 array several times larger than the last
  level cache (numpy releases the GIL inside the reduction); bytes read / wall time, best of N passes.
* compute: ``a @ b`` on float32 ``(n, n)`` matrices through numpy's BLAS; ``2 n^3`` / time, best of N.

Both share one time budget (the probe stays under ``TIMEOUT_S``): where first touching memory is slow (5-12 s
per GiB on some virtual machines), the array is smaller and the method string says so.

numpy's sum is not a tuned streaming kernel, so the bandwidth is a lower bound on what the memory system
can do, and a BLAS sgemm roughly matches the fp32 peak llama.cpp's kernels can reach; the method strings
say exactly what was run. Results are cached per machine (CPU model, cores, memory, kernel) and thread
count in ``<data dir>/device/probe.json``; ``refresh=True`` measures again.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import resource
import subprocess
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

from ..errors import InvalidArgument, OndeviceError
from ..models.store import data_dir, write_json  # one rule for where and how ondevice writes data
from ..supervise import python
from .info import device_info, l3_cache_bytes, machine_key

_BLAS_ENV = (
    "OPENBLAS_NUM_THREADS",
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "BLIS_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
    "NUMEXPR_NUM_THREADS",
)
TIMEOUT_S = 14.0  # the whole probe must stay under 15 s


@dataclass(frozen=True, slots=True)
class Probe:
    """Measured roofs of this machine at ``threads`` threads."""

    threads: int
    bandwidth_gbs: float  # 1e9 bytes/s read
    peak_gflops: float  # 1e9 float32 FLOP/s: an fp32 sgemm, not the int8 dot products of quantized kernels
    measured_at: str  # ISO 8601, UTC
    bandwidth_method: str
    compute_method: str
    machine_key: str
    load_avg_1m: float | None = None  # machine load when measured: a busy machine measures low
    # cores other work kept busy while the probe ran (/proc/stat less the probe's own CPU time), as a bench
    # record's ``load``; over ``NOISY_LOAD`` the probe is "loaded": it reads low, and never replaces a quiet one
    load: float | None = None
    cached: bool = False

    @property
    def loaded(self) -> bool:
        from ..bench.noise import NOISY_LOAD

        return self.load is not None and self.load > NOISY_LOAD

    def to_dict(self) -> dict:
        return asdict(self)


def cache_path() -> Path:
    return data_dir() / "device" / "probe.json"


def _bandwidth_bytes(llc: int) -> int:
    """Array size: 8x the last-level cache, at least 256 MiB, at most 1 GiB and a quarter of free RAM."""
    size = min(max(8 * llc, 256 << 20), 1 << 30)
    try:
        import psutil

        size = min(size, int(psutil.virtual_memory().available) // 4)
    except ImportError:
        pass
    return max(size, 64 << 20)


# Runs in the child: numpy is imported only after the BLAS env vars are set by the parent. Every phase watches
# one deadline (``budget`` s from the start), so a slow machine gets fewer passes or a smaller array, said in the
# method strings, not a timeout: first touching memory alone can take 5 s per GiB on a virtual machine.
_WORKER = r"""
import json, sys, threading, time
import numpy as np
threads, nbytes, budget, llc = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
t_start = time.perf_counter()
deadline = t_start + budget
out = {}

# ---- bandwidth: the array in parts of 32 MiB, allocated a round (one per thread) at a time until nbytes or a
# third of the budget; each thread sums its own parts (np.sum releases the GIL on float arrays)
part = min(32 << 20, max(nbytes // threads, 1 << 20)) // 4
parts = []
while len(parts) * part * 4 < nbytes and (not parts or time.perf_counter() < t_start + budget / 3):
    parts += [np.ones(part, dtype=np.float32) for _ in range(threads)]  # ones writes every page (zeros would not)
mine = [parts[i::threads] for i in range(threads)]
sink = [0.0] * threads
def work(i):
    sink[i] = sum(float(p.sum()) for p in mine[i])
best = float("inf")
passes = 0
while passes < 8 and (passes == 0 or time.perf_counter() + best < t_start + budget / 2):
    ts = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    t0 = time.perf_counter()
    for t in ts: t.start()
    for t in ts: t.join()
    best = min(best, time.perf_counter() - t0)
    passes += 1
total = len(parts) * part * 4
assert abs(sum(sink) - total / 4) < total / 4 * 1e-3, "sum check failed"  # the reduction really read the data
out["bandwidth_gbs"] = total / best / 1e9
small = total < 2 * llc
out["bandwidth_method"] = (f"numpy float32 sum over {total / 2**30:.2f} GiB split across {threads} threads, "
                           f"best of {passes} passes"
                           + (f" (under twice the {llc >> 20} MiB last-level cache: allocating more did not fit "
                              "the probe's time, so part may be read from cache)" if small else ""))
del parts, mine

# ---- compute: grow n until one sgemm takes >= 50 ms (or the next size would not fit), then best of N
rng = np.random.default_rng(0)
n = 256
while True:
    a = rng.standard_normal((n, n), dtype=np.float32); b = rng.standard_normal((n, n), dtype=np.float32)
    a @ b  # warm-up: BLAS thread pool start, page faults
    t0 = time.perf_counter(); a @ b; dt = time.perf_counter() - t0
    if dt >= 0.05 or n >= 4096 or time.perf_counter() + 2 * 8 * dt > deadline:
        break
    n *= 2
best = dt
reps = 1
while reps < 10 and time.perf_counter() + best < deadline:
    t0 = time.perf_counter(); a @ b; best = min(best, time.perf_counter() - t0)
    reps += 1
blas = "numpy BLAS"
try:
    from threadpoolctl import threadpool_info
    infos = [i for i in threadpool_info() if i.get("user_api") == "blas"]
    if infos:
        blas = f"{infos[0].get('internal_api')} {infos[0].get('version')} ({infos[0].get('num_threads')} threads)"
except ImportError:
    try:  # numpy >= 1.25 records which BLAS it was built against
        dep = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
        blas = f"{dep.get('name')} {dep.get('version')}"
    except Exception:
        pass
out["peak_gflops"] = 2 * n**3 / best / 1e9
out["compute_method"] = f"numpy float32 matmul n={n} via {blas}, BLAS threads={threads}, best of {reps}"
print(json.dumps(out))
"""


def _children_cpu() -> float:
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return kids.ru_utime + kids.ru_stime


def _measure(threads: int, timeout: float = TIMEOUT_S) -> dict:
    """Run the probe in a child at ``threads`` threads; its figures, plus ``load``: cores other work kept busy
    meanwhile."""
    from ..bench.noise import busy_seconds, other_load

    b0, t0, c0 = busy_seconds(), time.monotonic(), _children_cpu()
    out = _run_child(threads, timeout)
    load = other_load(b0, busy_seconds(), _children_cpu() - c0, time.monotonic() - t0)
    out["load"] = None if load is None else round(load, 2)
    return out


def _run_child(threads: int, timeout: float) -> dict:
    env = dict(os.environ)
    for k in _BLAS_ENV:
        env[k] = str(threads)
    llc = l3_cache_bytes() or (32 << 20)
    cmd = [*python("-c", _WORKER), str(threads), str(_bandwidth_bytes(llc)), str(timeout * 0.6), str(llc)]
    try:
        res = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise OndeviceError(
            f"the hardware probe took over {timeout:.0f} s at {threads} threads (a busy machine?); "
            "retry when the machine is idle"
        ) from None
    if res.returncode != 0:
        raise OndeviceError(
            f"the hardware probe failed (exit {res.returncode}): {res.stderr.strip()[-600:]}; "
            "check that numpy is installed in this Python"
        )
    out = json.loads(res.stdout.strip().splitlines()[-1])
    for key in ("bandwidth_gbs", "peak_gflops"):
        if not (math.isfinite(out[key]) and out[key] > 0):
            raise OndeviceError(f"the hardware probe measured {key}={out[key]}; rerun with refresh=True")
    return out


def _read_cache(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}  # missing or corrupt: measure again


def probe(threads: int | None = None, refresh: bool = False, wait_idle_s: float = 0.0) -> Probe:
    """Measured bandwidth and peak compute at ``threads`` threads (default, or 0 / -1: the default thread count,
    one per physical performance core allowed, capped by a container's CPU quota), cached.

    A probe measured while other work kept the machine busy reads low and makes every % of roofline after it
    read high, so: with ``wait_idle_s`` it first waits (at most that long) for a quiet machine, as
    ``bench --wait-idle`` does; its own measured ``load`` is kept; a loaded probe is returned for this run but
    never replaces a quiet cached one; and a cached loaded one is measured again once the machine is quiet."""
    from .cores import default_threads, resolve_threads

    if isinstance(threads, str):
        raise InvalidArgument(f"probe threads={threads!r} must be a whole number >= 1 (0 or -1: the default)")
    threads = resolve_threads(threads, "probe threads") or default_threads()
    from ..engine.resources import check_threads

    check_threads(threads, "-t/--threads")  # as llama.cpp will be asked: not 99 on 2 CPUs
    key = machine_key(device_info(include_llama=False))
    path = cache_path()
    entry = _read_cache(path).get(key, {}).get(str(threads))
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = None
    if entry and not refresh and not _busy_then_quiet_now(entry.get("load_avg_1m"), load) \
            and not _loaded_then_quiet_now(entry.get("load")):
        return Probe(**entry, cached=True)
    if wait_idle_s > 0:
        from ..bench.noise import wait_idle

        wait_idle(wait_idle_s, show=False)
    out = _measure(threads)
    result = Probe(
        threads=threads,
        bandwidth_gbs=out["bandwidth_gbs"],
        peak_gflops=out["peak_gflops"],
        measured_at=datetime.now(UTC).isoformat(timespec="seconds"),
        bandwidth_method=out["bandwidth_method"],
        compute_method=out["compute_method"],
        machine_key=key,
        load_avg_1m=load,
        load=out.get("load"),
    )
    old = Probe(**entry) if entry else None
    if not (result.loaded and old is not None and old.load is not None and not old.loaded):
        _store(path, key, threads, result)  # a loaded probe never replaces a quiet one
    return result


def _loaded_then_quiet_now(then: float | None) -> bool:
    """Whether a cached probe was measured under other work (its own ``load``) and the machine is quiet now
    (sampled for a second): measure again."""
    from ..bench.noise import NOISY_LOAD, machine_load

    if then is None or then <= NOISY_LOAD:
        return False
    now = machine_load(1.0)
    return now is not None and now <= NOISY_LOAD


def _busy_then_quiet_now(then: float | None, now: float | None) -> bool:
    """Whether a cached probe was measured while other work kept half the CPUs busy and the machine is much
    quieter now: it understates this machine (every % of roofline would read high, even over 100), so measure
    again."""
    cpus = os.cpu_count() or 1
    return then is not None and now is not None and then > 0.5 * cpus and now < 0.5 * then


def _store(path: Path, key: str, threads: int, result: Probe) -> None:
    """Read-modify-write the cache under a lock, then replace the file atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        data = _read_cache(path)
        entry = result.to_dict()
        entry.pop("cached")
        data.setdefault(key, {})[str(threads)] = entry
        write_json(path, data)


def cached_probes() -> dict[str, dict]:
    """This machine's cached probes by thread count (as stored), for display."""
    return _read_cache(cache_path()).get(machine_key(device_info(include_llama=False)), {})
