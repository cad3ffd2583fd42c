"""`ondevice bench` as a llama-bench user walks it: -pg with a zero side is llama-bench's pp / tg test."""

from __future__ import annotations

import json

import pytest

from ondevice.bench import parse_tests
from ondevice.errors import InvalidArgument


def test_pg_with_a_zero_side_is_the_pp_or_tg_test_as_in_llama_bench():
    # llama-bench names -pg 0,N "tgN" and -pg P,0 "ppP"; timed as a pg, pg0,N had no prompt to prefill and
    # sampled its first token from the logits an earlier run left (TTFT ~0, one token for free)
    (tg,) = parse_tests("pg0,16")
    assert (tg.name, tg.kind, tg.n_prompt, tg.n_gen) == ("tg16", "tg", 0, 16)
    (tgd,) = parse_tests("pp0+tg8@d4")
    assert (tgd.name, tgd.kind, tgd.n_depth) == ("tg8@d4", "tg", 4)
    (pp,) = parse_tests("pg32,0")
    assert (pp.name, pp.kind, pp.n_prompt, pp.n_gen) == ("pp32", "pp", 32, 0)
    assert parse_tests("pg8,4")[0].kind == "pg"  # both sides: still the combined test


@pytest.mark.parametrize("bad", ["pg0,0", "pp0+tg0", "pg0,0@d8"])
def test_pg_with_nothing_to_time_is_refused(bad):
    with pytest.raises(InvalidArgument, match="no tokens to time"):
        parse_tests(bad)


def test_cli_pg_zero_prompt_runs_the_tg_test_and_pg_zero_zero_stores_nothing(cli, tmp_path, smol_path):
    db = tmp_path / "b.sqlite"
    r = cli("bench", "-m", str(smol_path), "-pg", "0,4", "-p", "0", "-n", "0", "-r", "1", "-t", "1", "-o", "json",
            "--db", str(db), "--no-roofline", "--no-report", "--no-progress")
    assert r.returncode == 0, r.stderr
    (rec,) = json.loads(r.stdout)
    assert (rec["test"], rec["workload"], rec["n_prompt"], rec["n_gen"]) == ("tg4", "tg", 0, 4)
    assert rec["status"] == "ok" and rec["tps_mean"] > 0
    r = cli("bench", "-m", str(smol_path), "--tests", "pg0,0", "-r", "1", "--db", str(tmp_path / "z.sqlite"),
            "--no-report", "--no-progress")
    assert r.returncode == 2 and "ondevice bench: error: test 'pg0,0' has no tokens to time" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "z.sqlite").exists()  # refused before any work


def test_depth_alone_next_to_tests_is_refused_not_the_default_pp512_tg128_added():
    # `--tests tg64 -d 512` ran tg64, pp512@d512 and tg128@d512: -d alone brought llama-bench's -p/-n defaults
    from types import SimpleNamespace

    from ondevice.bench.cli import tests_from_args

    def specs(tests, d, p=None, n=None):
        return tests_from_args(SimpleNamespace(n_prompt=p, n_gen=n, pg=None, n_depth=d, tests=tests))

    with pytest.raises(InvalidArgument, match=r"^-d sets the KV depth of -p/-n/-pg tests; .* --tests tg64@d512$"):
        specs(["chat,tg64"], [512])
    assert specs(["tg4"], [8], p=[0], n=[4]) == ["tg4", "tg4@d8"]  # with -p/-n it still sweeps their tests
    assert specs(None, [0, 16]) == ["pp512", "tg128", "pp512@d16", "tg128@d16"]  # llama-bench's defaults, as there
