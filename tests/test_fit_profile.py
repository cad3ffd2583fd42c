"""``ondevice fit --profile`` and ``--quality`` without a model: the profile's defaults, cache keys and memory
bound, the score budget (the end-to-end fits under a profile and with a suite are in ``test_fit.py``)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from ondevice.device.profile import DeviceProfile, parse_profile
from ondevice.errors import InvalidArgument
from ondevice.fit.budget import parse_budget
from ondevice.fit.measure import device_section
from ondevice.fit.plan import Candidate, impossible
from ondevice.fit.profile import fit_profile
from ondevice.fit.quality import parse_quality


def test_profile_threads_default_and_host_is_no_profile():
    assert fit_profile(None).spec is None and fit_profile("host").spec is None
    from ondevice.engine.resources import physical_cores

    cores = physical_cores()  # run's and serve's default: the fit measures what they will run (it was 2 anywhere)
    assert fit_profile(None).threads(None) == cores and fit_profile("host").threads(3) == 3
    assert fit_profile("edge-1g").threads(None) == 1 and fit_profile("phone-4g").threads(None) == 2
    assert fit_profile("cpus=0").threads(None) == 1  # one pinned CPU: one thread
    assert fit_profile("mem=2G").threads(None) == cores  # no thread limit: the host's default


def test_the_fits_default_threads_follow_the_cpus_this_process_may_use():
    """Under `taskset -c 0` the fit said "2 thread(s) for the benches" (and on a bigger machine it used 2 of N)."""
    import os
    import subprocess
    import sys

    one = {min(os.sched_getaffinity(0))}
    code = "from ondevice.fit.profile import fit_profile; print(fit_profile(None).threads(None))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                       preexec_fn=lambda: os.sched_setaffinity(0, one))  # as taskset -c 0 starts it
    assert r.stdout.strip() == "1"
    assert fit_profile("edge-1g").threads(2) == 2  # an explicit count wins


def test_a_profile_object_becomes_a_spec_the_worker_parses_back():
    for p in (DeviceProfile("mine", threads=1, cpu_affinity=(0,), mem_limit_bytes=512 << 20),
              parse_profile("phone-4g"), parse_profile("threads=1,mem=2G")):
        back = parse_profile(fit_profile(p).spec)
        assert (back.threads, back.cpu_affinity, back.mem_limit_bytes) == (p.threads, p.cpu_affinity,
                                                                           p.mem_limit_bytes)


def test_the_speed_cache_is_kept_per_profile():
    host = device_section("sha", 1, ("pp32", "tg8"), 1, fit_profile(None).cache_id())
    assert host == device_section("sha", 1, ("pp32", "tg8"), 1)  # the host's sections are as before profiles
    edge = device_section("sha", 1, ("pp32", "tg8"), 1, fit_profile("edge-1g").cache_id())
    edge2 = device_section("sha", 1, ("pp32", "tg8"), 1, fit_profile("edge-1g,mem=2G").cache_id())
    assert len({host, edge, edge2}) == 3
    # the same limits spelled another way are the same device
    assert edge == device_section("sha", 1, ("pp32", "tg8"), 1,
                                  fit_profile(DeviceProfile("edge-1g", 1, None, 1 << 30)).cache_id())


@pytest.mark.parametrize("spec", ["phone-9g", "threads=-2", "mem=lots", "speed=3"])
def test_bad_profile_is_parse_profiles_one_line_error(spec):
    with pytest.raises(InvalidArgument) as e:
        fit_profile(spec)
    assert "\n" not in str(e.value)


def test_memory_cap_bounds_the_file():
    edge = fit_profile("edge-1g")
    with pytest.raises(InvalidArgument, match=r"memory cap \(1024 MiB\) holds no variant.* is 1100 MiB"):
        fit_profile("mem=1G").check_smallest(1100 << 20, ("Q8_0", "Q4_0"))
    edge.check_smallest(200 << 20, ("Q8_0",))  # fits: no error
    fits, note = edge.fits({"peak_rss": 300 << 20, "rss_model": 200 << 20, "limits": {"mem_mechanism": "cgroup2"}})
    assert fits == (1 << 30) - (100 << 20) and "100 MiB" in note and "cgroup2" in note
    assert fit_profile("threads=1").fits({"peak_rss": 1}) == (None, "")  # no cap, no bound
    with pytest.raises(InvalidArgument, match=r"files up to 968\.9 MB fit, and the smallest variant is 1000\.0 MB"):
        edge.fits({"peak_rss": 300 << 20, "rss_model": 200 << 20}, smallest=1_000_000_000)
    b = replace(parse_budget("size<=2GB"), fits=fits)
    big = {"size": fits + 1, "tg": 10.0, "pp": 10.0, "kld": 0.1}
    assert b.violations(big) == [f"size {big['size'] / 1e6:.1f}MB > {fits / 1e6:.1f}MB (the device profile's memory)"]
    msg = impossible([Candidate({}, big)], b)
    assert "device profile's memory" in msg and "cannot be met" in msg and "\n" not in msg


def test_score_budget_is_checked_on_measured_scores_only():
    b = parse_budget("size<=110MB,score>=0.9x")
    assert b.score_rel == 0.9 and b.score is None
    r = b.scored(0.5)
    assert r.score == pytest.approx(0.45)
    m = {"size": 100e6, "tg": 1.0, "pp": 1.0, "kld": 0.1}
    assert r.violations(m) == []  # a plan's score is not predicted
    assert r.violations({**m, "score": 0.4}) == ["score 0.400 < 0.450"]
    assert parse_budget("score>=0.3").score == 0.3
    with pytest.raises(InvalidArgument, match="floor"):
        parse_budget("score<=0.3")


def test_quality_checks_suite_limit_and_score_budget_up_front():
    assert parse_quality(None, 10, parse_budget("")).kind is None
    assert parse_quality("ppl", 10, parse_budget("")).kind == "ppl"
    q = parse_quality("rewrite", 3, parse_budget("score>=0.5"))
    assert (q.kind, q.suite, q.limit) == ("suite", "rewrite", 3)
    with pytest.raises(InvalidArgument, match="no suite named 'nosuch'.*assistant-en.*smartbench"):
        parse_quality("nosuch", 10, parse_budget(""))
    with pytest.raises(InvalidArgument, match="--quality SUITE"):
        parse_quality("ppl", 10, parse_budget("score>=0.5"))
    with pytest.raises(InvalidArgument, match="--quality-limit 0"):
        parse_quality("rewrite", 0, parse_budget(""))
