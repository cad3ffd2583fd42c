"""A container's own limits, read from cgroup trees: the CPU quota caps every default thread count (10x slower
decode was measured with 2 threads under ``docker --cpus=1``), memory.high counts as a memory limit, and a
profile's cap above the container's limit says which one binds. Fake trees stand in for /sys/fs/cgroup;
where this machine lets us make a real v1 cpu cgroup, `ondevice device` is run inside one too."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ondevice.device.cgroup import cap_by_quota, cgroup_memory, cpu_quota, memory_limit, usable_cpus
from ondevice.device.profile import DeviceProfile, parse_profile

MiB = 1 << 20


def tree(root: Path, levels: list[dict[str, str]]) -> Path:
    """A cgroup hierarchy: ``levels`` from the hierarchy's root down to the leaf, each {file: text}; every
    level holds cgroup.procs, as a real cgroup does. Returns the leaf."""
    here = root
    for i, files in enumerate(levels):
        if i:
            here = here / f"l{i}"
        here.mkdir(parents=True, exist_ok=True)
        (here / "cgroup.procs").write_text("")
        for name, text in files.items():
            (here / name).write_text(text + "\n")
    return here


def affinity() -> int:
    return len(os.sched_getaffinity(0))


# ---------------------------------------------------------------- CPU quota
def test_cgroup_v2_cpu_max_quota_and_its_absence(tmp_path):
    assert cpu_quota({None: tree(tmp_path / "a", [{"cpu.max": "max 100000"}])}) is None
    leaf = tree(tmp_path / "b", [{"cpu.max": "150000 100000"}])
    assert cpu_quota({None: leaf}) == {"cpus": 1.5, "file": "cpu.max", "path": str(leaf)}
    assert usable_cpus({None: leaf}) == min(affinity(), 1)  # floor(1.5)
    assert cpu_quota({None: tmp_path / "missing"}) is None  # no cgroup there: no quota


def test_an_ancestors_cpu_quota_binds_a_leaf_without_one(tmp_path):
    """A Kubernetes pod's limit sits on the pod's cgroup; the container's leaf says max (or lacks the file)."""
    leaf = tree(tmp_path, [{}, {"cpu.max": "100000 100000"}, {"cpu.max": "max 100000"}, {}])
    q = cpu_quota({None: leaf})
    assert q["cpus"] == 1.0 and q["path"] == str(tmp_path / "l1")
    tighter = tree(tmp_path / "c", [{"cpu.max": "400000 100000"}, {"cpu.max": "250000 100000"}])
    assert cpu_quota({None: tighter})["cpus"] == 2.5  # the tightest over the walk


def test_cgroup_v1_cfs_quota(tmp_path):
    none = tree(tmp_path / "a", [{"cpu.cfs_quota_us": "-1", "cpu.cfs_period_us": "100000"}])
    assert cpu_quota({"cpu": none}) is None
    leaf = tree(tmp_path / "b", [{"cpu.cfs_quota_us": "-1", "cpu.cfs_period_us": "100000"},
                                 {"cpu.cfs_quota_us": "50000", "cpu.cfs_period_us": "100000"},
                                 {"cpu.cfs_quota_us": "-1", "cpu.cfs_period_us": "100000"}])
    q = cpu_quota({"cpu": leaf})
    assert q["cpus"] == 0.5 and q["file"] == "cpu.cfs_quota_us"
    assert usable_cpus({"cpu": leaf}) == 1  # half a CPU still gets one thread


def test_quota_caps_threads_at_floor_at_least_one_and_never_above_the_affinity():
    assert cap_by_quota(8, None) == 8
    assert cap_by_quota(8, {"cpus": 2.9}) == 2
    assert cap_by_quota(8, {"cpus": 0.2}) == 1
    assert cap_by_quota(2, {"cpus": 16.0}) == 2


def test_profile_threads_are_capped_by_the_quota_unless_given(tmp_path):
    dirs = {None: tree(tmp_path, [{"cpu.max": "100000 100000"}])}
    assert DeviceProfile("host").resolved_threads(dirs) == 1
    assert parse_profile("cpus=0").resolved_threads(dirs) == 1
    assert parse_profile("threads=3").resolved_threads(dirs) == 3  # explicit: as asked
    assert DeviceProfile("host").resolved_threads({None: tmp_path / "none"}) == affinity()


# ---------------------------------------------------------------- memory
def test_memory_high_counts_as_a_limit_and_says_so(tmp_path):
    leaf = tree(tmp_path / "a", [{}, {"memory.max": "max", "memory.high": str(256 * MiB),
                                      "memory.current": str(100 * MiB), "memory.stat": "anon 1\nfile 0"}])
    m = memory_limit({None: leaf})
    assert (m["limit_bytes"], m["file"], m["in_use_bytes"]) == (256 * MiB, "memory.high", 100 * MiB)
    both = tree(tmp_path / "b", [{"memory.max": str(512 * MiB), "memory.high": str(MiB << 10),
                                  "memory.current": "0"}])
    assert memory_limit({None: both})["file"] == "memory.max"  # the smaller of the two
    assert cgroup_memory({None: both}) == (512 * MiB, 0)


def test_memory_limits_v1_sentinel_ancestor_and_page_cache(tmp_path):
    unlimited = tree(tmp_path / "a", [{"memory.limit_in_bytes": "9223372036854771712", "memory.usage_in_bytes": "1"}])
    assert memory_limit({"memory": unlimited}) is None
    leaf = tree(tmp_path / "b", [{"memory.limit_in_bytes": "9223372036854771712"},
                                 {"memory.limit_in_bytes": str(768 * MiB), "memory.usage_in_bytes": str(200 * MiB),
                                  "memory.stat": f"total_cache {100 * MiB}"},
                                 {"memory.limit_in_bytes": "9223372036854771712"}])
    assert cgroup_memory({"memory": leaf}) == (768 * MiB, 100 * MiB)  # the cache is left out of "in use"


def test_a_profile_cap_above_the_containers_limit_says_the_container_binds(tmp_path):
    """apply_profile in a child (RLIMIT_AS would cap this test process): a 1 GiB container, a 4 GiB profile."""
    leaf = tree(tmp_path, [{"memory.max": str(1 << 30), "memory.current": "0", "cpu.max": "100000 100000"}])
    code = f"""
import json
from pathlib import Path
from ondevice.device.limits import apply_profile
a = apply_profile("mem=4G,threads=2", mem_mechanism="rlimit_as", cgroup_dirs={{None: Path({str(leaf)!r})}})
b = apply_profile("mem=512M", mem_mechanism="rlimit_as", cgroup_dirs={{None: Path({str(leaf)!r})}})
print(json.dumps([a.to_dict(), b.to_dict()]))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    a, b = json.loads(r.stdout.strip().splitlines()[-1])
    assert a["mem_limit_bytes"] == 4 << 30 and a["effective_mem_limit_bytes"] == 1 << 30
    assert any("1.00 GiB" in n and "memory.max" in n and "binds" in n for n in a["notes"]), a["notes"]
    assert any("threads=2 exceeds the 1 usable CPUs (CPU quota 1)" in n for n in a["notes"]), a["notes"]
    assert b["effective_mem_limit_bytes"] == 512 << 20 and not any("binds" in n for n in b["notes"])


# ---------------------------------------------------------------- a real cgroup, where we may make one
def _v1_cpu_dir() -> Path | None:
    from ondevice.device.cgroup import cgroup_dir

    here = cgroup_dir("cpu")
    return here if here is not None and (here / "cpu.cfs_quota_us").exists() and os.access(here, os.W_OK) else None


def test_inside_a_one_cpu_quota_the_default_threads_are_one_and_device_says_why(tmp_path):
    """`docker --cpus=1` writes quota 100000/100000; `nproc` still says every CPU, ondevice must not."""
    here = _v1_cpu_dir()
    if here is None or affinity() < 2:
        pytest.skip("no writable cgroup v1 cpu controller here, or one CPU only")
    child = here / f"ondevice-test-{os.getpid()}"
    child.mkdir()
    try:
        (child / "cpu.cfs_period_us").write_text("100000")
        (child / "cpu.cfs_quota_us").write_text("100000")
        code = f"""
import json, os, subprocess, sys
open({str(child / 'cgroup.procs')!r}, "w").write(str(os.getpid()))
from ondevice.engine.resources import physical_cores
from ondevice.device import parse_profile
dev = subprocess.run([sys.executable, "-m", "ondevice.cli", "device"], capture_output=True, text=True)
print(json.dumps({{"cores": physical_cores(), "profile": parse_profile(None).resolved_threads(), "out": dev.stdout,
                  "err": dev.stderr}}))
"""
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                           env={**os.environ, "ONDEVICE_HOME": str(tmp_path)})
        assert r.returncode == 0, r.stderr
        out = json.loads(r.stdout.strip().splitlines()[-1])
        assert out["cores"] == 1 and out["profile"] == 1
        assert "1 usable (CPU quota 1)" in out["out"], out["out"] + out["err"]
    finally:
        child.rmdir()  # its processes have exited
