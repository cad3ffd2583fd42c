"""``ondevice quantize`` as a llama-quantize user meets it: the warning when most tensors fell back from the type
asked for (any type, not only K-quants), the old repacked types and threads given twice named as such, and the
library door ``ondevice.quantize`` whose errors name its own arguments."""

from __future__ import annotations

import pytest

from ondevice.errors import InvalidArgument


@pytest.mark.parametrize("typ, words", [
    # SmolLM2's 576-wide rows do not fit 256-value blocks: IQ4_XS falls back to IQ4_NL, TQ2_0 to Q4_0
    ("IQ4_XS", "tensors are not IQ4_XS (llama.cpp fell back where a row does not fit its 256-value blocks"),
    ("TQ2_0", "tensors are not TQ2_0 (llama.cpp fell back where a row does not fit its 256-value blocks"),
    # a dense model has no expert tensors: every matrix is Q8_0
    ("MXFP4_MOE", "no weight tensor is MXFP4 (got {'Q8_0': 211}): MXFP4_MOE quantizes only MoE expert tensors"),
])
def test_a_type_most_tensors_fell_back_from_is_warned_about(cli, tmp_path, typ, words):
    out = tmp_path / f"x-{typ}.gguf"
    r = cli("quantize", "smollm2-135m-instruct", str(out), typ, "1", "--allow-requantize")
    assert r.returncode == 0, r.stderr
    assert "warning: " in r.stderr and words in r.stderr, (r.stdout, r.stderr)


def test_a_type_that_holds_its_tensors_is_not_warned_about(cli, tmp_path):
    r = cli("quantize", "smollm2-135m-instruct", str(tmp_path / "x.gguf"), "Q4_0", "1", "--allow-requantize")
    assert r.returncode == 0 and "warning" not in r.stderr, r.stderr


@pytest.mark.parametrize("args, words", [
    (["{tmp}/x8.gguf", "Q4_0_4_4"], "Q4_0_4_4: Q4_0_4_4, Q4_0_4_8, Q4_0_8_8 are gone from llama.cpp; quantize to Q4_0"),
    (["--type", "q4_0_8_8"], "Q4_0_8_8: Q4_0_4_4, Q4_0_4_8, Q4_0_8_8 are gone from llama.cpp; quantize to Q4_0"),
    (["{tmp}/out.gguf", "Q4_K_M", "1", "--threads", "2"], "threads given twice (1 after the type and --threads 2)"),
])
def test_old_repacked_types_and_threads_given_twice_are_named(cli, tmp_path, args, words):
    args = [a.format(tmp=tmp_path) for a in args]  # outputs in tmp_path: none may be written
    r = cli("quantize", "smollm2-135m-instruct", *args, "--allow-requantize")
    assert r.returncode == 2 and words in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not list(tmp_path.rglob("*.gguf"))


def test_the_library_door_is_ondevice_quantize_and_its_errors_name_its_arguments(tmp_path, monkeypatch):
    import ondevice

    monkeypatch.setenv("ONDEVICE_HOME", str(tmp_path / "home"))
    assert "quantize" in ondevice.__all__
    out = tmp_path / "smol-q4.gguf"
    ref = ondevice.quantize(None, "q4_0", output=out, allow_requantize=True, threads=1)
    assert ref.path == out and ref.provenance["provenance"]["tensor_types"]["main_type"] == "Q4_0"
    with pytest.raises(InvalidArgument, match=r"exists; pass --force \(force=True\)"):
        ondevice.quantize(None, "q4_0", output=out, allow_requantize=True)
    with pytest.raises(InvalidArgument, match=r"--name \(name=\) names a stored variant and --output \(output=\)"):
        ondevice.quantize(None, "q4_0", "v", output=tmp_path / "v.gguf", allow_requantize=True)
    with pytest.raises(InvalidArgument, match=r"--override \(overrides=\) has no effect with --type F16"):
        ondevice.quantize(None, "F16", overrides=["ffn_down=Q8_0"], allow_requantize=True)
