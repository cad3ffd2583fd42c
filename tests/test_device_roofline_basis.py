"""What a % of roofline is measured against: the probe's compute roof is an fp32 sgemm, and quantized weights
run int8 dot products with a higher roof, so a compute-bound % for them is labelled a share of the fp32 roof
(record, table, HTML). The probe itself is not to be trusted under load: its own load is measured and
recorded, a loaded probe never replaces a quiet cached one, and a loaded cached one is measured again."""

from __future__ import annotations

import dataclasses
import importlib
from types import SimpleNamespace

import pytest

from ondevice.bench.meta import host_meta, model_meta, roofline_for
from ondevice.bench.record import BenchRecord
from ondevice.device import Probe
from ondevice.device.roofline import weight_kernels
from ondevice.report.formats import ROOF_NOTE, fp32_compute, to_md

probe_mod = importlib.import_module("ondevice.device.probe")  # the module (the package exports the function)


def roofs(peak: float, load: float | None = None) -> Probe:
    return Probe(threads=1, bandwidth_gbs=10.0, peak_gflops=peak, measured_at="2026-12-06T10:00:00+00:00",
                 bandwidth_method="sum", compute_method="numpy float32 matmul", machine_key="k", load_avg_1m=0.1,
                 load=load)


def test_weight_kernels_go_by_the_matmul_weights():
    q = [("token_embd.weight", "Q8_0", 1000, 1), ("blk.0.attn_q.weight", "Q4_0", 100, 1),
         ("blk.0.attn_norm.weight", "F32", 10, 1)]
    assert weight_kernels(q) == "int8"  # norms and the embedding lookup are no matmuls
    assert weight_kernels([("blk.0.attn_q.weight", "F16", 100, 1), ("blk.0.ffn_up.weight", "Q8_0", 50, 1)]) == "float"


def test_a_compute_bound_quantized_prefill_is_a_share_of_the_fp32_roof(smol_path):
    meta = model_meta(str(smol_path))  # the shipped file is quantized
    got = roofline_for(meta, [("prefill", 64, 0)], 0.5, 512, "f16", "f16", roofs(0.5, load=0.7))
    assert got["bound"] == "compute" and got["compute_roof"] == "fp32" and got["weight_kernels"] == "int8"
    assert got["pct_basis"].startswith("fp32 roof")
    assert got["probe"]["load"] == 0.7 and got["probe"]["load_avg_1m"] == 0.1  # the probe's load is recorded
    f16 = dataclasses.replace(meta, info=dataclasses.replace(
        meta.info, tensors=tuple(t._replace(type_name="F16") for t in meta.info.tensors)))
    got = roofline_for(f16, [("prefill", 64, 0)], 0.5, 512, "f16", "f16", roofs(0.5))
    assert got["weight_kernels"] == "float" and got["pct_basis"] == "roofline"
    memory = roofline_for(meta, [("decode", 8, 0)], 0.5, 512, "f16", "f16", roofs(1e6))
    assert memory["bound"] == "memory" and memory["pct_basis"] == "roofline"


def test_the_table_labels_a_share_of_the_fp32_roof_and_says_what_it_is():
    base = {"model": "m", "test": "pp64", "workload": "pp", "threads": 1, "tps_mean": 100.0, "tps_std": 1.0}
    int8 = BenchRecord.from_dict({**base, "roofline_pct": 112.8, "roofline_bound": "compute",
                                  "roofline": {"pct_basis": "fp32 roof: quantized weights ..."}})
    f16 = BenchRecord.from_dict({**base, "roofline_pct": 80.0, "roofline_bound": "compute",
                                 "roofline": {"pct_basis": "roofline"}})
    old = BenchRecord.from_dict({**base, "roofline_pct": 92.6, "roofline_bound": "compute", "roofline": {}})
    mem = BenchRecord.from_dict({**base, "roofline_pct": 60.0, "roofline_bound": "memory",
                                 "roofline": {"pct_basis": "roofline"}})
    assert [fp32_compute(r) for r in (int8, f16, old, mem)] == [True, False, True, False]
    text = to_md([int8, f16, mem])
    assert "112.8 (fp32 compute)" in text and "80.0 (compute)" in text and "60.0 (memory)" in text
    assert ROOF_NOTE in text
    assert ROOF_NOTE not in to_md([f16, mem])


def test_host_meta_tells_a_container_run_from_a_host_run():
    info = {"cpu_model": "X", "usable_cpus": 1, "cpu_quota": 1.0, "memory_limit_bytes": 1 << 30,
            "memory_limit_file": "memory.max", "load_avg": [0.1, 0.2, 0.3], "hypervisor": True, "boost": "off"}
    meta = host_meta(info)
    assert (meta["usable_cpus"], meta["cpu_quota"], meta["memory_limit_bytes"]) == (1, 1.0, 1 << 30)
    assert meta["load_avg_before"] == [0.1, 0.2, 0.3] and meta["hypervisor"] is True and meta["boost"] == "off"


# ---------------------------------------------------------------- the probe under load
def _fake_measure(monkeypatch, loads: list[float | None]) -> list[int]:
    runs: list[int] = []

    def measure(threads, timeout=0):
        runs.append(threads)
        return {"bandwidth_gbs": 10.0 * len(runs), "peak_gflops": 50.0, "bandwidth_method": "sum",
                "compute_method": "matmul", "load": loads[len(runs) - 1]}

    monkeypatch.setattr(probe_mod, "_measure", measure)
    monkeypatch.setattr("os.getloadavg", lambda: (0.0, 0.0, 0.0))
    return runs


def test_a_loaded_probe_never_replaces_a_quiet_cached_one(tmp_path, monkeypatch):
    monkeypatch.setenv("ONDEVICE_HOME", str(tmp_path))
    runs = _fake_measure(monkeypatch, [0.05, 1.2])
    quiet = probe_mod.probe(1, refresh=True)
    assert quiet.load == 0.05 and not quiet.loaded
    busy = probe_mod.probe(1, refresh=True)  # --reprobe while other work keeps 1.2 cores busy
    assert busy.loaded and busy.bandwidth_gbs == 20.0  # this run uses what it measured ...
    again = probe_mod.probe(1)
    assert again.cached and again.bandwidth_gbs == 10.0 and again.load == 0.05  # ... the cache keeps the quiet one
    assert len(runs) == 2


def test_a_loaded_cached_probe_is_measured_again_once_the_machine_is_quiet(tmp_path, monkeypatch):
    monkeypatch.setenv("ONDEVICE_HOME", str(tmp_path))
    noise = importlib.import_module("ondevice.bench.noise")
    runs = _fake_measure(monkeypatch, [1.5, 0.0])
    assert probe_mod.probe(1).loaded  # nothing cached yet: stored, marked by its load
    monkeypatch.setattr(noise, "machine_load", lambda window_s=1.0: 1.4)  # still busy: reuse it
    assert probe_mod.probe(1).cached and len(runs) == 1
    monkeypatch.setattr(noise, "machine_load", lambda window_s=1.0: 0.1)  # quiet now: measure again
    p = probe_mod.probe(1)
    assert not p.cached and p.load == 0.0 and len(runs) == 2
    assert probe_mod.probe(1).cached


def test_the_probe_waits_for_a_quiet_machine_when_asked(tmp_path, monkeypatch):
    monkeypatch.setenv("ONDEVICE_HOME", str(tmp_path))
    noise = importlib.import_module("ondevice.bench.noise")
    order: list[str] = []
    monkeypatch.setattr(noise, "wait_idle", lambda max_wait_s, **kw: order.append(f"wait {max_wait_s}"))
    runs = _fake_measure(monkeypatch, [0.0, 0.0])
    probe_mod.probe(1, refresh=True, wait_idle_s=7)
    probe_mod.probe(1, refresh=True)  # not asked: no wait
    assert order == ["wait 7"] and len(runs) == 2


def test_the_probe_measures_its_own_load():
    out = probe_mod._measure(1, timeout=6.0)
    assert out["load"] is None or out["load"] >= 0


def test_default_probe_threads_follow_the_usable_cpus(tmp_path, monkeypatch):
    monkeypatch.setenv("ONDEVICE_HOME", str(tmp_path))
    runs = _fake_measure(monkeypatch, [0.0])
    from ondevice.device.cgroup import usable_cpus

    assert probe_mod.probe().threads == usable_cpus() and runs == [usable_cpus()]


@pytest.mark.parametrize("load", [None, 0.1, 2.0])
def test_the_compute_note_names_a_loaded_probe(load):
    from ondevice.bench.sweep import roofline_note

    said = roofline_note("pp32", 1, {"pct": 130.0, "bound": "compute", "peak_gflops": 90.0},
                         SimpleNamespace(measured_at="t", load_avg_1m=0.5, load=load))
    assert "int8 dot products" in said and ("2.00 cores busy" in said) == (load == 2.0)
