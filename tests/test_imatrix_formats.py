"""quantize --imatrix reads llama-imatrix's files (imatrix.gguf and the legacy .dat) as llama-quantize does, and
ondevice's .npz: the same importance in any of the three makes the same quantized file."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from ondevice.quant.imatrix_file import read


def _importance(model_path) -> dict[str, np.ndarray]:
    """Made-up but plausible importance (positive, per input column) for every matrix of the model."""
    from gguf import GGUFReader

    rng = np.random.default_rng(0)
    return {t.name: rng.uniform(0.01, 4.0, int(t.shape[0])).astype(np.float32)
            for t in GGUFReader(model_path).tensors if len(t.shape) >= 2 and t.name.endswith(".weight")}


def write_dat(path, imp: dict[str, np.ndarray], ncall: int = 8) -> None:
    """llama-imatrix's legacy layout (--output-format dat): values stored as importance * ncall (a power of two
    here, so that the division back is exact and the three files hold the very same importance)."""
    out = [struct.pack("<i", len(imp))]
    for name, v in imp.items():
        out += [struct.pack("<i", len(name.encode())), name.encode(), struct.pack("<ii", ncall, v.size),
                (v * ncall).astype("<f4").tobytes()]
    out += [struct.pack("<i", 10), struct.pack("<i", 9), b"calib.txt"]  # chunks, then the calibration file
    path.write_bytes(b"".join(out))


def write_gguf(path, imp: dict[str, np.ndarray], count: int = 16) -> None:
    """llama-imatrix's GGUF layout: NAME.in_sum2 (sums of squares) and NAME.counts (tokens seen), F32."""
    from gguf import GGUFWriter

    w = GGUFWriter(str(path), arch="imatrix")
    w.add_string("general.type", "imatrix")
    w.add_array("imatrix.datasets", ["calib.txt"])
    w.add_uint32("imatrix.chunk_count", 10)
    w.add_uint32("imatrix.chunk_size", 512)
    for name, v in imp.items():
        w.add_tensor(f"{name}.in_sum2", (v * count).astype(np.float32).reshape(1, -1))
        w.add_tensor(f"{name}.counts", np.array([[count]], dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_the_three_formats_read_to_the_same_importance_and_quantize_the_same(cli, tmp_path, smol_path):
    imp = _importance(smol_path)
    np.savez(tmp_path / "im.npz", **imp)
    write_dat(tmp_path / "imatrix.dat", imp)
    write_gguf(tmp_path / "imatrix.gguf", imp)
    for f in ("im.npz", "imatrix.dat", "imatrix.gguf"):
        got = read(tmp_path / f)
        assert got.keys() == imp.keys(), f
        for k, v in imp.items():
            np.testing.assert_allclose(got[k], v, rtol=1e-6, err_msg=f"{f}: {k}")
    made = {}
    for f in ("im.npz", "imatrix.dat", "imatrix.gguf", None):
        out = tmp_path / f"q-{f or 'none'}.gguf"
        r = cli("quantize", str(smol_path), str(out), "Q4_0", "--allow-requantize",
                *(["--imatrix", str(tmp_path / f)] if f else []))
        assert r.returncode == 0, r.stderr
        made[f] = out.read_bytes()
    assert made["im.npz"] == made["imatrix.dat"] == made["imatrix.gguf"]
    assert made["im.npz"] != made[None]  # the importance did weigh the rounding


def test_a_gguf_count_of_zero_reads_as_one_as_llama_quantize_does(tmp_path):
    from gguf import GGUFWriter

    w = GGUFWriter(str(tmp_path / "moe.gguf"), arch="imatrix")
    w.add_tensor("blk.0.ffn_up_exps.weight.in_sum2", np.array([[2, 4], [6, 8]], dtype=np.float32))
    w.add_tensor("blk.0.ffn_up_exps.weight.counts", np.array([[2], [0]], dtype=np.float32))  # expert 1: no token
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    np.testing.assert_array_equal(read(tmp_path / "moe.gguf")["blk.0.ffn_up_exps.weight"], [1, 2, 1, 1])


@pytest.mark.parametrize(("make", "says"), [
    (lambda p, m: p.write_text("not a matrix\n"), "is neither an .npz, a GGUF nor llama-imatrix's legacy .dat"),
    (lambda p, m: p.write_bytes(m.read_bytes()[:4096]), "is not a readable GGUF"),
    (lambda p, m: write_dat(p, {"blk.0.attn_q.weight": np.ones(576, np.float32)}) or p.write_bytes(
        p.read_bytes()[:100]), "it ends inside entry 1"),
    (lambda p, m: np.savez(p, **{"model.layers.0.q_proj": np.ones(576, np.float32)}),
     ("names none of this model's weight tensors (it holds model.layers.0.q_proj, ...): it was collected on "
      "another model")),
])
def test_a_file_that_is_no_importance_matrix_for_this_model_is_named(cli, tmp_path, smol_path, make, says):
    bad = tmp_path / "bad.npz"
    make(bad, smol_path)
    r = cli("quantize", str(smol_path), str(tmp_path / "out.gguf"), "Q4_0", "--allow-requantize", "--imatrix",
            str(bad))
    assert r.returncode == 2 and says in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "out.gguf").exists()


def test_a_model_file_given_as_the_importance_matrix_is_named(tmp_path, smol_path):
    from ondevice.errors import InvalidArgument

    with pytest.raises(InvalidArgument, match="a GGUF without llama-imatrix's NAME.in_sum2 / NAME.counts tensors"):
        read(smol_path)
