"""Tests for ondevice.bench: workload specs, records from real runs, OOM under a cap, resume after kill -9."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ondevice.bench import WORKLOADS, Sample, TestSpec, Workload, parse_tests, workload
from ondevice.bench.measure import mean_std, percentile
from ondevice.bench.noise import assess, busy_seconds, other_load, wait_idle
from ondevice.bench.record import METRIC_FIELDS, RECORD_FIELDS, BenchRecord
from ondevice.device.energy import choose
from ondevice.errors import InvalidArgument

SRC = str(Path(__file__).resolve().parents[1] / "src")


# ---------------------------------------------------------------- specs and registry
def test_parse_tests_llama_bench_names():
    specs = parse_tests("pp512,tg128,pg512,128,tg128@d1024,pp64+tg8@d16,chat,chat64x2")
    assert [s.name for s in specs] == ["pp512", "tg128", "pp512+tg128", "tg128@d1024", "pp64+tg8@d16", "chat",
                                       "chat64x2"]
    pg = specs[2]
    assert (pg.kind, pg.n_prompt, pg.n_gen, pg.n_depth) == ("pg", 512, 128, 0)
    assert (specs[3].n_gen, specs[3].n_depth) == (128, 1024)
    assert specs[5].n_gen == 32 and specs[6].n_gen == 64 and specs[6].params == {"conversations": 2}
    assert TestSpec.from_dict(specs[4].to_dict()) == specs[4]


@pytest.mark.parametrize("bad", ["pp", "xx12", "tg0", "pp0", "pg512", "tg128@1024", "chat8x0"])
def test_parse_tests_rejects_with_a_fix(bad):
    with pytest.raises(InvalidArgument, match="use|no tokens|must be"):
        parse_tests(bad)


def test_llama_bench_flags_become_tests_as_in_llama_bench():
    """-p 0 / -n 0 drop the prompt / generation tests (llama-bench's meaning); negatives and nothing left are errors."""
    from types import SimpleNamespace

    from ondevice.bench.cli import tests_from_args

    def specs(p=None, n=None, pg=None, d=None, tests=None):
        return tests_from_args(SimpleNamespace(n_prompt=p, n_gen=n, pg=pg, n_depth=d, tests=tests))

    assert specs() is None  # no llama-bench flag: the default set
    assert specs(p=[0], n=[8]) == ["tg8"] and specs(n=[0]) == ["pp512"] and specs(p=[64], d=[0, 16]) == [
        "pp64", "tg128", "pp64@d16", "tg128@d16"]
    assert specs(p=[0], n=[0], pg=[[8, 4]]) == ["pp8+tg4"] and specs(p=[0], n=[0], tests=["tg4"]) == ["tg4"]
    with pytest.raises(InvalidArgument, match="nothing to run: -p 0 and -n 0"):
        specs(p=[0], n=[0])
    for kw, flag in (({"p": [-5], "n": [8]}, "-p -5"), ({"n": [8, -1]}, "-n -1"), ({"d": [-1]}, "-d -1"),
                     ({"pg": [[5, -1]]}, "-pg -1")):
        with pytest.raises(InvalidArgument, match=f"^{flag} is negative"):
            specs(**kw)


def test_workload_registry_is_extensible():
    @workload
    class Echo(Workload):
        kind = "echo"
        help = "echoN"

        @classmethod
        def parse(cls, text):
            return TestSpec(text, cls.kind, n_gen=int(text[4:])) if text.startswith("echo") else None

    try:
        assert WORKLOADS["echo"] is Echo
        assert parse_tests("echo3")[0].kind == "echo"
    finally:
        WORKLOADS.pop("echo")
    with pytest.raises(InvalidArgument):
        parse_tests("echo3")


def test_bench_config_one_declaration_for_flags_env_and_api(monkeypatch):
    """BenchConfig is what `ondevice bench`'s flags, ONDEVICE_BENCH_* and ondevice.bench(...)'s keywords build:
    comma lists split and repeat, the flag beats the env, and bad values name the flag."""
    import argparse

    from ondevice.bench.api import make_config
    from ondevice.bench.config import FLAGS, BenchConfig
    from ondevice.config import add_config_arguments, config_from

    p = argparse.ArgumentParser()
    add_config_arguments(p, BenchConfig, FLAGS)
    args = p.parse_args(["-t", "1,2", "-t", "4", "-fa", "0,1", "-fa", "auto,off", "--profile", "threads=2,mem=1G",
                         "--no-warmup", "--tests", "pg16,8", "--wait-idle"])
    cfg = config_from(BenchConfig, args, verb="bench", what="bench settings", flags=FLAGS)
    assert cfg.threads == [1, 2, 4] and cfg.flash_attn == [False, True, None, False]
    assert cfg.profile == ["threads=2,mem=1G"]
    assert not cfg.warmup and cfg.wait_idle == 120.0 and [t.name for t in cfg.specs] == ["pp16+tg8"]
    assert make_config(threads=2).threads == [2] and make_config().n_batch == [2048]  # the API's keywords
    assert make_config().flash_attn == [None]  # auto, as llama-bench's default and as `ondevice run` loads
    monkeypatch.setenv("ONDEVICE_BENCH_THREADS", "3")
    monkeypatch.setenv("ONDEVICE_BENCH_REPETITIONS", "2")
    assert make_config().threads == [3] and make_config(threads=1).threads == [1]  # the keyword wins
    assert make_config().repetitions == 2
    for bad, flag in (({"threads": -2}, "--threads"), ({"type_k": "q9"}, "--cache-type-k"),
                      ({"wait_idle": -1}, "--wait-idle"), ({"repetitions": 0}, "--repetitions")):
        with pytest.raises(InvalidArgument, match=flag):
            make_config(**bad)
    with pytest.raises(InvalidArgument, match="BenchConfig has no argument .nope."):
        make_config(nope=1)
    with pytest.raises(InvalidArgument, match="unknown test 'xx1'"):
        make_config(tests="xx1")


def test_a_misspelt_bench_keyword_names_every_keyword_and_the_signature_shows_them():
    import inspect

    import ondevice

    with pytest.raises(InvalidArgument, match=r"ondevice.bench\(\) has no argument 'progres' \(did you mean "
                                              r"'progress'\?\); it takes amx, config, .*repack, repetitions, .*store"):
        ondevice.bench(["x.gguf"], "tg1", progres=True)  # before any model is looked for
    for fn in (ondevice.bench, ondevice.fit, ondevice.quantize, ondevice.evaluate, ondevice.pull):
        assert "**kw" not in str(inspect.signature(fn)), fn  # the real keywords, not a wrapper's
    assert {"amx", "repack", "store", "on_record"} <= set(inspect.signature(ondevice.bench).parameters)
    assert "budget" in inspect.signature(ondevice.fit).parameters
    import ondevice.adapt  # noqa: F401 — imported, the packages take the place of the functions on `ondevice`
    import ondevice.fit  # noqa: F401

    for name, says in (("bench", "Benchmark models on this device"), ("fit", "Fit ``model``"),
                       ("adapt", "Train a LoRA adapter")):
        doc = inspect.getdoc(getattr(ondevice, name))  # help() and Jupyter's `?` showed the package's docstring
        assert doc.startswith(f"{name}(") and says in doc.split("(the package")[0], (name, doc[:300])


def test_noise_verdict_and_load_arithmetic():
    assert assess(100.0, 2.0, 0.05) == []
    why = assess(57.55, 26.29, 3.1)  # the figures of a busy run
    assert len(why) == 2 and "46%" in why[0] and "3.10 cores" in why[1]
    assert assess(100.0, None, None) == []
    # machine busy seconds minus ours, per second of wall time
    assert other_load(10.0, 14.0, 1.0, 2.0) == pytest.approx(1.5)
    assert other_load(10.0, 10.5, 1.0, 2.0) == 0.0 and other_load(None, 1.0, 0.0, 1.0) is None
    # the machine-wide counter sees at least the CPU time we spend ourselves
    b0, c0 = busy_seconds(), time.process_time()
    end = time.perf_counter() + 0.5
    while time.perf_counter() < end:
        pass
    b1, c1 = busy_seconds(), time.process_time()
    assert b1 - b0 >= 0.8 * (c1 - c0) - 0.02


def test_wait_idle_is_bounded():
    t0 = time.monotonic()
    quiet = wait_idle(30, quiet_s=1, threshold=1e9, show=False)  # any machine is "quiet" under a huge threshold
    assert quiet["quiet"] and quiet["load"] >= 0
    busy = wait_idle(1.5, quiet_s=1, threshold=-1, show=False)  # never quiet: gives up after the bound
    assert not busy["quiet"] and 1.5 <= busy["waited_s"] < 4
    assert time.monotonic() - t0 < 10


def test_stats_match_numpy():
    np = pytest.importorskip("numpy")
    xs = [3.0, 1.0, 4.0, 1.0, 5.0, 9.0, 2.0, 6.0]
    m, s = mean_std(xs)
    assert m == pytest.approx(np.mean(xs)) and s == pytest.approx(np.std(xs, ddof=1))
    for q in (0, 50, 90, 99, 100):
        assert percentile(xs, q) == pytest.approx(np.percentile(xs, q))
    assert mean_std([2.0]) == (2.0, 0.0) and mean_std([]) == (None, None) and percentile([], 50) is None
    assert Sample(time_s=1.0, n_tokens=4).itl_s == []


# ---------------------------------------------------------------- real runs (one small sweep, shared)
@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """One ONDEVICE_HOME for the module, so the hardware probe runs (and is cached) once."""
    h = tmp_path_factory.mktemp("home")
    old = os.environ.get("ONDEVICE_HOME")
    os.environ["ONDEVICE_HOME"] = str(h)
    yield h
    if old is None:
        os.environ.pop("ONDEVICE_HOME", None)
    else:
        os.environ["ONDEVICE_HOME"] = old


@pytest.fixture(scope="module")
def sweep(home, smol_path):
    import ondevice
    from ondevice.errors import OndeviceError

    try:
        from ondevice.device import probe

        probe(1)
        probe_ok = True
    except OndeviceError:  # a very busy machine: the probe times out; roofline checks are skipped
        probe_ok = False
    # one thread: llama.cpp's spinning thread barrier collapses on a shared, oversubscribed CI machine
    recs = ondevice.bench([str(smol_path)], "pp16,tg8,pg16,8,tg8@d16,chat8x1", threads=1, repetitions=2)
    return recs, probe_ok


def test_records_have_all_fields_and_consistent_units(sweep, smol_path):
    recs, _ = sweep
    assert [r.test for r in recs] == ["pp16", "tg8", "pp16+tg8", "tg8@d16", "chat8x1"]
    sha = hashlib.sha256(Path(smol_path).read_bytes()).hexdigest()
    for r in recs:
        assert r.status == "ok", r.error
        assert isinstance(r, BenchRecord)
        stored = r.to_dict()  # what the store and every export hold
        missing = [k for k in (*RECORD_FIELDS, *METRIC_FIELDS) if k not in stored]
        assert not missing, missing
        assert BenchRecord.from_dict(json.loads(json.dumps(stored))) == r
        assert r.model_sha256 == sha and r.model_size_bytes == Path(smol_path).stat().st_size
        assert r.threads == 1 and r.repetitions == 2 and len(r.tps_samples) == 2
        # t/s of each repetition is its tokens over its time (llama-bench's avg_ts)
        n_tok = {"pp": r.n_prompt, "tg": r.n_gen, "pg": r.n_prompt + r.n_gen}.get(r.workload)
        for tps, t in zip(r.tps_samples, r.time_s_samples):
            assert t > 0 and tps > 0
            if n_tok:
                assert tps == pytest.approx(n_tok / t)
        assert r.tps_mean == pytest.approx(sum(r.tps_samples) / 2)
        assert r.ttft_s_mean > 0 and r.load_time_s > 0
        if r.workload != "pp":
            assert 0 < r.itl_ms_p50 <= r.itl_ms_p90 <= r.itl_ms_p99
            assert r.decode_tps_mean > 0
        if r.workload in ("pp", "pg", "chat"):
            assert r.prefill_tps_mean > 0
        # memory: the peak covers the split sampled at its largest RSS; the mmapped model is file-backed
        assert r.peak_rss_bytes >= r.rss_file_bytes + r.rss_anon_bytes - (1 << 20)
        assert r.rss_file_bytes >= 0.8 * r.model_size_bytes
        # the model's own mapped pages: most of the file, and part of the file-backed RSS
        assert 0.5 * r.model_size_bytes <= r.rss_model_bytes <= r.model_size_bytes + (1 << 20)
        assert r.rss_model_bytes <= r.rss_file_bytes + (1 << 20)
        # noise: the load other processes put on the machine, and the verdict with its reasons
        assert r.load >= 0 and r.load_avg_1m >= 0
        assert r.noisy == bool(r.noise) and list(r.noise) == assess(r.tps_mean, r.tps_std, r.load)
        assert r.cpu_time_s > 0 and r.cpu_user_s + r.cpu_sys_s == pytest.approx(r.cpu_time_s)
        assert r.energy_method == choose()[0] and r.energy_j > 0  # what this machine measures with
        counted = 2 * (n_tok if n_tok else r.n_gen * len(r.prompt_lengths))  # chat: every generated token
        assert r.energy_j_per_token == pytest.approx(r.energy_j / counted)
        meta = r.meta
        for k in ("ondevice", "llama_build", "cpu_model", "cpu_flags", "governor", "load_avg_before", "kernel"):
            assert k in meta, k
        assert "llama-cpp-python" in meta["llama_build"]
        # what this process could use of the machine: a container's run is told apart from the host's
        for k in ("usable_cpus", "cpu_quota", "memory_limit_bytes", "l3_cache_bytes", "hypervisor", "boost"):
            assert k in meta, k
        assert 1 <= meta["usable_cpus"] <= meta["logical_cores"]
        assert meta["energy"]["watts_source"] in (None, "default", "env", "profile")  # None: measured
        assert r.settings["test"] == r.test
    assert len({r.config_key for r in recs}) == len(recs)
    # the tg at depth really ran at depth: its n_ctx holds depth + tokens
    assert recs[3].n_ctx >= 16 + 8 + 1
    chat = recs[4]
    assert len(chat.prompt_lengths) == 1 and chat.prompt_lengths[0] > 20


def test_records_are_in_the_store(sweep, home):
    from ondevice.store import Store

    recs, _ = sweep
    with Store() as st:
        stored = st.records("bench", recs.session)
    assert [r["config_key"] for r in stored] == [r.config_key for r in recs]
    assert all(r["_status"] == "ok" for r in stored)


def test_roofline_figures_present(sweep):
    recs, probe_ok = sweep
    if not probe_ok:
        pytest.skip("the hardware probe timed out on this busy machine; no roofs to compare against")
    for r in recs:
        roof = r.roofline
        assert r.roofline_pct > 0 and r.roofline_bound in ("memory", "compute")
        assert roof["bandwidth_gbs"] > 0 and roof["peak_gflops"] > 0 and roof["phases"]
        # % = time at the bound / measured mean time
        assert r.roofline_pct == pytest.approx(100 * roof["bound_time_s"] / r.avg_s)
        # the compute roof is an fp32 sgemm; the shipped file is quantized (int8 dot products)
        assert roof["compute_roof"] == "fp32" and roof["weight_kernels"] == "int8"
        assert "load" in roof["probe"] and "load_avg_1m" in roof["probe"]
    decode = recs[1].roofline["phases"][0]
    assert decode["phase"] == "decode" and decode["tokens"] == 8 and decode["depth"] == 0


def test_roofline_arithmetic_against_device_roofline(smol_path):
    from ondevice.bench.meta import model_meta, roofline_for
    from ondevice.device import Probe, decode_cost, prefill_cost, roofline

    meta = model_meta(str(smol_path))
    roofs = Probe(threads=2, bandwidth_gbs=10.0, peak_gflops=50.0, measured_at="x", bandwidth_method="m",
                  compute_method="c", machine_key="k")
    info = meta.info
    hp = {"n_layers": info.n_layers, "n_embd": info.n_embd, "n_head": info.n_head, "n_head_kv": info.n_head_kv}
    got = roofline_for(meta, [("prefill", 64, 0), ("decode", 9, 64)], 2.0, 512, "f16", "f16", roofs)
    pc = prefill_cost(info.tensors, n_prompt=64, n_ubatch=512, **hp)
    dc = decode_cost(info.tensors, depth=68, **hp)
    t_pre = 64 / roofline(1, pc.bytes_per_token, pc.flops_per_token, 10.0, 50.0)["bound_tps"]
    t_dec = 9 / roofline(1, dc.bytes_per_token, dc.flops_per_token, 10.0, 50.0)["bound_tps"]
    assert got["bound_time_s"] == pytest.approx(t_pre + t_dec)
    assert got["pct"] == pytest.approx(100 * (t_pre + t_dec) / 2.0)


def test_a_kv_cache_the_memory_cap_has_no_room_for_is_an_oom_record(home, smol_path):
    """Under a profile's cgroup cap the engine's KV check refused the context ("needs 720.0 MiB for the KV cache
    and this machine has 0.0 GiB available") and the bench recorded an error, not the device's lack of memory: a
    fit under that profile then failed on it instead of saying the variant does not fit the device."""
    import ondevice

    recs = ondevice.bench([str(smol_path)], "pp16", profile=["mem=300M,threads=1"], n_ctx=[32768],
                          repetitions=1, roofline=False, store=False)
    assert [r.status for r in recs] == ["oom"], [(r.status, r.error) for r in recs]
    assert "memory" in recs[0].error


def test_memory_cap_below_model_size_is_an_oom_record(home, smol_path):
    from test_device import _cgroup_mechanism

    import ondevice

    # RLIMIT_AS counts the whole mmapped model, so a cap under its size fails the load; a cgroup caps RAM,
    # where the model's file pages can be dropped and re-read, so it takes a cap under the process's own
    # anonymous memory (Python, llama.cpp's buffers) to kill it
    mech = _cgroup_mechanism() or "rlimit_as"
    cap = (64 << 20) if mech == "rlimit_as" else (16 << 20)
    assert cap < Path(smol_path).stat().st_size
    recs = ondevice.bench([str(smol_path)], "tg4", profile=[f"mem={cap}", "threads=1"], repetitions=1,
                          roofline=False, store=False)
    assert [r.status for r in recs] == ["oom", "ok"]  # the sweep went on after the OOM
    assert "memory" in recs[0].error and recs[0].tps_mean is None and "tps_mean" not in recs[0].to_dict()
    limits = recs[0].meta["limits"]
    assert limits is None or limits["mem_mechanism"] == mech  # None: killed before it could say
    assert recs[1].threads == 1


def _env(home: Path) -> dict:
    return dict(os.environ, ONDEVICE_HOME=str(home), PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))


def _count(db: Path) -> int:
    try:
        with sqlite3.connect(db, timeout=5) as c:
            return c.execute("SELECT COUNT(*) FROM records WHERE kind='bench'").fetchone()[0]
    except sqlite3.OperationalError:
        return 0


def _wait_records(proc, db: Path, n: int, timeout: float = 240) -> None:
    t0 = time.time()
    while _count(db) < n:
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else "sweep exited early"
        assert time.time() - t0 < timeout, "no record landed"
        time.sleep(0.05)


def test_resume_after_kill_9_skips_finished_configs(tmp_path, smol_path):
    psutil = pytest.importorskip("psutil")
    db = tmp_path / "runs.sqlite"
    args = [sys.executable, "-m", "ondevice.cli", "bench", "-m", str(smol_path), "--tests", "pp16,tg4",
            "-t", "1", "-ub", "512,256", "-r", "1", "--db", str(db), "--session", "s1", "--no-roofline", "--no-report",
            "--no-progress"]
    proc = subprocess.Popen(args, env=_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_records(proc, db, 1)
    workers = psutil.Process(proc.pid).children(recursive=True)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    _, alive = psutil.wait_procs(workers, timeout=15)  # the worker dies with the sweep (PR_SET_PDEATHSIG)
    assert all(p.status() == psutil.STATUS_ZOMBIE for p in alive if p.is_running()), "an orphan worker survived"
    with sqlite3.connect(db) as c:
        before = dict(c.execute("SELECT config_key, id FROM records"))
    assert 1 <= len(before) < 4
    res = subprocess.run([*args, "--resume", "-o", "json"], env=_env(tmp_path), check=False, capture_output=True, text=True,
                         timeout=400)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert [(r["n_ubatch"], r["test"]) for r in out] == [(512, "pp16"), (512, "tg4"), (256, "pp16"), (256, "tg4")]
    with sqlite3.connect(db) as c:
        after = c.execute("SELECT config_key, id, session FROM records").fetchall()
    keys = [k for k, _, _ in after]
    assert len(keys) == len(set(keys)) == 4  # nothing measured twice
    ids = {k: i for k, i, _ in after}
    assert all(ids[k] == i for k, i in before.items())  # the records stored before the kill are untouched
    assert {s for _, _, s in after} == {"s1"}
    assert "holds no records" not in res.stderr
    assert f"--resume: {len(before)} of the tests were in session s1 already: their stored records are shown, not " \
           f"measured again" in res.stderr, res.stderr
    cold = subprocess.run([*args, "--tests", "tg4", "-ub", "512", "--no-warmup", "--resume", "-o", "json"],
                          env=_env(tmp_path), check=False, capture_output=True, text=True, timeout=400)
    assert cold.returncode == 0 and "were in session s1 already" not in cold.stderr, cold.stderr  # cold: measured
    typo = [*args[:args.index("s1")], "s2", *args[args.index("s1") + 1:], "--tests", "tg4", "-ub", "512", "--resume"]
    res = subprocess.run(typo, env=_env(tmp_path), check=False, capture_output=True, text=True, timeout=400)
    assert res.returncode == 0 and "--resume: session s2 holds no records, so every test ran" in res.stderr, res.stderr


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_ctrl_c_or_a_kill_stops_cleanly_and_keeps_records(tmp_path, smol_path, sig):
    """Ctrl-C, a `kill` (SIGTERM) or a closed terminal (SIGHUP): the records so far are kept and the table of
    them printed, the line says what stopped it, and the exit status is the signal's (130, 143, 129)."""
    db = tmp_path / "runs.sqlite"
    args = [sys.executable, "-m", "ondevice.cli", "bench", "-m", str(smol_path), "--tests", "pp16,tg4,tg64@d256",
            "-r", "2", "-t", "1", "--db", str(db), "--no-roofline", "--no-report", "--no-progress"]
    # Ctrl-C's default action in the child, as a terminal's shell gives it, even where this test run was started
    # with SIGINT ignored (exec keeps "ignored"; the interrupt would then never land and the test skip)
    proc = subprocess.Popen(args, env=_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # noqa: PLW1509
    _wait_records(proc, db, 1)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    n = _count(db)
    if n == 3:
        pytest.skip("the sweep finished before the interrupt landed")
    assert proc.returncode == 128 + sig, err
    said = "interrupted" if sig == signal.SIGINT else f"stopped by {signal.Signals(sig).name}"
    assert f"ondevice bench: {said}; the records above were kept (continue with --resume --session " in err, err
    assert "Traceback" not in err
    assert "pp16" in out  # the table of what was measured is printed


def test_cli_bench_llama_bench_flags_and_csv(tmp_path, smol_path):
    from ondevice.report.formats import read

    res = subprocess.run([sys.executable, "-m", "ondevice.cli", "bench", "-m", str(smol_path), "-p", "16", "-n", "4",
                          "-r", "1", "-t", "1", "-o", "csv", "--no-roofline", "--no-progress", "--wait-idle", "2",
                          "--db", str(tmp_path / "r.sqlite"), "--html", str(tmp_path / "r.html")],
                         env=_env(tmp_path), check=False, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    rows = read(res.stdout, "csv")
    assert [r["test"] for r in rows] == ["pp16", "tg4"]
    assert all(isinstance(r["tps_mean"], float) and r["tps_mean"] > 0 for r in rows)
    waited = rows[0]["meta"]["wait_idle"]  # bounded: 3 quiet seconds cannot happen within 2
    assert waited["quiet"] is False and 2 <= waited["waited_s"] < 5 and waited["load"] >= 0
    html = (tmp_path / "r.html").read_text()
    assert "Memory per model" in html and "one prompt length per model" in html  # a single point is no curve
    assert "report:" in res.stderr


def test_cli_bench_reprobe_then_cached_probe_is_named(tmp_path, smol_path):
    """% of roofline depends on the probe: a cached one is named with its date; --reprobe measures anew."""
    def bench(*extra):
        return subprocess.run([sys.executable, "-m", "ondevice.cli", "bench", "-m", str(smol_path), "-p", "0", "-n", "4",
                               "-r", "1", "-t", "1", "-o", "json", "--no-store", "--no-report", "--no-progress",
                               *extra], env=_env(tmp_path), check=False, capture_output=True, text=True, timeout=300)

    fresh = bench("--reprobe")
    assert fresh.returncode == 0, fresh.stderr
    assert "uses the probe measured" not in fresh.stderr
    again = bench()
    assert again.returncode == 0, again.stderr
    note = next(line for line in again.stderr.splitlines() if "uses the probe measured" in line)
    assert "--reprobe" in note
    measured_again = bench("--reprobe")  # a probe is cached now: --reprobe replaces it rather than naming it
    assert measured_again.returncode == 0 and "uses the probe measured" not in measured_again.stderr


def test_bad_flags_name_the_fix(tmp_path, smol_path):
    res = subprocess.run([sys.executable, "-m", "ondevice.cli", "bench", "--tests", "pp512,zz1", "--no-store"],
                         env=_env(tmp_path), check=False, capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "unknown test 'zz1'" in res.stderr and "ppN" in res.stderr
    res = subprocess.run([sys.executable, "-m", "ondevice.cli", "bench", "-ctk", "q9", "--no-store"],
                         env=_env(tmp_path), check=False, capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "KV cache type" in res.stderr
    # refused before the sweep starts (were an error row per configuration, the second with the wrong fix)
    for flags, says in ((["-t", "1,999"], "-t/--threads=999 must be 1 to"),
                        (["-ctv", "q8_0", "-fa", "off"], "a quantized V cache (q8_0) needs flash attention in "
                                                           "llama.cpp: add -fa 1"),
                        (["-fa", "maybe"], "'maybe' is not on, off or auto"),
                        (["-c", "8"], "8 is too small a context")):
        res = subprocess.run([sys.executable, "-m", "ondevice.cli", "bench", *flags, "--no-store"],
                             env=_env(tmp_path), check=False, capture_output=True, text=True, timeout=60)
        assert res.returncode == 2 and says in res.stderr and "session" not in res.stderr, res.stderr
    for flags, says in ((["-nkvo", "1"], "-nkvo is llama-bench's and does not apply here"),  # was read as -n kvo
                        (["-dev", "none"], "-dev is llama-bench's"), (["-mmp", "0"], "-mmp is llama-bench's")):
        res = subprocess.run([sys.executable, "-m", "ondevice.cli", "bench", *flags, "--no-store"],
                             env=_env(tmp_path), check=False, capture_output=True, text=True, timeout=60)
        assert res.returncode == 2 and says in res.stderr and "Traceback" not in res.stderr, res.stderr
    res = subprocess.run([sys.executable, "-m", "ondevice.cli", "bench", "-m", str(smol_path), "-p", "16", "-n", "0",
                          "-r", "1", "-t", "1", "-ngl", "99", "--repack", "0", "--progress", "--no-store",
                          "--no-report", "-o", "json"], env=_env(tmp_path), check=False, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0 and "-ngl 99 ignored: ondevice runs on the CPU" in res.stderr, res.stderr
    assert json.loads(res.stdout)[0]["repack"] == "off"  # llama.cpp's --repack 0

    from ondevice.engine.base import EngineConfig
    from ondevice.engine.llama import LlamaEngine

    with pytest.raises(InvalidArgument, match="needs flash attention"):  # a load, as run and serve make it
        LlamaEngine(smol_path, EngineConfig(type_v="q4_0", flash_attn=False))


def test_library_door_is_callable_after_import():
    import ondevice
    import ondevice.bench.api

    assert callable(ondevice.bench)


# ---------------------------------------------------------------- interleaved comparisons
def test_interleaved_repetitions_go_round_the_models_in_turn():
    """With several models in one worker each repetition runs every model once, the first one rotating, and
    each model's figures come from its own runs only."""
    from types import SimpleNamespace

    from ondevice.bench.worker import run_test

    order: list[str] = []

    @workload
    class Order(Workload):
        kind = "order"

        @classmethod
        def parse(cls, text):
            return None

        def warmup(self):
            order.append("warmup " + self.model.name)

        def run(self):
            order.append(self.model.name)
            return Sample(time_s=0.01 if self.model.name == "a" else 0.02, n_tokens=4)

    def model(name):
        return SimpleNamespace(name=name, path=f"/nonexistent/{name}.gguf",
                               engine=SimpleNamespace(reset=lambda: None))

    try:
        res = run_test([model("a"), model("b"), model("c")], TestSpec("order4", "order"),
                       {"repetitions": 3}, None)
    finally:
        WORKLOADS.pop("order")
    assert order == ["warmup a", "warmup b", "warmup c", "a", "b", "c", "b", "c", "a", "c", "a", "b"]
    assert [r["tps"]["samples"] for r in res] == [[400.0] * 3, [200.0] * 3, [200.0] * 3]
    for r in res:  # one process holds every model: its peak is no one model's
        assert r["memory"]["peak_rss_bytes"] is None and r["memory"]["process_max_rss_bytes"] is None
        assert r["cpu"]["total_s"] >= 0 and r["measured_wall_s"] > 0


def test_cli_bench_interleave_compares_two_models_in_one_worker(tmp_path, smol_path):
    other = tmp_path / "smol-copy.gguf"
    other.write_bytes(Path(smol_path).read_bytes())
    res = subprocess.run([sys.executable, "-m", "ondevice.cli", "bench", "-m", str(smol_path), "-m", str(other),
                          "--tests", "pp8,tg4", "-t", "1", "-r", "2", "--interleave", "--no-store", "--no-report",
                          "--no-progress", "--no-roofline", "-o", "json"],
                         env=_env(tmp_path), check=False, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    recs = [BenchRecord.from_dict(d) for d in json.loads(res.stdout)]
    assert sorted((Path(r.model_path).name, r.test) for r in recs) == sorted(
        (n, t) for n in (Path(smol_path).name, other.name) for t in ("pp8", "tg4"))
    names = {r.model for r in recs}
    assert len(names) == 2
    for r in recs:
        assert r.status == "ok", r.error
        assert len(r.tps_samples) == 2 and r.tps_mean > 0
        assert r.meta["interleaved_with"] == sorted(names - {r.model})
        assert r.settings["interleave"] is True
        assert r.peak_rss_bytes is None and r.rss_model_bytes > 0  # the model's own pages, not the process's
    # the same model benched alone is another configuration (another way of measuring)
    alone = subprocess.run([sys.executable, "-m", "ondevice.cli", "bench", "-m", str(smol_path), "--tests", "tg4",
                            "-t", "1", "-r", "1", "--no-store", "--no-report", "--no-progress", "--no-roofline",
                            "-o", "json"], env=_env(tmp_path), check=False, capture_output=True, text=True,
                           timeout=300)
    assert alone.returncode == 0, alone.stderr
    solo = BenchRecord.from_dict(json.loads(alone.stdout)[0])
    assert solo.peak_rss_bytes > 0 and "interleaved_with" not in solo.meta
    assert solo.config_key not in {r.config_key for r in recs}


def test_interleave_refuses_a_memory_capped_profile(tmp_path, smol_path):
    import ondevice

    with pytest.raises(InvalidArgument, match="interleave.*memory cap"):
        ondevice.bench([str(smol_path), str(tmp_path / "other.gguf")], "tg4", interleave=True,
                       profile=["phone-4g"], store=False)
