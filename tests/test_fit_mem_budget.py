"""``ondevice fit --budget mem<=...``: a bound on the variant's peak RSS at the fit's bench shapes (not the file's
bytes): parsed like size, predicted for plans from the per-type variants' measured peak RSS, checked on the
validated candidates' measured one, and printed."""

from __future__ import annotations

import pytest
from conftest import home_with_f16

from ondevice.errors import InvalidArgument
from ondevice.fit.budget import parse_budget

# a short fit: the two ffn kinds, one type llama.cpp repacks on x86 (Q4_0: its repacked copy is anonymous
# memory beside its mapped pages) and one it does not (Q5_0), short texts and bench tests, one round
SHORT = {"types": ("Q8_0", "Q5_0", "Q4_0"), "groups": ("ffn_down", "ffn_gate_up"), "threads": 1, "calib_ctx": 64,
         "calib_chunks": 2, "eval_ctx": 64, "eval_chunks": 2, "validate": 2, "imatrix": "off", "transform": "off",
         "speed_tests": ("pp32", "tg8"), "repetitions": 1, "store": False}
MiB = 1 << 20


def test_mem_parses_like_size_and_ram_is_its_alias():
    assert parse_budget("mem<=300MB").mem == 300_000_000
    b = parse_budget("ram<=256MiB, kld<=0.05")
    assert (b.mem, b.size, b.kld) == (256 * MiB, None, 0.05)
    assert parse_budget("mem<0.5G").mem == 512 * MiB and parse_budget("size<=100MB").mem is None
    m = {"size": 100e6, "tg": 50.0, "pp": 100.0, "kld": 0.01}
    assert parse_budget("mem<=200MiB").violations({**m, "mem": 190 * MiB}) == []
    assert parse_budget("mem<=200MiB").violations({**m, "mem": 210 * MiB}) == [
        "mem 210.0MiB > 200.0MiB (peak RSS)"]
    assert parse_budget("mem<=200MiB").violations(m) == []  # no peak RSS (predicted without memory): unchecked


@pytest.mark.parametrize("text, words", [
    ("mem>=300MB", "mem can only be bounded as mem<=VALUE (a ceiling)"), ("ram>=1G", "mem can only be bounded"),
    ("mem<=lots", "--budget mem: 'lots' is not a size"), ("mem<=0MB", "positive"),
    ("mem<=1G,ram<=2G", "bounds mem twice"), ("memory<=1G", "use size (file bytes), mem (peak RSS)"),
])
def test_bad_mem_bounds_are_one_line_errors(text, words):
    with pytest.raises(InvalidArgument) as e:
        parse_budget(text)
    assert words in str(e.value) and "\n" not in str(e.value)


def test_fit_help_says_size_is_the_file_and_mem_the_peak_rss(cli):
    r = cli("fit", "--help")
    text = " ".join(r.stdout.split())
    assert r.returncode == 0 and "size<=110MB (the file's bytes)" in text and "mem<=300MB (alias ram: peak RSS" in text


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    h = tmp_path_factory.mktemp("fit-mem-home")
    with home_with_f16(h):
        yield h


@pytest.fixture(scope="module")
def smallest(home):
    """The fit that a loose KLD bound sends to the smallest file: every ffn matrix at Q4_0, repacked."""
    import ondevice

    return ondevice.fit(None, "kld<=1", **SHORT)


def test_every_validated_candidate_and_the_chosen_line_show_the_measured_peak_rss(smallest):
    c = smallest.chosen
    assert set(c.plan.values()) == {"Q4_0"}  # the smallest plan
    assert c.measured["mem"] > c.measured["size"]  # the weights and then the runtime's own memory
    assert all(v.measured["mem"] for v in smallest.candidates)
    head = next(ln for ln in smallest.lines if "RSS MiB" in ln and "tg meas" in ln)
    assert head.index("size MB") < head.index("RSS MiB") < head.index("tg table")
    chosen = next(ln for ln in smallest.lines if ln.startswith("chosen:"))
    assert f"peak RSS {c.measured['mem'] / MiB:.0f} MiB" in chosen


def test_a_fit_not_stored_names_no_file_and_leaves_no_work_folder(smallest, home):
    """``store=False``: the candidates' files are deleted with the fit, so no path to one is returned."""
    assert smallest.path is None and smallest.name is None
    assert not any("file" in c.measured for c in smallest.candidates)
    chosen = next(ln for ln in smallest.lines if ln.startswith("chosen:"))
    assert "measurements reused (cached, or already made in this fit)" in chosen
    # nothing kept there (no importance matrix); run before the other fits of this module, which make their own
    assert not list((home / "data" / "fit").glob("work-*"))


def test_the_shipped_file_is_benched_with_the_candidates(smallest):
    """Its tok/s in the fit's record are of the moment the candidates were measured, not the speed table's."""
    now = smallest.shipped["validation"]
    assert now["tg"] > 0 and now["pp"] > 0


def test_a_mem_bound_below_the_repacked_variant_chooses_one_that_meets_it_as_measured(smallest, home):
    import ondevice

    bound = int(smallest.chosen.measured["mem"] - 8 * MiB)  # below what the repacked Q4_0 plan measured
    r = ondevice.fit(None, f"kld<=1,mem<={bound}B", **SHORT)
    assert r.chosen.plan != smallest.chosen.plan
    assert r.chosen.measured["mem"] <= bound  # measured, not only predicted
    assert r.chosen.predicted["mem"] <= bound
    assert all(c.predicted["mem"] <= bound for c in r.candidates)  # the plans over it were never validated
    # a plan's peak RSS is predicted from the per-type variants: close to what its validation measured
    for c in r.candidates:
        assert c.predicted["mem"] == pytest.approx(c.measured["mem"], rel=0.05), c.summary()
    chosen = next(ln for ln in r.lines if ln.startswith("chosen:"))
    assert f"peak RSS {r.chosen.measured['mem'] / MiB:.0f} MiB" in chosen
    assert any("peak RSS at the bench shapes" in ln for ln in r.lines)
    assert any("RSS MiB" in ln and "KLD" in ln and "tg t/s" in ln for ln in r.lines)  # the predicted front's


def test_a_mem_bound_no_plan_meets_is_refused_after_the_device_table(smallest, home, cli):
    r = cli("fit", "--budget", "mem<=60MB", "--types", "Q8_0,Q5_0,Q4_0", "--groups", "ffn_down,ffn_gate_up",
            "-t", "1", "--calib-ctx", "64", "--calib-chunks", "2", "--eval-ctx", "64", "--eval-chunks", "2",
            "--imatrix", "off", "--tests", "pp32,tg8", "-r", "1", "--no-store", env={"ONDEVICE_HOME": str(home)})
    assert r.returncode == 2, r.stderr
    line = r.stderr.strip()
    assert "\n" not in line and "budget mem<=57.2MiB cannot be met" in line and "loosen the budget" in line
    assert "least peak RSS a plan is predicted at" in line
    assert "sensitivity" not in r.stdout  # refused before the KLD runs


ARGS = ("--types", "Q8_0,Q5_0,Q4_0", "--groups", "ffn_down,ffn_gate_up", "-t", "1", "--calib-ctx", "64",
        "--calib-chunks", "2", "--eval-ctx", "64", "--eval-chunks", "2", "--imatrix", "off", "--tests", "pp32,tg8",
        "-r", "1", "--no-store")


def test_a_mem_bound_only_the_shipped_file_meets_names_it(smallest, home, cli):
    """The shipped file is a candidate too: a bound over its peak RSS but under every plan's says to keep it."""
    import re

    r = cli("fit", "--budget", "mem<=60MB", *ARGS, env={"ONDEVICE_HOME": str(home)})  # measures the shipped file's
    shipped = int(re.search(r"peak RSS at the bench shapes, .*, shipped (\d+) MiB", r.stdout).group(1))
    assert r.returncode == 2 and "shipped file" not in r.stderr, r.stderr  # 60 MB: not even the shipped file
    r = cli("fit", "--budget", f"mem<={shipped + 1}MiB", *ARGS, env={"ONDEVICE_HOME": str(home)})
    assert r.returncode == 2, r.stderr  # every plan (ffn at Q5_0 the least, ~189 MiB) is over it
    line = r.stderr.strip()
    assert "\n" not in line and "cannot be met by a fitted variant" in line
    assert f"the shipped file (peak RSS {shipped} MiB) meets it: keep using it, or loosen" in line


def test_a_size_bound_only_the_shipped_file_meets_names_it(cli, tmp_path):
    """The same for size<=, refused before the reference is made: the shipped file is 98.4 MB, and every plan with
    only ffn_down lowered is larger."""
    r = cli("fit", "--budget", "size<=100MB", "--groups", "ffn_down", "--types", "Q8_0,Q4_0", "--no-store")
    assert r.returncode == 2, r.stderr
    assert "size<=100MB cannot be met by a fitted variant" in r.stderr
    assert "the shipped file (98.4 MB) meets it: keep using it, or loosen the size" in r.stderr
    r = cli("fit", "--budget", "size<=50MB", "--groups", "ffn_down", "--types", "Q8_0,Q4_0", "--no-store")
    assert r.returncode == 2 and "cannot be met" in r.stderr and "shipped file" not in r.stderr
