"""No sampler field takes NaN, infinity, 1e400 (which JSON parsers read as infinity) or an integer past float's
range, on any route or in the library: one check in the request schema (serve/schemas.py ``_Sampling``) and one in
the engine's :class:`Sampling`. Found by an audit (helper-118): ``repeat_penalty: Infinity`` was served, then
``GET /slots`` answered 500 to every client ("Out of range float values are not JSON compliant") until the slot was
reused, and a 400-digit logit bias was a 500 on /completion and an OverflowError in the library. Real engine, a
real server on loopback."""

from __future__ import annotations

import dataclasses
import json

import httpx
import pytest
from conftest import serve_process

from ondevice.engine.records import Sampling
from ondevice.errors import InvalidArgument

FLOATS = [f.name for f in dataclasses.fields(Sampling) if isinstance(f.default, float)]
BIG = "1" + "0" * 400


def _strict(text: str):
    """JSON as a strict client parses it: NaN and Infinity are not JSON."""
    def refuse(name):
        raise ValueError(f"{name} is not JSON")

    return json.loads(text, parse_constant=refuse)


@pytest.mark.parametrize("name", FLOATS)
@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan"), 10 ** 400])
def test_the_library_refuses_a_sampler_number_that_is_not_finite(name, value):
    with pytest.raises(InvalidArgument, match=f"{name}=.* must be a finite number"):
        Sampling(**{name: value})


def test_the_library_refuses_a_huge_integer_logit_bias():
    for bias in (10 ** 400, -10 ** 400):
        with pytest.raises(InvalidArgument, match="logit_bias holds a bias too large"):
            Sampling(logit_bias={1: bias})
    assert Sampling(repeat_penalty=1e300, logit_bias={1: 10 ** 30}).repeat_penalty == 1e300  # finite: taken


@pytest.fixture(scope="module")
def base(smol_path, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("numbers")
    with serve_process(tmp, "-m", str(smol_path), "-np", "2") as (proc, url, log):
        yield url.removesuffix("/v1")
        assert proc.poll() is None and "Traceback" not in log.read_text()


def _post(base: str, path: str, body: str) -> httpx.Response:
    return httpx.post(base + path, content=body, headers={"content-type": "application/json"}, timeout=120)


ROUTES = {  # route -> a body with FIELD where the sampler field goes
    "/v1/chat/completions": '{"messages": [{"role": "user", "content": "x"}], "max_tokens": 2, FIELD}',
    "/v1/completions": '{"prompt": "x", "max_tokens": 2, FIELD}',
    "/completion": '{"prompt": "x", "n_predict": 2, FIELD}',
    "/api/generate": '{"model": "MODEL", "prompt": "x", "stream": false, '
                     '"options": {"num_predict": 2, FIELD}}',
    "/api/chat": '{"model": "MODEL", "messages": [{"role": "user", "content": "x"}], '
                 '"stream": false, "options": {"num_predict": 2, FIELD}}',
}
OLLAMA_OPTIONS = ("temperature", "top_p", "min_p", "typical_p", "repeat_penalty", "presence_penalty",
                  "frequency_penalty", "mirostat_tau", "mirostat_eta")
SERVER_FLOATS = ("temperature", "top_p", "min_p", "typical_p", "repeat_penalty", "presence_penalty",
                 "frequency_penalty", "top_n_sigma", "xtc_probability", "xtc_threshold", "mirostat_tau",
                 "mirostat_eta", "dynatemp_range", "dynatemp_exponent", "dry_multiplier", "dry_base",
                 "t_max_predict_ms")


@pytest.mark.parametrize("route", ROUTES)
def test_every_route_refuses_a_sampler_number_that_is_not_finite_and_slots_stays_json(base, route):
    fields = OLLAMA_OPTIONS if route.startswith("/api/") else SERVER_FLOATS
    model = httpx.get(base + "/api/tags", timeout=60).json()["models"][0]["name"]
    for field in fields:
        for value in ("Infinity", "-Infinity", "NaN", "1e400"):
            r = _post(base, route, ROUTES[route].replace("MODEL", model).replace("FIELD", f'"{field}": {value}'))
            assert r.status_code == 400, (route, field, value, r.text)
            assert f"{field}: Input should be a finite number" in r.text, (route, field, value, r.text)
    finite = ROUTES[route].replace("MODEL", model).replace("FIELD", '"repeat_penalty": 1e300')
    r = _post(base, route, finite)  # finite, however large: served
    assert r.status_code == 200, r.text
    slots = httpx.get(base + "/slots", timeout=60)
    assert slots.status_code == 200 and _strict(slots.text)


@pytest.mark.parametrize("body", ['{"prompt": "Hi", "n_predict": 2, "logit_bias": {"1": BIG}}',
                                  '{"prompt": "Hi", "n_predict": 2, "logit_bias": [[1, BIG]]}',
                                  '{"prompt": "Hi", "n_predict": 2, "logit_bias": [["Hi", -BIG]]}'])
def test_a_huge_integer_logit_bias_is_a_400_on_completion(base, body):
    r = _post(base, "/completion", body.replace("BIG", BIG))
    assert r.status_code == 400 and "logit_bias" in r.json()["error"]["message"] and "-100 to 100" in r.text, r.text
    r = _post(base, "/v1/completions", '{"prompt": "Hi", "max_tokens": 2, "logit_bias": {"1": %s}}' % BIG)
    assert r.status_code == 400 and "logit_bias" in r.text, r.text
    assert httpx.get(base + "/health", timeout=60).json()["slots_processing"] == 0
