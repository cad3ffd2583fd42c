"""llama-quantize's tensor flags: --tensor-type (as --override), --output-tensor-type, --token-embedding-type,
--leave-output-tensor; --pure and the like refused by name. A real quantization of the default model."""

from __future__ import annotations

from ondevice.models import validate_gguf


def _types(path) -> dict[str, str]:
    return {t.name: t.type_name for t in validate_gguf(path).tensors}


def test_tensor_type_flags(cli, tmp_path):
    out = tmp_path / "q.gguf"
    r = cli("quantize", "smollm2", str(out), "Q4_0", "--allow-requantize", "--token-embedding-type", "Q5_0",
            "--tensor-type", "ffn_down=Q8_0", "--output-tensor-type", "Q6_K")
    assert r.returncode == 0, r.stderr
    types = _types(out)
    assert types["token_embd.weight"] == "Q5_0"  # --token-embedding-type wins for a tied embedding
    assert {t for n, t in types.items() if "ffn_down" in n} == {"Q8_0"}
    assert {t for n, t in types.items() if "attn_q.weight" in n} == {"Q4_0"}
    assert "output.weight" not in types  # SmolLM2 ties its output to the token embedding
    tied = tmp_path / "tied.gguf"  # then --output-tensor-type sets the embedding, as llama-quantize does
    r = cli("quantize", "smollm2", str(tied), "Q4_0", "--allow-requantize", "--output-tensor-type", "Q5_1")
    assert r.returncode == 0 and _types(tied)["token_embd.weight"] == "Q5_1", r.stderr
    kept = tmp_path / "kept.gguf"  # --leave-output-tensor: the tied embedding keeps its source type (Q8_0)
    r = cli("quantize", "smollm2", str(kept), "Q4_0", "--allow-requantize", "--leave-output-tensor")
    assert r.returncode == 0 and _types(kept)["token_embd.weight"] == "Q8_0", r.stderr
    r = cli("quantize", "smollm2", str(tmp_path / "p.gguf"), "Q4_0", "--pure")
    assert r.returncode == 2 and "--pure is llama-quantize's and does not apply here" in r.stderr
    r = cli("quantize", "smollm2", str(tmp_path / "p.gguf"), "Q4_0", "--leave-output-tensor", "--output-tensor-type",
            "Q8_0")
    assert r.returncode == 2 and "both set output.weight's type; give one" in r.stderr
