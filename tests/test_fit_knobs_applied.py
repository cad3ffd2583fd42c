"""A variant stored by ``ondevice fit --knobs`` loads with the runtime knobs that fit measured on this machine
(run, chat, serve and ``ondevice.load``), unless a flag, an env var or a keyword sets the knob; knobs measured on
another machine, another llama.cpp build or under a device profile are not applied, and the user is told which."""

from __future__ import annotations

import shutil

import pytest
from test_fit_plan import _fa_at_depth, _tune_at


def _variant(monkeypatch, tmp_path, smol_path, name="smol-fit-fa", **prov_over) -> str:
    """A stored variant of the default model whose provenance holds what a real ``tune`` chose on this machine:
    flash attention off (the Xeon's measured speeds at depth, through the real ``tune`` and ``runtime_record``)."""
    from ondevice.device.info import machine_key
    from ondevice.device.kernels import build_id
    from ondevice.fit.knobs import runtime_record
    from ondevice.models.catalog import register_variant

    r, _ = _tune_at(monkeypatch, _fa_at_depth, ("pp128", "tg64"), 1024)
    assert r["flags"] == "-fa off"
    monkeypatch.setenv("ONDEVICE_HOME", str(tmp_path / "home"))
    copy = tmp_path / "copy.gguf"
    shutil.copyfile(smol_path, copy)
    prov = {"made_by": "ondevice fit", "type": "fit", "measured": {"runtime": runtime_record(r)},
            "machine": machine_key(), "llama_build": build_id(), "profile": None, **prov_over}
    register_variant(name, copy, prov)
    return name


def test_load_applies_the_measured_knobs_unless_a_keyword_sets_them(monkeypatch, tmp_path, smol_path):
    import ondevice

    name = _variant(monkeypatch, tmp_path, smol_path)
    with ondevice.load(name, n_ctx=256, n_threads=1) as m:
        assert m.engine.config.flash_attn is False
        assert m.knobs_note == ("runtime knobs `ondevice fit --knobs` measured on this machine: -fa off (a flag "
                                "given overrides its knob)")
        assert m.generate("Hi", max_tokens=2, temp=0).text is not None
    with ondevice.load(name, n_ctx=256, n_threads=1, flash_attn=None) as m:  # auto asked for: kept
        assert m.engine.config.flash_attn is None and m.knobs_note == ""
    with ondevice.load(name, n_ctx=256, n_threads=1, type_k="q8_0", type_v="q8_0") as m:
        assert m.engine.config.flash_attn is None  # a quantized V cache needs flash attention: off is not applied
    with ondevice.load(str(smol_path), n_ctx=256, n_threads=1) as m:  # the shipped file has no fit
        assert m.engine.config.flash_attn is None and m.knobs_note == ""


@pytest.mark.parametrize("over, where", [({"machine": "another cpu|2|1|1|linux"}, "on another machine"),
                                         ({"llama_build": "0.0.0|old"}, "with another llama.cpp build"),
                                         ({"profile": {"threads": 1, "spec": "threads=1"}},
                                          "under the device profile 'threads=1'")])
def test_knobs_measured_elsewhere_are_not_applied_and_the_note_says_why(monkeypatch, tmp_path, smol_path, over,
                                                                        where):
    import ondevice

    name = _variant(monkeypatch, tmp_path, smol_path, **over)
    with ondevice.load(name, n_ctx=256, n_threads=1) as m:
        assert m.engine.config.flash_attn is None
        assert m.knobs_note == (f"the runtime knobs `ondevice fit --knobs` chose (-fa off) were measured {where}: "
                                f"not applied")


def test_run_says_the_knobs_it_applied_and_a_flag_overrides_them(monkeypatch, tmp_path, smol_path, cli):
    name = _variant(monkeypatch, tmp_path, smol_path)  # in the cli fixture's home (tmp_path / "home")
    r = cli("run", "-m", name, "-n", "2", "--temp", "0", "-t", "1", "Hi")
    assert r.returncode == 0, r.stderr
    assert f"{name}: runtime knobs `ondevice fit --knobs` measured on this machine: -fa off" in r.stderr, r.stderr
    r = cli("run", "-m", name, "-n", "2", "--temp", "0", "-t", "1", "-fa", "auto", "Hi")
    assert r.returncode == 0 and "knobs" not in r.stderr, r.stderr


def test_serve_applies_the_knobs_unless_its_settings_give_them(monkeypatch, tmp_path, smol_path):
    from ondevice.serve.settings import settings_from_args
    from ondevice.serve.state import ServerState

    name = _variant(monkeypatch, tmp_path, smol_path)
    for env, fa in ((None, False), ("auto", None)):  # an env var gives the setting as a flag does
        if env:
            monkeypatch.setenv("ONDEVICE_FLASH_ATTN", env)
        st = ServerState(settings_from_args(model=name, parallel=1, ctx=256, threads=1))
        st.start()
        try:
            assert st.engine.config.flash_attn is fa and ("-fa off" in st.knobs_note) == (fa is False)
        finally:
            st.close()


def test_serve_says_the_knobs_it_loaded_with(monkeypatch, tmp_path, smol_path):
    import time

    from conftest import serve_process

    name = _variant(monkeypatch, tmp_path, smol_path)
    with serve_process(tmp_path, "-m", name, "-np", "1", "-t", "1") as (_, _, log):
        deadline = time.monotonic() + 10
        while "knobs" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "ondevice serve: runtime knobs `ondevice fit --knobs` measured on this machine: -fa off" \
            in log.read_text(), log.read_text()


def test_damaged_knobs_in_the_sidecar_are_not_applied_and_the_load_goes_on(monkeypatch, tmp_path, smol_path):
    import json

    import ondevice
    from ondevice.models.catalog import resolve

    name = _variant(monkeypatch, tmp_path, smol_path)
    side = resolve(name).path.with_suffix(".json")
    rec = json.loads(side.read_text())
    rec["provenance"]["measured"]["runtime"]["knobs"]["threads"] = "two"  # a hand edit llama.cpp would choke on
    side.write_text(json.dumps(rec))
    with ondevice.load(name, n_ctx=256) as m:
        assert m.engine.config.flash_attn is None and m.engine.config.n_threads is None
        assert m.knobs_note == (f"the runtime knobs stored with {name}.gguf are damaged (its .json file): not "
                                f"applied; run `ondevice fit --knobs` again to measure them")


def test_knobs_a_fit_measured_on_the_file_in_hand_apply_to_that_file_while_it_is_unchanged(monkeypatch, tmp_path,
                                                                                           smol_path):
    """A fit that finds the file in hand best stores no variant; the knobs it measured on that file (the real
    ``tune`` and ``runtime_record``, the Xeon's speeds at depth) are kept for it: its loads apply them, another file's
    do not, and once the file changes they are not applied and the note says why."""
    import os

    import ondevice
    from ondevice.fit.knobs import runtime_record
    from ondevice.fit.register import keep_shipped_knobs
    from ondevice.models.catalog import resolve

    r, _ = _tune_at(monkeypatch, _fa_at_depth, ("pp128", "tg64"), 1024)
    monkeypatch.setenv("ONDEVICE_HOME", str(tmp_path / "home"))
    in_hand, other = tmp_path / "in-hand.gguf", tmp_path / "other.gguf"
    shutil.copyfile(smol_path, in_hand)
    shutil.copyfile(smol_path, other)
    said: list[str] = []
    keep_shipped_knobs(resolve(str(in_hand)), runtime_record(r), None, said.append)
    assert said == ["run, chat and serve load in-hand with its knobs on this machine (-fa off; a flag given "
                    "overrides its knob)"]
    assert [p.name for p in (tmp_path / "home" / "models").iterdir()] == ["knobs"]  # no copy of the model
    keep_shipped_knobs(resolve(str(other)), runtime_record(r), {"spec": "threads=1"}, said.append)
    assert len(list((tmp_path / "home" / "models" / "knobs").iterdir())) == 1 and len(said) == 1  # a profile's: not
    with ondevice.load(str(in_hand), n_ctx=256, n_threads=1) as m:
        assert m.engine.config.flash_attn is False and "measured on this machine: -fa off" in m.knobs_note
    with ondevice.load(str(other), n_ctx=256, n_threads=1) as m:
        assert m.engine.config.flash_attn is None and m.knobs_note == ""
    st = in_hand.stat()
    os.utime(in_hand, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # replaced or touched since the fit
    with ondevice.load(str(in_hand), n_ctx=256, n_threads=1) as m:
        assert m.engine.config.flash_attn is None
        assert m.knobs_note == ("the runtime knobs `ondevice fit --knobs` measured on in-hand.gguf are for the file "
                                "as it was then, and it has changed since: not applied; run the fit again to measure "
                                "them")


def test_rm_forgets_the_knobs_kept_for_a_stored_file(monkeypatch, tmp_path, smol_path, cli):
    """Knobs kept for a stored file the fit found best (a pulled model) go with it on ``ondevice rm``: a file pulled
    again under that name is another file, and its loads must not say its knobs were measured and have changed."""
    import ondevice
    from ondevice.fit.knobs import runtime_record
    from ondevice.fit.register import keep_shipped_knobs
    from ondevice.models.catalog import resolve

    r, _ = _tune_at(monkeypatch, _fa_at_depth, ("pp128", "tg64"), 1024)
    monkeypatch.setenv("ONDEVICE_HOME", str(tmp_path / "home"))
    store = tmp_path / "home" / "models"
    store.mkdir(parents=True)
    shutil.copyfile(smol_path, store / "mine.gguf")
    keep_shipped_knobs(resolve("mine"), runtime_record(r), None, lambda line: None)
    assert len(list((store / "knobs").iterdir())) == 1
    out = cli("rm", "mine")
    assert out.returncode == 0 and "removed mine" in out.stdout, out.stderr
    assert list((store / "knobs").iterdir()) == []
    shutil.copyfile(smol_path, store / "mine.gguf")  # pulled again: a new file, no fit has measured it
    with ondevice.load("mine", n_ctx=256, n_threads=1) as m:
        assert m.engine.config.flash_attn is None and m.knobs_note == ""
