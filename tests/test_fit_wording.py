"""What ``ondevice fit`` and ``report --fit`` say: the budget forms the help lists, and counts in words that read
right (one thread, one plan, plans measured by this fit too)."""

from __future__ import annotations

import pytest

from ondevice.fit.budget import Budget, parse_budget
from ondevice.fit.interact import KldModel


@pytest.mark.parametrize("text", ["none", "None", " NONE ", ""])
def test_budget_none_is_the_least_kld_as_the_help_says(text):
    assert parse_budget(text) == Budget() and parse_budget(text).describe() == "none (least KLD)"


def test_fit_takes_budget_none_from_the_command_line(cli):
    r = cli("fit", "--help")
    assert "none: least KLD" in " ".join(r.stdout.split())
    # the budget is read first: a bad type after it is the error, not the budget
    r = cli("fit", "--budget", "none", "--types", "Q8_0,Q9_9", "--no-store")
    assert r.returncode == 2 and "--budget" not in r.stderr and "Q9_9" in r.stderr, r.stderr


def test_the_kld_models_count_of_plans_says_this_fit_measures_them_too():
    said = KldModel("additive", {}, 1).describe()
    assert said.startswith("additive (1 multi-group plan measured on this text so far, by earlier fits or this one")
    assert "2 multi-group plans measured" in KldModel("additive", {}, 2).describe()


def test_report_fit_counts_read_right_and_says_where_the_shipped_speed_is_from(tmp_path, cli, monkeypatch):
    from ondevice.fit.plan import Candidate
    from ondevice.fit.register import log_fit
    from ondevice.models import resolve

    monkeypatch.setenv("ONDEVICE_HOME", str(tmp_path))  # the store log_fit writes
    src = resolve("smollm2-135m-instruct")
    chosen = Candidate({"ffn": "Q4_0"}, {"size": 105e6, "tg": 50.0},
                       {"size": 105e6, "tg": 50.0, "pp": 300.0, "kld": 0.01, "mem": 223 << 20})
    front = [{"plan": {"ffn": t}, "size": s, "tg": 50.0, "pp": 300.0, "kld": k}
             for t, s, k in (("Q8_0", 145e6, 0.001), ("Q5_0", 115e6, 0.005), ("Q4_0", 105e6, 0.01))]
    log_fit("smol-fit", "a" * 64, chosen, src, parse_budget("size<=106MB"), [chosen], front,
            {"size": 98e6, "tg": 50.5, "pp": 290.0}, 1, {})
    log_fit("smol-fit2", "b" * 64, chosen, src, parse_budget("tg>=1.1x"), [chosen], front,
            {"size": 98e6, "tg": 50.5, "pp": 290.0, "validation": {"tg": 40.0, "pp": 280.0}}, 2, {})
    r = cli("report", "--fit", env={"ONDEVICE_HOME": str(tmp_path)})
    assert r.returncode == 0, r.stderr
    assert "budget 'size<=106MB', 1 thread)" in r.stdout and "budget 'tg>=1.1x', 2 threads)" in r.stdout
    assert "predicted front (3 plans, KLD on the calibration text):" in r.stdout and "every 1" not in r.stdout
    # the speed table's tok/s are of another moment than the validated rows': said so
    assert "| shipped smollm2-135m-instruct (tok/s: speed table, earlier) | 98.0 | - | 50.5 | 290.0 | - |" in r.stdout
    # benched with the candidates (a relative bound): those tok/s, unmarked
    assert "| shipped smollm2-135m-instruct | 98.0 | - | 40.0 | 280.0 | - |" in r.stdout
