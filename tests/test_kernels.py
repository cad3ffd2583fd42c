"""Extra CPU kernels (AMX, CPU_REPACK): the choice on faked CPUs, a real self-test and decode here, and the
supervisor that turns a native crash into one clear line."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest
from conftest import serve_process, tmpfs

from ondevice.device import kernels as K
from ondevice.errors import InvalidArgument
from ondevice.supervise import crash_message

# What /proc/cpuinfo says and what a GGML_NATIVE build of llama.cpp offers on each kind of machine.
AMX_XEON = (("AMX", "CPU_REPACK"), ["avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16"])
AVX2_ONLY = (("CPU_REPACK",), ["sse3", "avx", "avx2", "fma", "f16c"])
AVX512_NO_AMX = (("CPU_REPACK",), ["avx2", "avx512f", "avx512bw", "avx512vl", "avx512_vnni"])
ARM_I8MM = (("CPU_REPACK",), ["neon", "asimd", "asimddp", "i8mm"])
ARM_KLEIDIAI = (("CPU_KLEIDIAI", "CPU_REPACK"), ["neon", "asimd", "asimddp", "i8mm", "sme"])


def ok(pp=None, tg=None):
    return {"ok": True, "error": None, **({"pp_tps": pp, "tg_tps": tg} if pp else {})}


def failed(why="SIGSEGV"):
    return {"ok": False, "error": why}


@pytest.mark.parametrize("machine", [AMX_XEON, AVX2_ONLY, AVX512_NO_AMX, ARM_I8MM, ARM_KLEIDIAI],
                         ids=["amx-xeon", "avx2", "avx512-no-amx", "arm-i8mm", "arm-kleidiai"])
def test_auto_untested_is_the_safe_set(machine):
    offered, flags = machine
    c = K.choose("auto", "auto", offered, flags, None)
    assert not c.amx and "AMX" not in c.bufts  # never AMX without proof
    assert c.repack and c.bufts == tuple(n for n in offered if n != "AMX")  # repacked kernels stay on
    assert "not self-tested" in c.reason


def test_amx_xeon_amx_only_when_proven_safe_and_faster():
    offered, flags = AMX_XEON
    crashed = {"none": ok(), "CPU_REPACK": ok(), "AMX": failed(), "AMX+CPU_REPACK": failed()}
    c = K.choose("auto", "auto", offered, flags, crashed)
    assert (c.amx, c.repack, c.bufts) == (False, True, ("CPU_REPACK",))
    assert "AMX+CPU_REPACK (SIGSEGV)" in c.reason
    untimed = {"none": ok(), "CPU_REPACK": ok(), "AMX": ok(), "AMX+CPU_REPACK": ok()}  # passed, never timed
    assert K.choose("auto", "auto", offered, flags, untimed).bufts == ("CPU_REPACK",)
    timed = {"none": ok(100, 50), "CPU_REPACK": ok(150, 50), "AMX": ok(200, 52), "AMX+CPU_REPACK": ok(300, 60)}
    c = K.choose("auto", "auto", offered, flags, timed)
    assert (c.amx, c.bufts) == (True, ("AMX", "CPU_REPACK")) and "fastest" in c.reason
    barely = {**timed, "AMX": ok(120, 50), "AMX+CPU_REPACK": ok(152, 51)}  # 2% better: noise; the default stays
    assert K.choose("auto", "auto", offered, flags, barely).bufts == ("CPU_REPACK",)
    # explicit flags are obeyed without a self-test; --amx off always wins
    assert K.choose("on", "auto", offered, flags, crashed).amx
    assert K.choose("off", "auto", offered, flags, timed).bufts == ("CPU_REPACK",)
    assert K.choose("off", "off", offered, flags, timed).bufts == ()


def test_amx_needs_the_cpu_and_the_build():
    offered, flags = AVX2_ONLY
    with pytest.raises(InvalidArgument, match="build has no AMX"):
        K.choose("on", "auto", offered, flags, None)
    # a build with AMX kernels on an AVX-512 CPU without AMX: never used, even if a stale cache says faster
    stale = {"none": ok(100, 50), "CPU_REPACK": ok(150, 50), "AMX+CPU_REPACK": ok(900, 90)}
    c = K.choose("auto", "auto", ("AMX", "CPU_REPACK"), AVX512_NO_AMX[1], stale)
    assert not c.amx and c.bufts == ("CPU_REPACK",)
    with pytest.raises(InvalidArgument, match="CPU has no AMX"):
        K.choose("on", "auto", ("AMX", "CPU_REPACK"), AVX512_NO_AMX[1], None)
    with pytest.raises(InvalidArgument, match="offers no repacked"):
        K.choose("auto", "on", (), ARM_I8MM[1], None)


def test_noise_between_identical_kernels_is_no_reason():
    offered, flags = AVX2_ONLY  # Q4_1 on AVX2: repack takes no weights, so both runs are the same kernels
    res = {"none": {**ok(120, 60), "buffers": {"CPU_Mapped": 92.1}},
           "CPU_REPACK": {**ok(100, 50), "buffers": {"CPU_Mapped": 92.1}}}
    assert K.choose("auto", "auto", offered, flags, res).bufts == ("CPU_REPACK",)
    res["CPU_REPACK"]["buffers"] = {"CPU_Mapped": 40.0, "CPU_REPACK": 57.0}  # really repacked, and slower
    assert K.choose("auto", "auto", offered, flags, res).bufts == ()


def test_a_config_timed_faster_in_one_round_only_is_not_chosen():
    """On a busy machine a burst of load in one round once made the plain kernels look 3x faster than repacked
    ones (one run each, in order), and the probe stored that. Timed in turns, a win must hold in every round."""
    offered, flags = AVX2_ONLY

    def timed(pp, tg, repacked=True):
        return {**ok(max(pp), max(tg)), "pp_rounds": pp, "tg_rounds": tg,
                "buffers": {"CPU_REPACK": 57.0} if repacked else {"CPU_Mapped": 92.1}}

    res = {"none": timed([300, 90, 95], [60, 20, 21], False), "CPU_REPACK": timed([100, 130, 140], [20, 30, 30])}
    assert K.choose("auto", "auto", offered, flags, res).bufts == ("CPU_REPACK",)  # the default stays
    res["none"] = timed([300, 280, 290], [60, 58, 61], False)  # faster in every round: a real difference
    c = K.choose("auto", "auto", offered, flags, res)
    assert c.bufts == () and "measured fastest" in c.reason


def test_the_probe_times_the_configurations_that_passed_in_turns(smol_path):
    """A real measured self-test: the ones that pass get per-round pp/tg, the best round as their figure."""
    from ondevice.device.selftest import ROUNDS, selftest

    res = selftest(smol_path, [(False, False), (False, True)], measure=True, threads=1)
    for r in res.values():
        assert r["ok"] and len(r["pp_rounds"]) == len(r["tg_rounds"]) == ROUNDS
        assert r["pp_tps"] == max(r["pp_rounds"]) > 0 and r["tg_tps"] == max(r["tg_rounds"]) > 0


def test_a_timing_run_that_fails_leaves_them_untimed_and_says_why(monkeypatch):
    from ondevice.device import selftest

    for ran, why in ((("", None, ""), "timeout after 120 s, a busy machine?"), (("", -11, ""), "SIGSEGV")):
        monkeypatch.setattr(selftest, "_run_child", lambda job, ran=ran: ran)
        got = selftest._timings("m.gguf", [(False, False), (False, True)], 1)
        assert list(got.values()) == [{"timing_error": why}] * 2
    res = {"none": {**ok(), **got["none"]}, "CPU_REPACK": {**ok(), **got["CPU_REPACK"]}}
    assert K.choose("auto", "auto", *AVX2_ONLY, res).bufts == ("CPU_REPACK",)  # untimed: the default


def test_repack_off_where_its_self_test_failed():
    offered, flags = ARM_I8MM
    res = {"none": ok(), "CPU_REPACK": failed("wrong logits (cosine 0.412 with no extra kernels)")}
    c = K.choose("auto", "auto", offered, flags, res)
    assert c.bufts == () and "wrong logits" in c.reason
    assert K.choose("auto", "on", offered, flags, res).bufts == ("CPU_REPACK",)  # asked for: obeyed
    busy = {"none": ok(), "CPU_REPACK": {"ok": None, "error": "timeout after 120 s (a busy machine?)"}}
    c = K.choose("auto", "auto", offered, flags, busy)  # a timeout proves nothing: as if untested
    assert c.bufts == ("CPU_REPACK",) and "FAILED" not in c.reason


def test_configs_and_requested(monkeypatch):
    assert K.configs(*AMX_XEON) == [(False, False), (False, True), (True, False), (True, True)]
    assert K.configs(*AVX2_ONLY) == [(False, False), (False, True)]
    assert K.configs(("AMX", "CPU_REPACK"), AVX512_NO_AMX[1]) == [(False, False), (False, True)]
    monkeypatch.setenv("ONDEVICE_AMX", "0")
    monkeypatch.setenv("ONDEVICE_REPACK", "ON")
    assert K.requested() == ("off", "on")
    assert K.requested("auto", None) == ("auto", "on")  # a flag beats the env var
    monkeypatch.setenv("ONDEVICE_REPACK", "sometimes")
    with pytest.raises(InvalidArgument, match="ONDEVICE_REPACK 'sometimes'"):
        K.requested()


# ---- on this machine, with the real llama.cpp ----------------------------------------------------------

def test_first_load_self_tests_then_decodes_under_the_choice(smol_path, kcache, tmp_path):
    from pathlib import Path

    from ondevice.engine.base import EngineConfig
    from ondevice.engine.bufts import offered, wanted
    from ondevice.engine.llama import LlamaEngine
    from ondevice.quant.quantize import ftype_id, run_worker

    names = offered()
    if "CPU_REPACK" not in names:
        pytest.skip("this llama.cpp build has no CPU_REPACK")
    q4_0 = K.variants(families=("Q4_0",))["Q4_0"]  # repack interleaves Q4_0 on AVX2, AVX-512 and NEON
    eng = LlamaEngine(q4_0, EngineConfig(n_ctx=256, n_threads=2))  # auto, first load: the quick self-test runs
    entry = K.tested(K.types_of(q4_0))
    assert set(entry["results"]) == {K.label(wanted(names, *c)) for c in K.configs(names, []) if not c[0]}
    assert all(r["ok"] for r in entry["results"].values()), entry  # nothing here crashes or disagrees
    assert entry["results"]["CPU_REPACK"]["agreement"] > 0.99
    assert "AMX" not in eng.kernels.bufts and eng.kernels.reason == "auto, self-tested"
    assert eng.kernels_used == "CPU_REPACK" and eng.buffer_types["CPU_REPACK"] > 0  # really repacked
    # the self-test (a child process that loads the model twice) is kept out of the load time bench stores
    assert eng.kernel_test_time > 0.2 and eng.load_time > 0
    again = LlamaEngine(q4_0, EngineConfig(n_ctx=256, n_threads=2))
    assert again.kernel_test_time < 0.2  # cached: no self-test
    again.close()
    toks = eng.tokenize("The capital of France is")
    eng.prefill(toks)
    auto_row = eng.logits()
    out = []
    for _ in range(8):  # a real greedy decode under the chosen kernels
        out.append(int(eng.logits().argmax()))
        eng.decode(out[-1])
    assert eng.detokenize(out).strip()
    eng.close()
    # Judged against the exact Q4_0 weights (in F16), as close as the plain kernel: two correct kernels differ
    # (each quantizes the activations its own way; on a Zen 5 the two rows after "The capital of France is"
    # had a cosine of only 0.981, the plain one the farther from the exact weights' row)
    exact = tmp_path / "q4_0-weights-f16.gguf"
    run_worker(Path(q4_0), exact, ftype_id("F16"), [], True, 2, 600)
    prompts = ["The capital of France is", "Once upon a time, there was a", "def fibonacci(n):",
               "The quick brown fox"]

    def rows(path, **kw):
        e = LlamaEngine(path, EngineConfig(n_ctx=256, n_threads=2, **kw))
        used = e.kernels_used
        out = []
        for p in prompts:
            e.reset()
            e.prefill(e.tokenize(p))
            out.append(e.logits().copy())
        e.close()
        return used, out

    def closeness(a, b):
        return float(np.mean([x @ y / np.linalg.norm(x) / np.linalg.norm(y) for x, y in zip(a, b)]))

    (used, repacked), (plain_used, plain), (_, ref) = rows(q4_0), rows(q4_0, amx="off", repack="off"), rows(exact)
    assert used == "CPU_REPACK" and plain_used == "none"
    assert closeness(repacked, ref) > 0.97 and closeness(repacked, ref) >= closeness(plain, ref) - 0.005
    assert np.allclose(repacked[0], auto_row)  # the rows above came from the same kernels
    # Q4_1 on this CPU: a dry run shows repack would take none of its weights, so there is nothing to test
    smol = LlamaEngine(smol_path, EngineConfig(n_ctx=128, n_threads=2))
    q41 = K.tested(K.types_of(smol_path))
    if smol.kernels_used == "none":
        assert q41["results"] == {} and "no extra kernel" in smol.kernels.reason
    smol.close()



def test_a_file_whose_other_weight_types_were_never_tested_here_is_tested_before_it_runs(smol_path, kcache,
                                                                                           tmp_path):
    """The self-test's unit is every weight type a file holds. The shipped file (Q4_1 + Q8_0) proves nothing about
    a variant of it that is still mostly Q4_1 but has Q4_0 attention matrices, which repack does take: keyed by
    the main type (as before), that variant ran repacked kernels that no test here had run."""
    from pathlib import Path

    from ondevice.engine.base import EngineConfig
    from ondevice.engine.bufts import offered, wanted, would_use
    from ondevice.engine.llama import LlamaEngine
    from ondevice.quant.quantize import ftype_id, run_worker

    names = offered()
    if "CPU_REPACK" not in names:
        pytest.skip("this llama.cpp build has no CPU_REPACK")
    mixed = tmp_path / "q4_1-with-q4_0-attention.gguf"
    run_worker(Path(smol_path), mixed, ftype_id("Q4_1"), [("attn_(q|k|v)", "Q4_0")], True, 2, 600)
    shipped, variant = K.types_of(smol_path), K.types_of(mixed)
    assert shipped.startswith("Q4_1+") and variant.startswith("Q4_1+") and "Q4_0" in variant.split("+")
    assert variant != shipped  # the same main type, another unit
    assert "CPU_REPACK" in would_use(mixed, wanted(names, False, True))  # its Q4_0 rows go to the repacked kernels
    LlamaEngine(smol_path, EngineConfig(n_ctx=128, n_threads=2)).close()
    assert K.tested(shipped) is not None and K.tested(variant) is None
    eng = LlamaEngine(mixed, EngineConfig(n_ctx=128, n_threads=2))
    try:
        entry = K.tested(variant)
        assert entry is not None and entry["model"] == str(mixed) and eng.kernel_test_time > 0.2, entry
        assert entry["results"]["CPU_REPACK"]["ok"] and eng.kernels_used == "CPU_REPACK", entry
    finally:
        eng.close()
    data = json.loads(kcache.read_text())  # one machine/build entry; the two units side by side
    assert {shipped, variant} <= set(next(iter(data.values()))["types"])

# ---- the supervisor: no bare native crash --------------------------------------------------------------

def test_crash_message_names_the_cause_and_the_flag():
    amx = crash_message("run", signal.SIGSEGV, {"amx": True, "repack": True, "bufts": ["AMX", "CPU_REPACK"]})
    assert "AMX" in amx and "--amx off" in amx and "ONDEVICE_AMX=off" in amx and "\n" not in amx
    rep = crash_message("serve", signal.SIGABRT, {"amx": False, "repack": True, "bufts": ["CPU_REPACK"]})
    assert rep.startswith("ondevice serve: error: llama.cpp crashed (SIGABRT)") and "--repack off" in rep
    assert "out-of-memory" in crash_message("eval", signal.SIGKILL, {})
    # offered CPU_REPACK but the load log shows no weights went there: not blamed
    plain = crash_message("run", signal.SIGSEGV, {"repack": True, "bufts": ["CPU_REPACK"], "buffers": ["CPU_Mapped"]})
    assert "with no extra CPU kernels" in plain and "--repack" not in plain  # no advice that changes nothing
    assert "--repack" not in crash_message("quantize", signal.SIGSEGV, {})


def test_a_child_killed_by_a_signal_gives_one_clear_line(cli):
    res = cli("run", "--temp", "0", "-n", "4", "Hi", env={"ONDEVICE_TEST_CRASH": "SIGSEGV"})
    assert res.returncode == 128 + signal.SIGSEGV
    lines = res.stderr.strip().splitlines()
    assert lines == [lines[-1]] and lines[-1].startswith("ondevice run: error: llama.cpp crashed (SIGSEGV)")


def test_ctrl_c_before_the_verb_runs_exits_130_without_a_traceback(cli):
    res = cli("run", "--temp", "0", "-n", "4", "Hi", env={"ONDEVICE_TEST_CRASH": "SIGINT"})  # while it starts
    assert res.returncode == 130 and "Traceback" not in res.stderr, res.stderr


def test_ctrl_backslash_in_the_child_is_a_quit_not_a_crash(cli):
    """Ctrl-\\ at a terminal sends SIGQUIT to the whole group, so the child dies of it with no signal forwarded:
    that printed "llama.cpp crashed (SIGQUIT) ... a bug in native code". A quit is a stop: 131, no line."""
    res = cli("run", "--temp", "0", "-n", "4", "Hi", env={"ONDEVICE_TEST_CRASH": "SIGQUIT"})
    assert res.returncode == 128 + signal.SIGQUIT and "crashed" not in res.stderr and "Traceback" not in res.stderr, \
        res.stderr


def test_a_crash_after_load_names_the_kernels_in_use(cli):
    from ondevice.engine.bufts import offered

    if "CPU_REPACK" not in offered():
        pytest.skip("this llama.cpp build has no CPU_REPACK")
    q4_0 = K.variants(families=("Q4_0",))["Q4_0"]  # its weights really go to CPU_REPACK
    res = cli("run", "-m", str(q4_0), "--temp", "0", "-n", "4", "--repack", "on", "--amx", "off", "Hi",
              env={"ONDEVICE_TEST_CRASH": "SIGABRT:loaded"})
    assert res.returncode == 128 + signal.SIGABRT, res.stderr
    last = res.stderr.strip().splitlines()[-1]
    assert "crashed (SIGABRT)" in last and "--repack off" in last and "Traceback" not in res.stderr


def test_amx_forced_on_a_real_amx_cpu_never_ends_in_a_bare_signal(cli):
    """On a CPU and build with AMX (llama.cpp issue 20824 crashes some Xeons there): `--amx on` either works, or
    ends in the one clear line with 128 + the signal and the flag that avoids it; the default never crashes."""
    from ondevice.device import device_info
    from ondevice.engine.bufts import offered

    if "AMX" not in offered() or not set(K.AMX_FLAGS) <= set(device_info()["cpu_flags"]):
        pytest.skip("no AMX in this CPU or llama.cpp build")
    res = cli("run", "--temp", "0", "-n", "4", "--amx", "on", "Hi")
    if res.returncode != 0:  # refused by the AMX self-test first, or (a crash it missed) the supervisor's line
        lines = res.stderr.strip().splitlines()
        refused = res.returncode == 2 and lines[-1].startswith("ondevice run: error: --amx on (ONDEVICE_AMX")
        assert refused or res.returncode > 128 and lines[-1].startswith("ondevice run: error: llama.cpp crashed (SIG"), \
            res.stderr
        assert "AMX" in lines[-1] and "--amx" in lines[-1] and "off" in lines[-1] and "Traceback" not in res.stderr
        assert "did not finish" not in lines[-1]  # a 4-token test has 120 s: its child re-testing itself took them
    res = cli("run", "--temp", "0", "-n", "4", "Hi")  # auto: AMX only where its self-test passed here
    assert res.returncode == 0 and res.stdout.strip(), res.stderr


@pytest.mark.parametrize(("result", "said"), [({"ok": False, "error": "SIGSEGV"}, "failed their self-test"),
                                              ({"ok": None, "error": "timeout after 120 s"}, "did not finish")])
def test_amx_forced_on_in_the_library_is_refused_where_its_self_test_did_not_pass(kcache, result, said):
    """Outside the CLI's supervisor a crash in the AMX kernels kills the user's own process (a notebook kernel)
    with a bare SIGSEGV: amx='on' loads with AMX only where its self-test passed here (a child's test, cached)."""
    from ondevice.device import device_info
    from ondevice.engine.bufts import offered, wanted, would_use

    if "AMX" not in offered() or not set(K.AMX_FLAGS) <= set(device_info()["cpu_flags"]):
        pytest.skip("no AMX in this CPU or llama.cpp build")
    q8 = K.variants(families=("Q8_0",))["Q8_0"]
    if "AMX" not in would_use(q8, wanted(offered(), True, True)):
        pytest.skip("AMX takes no Q8_0 weights in this build")
    results = {"none": {"ok": True}, K.label(wanted(offered(), True, True)): result}
    K._store(K.types_of(q8), K._entry(q8, results), offered())
    code = f"import ondevice; ondevice.load({str(q8)!r}, amx='on').generate('Hi', max_tokens=4)"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False)
    assert res.returncode == 1 and "OndeviceError: --amx on" in res.stderr and said in res.stderr, res.stderr
    assert "--amx auto" in res.stderr


def test_a_new_amx_self_test_is_stamped_with_its_own_date_and_load(kcache):
    """amx='on' adds its AMX self-test to the cached entry of the file's weight types: the refusal and `ondevice
    device` showed the date and load of the earlier test (a dry run 20 minutes before, at another load), as if that
    was when the AMX test crashed."""
    from ondevice.device import device_info
    from ondevice.engine.bufts import offered, wanted, would_use

    if "AMX" not in offered() or not set(K.AMX_FLAGS) <= set(device_info()["cpu_flags"]):
        pytest.skip("no AMX in this CPU or llama.cpp build")
    q8 = K.variants(families=("Q8_0",))["Q8_0"]
    if "AMX" not in would_use(q8, wanted(offered(), True, True)):
        pytest.skip("AMX takes no Q8_0 weights in this build")
    old = {**K._entry(q8, {"none": {"ok": True}}, measured=False, note="no extra kernel takes weights of these types"),
           "tested_at": "2020-01-01T00:00:00+00:00", "load_avg_1m": 99.0}
    K._store(K.types_of(q8), old, offered())
    code = f"import ondevice; ondevice.load({str(q8)!r}, amx='on').close()"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, check=False)
    entry = K.tested(K.types_of(q8))
    assert K.label(wanted(offered(), True, True)) in entry["results"], entry  # the AMX test ran and was added
    assert entry["tested_at"] > "2026" and entry["load_avg_1m"] != 99.0 and "note" not in entry, entry
    assert "2020-01-01" not in res.stderr, res.stderr


def test_supervised_exit_codes_and_output_pass_through(cli):
    res = cli("run", "--temp", "0", "-n", "3", "--timings", "json", "Say hi")
    assert res.returncode == 0 and res.stdout.strip()
    assert json.loads(res.stderr.strip().splitlines()[-1])["generation_tokens"] == 3
    bad = cli("run", "--threads", "-2", "Hi")
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("ondevice run: error:")


@contextlib.contextmanager
def _supervised_server(tmp_path):
    """``ondevice serve`` listening: (the supervisor's Popen, base URL, the serving child, the stderr file)."""
    import psutil

    with serve_process(tmp_path, "-np", "1", "-c", "256") as (proc, url, log):
        children = psutil.Process(proc.pid).children()
        assert len(children) == 1  # the supervised child does the serving
        yield proc, url, children[0], log


def _stop(proc, log) -> tuple[int, str]:
    proc.send_signal(signal.SIGTERM)
    rc = proc.wait(timeout=60)
    return rc, log.read_text()


def test_sigterm_to_the_supervisor_stops_the_server_cleanly(tmp_path):
    with _supervised_server(tmp_path) as (proc, _, child, log):
        time.sleep(0.5)
        rc, rest = _stop(proc, log)
    assert rc in (0, 128 + signal.SIGTERM) and "crashed" not in rest
    assert not child.is_running()


def test_sigterm_to_the_serving_child_alone_also_exits_0(tmp_path):
    """``kill`` of the ``python -m ondevice.cli serve`` process (what ``ps`` shows serving): the same graceful stop
    as one sent to the supervisor, so the same 0 as llama-server (it was 143: systemd counts that a failure)."""
    with _supervised_server(tmp_path) as (proc, _, child, log):
        time.sleep(0.5)
        child.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=60)
        rest = log.read_text()
    assert rc == 0 and "crashed" not in rest and "Traceback" not in rest, (rc, rest[-2000:])
    assert not child.is_running()


def test_a_stopped_and_continued_supervisor_keeps_serving(tmp_path):
    """Ctrl-Z then fg (SIGSTOP/SIGCONT; a profiler attaching does the same) for longer than the supervisor's
    wait: CPython then hands back an unset siginfo, which must not be taken for a signal to forward."""
    with _supervised_server(tmp_path) as (proc, url, child, log):
        for _ in range(2):
            proc.send_signal(signal.SIGSTOP)
            time.sleep(1.6)  # past the supervisor's 1 s wait
            proc.send_signal(signal.SIGCONT)
            time.sleep(0.5)
        assert proc.poll() is None and child.is_running()
        assert httpx.get(url + "/models", timeout=30).status_code == 200
        rc, rest = _stop(proc, log)
    assert rc in (0, 128 + signal.SIGTERM) and "Traceback" not in rest, rest[-2000:]


def test_ctrl_c_at_the_terminal_stops_a_supervised_run_with_130(tmp_path):
    """A real terminal (pty): Ctrl-C reaches the child through the process group; exit 130, no traceback."""
    import pty
    import select

    env = dict(os.environ, ONDEVICE_HOME=str(tmp_path / "home"))
    pid, fd = pty.fork()
    if pid == 0:  # the child: session leader on the pty, as a shell would start `ondevice`
        # a shell at a terminal starts commands with Ctrl-C's default action, even where this test run itself
        # was started with SIGINT ignored (a background job of a non-interactive shell; exec keeps "ignored")
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.execve(sys.executable, [sys.executable, "-m", "ondevice.cli", "run", "--temp", "0", "--ignore-eos",
                                   "-n", "100000", "Count to a million."], env)
    out, sent, deadline = b"", False, time.monotonic() + 240
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.5)
        if ready:
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # the pty closed: everyone exited
                break
            if not chunk:
                break
            out += chunk
        if not sent and len(out) > 200:  # it is streaming tokens: press Ctrl-C
            os.write(fd, b"\x03")
            sent = True
    _, status = os.waitpid(pid, 0)
    os.close(fd)
    assert sent, out[-500:]
    assert os.waitstatus_to_exitcode(status) == 130, (out[:400], out[-400:])
    assert b"Traceback" not in out and b"crashed" not in out


def test_a_killed_supervisor_takes_its_child_down(tmp_path):
    """...and leaves no file behind: the state the child leaves for a crash message lives in memory."""
    import psutil

    (tmp_path / "tmp").mkdir()
    env = dict(os.environ, ONDEVICE_HOME=str(tmp_path / "home"), TMPDIR=str(tmp_path / "tmp"))
    proc = subprocess.Popen([sys.executable, "-m", "ondevice.cli", "chat"], stdin=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.monotonic() + 60
    while not psutil.Process(proc.pid).children() and time.monotonic() < deadline:
        time.sleep(0.1)
    child = psutil.Process(proc.pid).children()[0]
    proc.kill()  # SIGKILL: nothing to forward
    proc.wait()
    child.wait(timeout=60)  # PR_SET_PDEATHSIG gave it SIGTERM
    assert not child.is_running()
    assert list((tmp_path / "tmp").iterdir()) == []


def test_the_crash_state_is_written_only_into_the_file_the_supervisor_passed(tmp_path, monkeypatch):
    """A process that inherited ONDEVICE_CRASH_STATE but not its descriptor (a grandchild) may hold another
    file under that number: it must not write there."""
    from ondevice import supervise

    other = tmp_path / "users-file.txt"
    other.write_text("keep me\n")
    state = os.memfd_create("state")
    with open(other, "r+b") as f:
        monkeypatch.setenv(supervise.STATE_ENV, f"{f.fileno()}:{os.fstat(state).st_dev}:{os.fstat(state).st_ino}")
        supervise.note_loaded({"bufts": ["CPU_REPACK"]}, {"CPU_REPACK": 1.0})
    assert other.read_text() == "keep me\n"
    monkeypatch.setenv(supervise.STATE_ENV, supervise._state_id(state))
    supervise.note_loaded({"bufts": ["CPU_REPACK"]}, {"CPU_REPACK": 1.0})
    assert json.loads(os.pread(state, 4096, 0)) == {"bufts": ["CPU_REPACK"], "buffers": ["CPU_REPACK"]}
    os.close(state)


def test_the_kernels_cache_env_var_never_replaces_a_file_that_is_not_a_kernels_cache(tmp_path, monkeypatch):
    from ondevice.device import kernels
    from ondevice.errors import OndeviceError

    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n")
    monkeypatch.setenv("ONDEVICE_KERNELS_CACHE", str(notes))
    with pytest.raises(OndeviceError, match="not a kernels cache; it was left as it is"):
        kernels._store("Q4_1", {"results": {}}, ())
    assert notes.read_text() == "my notes\n"
    for not_a_file in (tmp_path, "/dev/null"):
        monkeypatch.setenv("ONDEVICE_KERNELS_CACHE", str(not_a_file))
        with pytest.raises(OndeviceError, match="is not a regular file"):
            kernels.cache_path()
    fresh = tmp_path / "kernels.json"  # a new file is made, and read back as ours
    monkeypatch.setenv("ONDEVICE_KERNELS_CACHE", str(fresh))
    kernels._store("Q4_1", {"results": {"x": 1}}, ("CPU",))
    assert kernels.cached()["types"]["Q4_1"]["results"] == {"x": 1}


def test_run_works_from_a_read_only_home(tmp_path, cli):
    """A home on a read-only disk (a locked-down device image): the kernels self-test's result cannot be kept,
    so it holds for this run only; nothing else needs writing to answer."""
    with tmpfs(tmp_path / "ro", "ro") as ro:
        res = cli("run", "--temp", "0", "-n", "4", "Hi", env={"ONDEVICE_HOME": str(ro / "home"),
                                                              "ONDEVICE_KERNELS_CACHE": ""})
        assert res.returncode == 0 and res.stdout.strip(), res.stderr


@pytest.mark.parametrize("verb", ["run", "chat", "eval", "bench", "serve"])
def test_llama_cpps_no_repack_is_repack_off(verb, monkeypatch):
    """llama-cli's and llama-server's `-nr/--no-repack`, which copied commands carry on the Xeons whose repack or
    AMX kernels crash llama.cpp's own tools, was 'unrecognized arguments; did you mean --repack?'."""
    from ondevice.cli import build_parser

    monkeypatch.delenv("ONDEVICE_REPACK", raising=False)
    from ondevice.serve.settings import settings_from_args

    def repack(*flags: str) -> str | None:
        args = build_parser(verb).parse_args([verb, *flags])
        return settings_from_args(args).repack if verb == "serve" else args.repack

    assert repack("--no-repack") == repack("-nr") == repack("--repack", "0") == "off"
    assert repack() in (None, "auto")  # unset: the self-tested default
