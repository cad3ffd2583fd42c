"""`ondevice adapt average`: one adapter whose change is the weighted sum of several adapters' changes, checked
in numbers and in llama.cpp against the adapters applied together; and an adapter applied at a scale
(`--adapter PATH:SCALE`, llama-cli's `--lora-scaled PATH SCALE`) in the library, run and eval. No torch needed."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from ondevice.adapt import adapter_file
from ondevice.adapt.average import average
from ondevice.models.store import cached_sha256


def _pairs(seed: int, rank: int, layers=(27, 28, 29), scale: float = 0.4) -> dict:
    rng = np.random.default_rng(seed)
    return {f"blk.{i}.attn_v.weight": (rng.standard_normal((rank, 576)).astype(np.float32) * scale,
                                       rng.standard_normal((192, rank)).astype(np.float32) * scale) for i in layers}


def _delta(pairs: dict, alpha: float) -> dict:
    """llama.cpp's change to each weight: alpha / rank * B @ A (scale 1 when no alpha)."""
    return {t: (alpha / a.shape[0] if alpha else 1.0) * (b @ a) for t, (a, b) in pairs.items()}


def _logits_with(smol_path, adapters: tuple[str, ...]) -> np.ndarray:
    from test_adapt import _logits

    import ondevice

    m = ondevice.load(str(smol_path), n_ctx=256, n_threads=2, adapters=adapters)
    try:
        return _logits(m, "Rewrite formally: hey, send me the slides")
    finally:
        m.close()


@pytest.fixture()
def three(tmp_path, smol_path):
    """Three adapters of SmolLM2: ranks 4 and 8, alphas 8, 16 and none, one of them on a layer the others
    leave alone."""
    prov = {"base_sha256": cached_sha256(smol_path), "base_name": "smollm2-135m-instruct"}
    spec = (("a", 4, 8.0, (27, 28, 29)), ("b", 8, 16.0, (27, 28, 29)), ("c", 4, 0.0, (26, 29)))
    return {n: (adapter_file.write(tmp_path / f"{n}.gguf", "llama", alpha, _pairs(i, r, layers), prov), alpha)
            for i, (n, r, alpha, layers) in enumerate(spec)}


def test_the_combined_change_is_the_weighted_sum_of_the_adapters_changes(three, tmp_path):
    w = [0.5, 0.3, -0.2]
    r = average([str(p) for p, _ in three.values()], tmp_path / "soup.gguf", weights=w)
    assert r["tensors"] == 4 and r["ranks"] == [4, 12, 16] and r["weights"] == w
    got_pairs, alpha = adapter_file.read_lora(r["path"])
    got = _delta(got_pairs, alpha)
    want: dict = {}
    for (p, _), wi in zip(three.values(), w, strict=True):
        pairs, al = adapter_file.read_lora(p)
        for t, d in _delta(pairs, al).items():
            want[t] = want.get(t, 0) + wi * d
    assert sorted(got) == sorted(want)
    for t, d in want.items():
        assert np.allclose(got[t], d, atol=1e-5), t
    meta = adapter_file.read_meta(r["path"])
    first = adapter_file.read_meta(three["a"][0])
    assert meta["ondevice.adapter.base_sha256"] == first["ondevice.adapter.base_sha256"]
    assert [x["weight"] for x in meta["ondevice.adapter.averaged_from"]] == w
    assert [x["sha256"] for x in meta["ondevice.adapter.averaged_from"]] == [cached_sha256(p) for p, _ in
                                                                             three.values()]


def test_llama_cpp_gives_the_same_logits_as_the_adapters_applied_together(three, tmp_path, smol_path):
    """Weights 1 and 1 in one file = both adapters loaded at once (llama.cpp adds their changes)."""
    a, b = str(three["a"][0]), str(three["b"][0])
    one = average([a, b], tmp_path / "sum.gguf", weights=[1.0, 1.0])["path"]
    together = _logits_with(smol_path, (a, b))
    assert np.abs(together - _logits_with(smol_path, (one,))).max() < 2e-3
    assert np.abs(together - _logits_with(smol_path, (a,))).max() > 0.05  # b's change is there at all


def test_the_cli_stores_a_soup_that_runs_by_name_and_refuses_what_cannot_be_combined(three, tmp_path, cli):
    a, b, c = (str(p) for p, _ in three.values())
    r = cli("adapt", "average", a, b, "--name", "soup")
    assert r.returncode == 0, r.stderr
    # each input as given (two inputs with one stem stay apart), the rank said to be the inputs' stacked
    assert f"{a} x 0.5, {b} x 0.5; 3 tensors, rank 12 (the inputs' ranks add up" in r.stdout
    assert "ondevice run --adapter soup" in r.stderr
    run = cli("run", "--adapter", "soup", "-n", "3", "--temp", "0", "Hello")
    assert run.returncode == 0, run.stderr
    js = json.loads(cli("adapt", "average", a, c, "--weights", "2,-1", "-o", str(tmp_path / "x.gguf"), "--json").stdout)
    assert js["weights"] == [2.0, -1.0] and js["name"] is None
    alien = adapter_file.write(tmp_path / "alien.gguf", "llama", 8.0, _pairs(9, 4),
                               {"base_sha256": "0" * 64, "base_name": "another-model"})
    before = sorted(p.name for p in tmp_path.iterdir())
    for args, msg in (((a,), "needs two or more adapters"),
                      ((a, b, "--weights", "1"), "--weights has 1 values for 2 adapters"),
                      ((a, b, "--weights", "1,x"), "give numbers separated by commas"),
                      ((a, b, "--weights", "1,nan"), "every weight must be a finite number"),
                      ((a, b, "--weights", "0,0"), "the adapter would change nothing"),
                      ((a, str(alien), "-o", str(tmp_path / "y.gguf")), "trained on different base models"),
                      ((a, b), "give -o OUT.gguf or --name NAME"),
                      ((a, b, "-o", str(tmp_path)), "is a directory"),
                      ((a, "nope", "--name", "z"), "adapt average nope: no such adapter file or stored adapter")):
        bad = cli("adapt", "average", *args)
        assert bad.returncode == 2 and msg in bad.stderr and "Traceback" not in bad.stderr, (args, bad.stderr)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written by a refused run
    m = cli("adapt", "merge", a, b)
    assert m.returncode == 2 and "merge takes one adapter" in m.stderr


def test_average_and_merge_replace_an_adapter_or_model_only_with_force(three, tmp_path, cli):
    """A typo'd --name used to replace a trained adapter (or a merged model) without a word, where PEFT's
    add_weighted_adapter refuses an existing name."""
    a, b, c = (str(p) for p, _ in three.values())
    assert cli("adapt", "average", a, b, "--name", "soup").returncode == 0
    home = tmp_path / "home"
    kept = (home / "adapters" / "soup.gguf").read_bytes()
    again = cli("adapt", "average", a, c, "--name", "soup")
    assert again.returncode == 2 and "adapt average would replace the adapter " in again.stderr, again.stderr
    assert "soup.gguf (made " in again.stderr and "give another name, or --force to replace it" in again.stderr
    assert (home / "adapters" / "soup.gguf").read_bytes() == kept
    out = tmp_path / "x.gguf"
    out.write_bytes(b"a file of the user's")
    assert cli("adapt", "average", a, c, "-o", str(out)).returncode == 2 and out.read_bytes() == b"a file of the user's"
    assert cli("adapt", "average", a, c, "--name", "soup", "--force").returncode == 0
    assert (home / "adapters" / "soup.gguf").read_bytes() != kept
    first = cli("adapt", "merge", "soup")
    assert first.returncode == 0, first.stderr
    merged = home / "models" / "smollm2-135m-instruct-soup.gguf"
    made = merged.stat().st_mtime_ns
    second = cli("adapt", "merge", "soup")
    assert second.returncode == 2 and "adapt merge would replace the model " in second.stderr, second.stderr
    # merge has no --name
    assert "; write to another path (-o), or --force to replace it" in second.stderr, second.stderr
    assert merged.stat().st_mtime_ns == made
    assert cli("adapt", "merge", "soup", "--force").returncode == 0 and merged.stat().st_mtime_ns != made


def test_a_scale_multiplies_the_adapters_change_as_llama_cpp_applies_it(three, tmp_path, smol_path):
    a = str(three["a"][0])
    twice = average([a, a], tmp_path / "twice.gguf", weights=[1.0, 1.0])["path"]  # the change x 2, in one file
    base, one = _logits_with(smol_path, ()), _logits_with(smol_path, (a,))
    assert np.abs(_logits_with(smol_path, (f"{a}:0",)) - base).max() < 1e-4  # scale 0: the base
    assert np.abs(_logits_with(smol_path, (f"x={a}:1",)) - one).max() < 1e-4
    doubled = _logits_with(smol_path, (f"{a}:2",))
    assert np.abs(doubled - _logits_with(smol_path, (twice,))).max() < 2e-3 and np.abs(doubled - one).max() > 0.05


def test_run_and_eval_take_a_scaled_adapter_and_eval_records_the_scale(three, tmp_path, cli):
    a = str(three["a"][0])
    plain = cli("run", "-n", "6", "--temp", "0", "Hello")
    live = cli("run", "--adapter", a, "-n", "6", "--temp", "0", "Hello")
    off = cli("run", "--lora-scaled", a, "0", "-n", "6", "--temp", "0", "Hello")
    assert plain.returncode == live.returncode == off.returncode == 0, off.stderr
    assert off.stdout == plain.stdout != live.stdout  # scale 0 changes nothing; scale 1 does
    bad = cli("run", "--lora-scaled", a, "half", "-n", "2", "Hello")
    assert bad.returncode == 2 and "SCALE must be a number" in bad.stderr, bad.stderr
    ppl = ("eval", "--ppl", "--ctx", "64", "--chunks", "2", "--threads", "2", "--json", "--no-store")
    recs = [json.loads(cli(*ppl, *extra).stdout.splitlines()[0]) for extra in
            ((), ("--adapter", f"{a}:0"), ("--adapter", f"{a}:0.5"), ("--adapter", a))]
    assert recs[1]["adapter_scale"] == 0.0 and recs[1]["ppl"] == pytest.approx(recs[0]["ppl"], rel=1e-4)
    assert recs[2]["adapter_scale"] == 0.5 and recs[3].get("adapter_scale") is None
    assert recs[2]["ppl"] != pytest.approx(recs[3]["ppl"], rel=1e-3) and recs[2]["adapter"] == a
    shown = cli(*ppl[:-2], "--no-store", "--adapter", f"{a}:0.5")
    assert shown.returncode == 0 and "+ adapter a.gguf x 0.5 (sha256" in shown.stdout + shown.stderr, shown.stderr


def test_an_adapter_applies_to_another_quantization_of_its_base_with_a_warning(three, tmp_path, cli, smol_path):
    """llama.cpp and Ollama apply a LoRA to any quantization of the model it was trained on; the sha256 check
    refused it as "another base model". The same model in another file (same name, architecture, vocabulary and
    tensor shapes) is now applied with a warning; another model is still refused."""
    a = str(three["a"][0])
    q8 = tmp_path / "smol-q8_0.gguf"
    r = cli("quantize", str(smol_path), str(q8), "Q8_0", "--allow-requantize")
    assert r.returncode == 0, r.stderr
    run = cli("run", "-m", str(q8), "--adapter", a, "-n", "3", "--temp", "0", "Hello")
    assert run.returncode == 0, run.stderr
    assert "ondevice run: warning: --adapter a.gguf was trained on smollm2-135m-instruct (sha256 " in run.stderr
    assert "smol-q8_0.gguf is the same model (" in run.stderr and "another quantization most likely" in run.stderr
    other = tmp_path / "renamed.gguf"  # the same shapes under another model name: not provably the same model
    from gguf import GGUFReader

    reader = GGUFReader(q8)
    field = reader.fields["general.name"]
    raw = bytearray(q8.read_bytes())
    start = field.parts[field.data[0]].ctypes.data - reader.data.ctypes.data  # the name's bytes, same length
    old = bytes(raw[start:start + len(field.parts[field.data[0]])])
    raw[start:start + len(old)] = b"X" * len(old)
    other.write_bytes(bytes(raw))
    refused = cli("run", "-m", str(other), "--adapter", a, "-n", "3", "Hello")
    assert refused.returncode == 2, refused.stderr
    assert "was trained on another base model (smollm2-135m-instruct" in refused.stderr
    assert "which differs in its name, architecture or tensor shapes" in refused.stderr


def test_a_kill_during_merge_leaves_no_half_written_model(three, tmp_path):
    """SIGTERM mid-merge ended the process at once and left the hidden .part (the model's size) in the store."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from conftest import as_a_shell_starts_it

    home = tmp_path / "home"
    store = home / "models"
    proc = subprocess.Popen([sys.executable, "-m", "ondevice.cli", "adapt", "merge", str(three["a"][0]), "--type",
                             "f32"], env=dict(os.environ, ONDEVICE_HOME=str(home)), stderr=subprocess.PIPE, text=True,
                            preexec_fn=as_a_shell_starts_it)  # noqa: PLW1509 — no threads yet
    try:
        deadline = time.monotonic() + 120
        while not (store.is_dir() and any(p.name.endswith(".part") for p in store.iterdir())):
            assert proc.poll() is None and time.monotonic() < deadline, "merge ended before its file was written"
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        err = proc.communicate(timeout=60)[1]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 143, err
    assert not [p.name for p in store.iterdir() if p.name.startswith(".")], list(store.iterdir())
    assert "Traceback" not in err


def test_a_lora_of_bf16_or_q8_0_tensors_reads_as_its_values(tmp_path):
    """convert_lora_to_gguf.py --outtype bf16 / q8_0 / auto writes such tensors; merge and average read their raw
    bytes as numbers (a wrong shape refused, or a broken file written)."""
    import gguf

    T = gguf.GGMLQuantizationType
    a, b = _pairs(5, 4, layers=(29,))["blk.29.attn_v.weight"]
    for types in ((T.BF16, T.BF16), (T.Q8_0, T.BF16)):  # a (4, 576) takes Q8_0's blocks of 32; b (192, 4) does not
        path = tmp_path / f"conv-{types[0].name}.gguf"
        w = gguf.GGUFWriter(str(path), arch="llama")
        w.add_type(gguf.GGUFType.ADAPTER)
        w.add_string(gguf.Keys.Adapter.TYPE, "lora")
        w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, 8.0)
        for suffix, m, t in ((".lora_a", a, types[0]), (".lora_b", b, types[1])):
            w.add_tensor("blk.29.attn_v.weight" + suffix, gguf.quants.quantize(m, t), raw_dtype=t)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        pairs, alpha = adapter_file.read_lora(path)
        got_a, got_b = pairs["blk.29.attn_v.weight"]
        assert alpha == 8.0
        assert got_a.shape == a.shape and got_b.shape == b.shape
        np.testing.assert_allclose(got_a, a, atol=0.02 * np.abs(a).max())
        np.testing.assert_allclose(got_b, b, atol=0.01 * np.abs(b).max())


def test_an_adapter_of_a_base_given_by_path_merges_onto_that_file(three, tmp_path, cli, smol_path):
    """A base given by path was recorded by its file's stem only: `adapt merge NAME` said "unknown model"."""
    copy = tmp_path / "my-base.gguf"
    copy.write_bytes(Path(smol_path).read_bytes())
    a, b = _pairs(7, 4, layers=(29,))["blk.29.attn_v.weight"]
    prov = {"base_sha256": cached_sha256(copy), "base_name": "my-base", "base_path": str(copy)}
    adapter = adapter_file.write(tmp_path / "pathed.gguf", "llama", 8.0, {"blk.29.attn_v.weight": (a, b)}, prov)
    r = cli("adapt", "merge", str(adapter), "-o", str(tmp_path / "merged.gguf"))
    assert r.returncode == 0 and (tmp_path / "merged.gguf").is_file(), r.stderr
    copy.unlink()  # gone: the error names what was recorded and the flag that gives it
    r = cli("adapt", "merge", str(adapter), "-o", str(tmp_path / "merged2.gguf"))
    assert r.returncode == 2 and "was trained on my-base (sha256 " in r.stderr and "give the base with -m PATH" \
        in r.stderr, r.stderr


@pytest.mark.parametrize("verb", ["average", "merge"])
def test_a_kill_just_after_the_rename_says_the_file_is_in_place_not_that_nothing_was_written(three, tmp_path, verb):
    """A SIGTERM in the microseconds after the finished file was renamed into place said "stopped by SIGTERM before
    OUT was complete; nothing was written" with OUT whole in place. The kill is sent by a patched os.replace right
    after the rename (sitecustomize: in the real CLI's supervised child as in its parent, which never renames OUT)."""
    import os
    import subprocess
    import sys

    from conftest import as_a_shell_starts_it

    out = tmp_path / f"out-{verb}.gguf"
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import os, signal\n_real = os.replace\n"
        "def _replace(a, b, **kw):\n    _real(a, b, **kw)\n"
        f"    if str(b) == {str(out)!r}:\n        os.kill(os.getpid(), signal.SIGTERM)\n"
        "os.replace = _replace\n")
    args = ["average", str(three["a"][0]), str(three["b"][0])] if verb == "average" else \
        ["merge", str(three["a"][0]), "--type", "f32"]
    r = subprocess.run([sys.executable, "-m", "ondevice.cli", "adapt", *args, "-o", str(out)],
                       env=dict(os.environ, ONDEVICE_HOME=str(tmp_path / "home"),
                                PYTHONPATH=os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])),
                       capture_output=True, text=True, timeout=300, preexec_fn=as_a_shell_starts_it)  # noqa: PLW1509
    assert r.returncode == 143, r.stderr
    assert f"stopped by SIGTERM after {out} was complete: {out} is in place, whole" in r.stderr, r.stderr
    assert "nothing was written" not in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert out.is_file() and not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    if verb == "average":  # the file in place reads whole (each raises on a damaged file)
        adapter_file.read_meta(out)
    else:
        from ondevice.models.gguf_check import validate_gguf

        validate_gguf(out)


def test_an_adapter_is_refused_on_the_model_it_was_merged_into(three, tmp_path, smol_path):
    """`run -m BASE-ADAPTER --adapter ADAPTER` applied the change a second time, with a warning that called the merged
    file "the same model in another quantization"."""
    import ondevice
    from ondevice.adapt.merge import merge
    from ondevice.errors import InvalidArgument

    out = merge(str(three["a"][0]), str(tmp_path / "merged.gguf"), model=str(smol_path), out_type="q8_0")["path"]
    with pytest.raises(InvalidArgument, match=r"^--adapter a.gguf is already merged into merged.gguf .*count twice; "
                                              r"run merged.gguf without --adapter, or apply the adapter to its base"):
        ondevice.load(out, n_ctx=256, adapters=(str(three["a"][0]),))
    with pytest.warns(UserWarning, match="same model"):  # another adapter of the same base still applies to it
        ondevice.load(out, n_ctx=256, adapters=(str(three["b"][0]),)).close()
