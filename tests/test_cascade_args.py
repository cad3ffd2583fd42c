"""The cascade's library arguments and `cascade fit`'s selection are checked before any model or cloud work,
with one-line errors that name the argument."""

from __future__ import annotations

import pytest

from ondevice.errors import InvalidArgument

DOWN = "http://127.0.0.1:9/v1"  # nothing listens: these checks come before the cloud is asked


@pytest.mark.parametrize(("kw", "match"), [
    ({"cloud_url": 8081}, "cloud_url, an OpenAI-compatible endpoint as a string"),
    ({"cloud_url": DOWN, "combiner": 123}, "combiner=123: give a Combiner, a combiner file's path or None"),
    ({"cloud_url": DOWN, "key_env": None}, "key_env=None: give the name of an environment variable"),
    ({"cloud_url": DOWN, "cloud_model": 5}, "cloud_model=5: give a model name or None"),
])
def test_cascade_arguments_name_the_one_that_is_wrong(kw, match):
    import ondevice

    with pytest.raises(InvalidArgument, match=match):
        ondevice.Cascade("smollm2-135m-instruct", **kw)


def test_cascade_generate_refuses_what_is_not_a_prompt(smol):
    import ondevice

    with ondevice.Cascade(smol, DOWN) as c:
        for bad in (None, 5, b"hi"):
            with pytest.raises(InvalidArgument, match="give a string or a list of chat messages"):
                c.generate(bad, max_tokens=2)
        with pytest.raises(InvalidArgument, match=r"messages\[0\].content is 5"):
            c.generate([{"role": "user", "content": 5}], max_tokens=2)


@pytest.mark.parametrize(("limit", "match"), [("0", "--limit must be at least 1, got 0"),
                                              ("1", "needs at least 4 dev items, the selection has 1")])
def test_cascade_fit_refuses_a_selection_too_small_before_answering(cli, limit, match):
    r = cli("cascade", "fit", "--cascade", DOWN, "--limit", limit, timeout=60)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert match in r.stderr.strip().splitlines()[-1] and "fitting on" not in r.stderr


@pytest.mark.parametrize("verb", [("cascade", "export"), ("adapt", "--from", "deferred", "--steps", "1")])
def test_a_db_that_names_no_store_is_an_error_not_a_new_store(cli, tmp_path, verb):
    db = tmp_path / "typo" / "x.sqlite"
    r = cli(*verb, "--db", str(db), timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert f"no ondevice store at {db}; give the --db that" in r.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "typo").exists()


def test_serve_refuses_cascade_flags_without_cascade(cli):
    """`serve --cascade-defer-share 0.4 --cascade-keep-hard` without --cascade started a plain server: the flags were
    ignored silently (as `eval` refuses its cascade flags without --cascade, serve does)."""
    r = cli("serve", "--port", "0", "--cascade-defer-share", "0.4", "--cascade-keep-hard", timeout=60)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines()[-1] == (
        "ondevice serve: error: invalid server settings: --cascade-defer-share, --cascade-keep-hard only apply with "
        "--cascade URL (the cloud to defer to); add --cascade URL or drop them; see `ondevice serve --help`")
    r = cli("serve", "--port", "0", "--no-embeddings", env={"ONDEVICE_CASCADE_TIMEOUT": "5"}, timeout=60)
    assert r.returncode == 2 and "ONDEVICE_CASCADE_TIMEOUT only applies with --cascade URL" in r.stderr, r.stderr
    # a flag given at its default value is given too (it was taken silently: only other values were compared)
    r = cli("serve", "--port", "0", "--no-embeddings", "--cascade-threshold", "0.5", timeout=60)
    assert r.returncode == 2 and "--cascade-threshold only applies with --cascade URL" in r.stderr, r.stderr


def test_a_report_with_no_store_names_every_verb_that_records_one(cli):
    """`report --fit` on an empty home said to record with bench, eval or serve: not with fit, whose table it is."""
    r = cli("report", "--fit", timeout=60)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines()[-1].endswith("; record one with `ondevice bench`, `eval` (`--cascade` too), "
                                                      "`fit` or `serve --cascade-keep-hard`"), r.stderr


def test_an_unknown_task_is_named_with_the_suites_tasks():
    """`--tasks nosuch` said to run `ondevice eval --suite NAME` to see the task names, which runs the whole suite."""
    from ondevice.errors import InvalidArgument
    from ondevice.eval.cascade_curve import load_items

    with pytest.raises(InvalidArgument, match=r"^--tasks nosuch: no such task in the suite; its tasks are "
                                              r"rewrite_formal, rewrite_friendly, .*rewrite_shorter$"):
        load_items("rewrite", tasks=["rewrite_formal", "nosuch"])
    assert {it.task for it in load_items("rewrite", "dev", tasks=["rewrite_formal"])} == {"rewrite_formal"}
