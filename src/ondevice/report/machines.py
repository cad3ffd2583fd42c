"""Which machine and which llama.cpp build a bench record was measured on, so that figures from two machines or
two builds are never summarised or compared as if alike.

A record's ``meta`` holds both: the CPU (``cpu_model``, core counts, memory) and ``llama_build`` (llama-cpp-python's
version and llama.cpp's system info line, which names the backends and CPU features it was built with). A store
can hold several machines' records (one copied or merged in, a laptop and a server writing to one synced file).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence

MACHINE_KEYS = ("cpu_model", "physical_cores", "logical_cores")  # and the memory, in whole GiB (machine_id)


def _meta(r) -> Mapping:
    meta = r.get("meta") if isinstance(r, Mapping) else getattr(r, "meta", None)
    return meta if isinstance(meta, Mapping) else {}


def machine_label(meta: Mapping) -> str:
    """"AMD EPYC (2 cores, 23.5 GiB)"; "unknown machine" for a record made without it."""
    cpu = meta.get("cpu_model")
    if not cpu:
        return "unknown machine"
    bits = [f"{meta['physical_cores']} cores"] if meta.get("physical_cores") else []
    if meta.get("memory_total_bytes"):
        bits.append(f"{meta['memory_total_bytes'] / 2**30:.1f} GiB")
    return f"{cpu}" + (f" ({', '.join(bits)})" if bits else "")


def build_short(meta: Mapping) -> str:
    """"llama-cpp-python 0.3.36" plus a short hash of llama.cpp's whole build line (its backends and CPU
    features), so that two builds of one version read apart; "unknown build" without one."""
    line = meta.get("llama_build")
    if not line:
        return "unknown build"
    line = line if isinstance(line, str) else repr(line)
    head = line.split(";", 1)[0].strip()
    return f"{head} #{hashlib.sha256(line.encode()).hexdigest()[:8]}"


def build_commit(meta: Mapping) -> str:
    """llama-bench's ``build_commit`` for a record: ``ondevice-<version>+llama-cpp-python-<version>-<hash>``, one
    value per ondevice version and llama.cpp build (llama-bench's is the llama.cpp git commit, which
    llama-cpp-python does not report); ``ondevice-<version>`` alone for a record without its build."""
    ours = f"ondevice-{meta.get('ondevice') or 'unknown'}"
    if not meta.get("llama_build"):
        return ours
    return ours + "+" + build_short(meta).replace(" #", "-").replace(" ", "-")


def identity(r) -> tuple[str, str]:
    """(machine, build) labels of one record."""
    meta = _meta(r)
    return machine_label(meta), build_short(meta)


def machine_id(meta: Mapping) -> tuple:
    """What tells one machine from another: CPU, cores and memory in whole GiB (the kernel's MemTotal moves by a
    few MiB across boots and kernel updates: one machine, not two)."""
    mem = meta.get("memory_total_bytes")
    return tuple(str(meta.get(k)) for k in MACHINE_KEYS) + (round(mem / 2**30) if isinstance(mem, int) else None,)


def key(r) -> tuple:
    """What tells one record's machine and build from another's."""
    meta = _meta(r)
    return machine_id(meta) + (str(meta.get("llama_build")),)


def distinct(records: Iterable) -> dict[tuple, Mapping]:
    """The distinct machines + builds of ``records`` (:func:`key` -> the first such record's meta), in the order
    first met."""
    out: dict[tuple, Mapping] = {}
    for r in records:
        out.setdefault(key(r), _meta(r))
    return out


def describe(metas: Sequence[Mapping]) -> str:
    """"AMD EPYC (2 cores), llama-cpp-python 0.3.36 #1a2b3c4d" for one; joined with " and " for several."""
    return " and ".join(f"{machine_label(m)}, {build_short(m)}" for m in metas)


def compare_warning(a: Sequence, b: Sequence) -> str | None:
    """A warning when the two sides of a comparison ran on different machines or llama.cpp builds (or either
    side mixes several): then a speedup compares machines or builds, not only the configurations."""
    ma, mb = list(distinct(a).values()), list(distinct(b).values())
    if not ma or not mb:
        return None
    machines = lambda ms: {machine_id(m) for m in ms}
    builds = lambda ms: {str(m.get("llama_build")) for m in ms}
    what = [w for w, ka, kb in (("machines", machines(ma), machines(mb)), ("llama.cpp builds", builds(ma), builds(mb)))
            if ka != kb or len(ka) > 1]
    if not what:
        return None
    return (f"warning: A ran on {describe(ma)}; B on {describe(mb)}: these speedups compare {' and '.join(what)}, "
            f"not only configurations (compare sessions from one machine and build to measure a setting)")
