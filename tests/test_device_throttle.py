"""A bench record slowed by the container's CPU quota says so: cpu.stat's throttled time (v2 ``throttled_usec``,
v1 ``throttled_time`` in ns) read before and after the timed runs is kept as ``meta.throttled_s``, and the noise
reason and the table note name the quota instead of blaming other processes. Fake cgroup trees."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from ondevice.bench import noise, worker
from ondevice.bench.noise import assess, throttled_between
from ondevice.bench.record import BenchRecord
from ondevice.device.cgroup import cpu_throttled
from ondevice.report.formats import noise_note


def level(d: Path, stat: str) -> Path:
    d.mkdir(parents=True)
    (d / "cgroup.procs").write_text("")
    (d / "cpu.stat").write_text(stat)
    return d


def test_v2_and_v1_cpu_stat_are_read_per_level_in_seconds(tmp_path):
    top = level(tmp_path / "v2", "usage_usec 10\nnr_periods 5\nnr_throttled 2\nthrottled_usec 1500000\n")
    leaf = level(top / "leaf", "usage_usec 3\nnr_throttled 0\nthrottled_usec 0\n")
    v1 = level(tmp_path / "v1", "nr_periods 9\nnr_throttled 4\nthrottled_time 250000000\n")
    got = cpu_throttled({None: leaf, "cpu": v1})
    assert got == {f"{top}:throttled_usec": 1.5, f"{leaf}:throttled_usec": 0.0, f"{v1}:throttled_time": 0.25}
    assert cpu_throttled({None: tmp_path / "none", "cpu": None}) == {}


def test_throttling_between_two_readings_is_the_most_any_level_grew():
    before = {"a": 1.0, "b": 0.0}
    assert throttled_between(before, {"a": 1.5, "b": 2.25}) == 2.25
    assert throttled_between(before, dict(before)) == 0.0
    assert throttled_between({}, {}) is None  # no cpu.stat: unknown, not zero


def test_the_reason_names_the_quota_instead_of_other_processes():
    why = assess(10.0, 0.1, 1.5, throttled_s=0.8, wall_s=4.0)
    assert why == ["the container's CPU quota throttled it for 0.80 s during the runs (its processes wanted more "
                   "CPU than the quota gives: fewer -t, or a larger quota)"]
    assert assess(10.0, 0.1, 1.5, throttled_s=0.01, wall_s=4.0) == [  # a trace of throttling: load is the reason
        f"other processes kept 1.50 cores busy during the runs (over {noise.NOISY_LOAD})"]
    assert assess(10.0, 0.1, 0.0, throttled_s=0.0, wall_s=4.0) == []


def test_timed_runs_record_the_throttling(monkeypatch):
    readings = iter([{"/cg:throttled_usec": 2.0}, {"/cg:throttled_usec": 2.75}])
    monkeypatch.setattr(worker, "cpu_throttled", lambda: next(readings))
    run = worker._timed(SimpleNamespace(run=lambda: "sample"), None)
    assert run.sample == "sample" and run.throttled_s == 0.75


def test_the_table_note_says_the_quota_throttled_them():
    rec = {"kind": "bench", "noisy": True, "load": 1.2, "meta": {"throttled_s": 0.8},
           "noise": assess(10.0, 0.1, 1.2, throttled_s=0.8, wall_s=4.0)}
    note = noise_note(BenchRecord.coerce([rec, {**rec, "noisy": False, "noise": [], "meta": {}}]))
    assert "(1 of 2)" in note and "the container's CPU quota throttled 1 of them, for up to 0.80 s" in note
    plain = {**rec, "meta": {}, "noise": assess(10.0, 0.1, 1.2)}
    assert "CPU quota" not in noise_note(BenchRecord.coerce([plain]))


def test_compare_says_the_quota_throttled_a_side():
    from ondevice.report.compare import compare_records, format_compare

    base = {"kind": "bench", "model": "m", "model_sha256": "aa" * 32, "test": "tg128", "threads": 2,
            "tps_mean": 100.0, "tps_std": 1.0, "status": "ok"}
    slow = {**base, "tps_mean": 60.0, "tps_std": 9.0, "noisy": True, "meta": {"throttled_s": 1.25},
            "noise": assess(60.0, 9.0, 0.2, throttled_s=1.25, wall_s=4.0)}
    text = format_compare(compare_records([base], [slow], by_model=True), "A", "B")
    assert "(1 of 2)" in text and "the container's CPU quota throttled 1 of them, for up to 1.25 s" in text
    busy = {**slow, "meta": {}, "noise": assess(60.0, 9.0, 1.5)}  # noisy for another reason: no quota named
    assert "CPU quota" not in format_compare(compare_records([base], [busy], by_model=True), "A", "B")
