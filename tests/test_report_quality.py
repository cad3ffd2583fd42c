"""``ondevice report``'s quality views read from real records: the quality-vs-speed plot of a ``kld:`` eval shows
the KLD (not the model's own perplexity the record also carries), and the eval view's messages end their line."""

from __future__ import annotations

import pytest
from conftest import ondevice_home

from ondevice.report import build_html, quality_vs_speed
from ondevice.store import Store


@pytest.fixture(scope="module")
def kld_store(tmp_path_factory):
    """A Q4_0 variant of the default model, its KLD against the shipped file (a tiny real eval) and a tiny real
    bench of it, in a module-local store: (bench records, eval records)."""
    import ondevice
    from ondevice.quant import quantize

    home = tmp_path_factory.mktemp("report-kld")
    db = home / "r.sqlite"
    with ondevice_home(home):
        q4 = quantize(None, "Q4_0", allow_requantize=True, threads=1)
        ondevice.evaluate(str(q4.path), ref="smollm2-135m-instruct", ctx=64, chunks=1, threads=1, store=db)
        ondevice.bench([str(q4.path)], "tg4", threads=1, repetitions=1, roofline=False, store=db)
    with Store(db) as s:
        return s.records("bench"), s.records("eval")


def test_the_kld_plot_shows_the_kld_and_not_the_models_perplexity(kld_store):
    bench, evals = kld_store
    kld = next(e for e in evals if e["test"].startswith("kld:"))
    assert kld["ppl"] and kld["kld_mean"] is not None and kld["ppl"] != kld["kld_mean"]
    points = [p for p in quality_vs_speed([*bench, *({**e, "kind": "eval"} for e in evals)])
              if p["eval_test"] == kld["test"]]
    assert len(points) == 1
    p = points[0]
    assert (p["quality"], p["metric"], p["higher_is_better"]) == (kld["kld_mean"], "kld", False)
    assert p["lower_bound"] is False  # the exact KLD (the reference's full distribution)
    html = build_html(bench, evals)
    plot = html[html.index(f"Quality vs speed: {kld['test']}"):]
    plot = plot[:plot.index("</svg>")]
    assert "kld (lower is better)" in plot and "ppl (lower is better)" not in plot
    # a top-k KLD is a lower bound: its point says so
    topk = [{**kld, "kld_exact": False}]
    assert quality_vs_speed([*bench, *({**e, "kind": "eval"} for e in topk)])[0]["lower_bound"] is True
    assert "(KLD &gt;=)" in build_html(bench, topk) or "(KLD >=)" in build_html(bench, topk)


def test_report_eval_and_retention_with_nothing_stored_each_end_their_line(cli, tmp_path):
    (tmp_path / "home").mkdir()
    with Store(tmp_path / "home" / "empty.sqlite"):  # a store with no eval records
        pass
    r = cli("report", "--db", str(tmp_path / "home" / "empty.sqlite"), "--eval")
    assert r.returncode == 0, r.stderr
    # an empty store is a state: exit 0, the sentence on stderr (stdout: the records, none)
    assert (r.stdout, r.stderr) == ("", "ondevice report: no eval records stored yet; run `ondevice eval`\n")


def test_a_run_past_a_compute_roof_says_what_the_roof_is_and_not_to_reprobe():
    """Quantized prefill (int8 dot products: VNNI, AMX) beats the probe's float32 matmul peak: that is what the
    figure is, and --reprobe cannot change it; past a memory roof the bandwidth probe is what is off."""
    from types import SimpleNamespace

    from ondevice.bench.sweep import roofline_note

    probe = SimpleNamespace(measured_at="2026-12-06T10:00:00+00:00", load_avg_1m=0.5)
    said = roofline_note("pp32", 1, {"pct": 104.9, "bound": "compute", "peak_gflops": 151.3}, probe)
    assert said.startswith("pp32 at 1 thread ran at 105% of the roofline: its compute roof is the probe's float32 "
                           "matmul peak (151 GFLOP/s)")
    assert "int8 dot products" in said and "--reprobe" not in said
    said = roofline_note("tg8", 2, {"pct": 120.0, "bound": "memory", "peak_gflops": 151.3}, probe)
    assert said.startswith("tg8 at 2 threads ran at 120% of the roofline") and "--reprobe" in said
