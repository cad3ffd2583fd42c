"""``ondevice fit``: budget parsing, the planner against brute force on a measured table, an end-to-end fit
on the real engine (stored GGUF whose tensor types are the plan's), impossible budgets, ``--resume``."""

from __future__ import annotations

import itertools
import json

import pytest
from conftest import home_with_f16

from ondevice.errors import InvalidArgument
from ondevice.fit.budget import parse_budget
from ondevice.fit.plan import choose, impossible, pareto_front

# a tiny fit: two kinds, two types, short texts, one bench repetition of short tests, one thread
TINY = {"types": ("Q8_0", "Q4_0"), "groups": ("ffn_down", "ffn_gate_up"), "threads": 1, "calib_ctx": 64, "calib_chunks": 2,
            "eval_ctx": 64, "eval_chunks": 2, "validate": 2, "imatrix": "off", "transform": "off", "speed_tests": ("pp32", "tg8"), "repetitions": 1}


# --- budget parsing -------------------------------------------------------------------------------------

def test_the_shipped_file_is_named_when_it_beats_the_chosen_variant():
    """Against the reference made from it the shipped file has KLD 0: a chosen variant larger and no faster is no
    gain (an audit stored a 105 MB variant with KLD 0.18 beside the 98 MB file, in silence)."""
    from ondevice.fit.budget import say_if_shipped_is_better

    shipped = {"size": 98.4e6, "tg": 54.8, "pp": 300.0}
    said: list[str] = []
    # and then nothing is stored unless the variant is named (fit stored a dominated copy as "chosen")
    assert say_if_shipped_is_better(shipped, {"size": 105e6, "tg": 53.7, "kld": 0.18}, parse_budget("size<=110MB"),
                                    said.append) is True
    assert len(said) == 1 and "shipped file already meets the budget" in said[0] and "98.4 MB" in said[0]
    for chosen, budget in (({"size": 90e6, "tg": 53.0, "kld": 0.2}, "size<=110MB"),  # smaller: a gain
                           ({"size": 105e6, "tg": 60.0, "kld": 0.2}, "size<=110MB"),  # faster: a gain
                           ({"size": 95e6, "tg": 53.0, "kld": 0.2}, "size<=97MB")):  # the shipped one is too big
        said.clear()
        assert say_if_shipped_is_better(shipped, chosen, parse_budget(budget), said.append) is False
        assert said == [], (chosen, budget)
    # its tok/s benched with the candidates count, not the speed table's of another moment
    slower_now = {**shipped, "validation": {"tg": 40.0, "pp": 250.0}}
    assert say_if_shipped_is_better(slower_now, {"size": 105e6, "tg": 53.7, "kld": 0.18}, parse_budget("size<=110MB"),
                                    said.append) is False


def test_budget_parses_units_and_relative_speeds():
    b = parse_budget("size<=110MB, tg>=100,kld<=0.02")
    assert (b.size, b.tg, b.kld, b.pp) == (110_000_000, 100.0, 0.02, None)
    assert parse_budget("size<100MiB").size == 100 * 2**20
    assert parse_budget("size<=0.1GB").size == 100_000_000
    assert parse_budget("size<=512M").size == 512 << 20 and parse_budget("size<=1g").size == 1 << 30  # as mem=
    b = parse_budget("tg>=1.1x,pp>=2X")
    assert (b.tg_rel, b.pp_rel, b.tg) == (1.1, 2.0, None)
    r = b.resolved(shipped_tg=100.0, shipped_pp=50.0)
    assert r.tg == pytest.approx(110.0) and r.pp == pytest.approx(100.0)
    assert parse_budget("").size is None and parse_budget(None).kld is None


@pytest.mark.parametrize("text, words", [
    ("size>=110MB", "ceiling"), ("tg<=100", "floor"), ("speed>=3", "unknown"), ("size<=110 parsecs", "KEY<=VALUE"),
    ("size<=110XB", "not a size"), ("kld<=abc", "not a number"), ("kld<=-1", "positive"),
    ("tg>=1,,kld<=1", "empty item"), ("tg>=1,tg>=2", "twice"), ("size=110MB", "KEY<=VALUE"),
])
def test_budget_errors_are_one_line_and_name_the_problem(text, words):
    with pytest.raises(InvalidArgument) as e:
        parse_budget(text)
    assert words in str(e.value) and "\n" not in str(e.value)


# --- the real thing on the small model ------------------------------------------------------------------

@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """An isolated store holding the F16 reference (dequantized from the shipped file) for this module."""
    h = tmp_path_factory.mktemp("fit-home")
    with home_with_f16(h):
        yield h


@pytest.fixture(scope="module")
def fitted(home):
    import ondevice

    return ondevice.fit(None, "size<=140MB", name="smol-fit", **TINY)


def test_fit_stores_a_gguf_whose_tensor_types_are_the_plan(fitted, home):
    from ondevice.fit.groups import BASE
    from ondevice.models.catalog import read_provenance, resolve
    from ondevice.quant.quantize import weight_types
    from ondevice.store import Store

    ref = resolve("smol-fit")
    assert ref.path == fitted.path and ref.path.is_file()
    got = weight_types(ref.path)
    for g in fitted.table.layout.groups:
        for m in g.matrices:
            assert got[m.name] == fitted.chosen.plan[g.name]
    for m in fitted.table.layout.fixed:
        assert got[m.name] == BASE
    prov = read_provenance(ref.path)["provenance"]
    assert prov["made_by"] == "ondevice fit" and prov["plan"] == fitted.chosen.plan
    assert prov["measured"]["size"] == ref.path.stat().st_size <= 140_000_000
    assert prov["measured"]["tg"] > 0 and prov["measured"]["kld"] >= 0
    assert "dequantized from the shipped" in prov["reference_note"]
    with Store() as db:
        rec = [r for r in db.records("fit") if r["model"] == "smol-fit"]
    assert rec and rec[-1]["front"] and rec[-1]["plan"] == fitted.chosen.plan
    # every validated candidate was measured, and the chosen one is the least measured KLD meeting the budget
    ok = [c for c in fitted.candidates if c.measured["size"] <= 140_000_000]
    assert fitted.chosen.measured["kld"] == min(c.measured["kld"] for c in ok)
    # predicted tok/s are put at the base variant's speed benched with the candidates: one factor for all
    ratios = {round(c.predicted["tg"] / c.predicted["tg_table"], 9) for c in fitted.candidates}
    assert len(ratios) == 1 and ratios.pop() > 0
    assert list(fitted.phases)[:5] == ["reference", "device", "imatrix", "sensitivity", "plan"] and fitted.phases["validation"] > 0


def test_the_stored_front_is_the_front_the_fit_printed(fitted, home):
    """Validation re-predicts its picks at the speed of that moment, in place: the stored front (what `report
    --fit` draws) showed a validated plan at 32.5 tok/s where the fit had printed 42.5."""
    from ondevice.fit.plan import Candidate, front_table
    from ondevice.store import Store

    with Store() as db:
        rec = [r for r in db.records("fit") if r["model"] == "smol-fit"][-1]
    stored = front_table([Candidate(r["plan"], {k: v for k, v in r.items() if k != "plan"}) for r in rec["front"]])
    start = fitted.lines.index(stored[0])
    assert fitted.lines[start:start + len(stored)] == stored


def test_report_shows_the_fit(fitted, home, cli):
    r = cli("report", "--fit", env={"ONDEVICE_HOME": str(home)})
    assert r.returncode == 0, r.stderr
    assert "## smol-fit (fit of smollm2-135m-instruct" in r.stdout and "(chosen)" in r.stdout
    assert "predicted front" in r.stdout
    # the validated variants' measured peak RSS, as the fit printed it (it was stored and not shown)
    row = next(x for x in r.stdout.splitlines() if "(chosen)" in x)
    assert row.split(" | ")[2] == f"{fitted.chosen.measured['mem'] / 2**20:.0f}", row
    r = cli("report", "--fit", "-o", "json", env={"ONDEVICE_HOME": str(home)})  # it was refused
    assert r.returncode == 0, r.stderr
    rec = [x for x in json.loads(r.stdout) if x["model"] == "smol-fit"][-1]
    assert rec["plan"] == fitted.chosen.plan and rec["kind"] == "fit" and "avg_ts" not in rec  # no bench fields
    r = cli("report", "--fit", "-o", "csv", env={"ONDEVICE_HOME": str(home)})
    assert r.returncode == 2 and "-o csv does not apply" in r.stderr


def test_a_noisy_speed_is_marked_where_the_fit_and_report_show_it(fitted, home, cli):
    """A speed measured while the machine was busy (bench's noisy flag, stored in the provenance) is shown with
    bench's (!) mark in the fit's tables and chosen line and in `report --fit`, with a line saying what it
    means; it was stored and never shown."""
    from ondevice.fit.measure import NOISY_NOTE

    noisy = [c.measured.get("noisy") for c in fitted.candidates]
    rows = [line for line in fitted.lines if any(line.startswith(f"  {c.summary()} ") for c in fitted.candidates)]
    assert len(rows) >= len(fitted.candidates)
    for c in fitted.candidates:  # its validation row (the last row that starts with its plan)
        row = [line for line in rows if line.startswith(f"  {c.summary()} ")][-1]
        assert ("(!)" in row) == bool(c.measured.get("noisy")), row
    chosen = next(line for line in fitted.lines if line.startswith("chosen: "))
    assert ("(!)" in chosen.split("KLD")[0]) == bool(fitted.chosen.measured.get("noisy"))
    table = fitted.lines[fitted.lines.index(next(x for x in fitted.lines if x.startswith("device speed table"))):]
    any_noisy = any(noisy) or fitted.shipped.get("noisy") or any("(!)" in x for x in table[1:4])
    assert (NOISY_NOTE in fitted.lines) == bool(any_noisy)
    r = cli("report", "--fit", env={"ONDEVICE_HOME": str(home)})
    assert r.returncode == 0, r.stderr
    part = r.stdout.split("## smol-fit")[-1].split("predicted front")[0]
    assert ("(!)" in part) == bool(any(noisy) or fitted.shipped.get("noisy")), part
    assert ("noisy, do not trust" in r.stdout) == ("(!)" in part)


def test_planner_picks_the_least_loss_feasible_plan_by_brute_force(fitted):
    table = fitted.table
    names = list(table.options)
    every = [dict(zip(names, ts)) for ts in itertools.product(*[[o.type for o in table.options[g]] for g in names])]
    front = pareto_front(table)
    for text in ("size<=120MB", "size<=130MB", "kld<=1", "size<=135MB,tg>=1"):
        b = parse_budget(text)
        best = choose(front, b, 1)[0]
        feasible = [table.predict(p) for p in every if not b.violations(table.predict(p))]
        key = (lambda m: m["kld"]) if b.kld is None else (lambda m: m["size"])
        assert key(best.predicted) == pytest.approx(min(key(m) for m in feasible))
        assert not b.violations(best.predicted)


def test_impossible_budget_names_the_constraint_and_the_closest_variant(fitted, home, cli, tmp_path):
    front = pareto_front(fitted.table)
    msg = impossible(front, parse_budget("kld<=0.000000001"))
    assert "kld<=1e-09" in msg and "cannot be met" in msg and "closest variant" in msg
    with pytest.raises(InvalidArgument, match="tg>=1000000.0 .*cannot be met"):
        choose(front, parse_budget("tg>=1000000"), 1)
    r = cli("fit", "--budget", "size<=20MB", "--types", "Q8_0,Q4_0",
            env={"ONDEVICE_HOME": str(home)})
    assert r.returncode == 2, r.stderr
    line = r.stderr.strip()
    assert line.startswith("ondevice fit: error: budget 'size<=20MB': size<=20MB cannot be met") and "\n" not in line
    assert "add lower --types or quantize more --groups" in line  # the --groups left out stay at F16
    fresh = tmp_path / "fresh-home"  # no reference yet: the size is refused before one is made (270 MB, seconds)
    r = cli("fit", "--budget", "size<=20MB", "--no-store", env={"ONDEVICE_HOME": str(fresh)})
    assert r.returncode == 2 and "size<=20MB cannot be met" in r.stderr and "making the reference" not in r.stderr
    assert not list(fresh.rglob("*.gguf")), list(fresh.rglob("*"))


def test_bad_model_and_type_are_one_line_errors(home, cli):
    r = cli("fit", "no-such-model", "--budget", "size<=100MB", env={"ONDEVICE_HOME": str(home)})
    assert r.returncode == 2 and "no-such-model" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = cli("fit", "--types", "Q8_0,Q9_9", env={"ONDEVICE_HOME": str(home)})
    assert r.returncode == 2 and "Q9_9" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_resume_reuses_the_measurements(fitted, home):
    import ondevice

    again = ondevice.fit(None, "size<=140MB", name="smol-fit-2", resume=True, **{**TINY, "validate": 1})
    assert again.chosen.plan == fitted.candidates[0].plan  # the same best predicted plan
    # only the validated candidate's file is built again (to store it); every figure is reused
    assert again.built == 1
    assert again.reused >= fitted.built


def test_a_relative_speed_bound_is_met_against_the_shipped_file_benched_with_the_candidates(fitted, home,
                                                                                          monkeypatch):
    import ondevice
    from ondevice.models.catalog import resolve

    shipped = str(resolve("smollm2-135m-instruct").path.resolve())
    calls, real = [], ondevice.bench

    def spy(models, *a, **kw):  # the real bench, its calls recorded
        calls.append(([str(m) for m in models], kw.get("interleave")))
        return real(models, *a, **kw)

    monkeypatch.setattr(ondevice, "bench", spy)
    res = ondevice.fit(None, "tg>=0.5x", store=False, **{**TINY, "validate": 2, "repetitions": 2})
    # the validation's bench is the last interleaved one (each candidate's peak RSS is then measured alone)
    table, validation = calls[0], [c for c in calls if c[1]][-1]
    assert [files for files, inter in calls if not inter] == [[f] for f in validation[0][1:-1]]
    # the shipped file in the speed table's process and again in the validation's, with the candidates
    for files, interleave in (table, validation):
        assert shipped in files and len(files) >= 3 and interleave
    assert len(validation[0]) == 1 + len(res.candidates) + 1  # base, candidates, shipped
    assert resolve("smollm2-135m-instruct").path.is_file()  # measured where it is, never deleted
    v = res.shipped["validation"]
    assert res.budget.tg == pytest.approx(0.5 * v["tg"]) and res.budget.pp is None
    assert res.chosen.measured["tg"] >= res.budget.tg
    assert any(ln.startswith("budget tg>=0.5x: the shipped file benched with the candidates made tg")
               for ln in res.lines)


def test_a_speed_bound_missed_as_measured_validates_the_next_plans(fitted, home, monkeypatch):
    """The validated plan decodes slower than the table said (the host slowed it): the fit validates the next
    plans predicted to meet the bound at this moment's speed instead of giving up, and chooses one of those."""
    import ondevice

    real, slowed, built = ondevice.bench, [], set()

    def bench(models, *a, **kw):  # the real bench; the first validation's candidate decodes at 0.5 tok/s
        out = real(models, *a, **kw)
        built.update(str(m) for m in models if "candidate-" in str(m))
        if not slowed and any("candidate-" in str(m) for m in models):
            for i, r in enumerate(out):
                r = r.to_dict()
                if "candidate-" in r["model_path"] and r["test"].startswith("tg"):
                    slowed.append(r["model_path"])
                    out[i] = {**r, "tps_samples": [0.5] * len(r["tps_samples"]), "tps_mean": 0.5}
        return out

    monkeypatch.setattr(ondevice, "bench", bench)
    # resumed (the KLDs are the earlier fit's), at a prompt length of its own so that every speed is benched
    res = ondevice.fit(None, "tg>=1", store=False, resume=True, **{**TINY, "validate": 1, "speed_tests": ("pp16", "tg8")})
    assert slowed
    first, *more = res.candidates
    assert first.measured["tg"] == pytest.approx(0.5) and more  # missed, then the next plan(s) validated
    assert res.chosen in more and res.chosen.measured["tg"] >= 1 and res.chosen.plan != first.plan
    assert len(built) == len(res.candidates)  # each built to its own file
    assert not any("file" in c.measured for c in res.candidates)  # gone with the fit: not stored
    assert any(ln.startswith("no validated plan met the speed bound as measured") for ln in res.lines)


def test_imatrix_is_collected_from_the_eval_callback(home, tmp_path):
    import numpy as np

    from ondevice.eval.corpora import pydoc
    from ondevice.fit.imatrix import collect
    from ondevice.models.catalog import resolve

    text = tmp_path / "calib.txt"
    text.write_text(pydoc().text[:20000])
    out = tmp_path / "im.npz"
    n = collect(resolve("smollm2-135m-instruct-f16").path, text, out, n_ctx=32, n_chunks=2)
    with np.load(out) as z:
        assert n == len(z.files) == 30 * 7 + 1  # 7 matrices per layer, and the tied output (token_embd)
        v = z["blk.0.ffn_down.weight"]
        assert v.shape == (1536,) and np.all(v >= 0) and v.max() > 0
    from ondevice.quant import quantize

    ref = quantize("smollm2-135m-instruct-f16", "Q4_0", "smol-q4-im", imatrix=out)
    assert ref.provenance["provenance"]["imatrix"] == str(out)


def test_a_spliced_plan_holds_the_tensors_quantizing_it_writes(home, tmp_path):
    """Within ``Meter.splicing`` a plan is put together from one variant per type: the same tensor types and
    bytes as llama.cpp's quantizer writes for that plan, with one quantizer run per type, not per plan."""
    from gguf import GGUFReader

    from ondevice.fit.groups import layout
    from ondevice.fit.measure import Cache, Meter
    from ondevice.models.catalog import resolve

    ref = resolve("smollm2-135m-instruct-f16").path
    lay = layout(ref)
    meter = Meter(ref, lay, ref, 1, Cache(tmp_path / "speed.json", "s"), tmp_path, print)
    plan = {"ffn_down": "Q4_K", "attn_qk": "Q4_0", "token_embd": "Q4_0"}
    direct = meter.build(plan, tmp_path / "direct.gguf")
    assert (meter.built, meter.spliced) == (1, 0)
    opts = lay.options(("Q8_0", "Q4_0", "Q4_K"))
    types = {t for ts in opts.values() for t in ts}
    assert types == {"Q8_0", "Q4_0", "Q4_K", "Q5_0"}  # Q5_0: where rows refuse Q4_K, llama.cpp's fallback
    with meter.splicing(opts):
        spliced = meter.build(plan, tmp_path / "spliced.gguf")
        again = meter.build({"ffn_gate_up": "Q4_0"}, tmp_path / "again.gguf")
    assert (meter.built, meter.spliced) == (1 + len(types), 2)  # one per type, then no quantizer run
    a, b = GGUFReader(direct), GGUFReader(spliced)
    assert [(t.name, t.tensor_type) for t in a.tensors] == [(t.name, t.tensor_type) for t in b.tensors]
    assert all(x.data.tobytes() == y.data.tobytes() for x, y in zip(a.tensors, b.tensors))
    assert {f.name: f.contents() for f in a.fields.values() if not f.name.startswith("GGUF.")} == \
        {f.name: f.contents() for f in b.fields.values() if not f.name.startswith("GGUF.")}
    assert again.is_file() and meter.build({}, tmp_path / "base.gguf") and meter.spliced == 3  # still in use after
    with meter.splicing(lay.options(("Q8_0", "Q4_0")), imatrix=tmp_path / "none.npz"):
        pass  # nothing built within: the next plan of that imatrix would be quantized, not spliced from nothing
    assert len(meter.sources) == 1


# --- --profile and --quality ----------------------------------------------------------------------------

def test_the_memory_cap_bound_takes_the_runtimes_anonymous_memory_and_is_never_negative():
    """What the runtime needs besides the weights is its anonymous RSS at the peak; peak RSS less the model's
    mapped pages (taken at another moment, after the cap evicted some) swung from 81 to 153 MiB with the cap
    and printed "files up to -35.0 MB fit"."""
    from ondevice.fit.profile import fit_profile

    mib = 2 ** 20
    prof = fit_profile("threads=1,mem=250M")
    evicted = {"peak_rss": 230 * mib, "rss_model": 77 * mib, "rss_anon": 58 * mib, "limits": {"mem_mechanism": "x"}}
    fits, note = prof.fits(evicted, 50_000_000)
    assert fits == 250 * mib - 58 * mib and "less the 58 MiB the runtime used" in note
    older = {k: v for k, v in evicted.items() if k != "rss_anon"}  # a record from before rss_anon was kept
    assert prof.fits(older, 50_000_000)[0] == 250 * mib - (230 - 77) * mib
    with pytest.raises(InvalidArgument, match=r"less the 130 MiB .*: no model file fits beside it, and the "
                                              r"smallest variant is 77\.6 MB") as e:
        fit_profile("threads=1,mem=120M").fits({**evicted, "rss_anon": 130 * mib}, 77_600_000)
    assert "files up to" not in str(e.value)  # was "files up to -35.0 MB fit"

@pytest.fixture(scope="module")
def edge_fit(fitted, home):
    """The tiny fit again under the edge-1g profile with --quality ppl (its KLDs reused: only speeds differ)."""
    import ondevice

    tiny = {k: v for k, v in TINY.items() if k != "threads"}  # the profile's one thread is the default
    return ondevice.fit(None, "size<=140MB", name="smol-fit-edge", profile="edge-1g", quality="ppl", resume=True,
                        **{**tiny, "validate": 1})


def test_profile_runs_every_bench_under_it_and_is_recorded(edge_fit, fitted, home):
    import json

    from ondevice.fit.measure import fit_dir
    from ondevice.models.catalog import read_provenance

    speed = json.loads((fit_dir() / "speed.json").read_text())
    edge = [e for sec in speed.values() for e in sec.values() if (e.get("limits") or {}).get("profile")]
    host = [e for sec in speed.values() for e in sec.values() if not e.get("limits")]
    assert edge and host  # the tiny fit's host speeds are kept apart from the profile's (the cache key)
    # shipped, base, Q4_0 for the table; base and the candidate again to validate: all in the worker, capped
    assert len(edge) >= 5
    for e in edge:
        lim = e["limits"]
        assert (lim["profile"], lim["threads"], lim["mem_limit_bytes"]) == ("edge-1g", 1, 1 << 30)
    # the cap bounds the file: the cap less the runtime's own memory measured under it
    assert 0 < edge_fit.budget.fits < 1 << 30
    assert edge_fit.profile["name"] == "edge-1g" and fitted.profile is None
    assert any("profile edge-1g (threads 1, memory 1024 MiB)" in ln for ln in edge_fit.lines)
    assert "under profile edge-1g" in next(line for line in edge_fit.lines if line.startswith("chosen: "))
    prov = read_provenance(edge_fit.path)["provenance"]
    assert prov["profile"]["name"] == "edge-1g" and prov["threads"] == 1


def test_quality_ppl_reports_held_out_perplexity(edge_fit):
    ref_ppl = edge_fit.quality["reference"]["ppl"]
    assert edge_fit.quality["kind"] == "ppl" and ref_ppl > 1
    for c in edge_fit.candidates:
        assert c.measured["ppl"] > 1 and c.measured["ppl"] != ref_ppl
    table = edge_fit.lines[edge_fit.lines.index(next(ln for ln in edge_fit.lines if "ppl held" in ln)):]
    assert table[2].lstrip().startswith("reference") and f"{ref_ppl:.3f}" in table[2]
    assert f"ppl {edge_fit.chosen.measured['ppl']:.3f} (reference {ref_ppl:.3f})" in next(
        line for line in edge_fit.lines if line.startswith("chosen: "))


def test_report_shows_the_profile_and_the_quality_column(edge_fit, home, cli):
    r = cli("report", "--fit", env={"ONDEVICE_HOME": str(home)})
    assert r.returncode == 0, r.stderr
    section = r.stdout[r.stdout.index("## smol-fit-edge"):]
    assert section.splitlines()[0].endswith("device profile edge-1g)") and "| ppl (held-out) |" in section
    ref = edge_fit.quality["reference"]["ppl"]
    assert f"| reference (F16) | - | - | - | - | 0.0000 | {ref:.3f} |" in section
    assert f"{edge_fit.chosen.measured['ppl']:.3f} |" in section


def test_quality_suite_scores_the_candidates_with_the_real_eval(fitted, home):
    import ondevice
    from ondevice.eval.api import evaluate
    from ondevice.models.catalog import read_provenance

    r = ondevice.fit(None, "size<=140MB,score>=0.01x", name="smol-fit-suite", quality="rewrite", quality_limit=2,
                     resume=True, **{**TINY, "validate": 1})
    ref_score = r.quality["reference"]["score"]
    assert r.quality["kind"] == "suite" and 0 <= ref_score <= 1 and r.budget.score == pytest.approx(0.01 * ref_score)
    m = r.chosen.measured
    assert 0 <= m["score"] <= 1 and m["score_items"] == 2
    # the stored file scores the same when evaluated directly (greedy, one thread): the eval's own figure
    (rec,) = [x for x in evaluate("smol-fit-suite", suite="rewrite", limit=2, threads=1, store=False)
              if x.test.startswith("suite:")]
    assert rec.score == pytest.approx(m["score"])
    prov = read_provenance(r.path)["provenance"]
    assert prov["measured"]["score"] == m["score"] and prov["quality"]["suite"] == "rewrite"
    assert prov["quality"]["reference"]["score"] == ref_score
    # a score no candidate reaches: which bound, and the closest variant (the scores are cached: no new eval)
    with pytest.raises(InvalidArgument, match=r"score>=1\.500 \(the best score is .*cannot be met"):
        ondevice.fit(None, "size<=140MB,score>=1.5", name="smol-fit-suite2", quality="rewrite", quality_limit=2,
                     resume=True, **{**TINY, "validate": 1})


@pytest.mark.parametrize("kw, words", [
    ({"profile": "phone-9g"}, "unknown device profile 'phone-9g'"),
    ({"quality": "nosuch"}, "no suite named 'nosuch'"),
    ({"budget": "size<=140MB,score>=0.5"}, "pass --quality SUITE"),
])
def test_bad_profile_and_quality_are_one_line_errors(home, kw, words):
    import ondevice

    with pytest.raises(InvalidArgument) as e:
        ondevice.fit(None, **{"budget": None, **kw})
    assert words in str(e.value) and "\n" not in str(e.value)


def test_a_profile_whose_memory_holds_no_variant_is_refused_before_measuring(home, cli):
    r = cli("fit", "--types", "Q8_0,Q4_0", "--profile", "threads=1,mem=64M", env={"ONDEVICE_HOME": str(home)})
    assert r.returncode == 2, r.stderr
    line = r.stderr.strip()
    assert "memory cap (64 MiB) holds no variant" in line and "\n" not in line


def test_a_profile_whose_memory_holds_the_file_but_not_the_runtime_is_refused_after_one_bench(home, cli):
    """The smallest file (77.6 MB) is under the cap, but the runtime's own memory is not: the smallest variant is
    benched first under the cap and the fit refuses then, not after benching every type (15 minutes here)."""
    r = cli("fit", "--types", "Q8_0,Q4_0", "--profile", "threads=1,mem=100M", "--repetitions", "1",
            env={"ONDEVICE_HOME": str(home)})
    assert r.returncode == 2, r.stderr
    err = r.stderr.strip().splitlines()[-1]
    # the bench of the smallest variant fits the cap and leaves no room (AMD Zen 5), or is killed by the cap
    # itself (an AMX Xeon, where CPU_REPACK's repacked copy of the weights costs memory too)
    assert ("less the" in err and "the runtime used besides the weights" in err and "smallest variant is" in err) or (
        "ran out of memory under the device profile 'threads=1,mem=100M': it does not fit that device" in err), err
    assert r.stdout.count("  measuring ") == 1 and "device speed table" not in r.stdout


@pytest.mark.parametrize("args, words", [
    (["--name", "a/b"], "--name 'a/b' is not allowed"),
    (["--tests", "pp0,tg8"], "test 'pp0' has no tokens to time"),
    (["-t", "-2"], "-t -2 must be >= 1 (0 or -1: "),  # named as typed; -1 is the default
    (["--calib-ctx", "0"], "--calib-ctx 0 must be >= 8"),
    (["--eval-chunks", "0"], "--eval-chunks 0 must be >= 1"),
])
def test_settings_that_would_fail_later_are_refused_before_measuring(home, cli, args, words):
    """Each of these used to start the fit and fail minutes later (or, for --name, after the whole fit)."""
    r = cli("fit", "--types", "Q8_0,Q4_0", *args, env={"ONDEVICE_HOME": str(home)})
    assert r.returncode == 2 and words in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "measuring" not in r.stdout


def test_ctrl_c_says_the_measurements_are_kept_for_resume(home):
    """Ctrl-C during a fit exited 130 in silence; --resume continues from the cached measurements."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from conftest import as_a_shell_starts_it

    env = {**os.environ, "ONDEVICE_HOME": str(home)}
    p = subprocess.Popen([sys.executable, "-m", "ondevice.cli", "fit", "--budget", "size<=110MB", "--types",
                          "Q8_0,Q4_0", "-t", "1", "--no-store"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                         text=True, env=env, preexec_fn=as_a_shell_starts_it)  # noqa: PLW1509
    time.sleep(8)  # into the measuring (the reference is in the store already)
    p.send_signal(signal.SIGINT)
    err = p.communicate(timeout=120)[1]
    assert p.returncode == 130 and "interrupted; the measurements so far are kept" in err and "--resume" in err, err
    assert "Traceback" not in err and "ondevice fit: interrupted (Ctrl-C)" not in err, err  # said once, not twice


def test_a_fit_stopped_by_sigterm_mid_build_leaves_no_half_written_file(tmp_path):
    """A `kill` (timeout, systemd, a CI cancel) ended the process without unwinding: the variant being built stayed
    as a v-*.tmp of up to the model's size in the fit's work folder, and no later fit removed it."""
    import os
    import signal
    import subprocess
    import sys
    import time

    env = dict(os.environ, ONDEVICE_HOME=str(tmp_path / "home"))
    proc = subprocess.Popen([sys.executable, "-m", "ondevice.cli", "fit", "--budget", "size<=110MB", "--types",
                             "Q8_0,Q4_0", "--no-store", "-t", "1", "--imatrix", "off"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    fit_dir = tmp_path / "home" / "data" / "fit"
    deadline = time.monotonic() + 240
    while not list(fit_dir.glob("work-*/*.tmp")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert list(fit_dir.glob("work-*/*.tmp")), "no build was seen in progress"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "ondevice fit: stopped by SIGTERM; the measurements so far are kept" in err, err
    assert not list(fit_dir.glob("**/*.tmp")), list(fit_dir.glob("**/*.tmp"))


def test_a_chunk_past_the_trained_context_is_refused_up_front_with_fits_own_flag(cli):
    """It was refused after the reference and the speed table, as eval's `--ctx/-c` of a work file
    (`v-cae662172fd4`), flags and a name fit does not have."""
    r = cli("fit", "--budget", "size<=100MB", "--calib-ctx", "100000")
    assert r.returncode == 2
    assert "--calib-ctx 100000 is above smollm2-135m-instruct's trained context (8192)" in r.stderr, r.stderr
    assert "making the reference" not in r.stdout + r.stderr


def test_a_variant_is_fitted_against_the_model_it_was_made_from(home):
    """Fitting a stored variant dequantized that lossy file into a new reference (another 270 MB file, and KLDs
    against the variant rather than the model); its provenance names the F16 it was made from."""
    from ondevice.fit.inputs import reference_for
    from ondevice.models.catalog import resolve, store_variants
    from ondevice.quant.api import quantize
    from ondevice.quant.quantize import default_name

    src = resolve(None)
    f16 = resolve(default_name(src.name, "F16"))  # the module's reference, made from the shipped file
    variant = quantize(f16, "Q8_0", "smol-made-from-f16")
    before = set(store_variants())
    ref, note, dequantized = reference_for(resolve(variant.name), None, print)
    assert ref.path == f16.path and not dequantized and "was made from" in note
    assert set(store_variants()) == before  # no new reference file
    assert reference_for(src, None, print)[2] is True  # the shipped file: its reference is itself dequantized


def test_report_says_when_the_shipped_file_was_the_fits_answer(tmp_path, cli, monkeypatch):
    """A fit whose answer was the shipped file stored nothing, not even its record: `report --fit` then said
    "no fit records stored yet". The record is logged (no variant is), and the report says the shipped won."""
    from ondevice.fit.plan import Candidate
    from ondevice.fit.register import log_fit
    from ondevice.models import resolve

    monkeypatch.setenv("ONDEVICE_HOME", str(tmp_path))  # the store log_fit writes
    src = resolve("smollm2-135m-instruct")
    chosen = Candidate({"ffn": "Q4_0"}, {"size": 105e6, "tg": 50.0},
                       {"size": 105e6, "tg": 50.0, "pp": 300.0, "kld": 0.01, "mem": 223 << 20})
    log_fit(src.name, "a" * 64, chosen, src, parse_budget("size<=106MB"), [chosen], [],
            {"size": 98e6, "tg": 50.5, "pp": 290.0}, 2, {}, shipped_chosen=True)
    r = cli("report", "--fit", env={"ONDEVICE_HOME": str(tmp_path)})
    assert r.returncode == 0 and "chosen: the shipped smollm2-135m-instruct (no variant was better" in r.stdout
    assert "| shipped smollm2-135m-instruct (chosen; tok/s: speed table, earlier) |" in r.stdout
    assert "| fitted: ffn=Q4_0 | 105.0 | 223 |" in r.stdout
