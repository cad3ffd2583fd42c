"""Adapters by store name in every verb (run, chat, eval, serve), the base-hash refusal through a name,
`ondevice adapt list`, and `ondevice adapt merge` (its refusals; the merged model's agreement with base +
adapter is checked on a trained adapter in test_adapt.py). No torch needed here."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ondevice.adapt import adapter_file, store
from ondevice.errors import InvalidArgument
from ondevice.models.store import cached_sha256


def _tensors(seed: int, scale: float = 0.5) -> dict:
    rng = np.random.default_rng(seed)
    return {f"blk.{i}.attn_v.weight": (rng.standard_normal((4, 576)).astype(np.float32) * scale,
                                       rng.standard_normal((192, 4)).astype(np.float32) * scale) for i in (28, 29)}


@pytest.fixture()
def home(tmp_path, monkeypatch, smol_path):
    """An isolated ondevice home (the one the ``cli`` fixture's processes use) holding two stored adapters:
    'live' for this base and 'alien', recorded as trained on another."""
    h = tmp_path / "home"
    monkeypatch.setenv("ONDEVICE_HOME", str(h))
    sha = cached_sha256(smol_path)
    prov = {"base_name": "smollm2-135m-instruct", "created": "2026-11-30T12:00:00+00:00",
            "figures": {"steps": 20, "trainable_params": 4608, "heldout_loss_before": 0.9,
                        "heldout_loss_after": 0.2, "peak_rss_bytes": 500 << 20}}
    adapter_file.write(store.path_for("live"), "llama", 8.0, _tensors(1), {**prov, "base_sha256": sha})
    adapter_file.write(store.path_for("alien"), "llama", 8.0, _tensors(2),
                       {**prov, "base_sha256": "0" * 64, "base_name": "another-model"})
    return h


def test_names_resolve_through_the_store(home, tmp_path):
    assert store.resolve("live") == home / "adapters" / "live.gguf"
    assert (home / "adapters" / "live.gguf").stat().st_mode & 0o777 == 0o644  # readable as a model file is
    assert store.resolve(tmp_path / "x.gguf") == tmp_path / "x.gguf"  # a path stays a path, checked later
    with pytest.raises(InvalidArgument, match=r"--adapter nope: no such adapter file or stored adapter; "
                                              r"stored: alien, live \(`ondevice adapt list`"):
        store.resolve("nope")
    for bad in ("a+b", "x=y", ""):
        with pytest.raises(InvalidArgument, match="is not allowed"):
            store.path_for(bad)


def test_run_chat_eval_take_a_stored_name_and_refuse_another_base(home, cli):
    r = cli("run", "--adapter", "live", "-n", "3", "--temp", "0", "Hello")
    assert r.returncode == 0, r.stderr
    for verb in (("run", "-n", "2", "hi"), ("chat",), ("eval", "--ppl", "--ctx", "64", "--chunks", "1")):
        bad = cli(verb[0], "--adapter", "nope", *verb[1:], input="hi\n")
        assert bad.returncode == 2 and "Traceback" not in bad.stderr, bad.stderr
        assert "--adapter nope: no such adapter file or stored adapter; stored: alien, live" in bad.stderr
        alien = cli(verb[0], "--adapter", "alien", *verb[1:], input="hi\n")
        assert alien.returncode == 2 and "alien.gguf was trained on another base model (another-model" \
            in alien.stderr, alien.stderr
    ev = cli("eval", "-m", "smollm2-135m-instruct", "--ppl", "--ctx", "64", "--chunks", "1", "--threads", "2",
             "--json", "--no-store", "--adapter", "live")
    assert ev.returncode == 0, ev.stderr
    rec = json.loads(ev.stdout.splitlines()[0])
    assert rec["adapter"] == str(home / "adapters" / "live.gguf")
    assert rec["adapter_sha256"] == cached_sha256(home / "adapters" / "live.gguf")


def test_serve_takes_name_equals_stored_name(home, smol_path, cli):
    import openai

    from ondevice.serve import BackgroundServer, ServeSettings

    s = ServeSettings(model=str(smol_path), port=0, parallel=2, ctx=128, threads=2, embeddings=False,
                      adapter=["a=live"])
    with BackgroundServer(s) as srv:
        c = openai.OpenAI(base_url=srv.base_url + "/v1", api_key="x")
        ids = [m.id for m in c.models.list().data]
        assert ids[1:] == [f"{ids[0]}+a"]
        r = c.completions.create(model=f"{ids[0]}+a", prompt="Hi", max_tokens=2, temperature=0)
        assert r.usage.completion_tokens == 2
    for spec, msg in (("a=alien", "alien.gguf was trained on another base model"), ("a=nope", "stored: alien, live")):
        r = cli("serve", "--port", "0", "--parallel", "1", "--ctx", "64", "--adapter", spec)
        assert r.returncode == 2 and msg in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_adapt_list_shows_name_base_size_date_figures(home, cli):
    r = cli("adapt", "list")
    assert r.returncode == 0, r.stderr
    head, alien, live = r.stdout.splitlines()
    assert head.split()[:5] == ["NAME", "BASE", "SIZE", "CREATED", "(UTC)"]
    assert live.startswith("live") and "smollm2-135m-instruct" in live and "2026-11-30 12:00" in live
    assert "20 steps, 2 tensors, 4,608 params, held-out loss 0.900 -> 0.200, peak RSS 500 MiB" in live
    assert alien.split()[1] == "another-model"
    rows = json.loads(cli("adapt", "list", "--json").stdout)
    assert [x["name"] for x in rows] == ["alien", "live"]
    assert rows[1]["size_bytes"] == (home / "adapters" / "live.gguf").stat().st_size


def test_merge_refuses_another_base_and_unknown_names(home, cli, tmp_path, smol_path):
    r = cli("adapt", "merge", "alien", "-m", "smollm2-135m-instruct", "-o", str(tmp_path / "m.gguf"))
    assert r.returncode == 2 and "trained on another base model" in r.stderr, r.stderr
    r = cli("adapt", "merge", "nope")
    assert r.returncode == 2 and "adapt merge nope: no such adapter" in r.stderr and "stored: alien, live" in r.stderr
    r = cli("adapt", "merge", str(smol_path))  # a whole model, not an adapter
    assert r.returncode == 2 and "not a LoRA adapter (general.type='model'" in r.stderr, r.stderr
    assert not list(tmp_path.glob("*m.gguf*"))  # nothing left behind


def test_merge_names_its_own_verb_and_an_adapters_fix(home, cli, tmp_path):
    """`adapt merge FILE` errors named `--adapter` (a flag merge has not) and told a damaged adapter to be
    re-downloaded with `ondevice pull`, as for a model."""
    cut = tmp_path / "cut.gguf"
    cut.write_bytes((home / "adapters" / "live.gguf").read_bytes()[:2000])
    for verb, args in ((("adapt", "merge"), [cut]), (("adapt", "average"), [cut, cut, "-o", tmp_path / "s.gguf"])):
        r = cli(*verb, *map(str, args))
        assert r.returncode == 2 and f"{' '.join(verb)} {cut}: truncated" in r.stderr, r.stderr
        assert "--adapter" not in r.stderr and "ondevice pull" not in r.stderr
        assert "copy it again or train it again with `ondevice adapt`" in r.stderr
    r = cli("run", "--adapter", str(cut), "hi", "-n", "2")
    assert r.returncode == 2 and f"--adapter {cut}: truncated" in r.stderr and "ondevice pull" not in r.stderr


def test_merge_without_out_stores_a_model_that_runs_by_name(home, cli):
    r = cli("adapt", "merge", "live", "--type", "f16", "--json")
    assert r.returncode == 0, r.stderr
    rec = json.loads(r.stdout)
    assert rec["name"] == "smollm2-135m-instruct-live" and rec["tensors_merged"] == 2 and rec["type"] == "f16"
    assert rec["path"] == str(home / "models" / "smollm2-135m-instruct-live.gguf")
    assert not [p for p in (home / "models").iterdir() if p.name.startswith(".")]  # no temp file left
    assert (home / "models" / "smollm2-135m-instruct-live.gguf").stat().st_mode & 0o777 == 0o644  # not 0600
    r = cli("run", "-m", "smollm2-135m-instruct-live", "-n", "2", "--temp", "0", "Hello")
    assert r.returncode == 0, r.stderr
    from ondevice.models.gguf_check import validate_gguf

    assert {t.type_name for t in validate_gguf(rec["path"]).tensors if "attn_v" in t.name} == {"Q4_1", "F16"}


def test_merged_weight_is_base_plus_scaled_lora():
    rng = np.random.default_rng(0)
    w, a, b = (rng.standard_normal(s).astype(np.float32) for s in ((6, 5), (2, 5), (6, 2)))
    from ondevice.adapt.merge import merged_weight

    assert np.allclose(merged_weight(w, a, b, 8.0), w + 4.0 * np.einsum("or,ri->oi", b, a), atol=1e-6)
    assert np.allclose(merged_weight(w, a, b, 0.0), w + b @ a, atol=1e-6)  # no alpha: scale 1, as llama.cpp


def test_a_scale_that_is_no_number_is_named_not_taken_for_a_missing_file(tmp_path):
    f = tmp_path / "a.gguf"
    f.write_bytes(b"")
    assert store.split_scale(f"{f}:0.5") == (str(f), 0.5)
    for spec in (f"{f}:abc", "missing.gguf:x"):
        with pytest.raises(InvalidArgument, match="the scale after ':' must be a number"):
            store.split_scale(spec)
    assert store.split_scale("C:\\adapters\\a") == ("C:\\adapters\\a", 1.0)  # a drive letter is no scale


def test_a_stored_adapters_name_with_a_scale_that_is_no_number(tmp_path, monkeypatch):
    """`dates:abc` said 'no such adapter file or stored adapter' while dates was stored: the scale is wrong."""
    monkeypatch.setenv("ONDEVICE_HOME", str(tmp_path / "home"))
    store.path_for("dates").write_bytes(b"")
    with pytest.raises(InvalidArgument, match=r"^--adapter dates:abc: the scale after ':' must be a number, e\.g\. "
                                              r"dates:0\.5$"):
        store.split_scale("dates:abc")
    assert store.split_scale("dates:0.25") == ("dates", 0.25)
