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
    assert types["token_embd.weight"] == "Q5_0"
    assert {t for n, t in types.items() if "ffn_down" in n} == {"Q8_0"}
    assert {t for n, t in types.items() if "attn_q.weight" in n} == {"Q4_0"}
    # SmolLM2 ties its output to the token embedding: there is no output.weight to set, and that is said
    assert "output.weight" not in types and "override ^output\\.weight$=Q6_K matched no tensor" in r.stderr
    r = cli("quantize", "smollm2", str(tmp_path / "p.gguf"), "Q4_0", "--pure")
    assert r.returncode == 2 and "--pure is llama-quantize's and does not apply here" in r.stderr
    r = cli("quantize", "smollm2", str(tmp_path / "p.gguf"), "Q4_0", "--leave-output-tensor", "--output-tensor-type",
            "Q8_0")
    assert r.returncode == 2 and "both set output.weight's type; give one" in r.stderr
