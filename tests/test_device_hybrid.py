"""Hybrid CPUs: the default thread count is one per physical *performance* core (as llama.cpp's
common_cpu_get_num_math leaves Intel E-cores and SMT siblings out), read from fake sysfs trees of an Intel
12th-gen-like part (8 P-cores with SMT + 4 E-cores), an ARM phone (1 prime + 3 big + 4 little) and a plain
SMT server; capped by the CPUs allowed and a container's CPU quota. And -1 threads is "the default", as in
llama.cpp, wherever threads are parsed."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from ondevice.device import cores
from ondevice.device.cores import core_kinds, core_split, default_threads, parse_cpulist, resolve_threads
from ondevice.device.profile import DeviceProfile, parse_profile
from ondevice.errors import InvalidArgument


def sysfs(root: Path, siblings: dict[int, str], capacity: dict[int, int] | None = None,
          intel: tuple[str, str] | None = None) -> Path:
    """A /sys/devices tree: per CPU its core's CPU list (SMT siblings share one), optionally cpu_capacity, and
    Intel's cpu_core/cpu_atom PMU cpus lists."""
    for n, sib in siblings.items():
        topo = root / "system" / "cpu" / f"cpu{n}" / "topology"
        topo.mkdir(parents=True)
        (topo / "core_cpus_list").write_text(sib + "\n")
        (topo / "thread_siblings_list").write_text(sib + "\n")
        if capacity:
            (topo.parent / "cpu_capacity").write_text(f"{capacity[n]}\n")
    (root / "system" / "cpu" / "cpufreq").mkdir(parents=True, exist_ok=True)  # not a cpuN: ignored
    if intel:
        for kind, cpus in zip(("cpu_core", "cpu_atom"), intel):
            (root / kind).mkdir()
            (root / kind / "cpus").write_text(cpus + "\n")
    return root


@pytest.fixture
def alder(tmp_path):
    """i7-12700-like: P-cores 0-15 (siblings 0,1 / 2,3 / ...), E-cores 16-19 (no SMT)."""
    sib = {n: f"{n - n % 2}-{n - n % 2 + 1}" for n in range(16)} | {n: str(n) for n in range(16, 20)}
    return sysfs(tmp_path / "alder", sib, intel=("0-15", "16-19"))


@pytest.fixture
def phone(tmp_path):
    """Snapdragon-8-Gen-1-like: 4 little A510 (0-3), 3 big A710 (4-6), 1 prime X2 (7); no SMT."""
    caps = {0: 325, 1: 325, 2: 325, 3: 325, 4: 870, 5: 870, 6: 870, 7: 1024}
    return sysfs(tmp_path / "phone", {n: str(n) for n in range(8)}, capacity=caps)


@pytest.fixture
def plain(tmp_path):
    """A 2-core SMT server: siblings 0,2 and 1,3; equal capacities."""
    sib = {0: "0,2", 2: "0,2", 1: "1,3", 3: "1,3"}
    return sysfs(tmp_path / "plain", sib, capacity=dict.fromkeys(range(4), 1024))


NO_QUOTA: dict = {None: None, "cpu": None}  # no cgroup to read: no CPU quota


def quota(tmp_path: Path, cpus: float) -> dict:
    d = tmp_path / "cg"
    d.mkdir()
    (d / "cgroup.procs").write_text("")
    (d / "cpu.max").write_text(f"{int(cpus * 100000)} 100000\n")
    return {None: d, "cpu": None}


def test_intel_hybrid_counts_p_cores_once_and_leaves_e_cores_out(alder, tmp_path):
    kinds = core_kinds(alder)
    assert kinds["performance"] == set(range(16)) and kinds["efficiency"] == {16, 17, 18, 19}
    split = core_split(range(20), alder)
    assert (split["cores"], split["performance"], split["efficiency"], split["hybrid"]) == (12, 8, 4, True)
    assert core_split("all", alder)["cores"] == 12
    assert default_threads(range(20), NO_QUOTA, alder) == 8  # llama.cpp's num_math here: 8, not 20 or 12
    assert default_threads({0, 1, 2, 3, 16, 17}, NO_QUOTA, alder) == 2  # taskset: the P-cores allowed
    assert default_threads({16, 17, 18}, NO_QUOTA, alder) == 3  # pinned to E-cores: one per E-core
    assert default_threads(range(20), quota(tmp_path, 5.5), alder) == 5  # a quota caps it (floor)


def test_arm_phone_takes_prime_and_big_cores(phone, tmp_path):
    split = core_split(range(8), phone)
    assert (split["cores"], split["performance"], split["efficiency"]) == (8, 4, 4)
    assert core_kinds(phone)["performance"] == {4, 5, 6, 7}
    assert default_threads(range(8), NO_QUOTA, phone) == 4
    assert default_threads({0, 1, 2, 3}, NO_QUOTA, phone) == 4  # only little cores allowed: all of them
    assert default_threads(range(8), quota(tmp_path, 2), phone) == 2


def test_arm_without_little_cores_or_with_equal_capacities_is_not_hybrid(tmp_path):
    big_mid = sysfs(tmp_path / "bm", {n: str(n) for n in range(4)}, capacity={0: 600, 1: 600, 2: 1024, 3: 1024})
    assert core_kinds(big_mid) is None and default_threads(range(4), NO_QUOTA, big_mid) == 4
    same = sysfs(tmp_path / "same", {n: str(n) for n in range(4)}, capacity=dict.fromkeys(range(4), 1024))
    assert core_kinds(same) is None


def test_plain_smt_machine_counts_physical_cores(plain):
    split = core_split(range(4), plain)
    assert (split["cores"], split["performance"], split["efficiency"], split["hybrid"]) == (2, 2, 0, False)
    assert default_threads(range(4), NO_QUOTA, plain) == 2
    assert default_threads({0, 2}, NO_QUOTA, plain) == 1  # two siblings: one core


def test_no_sysfs_topology_falls_back_to_the_allowed_cpus(tmp_path):
    assert core_split({0, 1}, tmp_path / "none")["cores"] is None
    assert 1 <= default_threads({0, 1}, NO_QUOTA, tmp_path / "none") <= 2


def test_parse_cpulist():
    assert parse_cpulist("0-3,8,10-11\n") == {0, 1, 2, 3, 8, 10, 11} and parse_cpulist("") == set()


def test_profile_default_threads_use_the_performance_cores(alder, monkeypatch):
    monkeypatch.setattr(cores, "SYS_DEVICES", alder)
    assert parse_profile("cpus=0-3;16-19").resolved_threads(NO_QUOTA) == 2  # 2 P-cores (4 CPUs with SMT)
    assert DeviceProfile(cpu_affinity=range(20)).resolved_threads(NO_QUOTA) == 8


def test_device_shows_the_split_on_a_hybrid_cpu(alder, monkeypatch, capsys):
    from ondevice.device import cli, info

    monkeypatch.setattr(cores, "SYS_DEVICES", alder)
    monkeypatch.setattr(cores, "allowed_cpus", lambda: set(range(20)))
    monkeypatch.setattr("ondevice.device.cgroup.cpu_quota", lambda dirs=None: None)
    d = info.device_info(include_llama=False)
    assert (d["performance_cores"], d["efficiency_cores"], d["default_threads"]) == (8, 4, 8)
    from ondevice.bench.meta import host_meta

    assert (host_meta(d)["performance_cores"], host_meta(d)["efficiency_cores"]) == (8, 4)  # kept in bench records
    d.update(physical_cores=12, logical_cores=20, usable_cpus=20)  # psutil and os.cpu_count read the real machine
    monkeypatch.setattr(info, "device_info", lambda include_llama=True: d)
    cli.run(argparse.Namespace(threads=None, model=None, probe=False, json=False))
    line = capsys.readouterr().out.splitlines()[0]
    assert line.endswith(", 12 cores: 8 performance + 4 efficiency / 20 threads, 20 usable; default threads 8"), line


def test_device_line_unchanged_off_hybrid(plain, monkeypatch, capsys):
    from ondevice.device import cli, info

    monkeypatch.setattr(cores, "SYS_DEVICES", plain)
    d = info.device_info(include_llama=False)
    assert d["performance_cores"] is None and d["efficiency_cores"] is None
    monkeypatch.setattr(info, "device_info", lambda include_llama=True: d)
    cli.run(argparse.Namespace(threads=None, model=None, probe=False, json=False))
    line = capsys.readouterr().out.splitlines()[0]
    assert "efficiency" not in line and "default threads" not in line, line


# ---------------------------------------------------------------- -1: the default, as in llama.cpp

@pytest.mark.parametrize("value", [None, 0, -1, "0", "-1", " -1 "])
def test_minus_one_and_zero_are_the_default(value):
    assert resolve_threads(value) is None


@pytest.mark.parametrize("value", [-2, "-3", "two", 1.5, "1.5", True, ""])
def test_other_negatives_and_non_integers_name_the_problem(value):
    with pytest.raises(InvalidArgument, match=r"threads=.* must be a whole number: >= 1, or 0 / -1 for the default"):
        resolve_threads(value)


def test_profile_threads_minus_one_is_the_default():
    assert parse_profile("threads=-1").threads is None and DeviceProfile(threads=-1).threads is None
    assert DeviceProfile(threads=0).threads is None and parse_profile("threads=3").threads == 3
    with pytest.raises(InvalidArgument, match="threads=-2"):
        parse_profile("threads=-2")


def test_check_threads_and_run_flags_take_minus_one(monkeypatch):
    from ondevice.engine import args as engine_args
    from ondevice.engine.resources import check_threads, physical_cores

    assert check_threads(-1) == physical_cores()
    with pytest.raises(InvalidArgument, match=r"--threads / n_threads=-2 must be 1 to .*0, -1 or none"):
        check_threads(-2)
    seen = {}
    monkeypatch.setattr("ondevice.engine.model.load",  # a model that loaded with no fitted knobs
                        lambda model, **kw: seen.update(kw) or argparse.Namespace(knobs_note="", name="m"))
    for name in ("apply_kernel_args", "apply_key_args"):
        monkeypatch.setattr(engine_args, name, lambda a: None)
    monkeypatch.setattr(engine_args, "load_config", lambda a: {})
    ns = argparse.Namespace(threads=-1, ctx=0, model=None, chat_template=None, chat_template_file=None)
    engine_args.load_from(ns)
    assert seen["n_threads"] == 0  # the default, as 0 and omitted are
    with pytest.raises(InvalidArgument, match=r"--threads -2 must be >= 1 \(0 or -1: the default"):
        engine_args.load_from(argparse.Namespace(**{**vars(ns), "threads": -2}))


def test_bench_and_fit_take_minus_one_as_the_default():
    from pydantic import ValidationError

    from ondevice.bench.config import BenchConfig
    from ondevice.engine.resources import physical_cores
    from ondevice.fit.profile import fit_profile

    n = physical_cores()
    assert BenchConfig(threads=[-1, 0, 1]).threads == [n, n, 1]
    with pytest.raises((InvalidArgument, ValidationError), match=r"-t/--threads=-2 must be 1 to .*0, -1 or none"):
        BenchConfig(threads=[-2])
    assert fit_profile(None).threads(-1) == fit_profile(None).threads(None) == n
    assert fit_profile("threads=1").threads(-1) == 1  # the profile's, as with none


def test_python_api_load_takes_minus_one_as_the_default():
    import llama_cpp

    import ondevice
    from ondevice.engine.resources import physical_cores

    with ondevice.load("smollm2-135m-instruct", n_ctx=64, n_threads=-1) as m:
        engine = getattr(m, "engine", m)
        assert engine.n_threads == physical_cores() == llama_cpp.llama_n_threads(engine.ctx)
    with pytest.raises(InvalidArgument, match=r"n_threads=-2 must be 1 to"):
        ondevice.load("smollm2-135m-instruct", n_ctx=64, n_threads=-2)


def test_serve_and_eval_take_minus_one_as_the_default_and_batch_threads_follow():
    import llama_cpp
    from pydantic import ValidationError

    import ondevice
    from ondevice.eval.config import EvalConfig
    from ondevice.serve.settings import ServeSettings

    assert ServeSettings(threads=-1).threads == 0 and EvalConfig(threads=-1).threads == 0
    for make in (ServeSettings, EvalConfig):
        with pytest.raises(ValidationError, match="greater than or equal to 0"):
            make(threads=-2)
    # n_threads_batch -1 (llama-server's default for -tb): as n_threads, not -1 handed to llama.cpp
    with ondevice.load("smollm2-135m-instruct", n_ctx=64, n_threads=1, n_threads_batch=-1) as m:
        engine = getattr(m, "engine", m)
        assert llama_cpp.llama_n_threads_batch(engine.ctx) == 1
