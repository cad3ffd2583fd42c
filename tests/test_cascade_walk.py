"""A new user's walk through the cascade: `cascade export` on a store with nothing kept, and a cloud that refuses
the key (a real second ``ondevice serve --api-key`` on loopback, reached with the openai client) for `cascade fit`
and for ``ondevice serve --cascade``."""

from __future__ import annotations

import os
import re
import time

import numpy as np
import openai
import pytest
from conftest import serve_process
from test_cascade import CloudServer


def test_export_with_nothing_kept_says_so_and_leaves_the_file_alone(cli, tmp_path):
    """An export of an empty store (or of a --since that matches nothing) once replaced the user's earlier
    export with an empty file; now nothing is written and the line says how samples are kept (exit 0: a periodic
    export with --since often has nothing new)."""
    out = tmp_path / "hard.jsonl"
    earlier = '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello."}]}\n'
    out.write_text(earlier)
    r = cli("cascade", "export", "-o", str(out))
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip() == (f"0 hard samples: the store holds none (serve with --cascade URL --cascade-keep-hard "
                                f"keeps deferred requests with the cloud's answers); {out} not written"), r.stderr
    assert out.read_text() == earlier
    r = cli("cascade", "export", "--since", "0")
    assert r.returncode == 0 and r.stdout == "" and "the store holds none matching --since (" in r.stderr, r.stderr


VAR = "ONDEVICE_TEST_WALK_CLOUD_KEY"


@pytest.fixture(scope="module")
def keyed_cloud():
    """A real second server that wants a key (``--api-key``), as a hosted API does."""
    assert VAR not in os.environ
    cloud = CloudServer("--api-key", "sekret")
    yield cloud
    cloud.kill()


def test_a_cloud_that_refuses_the_key_names_the_variable_it_was_read_from(cli, keyed_cloud):
    """HTTP 401 said only "answered HTTP 401": the usual cause is a key variable that is unset or misnamed, so the
    error names the variable and whether it is set."""
    for env, state in (({}, "which is not set"), ({VAR: "wrong"}, "which holds a key it does not accept")):
        r = cli("cascade", "fit", "--cascade", keyed_cloud.url + "/v1", "--cloud-key-env", VAR, "--limit", "4",
                env=env, timeout=300)
        assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
        assert r.stderr.strip().splitlines()[-1] == (
            f"ondevice cascade: error: the cloud at {keyed_cloud.url}/v1 answered HTTP 401: it refused the key, read "
            f"from the environment variable {VAR}, {state}"), r.stderr


def test_a_server_whose_cloud_fails_says_so_once_in_its_log(tmp_path, keyed_cloud):
    """Every deferral fell back to the device while the server's log showed only 200s: the operator never learnt
    that the key was refused. The first failure of a kind is logged, with its cause; the next are not repeated."""
    with serve_process(tmp_path, "--cascade", keyed_cloud.url + "/v1", "--cascade-key-env", VAR) as (_, url, log):
        client = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=120)
        for stream in (False, True, False):
            r = client.chat.completions.create(model="x", messages=[{"role": "user", "content": "Say hi"}],
                                               max_tokens=4, temperature=0, stream=stream,
                                               extra_body={"cascade": {"always_defer": True}})
            last = list(r)[-1] if stream else r
            assert last.model_extra["cascade"]["fallback"] == "http_401"
        said = [line for line in log.read_text().splitlines() if " cascade: " in line]
        start = log.read_text().splitlines()[0]  # the start-up line says where it defers and whether a key is set
    assert start.endswith(f"; cascade -> {keyed_cloud.url}/v1 (threshold 0.5, uncalibrated; key from {VAR}: not set; "
                         f"model: the one it lists)"), start
    assert len(said) == 1, said
    assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d ondevice serve: warning: cascade: ", said[0]), said  # as its notes
    assert said[0].endswith(f"cascade: the cloud at {keyed_cloud.url}/v1 answered HTTP 401: it refused the key, "
                            f"read from the environment variable {VAR}, which is not set; deferred requests get the "
                            f"device's answer (fallback \"http_401\")"), said


def test_a_threshold_above_the_fitted_combiners_dev_confidences_is_warned_at_start_up(tmp_path):
    """`cascade fit` on a dev split where the device rarely matched the cloud gives confidences near that base rate
    (all below 0.007 in the audit); `serve --cascade URL` with it and the default threshold 0.5 deferred every
    request, silently. The start-up log now says so and names the flags that fix it."""
    from ondevice.cascade.confidence import FEATURES, Combiner

    rng = np.random.default_rng(0)
    feats = [dict.fromkeys(FEATURES, 0.0) | {"copied_bigrams": x} for x in rng.random(40)]
    comb = Combiner.fit(feats, [int(f["copied_bigrams"] > 0.95) for f in feats], l2=1000.0)  # few good: all low
    top = comb.meta["share_thresholds"][-1][1]
    assert top < 0.5
    path = str(comb.save(tmp_path / "combiner.json"))
    down = "http://127.0.0.1:9/v1"  # never asked: the warning comes before any request
    with serve_process(tmp_path, "--cascade", down, "--cascade-combiner", path) as (_, _url, log):
        deadline = time.monotonic() + 10
        while "warning" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        lines = log.read_text().splitlines()
    assert lines[1] == (f"ondevice serve: warning: --cascade-threshold 0.5 is above 95% of the fitted combiner's dev "
                        f"confidences (they lie below {top:.4g}), so nearly every request will go to the cloud; give "
                        f"--cascade-defer-share 0.4 to defer the least confident 40%, or a --cascade-threshold below "
                        f"{top:.4g}"), lines
    with serve_process(tmp_path, "--cascade", down, "--cascade-combiner", path, "--cascade-defer-share", "0.4") \
            as (_, _url, log):
        time.sleep(0.5)
        text = log.read_text()
    assert "warning" not in text and "(defer share 0.4: threshold " in text, text
