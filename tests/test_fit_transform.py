"""``fit.transform``: the equivalent per-channel scaling computes the same function through the real llama.cpp
engine (KLD ~ 0, same greedy tokens), its importance matrix is the one the transformed model really produces,
it is refused on architectures it is not checked on, and ``fit(transform="on")`` builds from it."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import home_with_f16

from ondevice.errors import InvalidArgument

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Water boils at"]


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """An isolated store holding the F16 reference (dequantized from the shipped file), as test_fit's."""
    with home_with_f16(tmp_path_factory.mktemp("transform-home")) as f16:
        yield f16


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    from ondevice.eval.corpora import pydoc

    p = tmp_path_factory.mktemp("transform-text") / "calib.txt"
    p.write_text(pydoc().text[:20000])
    return p


@pytest.fixture(scope="module")
def made(home, calib, tmp_path_factory):
    """(imatrix, transformed F16, its predicted imatrix, the scales) at alpha 0.5."""
    from ondevice.fit.imatrix import collect
    from ondevice.fit.transform import transform

    d = tmp_path_factory.mktemp("transform")
    collect(home, calib, d / "im.npz", n_ctx=64, n_chunks=2)
    sc = transform(home, d / "im.npz", d / "t.gguf", alpha=0.5, imatrix_out=d / "im-t.npz")
    return d / "im.npz", d / "t.gguf", d / "im-t.npz", sc


def _kld(path, ref, text) -> dict:
    import ondevice
    from ondevice.fit.measure import kld_of

    return kld_of(ondevice.evaluate(str(path), ref=str(ref), text=str(text), ctx=64, chunks=2, threads=1,
                                    store=False))


def _greedy(path) -> list[list[int]]:
    import ondevice

    m = ondevice.load(str(path), n_ctx=256, n_threads=1)
    try:
        return [m.generate(p, chat_template=False, temp=0.0, max_tokens=12).tokens for p in PROMPTS]
    finally:
        m.close()


def test_transformed_f16_is_the_same_function(home, calib, made):
    from gguf import GGUFReader

    _, tpath, _, sc = made
    # the weights really moved: scales far from 1, and the matrices differ from the original's
    assert max(float(s.max() / s.min()) for s in sc.values()) > 4
    a, b = ({t.name: t.data for t in GGUFReader(str(p)).tensors} for p in (home, tpath))
    assert np.abs(a["blk.3.attn_q.weight"].astype(np.float32) - b["blk.3.attn_q.weight"]).max() > 0.01
    assert not np.array_equal(a["blk.3.ffn_norm.weight"], b["blk.3.ffn_norm.weight"])
    k = _kld(tpath, home, calib)
    assert k["kld"] < 1e-4, k  # F16 rounding of the rescaled weights only (a Q8_0 copy is ~1e-3)
    assert k["top1"] > 0.95
    assert _greedy(tpath) == _greedy(home)


def test_a_non_equivalent_scaling_is_caught(home, calib, made, tmp_path, monkeypatch):
    """The same check fails when the columns are not compensated (only the norms divided): it can fail."""
    from ondevice.fit import transform as tr

    real = tr._effects
    monkeypatch.setattr(tr, "_effects", lambda *a: {n: (r, None) for n, (r, _) in real(*a).items()})
    tr.transform(home, made[0], tmp_path / "bad.gguf", alpha=0.5)
    assert _kld(tmp_path / "bad.gguf", home, calib)["kld"] > 0.05


def test_transformed_imatrix_is_what_the_transformed_model_produces(calib, made, tmp_path):
    from ondevice.fit.imatrix import collect
    from ondevice.fit.transform import load_imatrix

    im, tpath, im_t, _ = made
    collect(tpath, calib, tmp_path / "real.npz", n_ctx=64, n_chunks=2)
    old, pred, real = load_imatrix(im), load_imatrix(im_t), load_imatrix(tmp_path / "real.npz")
    assert pred.keys() == real.keys() == old.keys()

    def rel(x, y):
        return np.abs(x - y) / (np.abs(y) + 1e-3 * y.max())

    assert max(float(np.median(rel(pred[k], real[k]))) for k in real) < 0.01
    assert max(float(rel(old[k], real[k]).max()) for k in real) > 0.5  # the transform did change it


def test_other_architectures_and_quantized_files_are_refused(made, tmp_path, monkeypatch):
    from ondevice.fit.transform import choose, transform
    from ondevice.models.catalog import resolve

    with pytest.raises(InvalidArgument, match=r"'gemma3' model.*only implemented for llama.*--transform off"):
        transform(resolve("gemma3-270m").path, made[0], tmp_path / "g.gguf")
    # ``--transform auto`` skips such a model (said in the fit's output), ``on`` refuses it
    said = []
    gemma = type("Ref", (), {"path": resolve("gemma3-270m").path})
    skipped = choose("auto", None, gemma, {}, None, None, None, None, None, tmp_path, said.append)
    assert not skipped.used and said == ["equivalent transform: not tried: gemma3-270m.gguf is not a llama model"]
    with pytest.raises(InvalidArgument, match="'gemma3' model"):
        choose("on", None, gemma, {}, None, None, None, None, None, tmp_path, said.append)
    with pytest.raises(InvalidArgument, match=r"unquantized reference.*Q8_0"):
        transform(resolve(None).path, made[0], tmp_path / "q.gguf")
    with pytest.raises(InvalidArgument, match="--transform 'sometimes' must be auto, on or off"):
        import ondevice

        ondevice.fit(None, "", transform="sometimes")
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*part"))
    # a fit refuses it at once (it came after the reference, the speed table and the imatrix: minutes)
    from ondevice.fit import api

    monkeypatch.setattr(api, "reference_for", lambda *a, **k: pytest.fail("the reference was made first"))
    with pytest.raises(InvalidArgument, match="'gemma3' model"):
        ondevice.fit("gemma3-270m", "size<=250MB", transform="on", store=False)


def test_fit_with_transform_on_builds_from_the_transformed_reference(home, monkeypatch):
    import ondevice
    from ondevice.fit import transform
    from ondevice.models.catalog import read_provenance, resolve

    monkeypatch.setattr(transform, "ALPHAS", (0.5,))  # one grid point: the hook is tested, not the grid
    r = ondevice.fit(None, "", name="smol-fit-t", types=("Q8_0", "Q4_0"), groups=("ffn_down",), threads=1,
                     calib_ctx=64, calib_chunks=1, eval_ctx=64, eval_chunks=1, validate=1, imatrix="off",
                     transform="on", speed_tests=("pp32", "tg8"), repetitions=1)
    assert r.transform["used"] and set(r.transform["grid"]) == {"0.5"}
    assert any("equivalent transform on the lowest plan" in ln for ln in r.lines)
    prov = read_provenance(resolve("smol-fit-t").path)["provenance"]
    assert prov["transform"]["used"] and prov["transform"]["alpha"] == r.transform["alpha"]
    from gguf import GGUFReader

    keys = GGUFReader(str(r.path)).fields
    assert "ondevice.transform.alpha" in keys  # the stored file was quantized from the transformed F16


def test_auto_keeps_the_transform_per_candidate_only_where_it_lowers_its_kld(home, monkeypatch):
    # the decision at the lowest plan (all Q4_0, where the transform helps) was applied to every candidate, and
    # at Q4_1 it costs KLD: now each validated candidate is also built untransformed and keeps the better file
    from gguf import GGUFReader

    import ondevice
    from ondevice.fit import transform
    from ondevice.fit.imatrix import lowers_kld
    from ondevice.models.catalog import read_provenance, resolve

    monkeypatch.setattr(transform, "ALPHAS", (0.5,))
    r = ondevice.fit(None, "", name="smol-fit-auto", types=("Q8_0", "Q4_1", "Q4_0"), groups=("ffn_down",),
                     threads=1, calib_ctx=64, calib_chunks=2, eval_ctx=64, eval_chunks=2, validate=3,
                     imatrix="off", transform="auto", speed_tests=("pp32", "tg8"), repetitions=1)
    assert r.transform["used"], r.lines  # the lowest plan gained: the per-candidate check runs
    kept = {}
    for c in r.candidates:
        t = c.measured["transform"]
        assert t["used"] == lowers_kld({"kld": t["kld_without"], "kld_err": t["kld_err_without"]},
                                       {"kld": t["kld_with"], "kld_err": t["kld_err_with"]})
        assert c.measured["kld"] == (t["kld_with"] if t["used"] else t["kld_without"])
        kept[c.summary()] = t["used"]
    assert False in kept.values(), (kept, r.lines)  # some candidate (the Q4_1 or all-Q8_0 one) keeps the plain file
    for c in r.candidates:  # each decision is printed with both KLDs
        said = "kept" if c.measured["transform"]["used"] else "not kept"
        assert any(f"{c.summary()}: the transform is {said} (held-out KLD" in ln for ln in r.lines), r.lines
    chosen_used = r.chosen.measured["transform"]["used"]
    assert ("ondevice.transform.alpha" in GGUFReader(str(r.path)).fields) == chosen_used
    prov = read_provenance(resolve("smol-fit-auto").path)["provenance"]
    assert prov["transform"]["chosen"] == chosen_used and prov["measured"]["transform"]["used"] == chosen_used
