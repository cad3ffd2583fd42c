"""The kernels self-test's cache and what it tells the user (issue #9's audit): a malformed cache, a self-test child
killed from outside, an inconclusive test tried again, no core dumps, `ondevice device` saying what a load does,
an unusable cache said once, the self-test pause said."""

from __future__ import annotations

import argparse
import json
import resource
import signal
import threading
import time
import warnings
from datetime import UTC, datetime, timedelta

import pytest

from ondevice.device import kernels as K
from ondevice.device import kernels_cache as KC
from ondevice.device import selftest as ST
from ondevice.errors import OndeviceError

AMX_XEON = (("AMX", "CPU_REPACK"), ["avx2", "avx512f", "amx_tile", "amx_int8", "amx_bf16"])
AVX2_ONLY = (("CPU_REPACK",), ["avx", "avx2", "fma"])
TYPES = "Q4_0+Q8_0+F32"
_orig_selftest = ST.selftest  # the real one (the fixture below fakes it)


def ok():
    return {"ok": True, "error": None}


@pytest.fixture()
def machine(monkeypatch):
    """A faked CPU and build (AVX2 + CPU_REPACK unless set), extra kernels that take every weight, and a faked
    self-test: ``machine.results`` (label -> result) answers, ``machine.calls`` lists the configurations run."""
    from ondevice.device import info
    from ondevice.engine import bufts

    class M:
        names, flags = AVX2_ONLY
        results: dict = {}
        calls: list = []

        def set(self, names, flags):
            self.names, self.flags = names, flags

    m = M()
    m.results, m.calls = {}, []

    def fake_selftest(path, configs, measure=False, threads=None):
        m.calls.append(list(configs))
        labels = [K.label(bufts.wanted(m.names, *c)) for c in configs]
        return {k: dict(m.results.get(k, ok())) for k in labels}

    monkeypatch.setattr(bufts, "offered", lambda: m.names)
    monkeypatch.setattr(info, "cpu_flags", lambda: m.flags)
    monkeypatch.setattr(bufts, "would_use", lambda path, b: {n: 1.0 for n in b})
    monkeypatch.setattr(K, "selftest", fake_selftest)
    monkeypatch.setattr(ST, "selftest", fake_selftest)
    return m


def _write(path, types_value):
    path.write_text(json.dumps({KC._key(): {"offered": ["CPU_REPACK"], "types": types_value}}))


@pytest.mark.parametrize("types_value", [
    [],  # "types" a list
    {TYPES: {"tested_at": "2026-01-01T00:00:00+00:00"}},  # no results
    {TYPES: {"tested_at": "x", "results": {"CPU_REPACK": "ok", "none": "ok"}}},  # a result that is a string
    {TYPES: {"tested_at": "x", "results": ["none"]}},
    {TYPES: {"tested_at": "x", "results": {"none": {"ok": "yes"}}}},
    {TYPES: "tested"},
], ids=["types-list", "no-results", "result-str", "results-list", "ok-str", "entry-str"])
def test_a_malformed_cache_entry_is_untested_then_rewritten_never_a_traceback(kcache, machine, types_value):
    _write(kcache, types_value)
    assert K.tested(TYPES) is None
    summary = K.kernels_summary()  # `ondevice device`
    assert all(e["choice"] in ("untested", "CPU_REPACK") for e in summary["types"].values())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", KC.KernelsNotice)
        c = K.resolve("auto", "auto", "m.gguf", types=TYPES)
    assert machine.calls and c.bufts == ("CPU_REPACK",)  # tested again
    assert K.tested(TYPES)["results"] == {"none": ok(), "CPU_REPACK": ok()}  # and rewritten
    assert KC.valid(K.tested(TYPES))


@pytest.mark.parametrize(("sig", "broke"), [(signal.SIGKILL, False), (signal.SIGTERM, False), (signal.SIGINT, False),
                                            (signal.SIGHUP, False), (signal.SIGSEGV, True), (signal.SIGBUS, True),
                                            (signal.SIGILL, True), (signal.SIGFPE, True), (signal.SIGABRT, True),
                                            (signal.SIGTRAP, True)])
def test_only_a_signal_that_means_the_kernel_broke_is_a_failure(monkeypatch, machine, sig, broke):
    """The OOM killer's SIGKILL, a user's SIGTERM or SIGINT say nothing about the kernels: inconclusive (tested again
    later), not a failure that loses CPU_REPACK for good."""
    ran = []

    def child(job):
        ran.append(list(job["configs"]))
        return "", -sig, ""  # died during the first configuration

    monkeypatch.setattr(ST, "_run_child", child)
    res = _orig_selftest("m.gguf", [(False, False), (False, True)])
    if broke:
        assert res["none"] == {"ok": False, "error": signal.Signals(sig).name}
        assert len(ran) == 2  # a new child took the rest
    else:
        assert res["none"]["ok"] is None and res["CPU_REPACK"]["ok"] is None, res
        assert signal.Signals(sig).name in res["none"]["error"] and "outside" in res["none"]["error"]




def test_ctrl_c_during_the_self_test_kills_the_child_stops_the_command_and_records_nothing(kcache, monkeypatch):
    """Ctrl-C (the CLI's SIGTERM too) during a first load's self-test is the user stopping the command: it
    propagates (exit 130 in the CLI), the child is killed, nothing is cached (the next load tests again)."""
    from ondevice.device import info
    from ondevice.engine import bufts

    monkeypatch.setattr(bufts, "offered", lambda: AVX2_ONLY[0])
    monkeypatch.setattr(info, "cpu_flags", lambda: AVX2_ONLY[1])
    monkeypatch.setattr(bufts, "would_use", lambda path, b: {n: 1.0 for n in b})
    monkeypatch.setattr(K, "selftest", _orig_selftest)
    killed = []

    class Proc:
        def __init__(self, *a, **kw):
            self.returncode = None

        def communicate(self, timeout=None):
            raise KeyboardInterrupt

        def kill(self):
            killed.append(True)

        def wait(self, timeout=None):
            return -9

    monkeypatch.setattr(ST.subprocess, "Popen", Proc)
    with warnings.catch_warnings(), pytest.raises(KeyboardInterrupt):
        warnings.simplefilter("ignore", KC.KernelsNotice)
        K.resolve("auto", "auto", "m.gguf", types=TYPES)
    assert killed and not kcache.exists()


def _store_old(types, results, minutes_ago, **extra):
    e = K._entry("m.gguf", results, measured=False, **extra)
    e["tested_at"] = (datetime.now(UTC) - timedelta(minutes=minutes_ago)).isoformat(timespec="seconds")
    K._store(types, e, AVX2_ONLY[0])


def _as_cli(monkeypatch, verb="run"):
    """What the CLI's verbs install (ondevice.cli._warnings_as_lines): notes then go to stderr (undone after)."""
    import logging

    from ondevice.cli import _warnings_as_lines

    log = logging.getLogger("ondevice.kernels")
    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)
    for name, value in (("handlers", []), ("level", log.level), ("propagate", log.propagate)):
        monkeypatch.setattr(log, name, value)
    _warnings_as_lines(verb)


def test_an_inconclusive_test_is_tried_again_on_a_later_load_a_bounded_number_of_times(kcache, machine, monkeypatch,
                                                                                         capsys):
    busy = {"ok": None, "error": "timeout after 120 s, a busy machine?"}
    _as_cli(monkeypatch)
    _store_old(TYPES, {"none": ok(), "CPU_REPACK": busy}, minutes_ago=1)
    K.resolve("auto", "auto", "m.gguf", types=TYPES)
    assert not machine.calls and not capsys.readouterr().err  # a minute ago: not yet
    _store_old(TYPES, {"none": ok(), "CPU_REPACK": busy}, minutes_ago=KC.RETRY_AFTER_S / 60 + 1)
    machine.results = {"CPU_REPACK": busy}  # still busy
    K.resolve("auto", "auto", "m.gguf", types=TYPES)
    err = capsys.readouterr().err
    assert len(machine.calls) == 1 and "inconclusive" in err and "try 2 of 3" in err, err
    e = KC.stored(TYPES)
    assert e["tries"] == 2 and e["results"]["CPU_REPACK"]["ok"] is None
    for tries, runs in ((2, 2), (3, 2)):  # the third try runs; after it, no more (until --probe)
        _store_old(TYPES, e["results"], minutes_ago=60, tries=tries)
        K.resolve("auto", "auto", "m.gguf", types=TYPES)
        assert len(machine.calls) == runs
    _store_old(TYPES, e["results"], minutes_ago=60, tries=2)
    machine.results = {}  # the machine is quiet now: it passes
    K.resolve("auto", "auto", "m.gguf", types=TYPES)
    assert K.tested(TYPES)["results"]["CPU_REPACK"]["ok"] is True


def test_the_self_test_child_leaves_no_core_dump(smol_path, monkeypatch):
    """Its crashes are expected (AMX's SIGSEGV left a 272 MB `core` in the user's folder): RLIMIT_CORE 0 in it."""
    import psutil

    soft, hard = resource.getrlimit(resource.RLIMIT_CORE)
    if hard == 0:
        pytest.skip("core dumps are off for this test run")
    seen: list = []

    def watch():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not done.is_set():
            for c in psutil.Process().children():
                try:
                    if "ondevice.device.selftest" in " ".join(c.cmdline()):
                        seen.append(c.rlimit(psutil.RLIMIT_CORE)[0])
                except psutil.Error:
                    pass
            time.sleep(0.005)

    done = threading.Event()
    resource.setrlimit(resource.RLIMIT_CORE, (hard, hard))  # `ulimit -c unlimited`: the child inherits it
    try:
        t = threading.Thread(target=watch)
        t.start()
        _orig_selftest(smol_path, [(False, False)], threads=1)
        done.set()
        t.join()
    finally:
        resource.setrlimit(resource.RLIMIT_CORE, (soft, hard))
    assert seen and seen[-1] == 0, seen


def test_ondevice_device_shows_what_a_load_with_amx_on_does(kcache, machine, monkeypatch):
    """One rule for the load and the display: with AMX+CPU_REPACK failed but AMX alone passed, --amx on loads AMX
    (both say so); with both failed, both refuse; untested types are tested first, not "auto"."""
    machine.set(*AMX_XEON)
    monkeypatch.setenv("ONDEVICE_AMX", "on")
    d = K.kernels_summary()["default"]
    assert d["label"] == "AMX+CPU_REPACK" and "auto" not in d["reason"] and "refused if it fails" in d["reason"]
    crashed = {"ok": False, "error": "SIGSEGV"}
    _store_old(TYPES, {"none": ok(), "CPU_REPACK": ok(), "AMX": ok(), "AMX+CPU_REPACK": crashed}, minutes_ago=1)
    assert K.kernels_summary()["types"][TYPES]["choice"] == "AMX"
    assert K.resolve("on", "auto", "m.gguf", types=TYPES).bufts == ("AMX",) and not machine.calls
    _store_old(TYPES, {"none": ok(), "CPU_REPACK": ok(), "AMX": crashed, "AMX+CPU_REPACK": crashed}, minutes_ago=1)
    shown = K.kernels_summary()["types"][TYPES]
    assert shown["choice"] == "refused" and "failed" in shown["reason"]
    with pytest.raises(OndeviceError, match="failed their self-test"):
        K.resolve("on", "auto", "m.gguf", types=TYPES)
    monkeypatch.setenv("ONDEVICE_AMX", "auto")
    assert K.kernels_summary()["types"][TYPES]["choice"] == "CPU_REPACK"


def test_a_kernels_cache_that_cannot_be_kept_is_said_once(tmp_path, monkeypatch, machine):
    monkeypatch.delenv("ONDEVICE_KERNELS_CACHE", raising=False)
    monkeypatch.setenv("ONDEVICE_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(KC, "_warned", set())
    (tmp_path / "home" / "data" / "device" / "kernels.json").mkdir(parents=True)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        for _ in range(2):
            K.resolve("auto", "auto", "m.gguf", types=TYPES)
    said = [str(x.message) for x in w if "cannot be" in str(x.message)]
    assert len(said) == 1 and "kernels.json" in said[0] and "rm -r" in said[0], said
    assert len(machine.calls) == 2  # each load tested again: that is what it says


def test_a_load_that_self_tests_says_so_in_the_cli_only(kcache, machine, monkeypatch, capsys):
    """The first load's self-test pause (5-38 s on a busy machine) is said in one line on stderr in the CLI; a
    library user's program gets no print."""
    import logging

    log = logging.getLogger("ondevice.kernels")  # as in a program that never ran a CLI verb in-process
    for name, value in (("handlers", []), ("level", logging.NOTSET), ("propagate", True)):
        monkeypatch.setattr(log, name, value)
    K.resolve("auto", "auto", "m.gguf", types=TYPES)
    assert machine.calls and capsys.readouterr().err == ""  # the library: nothing printed

    _as_cli(monkeypatch)
    K.resolve("auto", "auto", "m.gguf", types="Q4_K+F32")
    K.resolve("auto", "auto", "m.gguf", types="Q4_K+F32")  # cached: nothing to say
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("ondevice run: note: first load of weight types Q4_K+F32"), err
    assert "self-testing" in err[0] and "120 s" in err[0]


def test_two_loads_of_new_weight_types_at_once_self_test_them_once(cli, kcache):
    """A fit's two parallel workers each self-tested the same new set of weight types, and its note came twice: the
    second load now waits for the first one's test and reads its result."""
    from concurrent.futures import ThreadPoolExecutor

    from ondevice.engine.bufts import offered

    if "CPU_REPACK" not in offered():
        pytest.skip("this llama.cpp build has no CPU_REPACK")
    q4_0 = K.variants(families=("Q4_0",))["Q4_0"]  # repack takes its weights: the first load self-tests
    args = ("run", "-m", str(q4_0), "-n", "2", "--temp", "0", "Hi")
    with ThreadPoolExecutor(2) as pool:
        runs = list(pool.map(lambda _: cli(*args, env={"ONDEVICE_KERNELS_CACHE": str(kcache)}), range(2)))
    assert [r.returncode for r in runs] == [0, 0], [r.stderr for r in runs]
    notes = [r for r in runs if "note: first load of weight types" in r.stderr]
    assert len(notes) == 1, [r.stderr for r in runs]


def test_the_cli_says_when_a_load_self_tests(cli, kcache):
    from ondevice.engine.bufts import offered

    if "CPU_REPACK" not in offered():
        pytest.skip("this llama.cpp build has no CPU_REPACK")
    q4_0 = K.variants(families=("Q4_0",))["Q4_0"]  # repack takes its weights: the first load self-tests
    first = cli("run", "-m", str(q4_0), "-n", "2", "--temp", "0", "Hi", env={"ONDEVICE_KERNELS_CACHE": str(kcache)})
    again = cli("run", "-m", str(q4_0), "-n", "2", "--temp", "0", "Hi", env={"ONDEVICE_KERNELS_CACHE": str(kcache)})
    assert first.returncode == again.returncode == 0, first.stderr
    assert "ondevice run: note: first load of weight types" in first.stderr and "warning" not in first.stderr
    assert "note:" not in again.stderr, again.stderr


def test_the_probe_line_says_not_timed_when_every_timing_failed(kcache, machine, capsys):
    from ondevice.device import cli

    untimed = {**ok(), "timing_error": "timeout after 120 s, a busy machine?"}
    _store_old(TYPES, {"none": untimed, "CPU_REPACK": untimed}, minutes_ago=1)
    KC._store(TYPES, {**KC.stored(TYPES), "measured": True}, AVX2_ONLY[0])
    cli.run(argparse.Namespace(threads=None, model=None, probe=False, json=False))
    line = next(x for x in capsys.readouterr().out.splitlines() if TYPES in x)
    assert "pp/tg timed" not in line and "timing failed" in line, line
