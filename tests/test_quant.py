"""``ondevice quantize``: real llama.cpp quantization, read back with gguf-py, loaded and run."""

from __future__ import annotations

from collections import Counter

import pytest

from ondevice.errors import InvalidArgument, OndeviceError
from ondevice.quant import quantize, weight_types
from ondevice.quant.quantize import default_name, main_type, parse_overrides, run_worker


@pytest.fixture()
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("ONDEVICE_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def test_names_and_parsing():
    assert default_name("smollm2-135m-instruct", "Q8_0") == "smollm2-135m-instruct-q8_0"
    assert default_name("SmolLM2-135M-Instruct.Q4_1", "F16") == "smollm2-135m-instruct-f16"
    assert main_type("Q4_K_M") == "Q4_K" and main_type("Q8_0") == "Q8_0"
    assert parse_overrides(["ffn_down=q8_0", "a=b=F16"]) == [("ffn_down", "Q8_0"), ("a=b", "F16")]
    with pytest.raises(InvalidArgument, match="not a ggml tensor type"):
        parse_overrides(["ffn_down=Q9"])
    with pytest.raises(InvalidArgument, match="not a valid regex"):
        parse_overrides(["ffn_down[=Q8_0"])
    with pytest.raises(InvalidArgument, match="REGEX=TYPE"):
        parse_overrides(["ffn_down"])
    with pytest.raises(InvalidArgument, match="'I32' is not a type llama.cpp quantizes weights to"):
        parse_overrides(["attn_q=I32"])  # llama.cpp aborted on it (a 600-character error blaming the model)


def test_llama_quantizes_positional_order_never_takes_threads_for_the_type(home, cli, tmp_path):
    """`MODEL Q4_K 2` (llama-quantize's alias, then threads) wrote a Q4_0 (type 2) into a file named Q4_K; Q4_K
    is Q4_K_M, a word that is neither a type nor an output file is refused, and quantize's -t N is no thread count."""
    from ondevice.quant.quantize import file_type

    assert [file_type(w) for w in ("Q4_K", "q5_k", "Q3_K", "7", 15, "Q4_KM")] == ["Q4_K_M", "Q5_K_M", "Q3_K_M",
                                                                                  "Q8_0", "Q4_K_M", None]
    x = str(tmp_path / "x.gguf")
    for args, said in ((["Q4_KM", "2"], "'Q4_KM' is not a llama.cpp file type (`--type list` shows them), nor an"),
                       ([x, "BOGUS", "1"], "'BOGUS' is not a llama.cpp file type"),
                       ([x, "-t", "2"], "-t 2: quantize's -t is the file type, not the threads")):
        r = cli("quantize", "smollm2", *args, "--allow-requantize")
        assert r.returncode == 2 and said in r.stderr, (args, r.stderr)
    assert list(tmp_path.iterdir()) == [tmp_path / "home"] or not (tmp_path / "x.gguf").exists()
    r = cli("quantize", "--type", "list")  # no model needed to list the types
    assert r.returncode == 0 and "Q4_K_M" in r.stdout, r.stderr


def test_invalid_type_is_a_clear_error(home, cli):
    with pytest.raises(InvalidArgument, match="not a llama.cpp quantization type.*Q8_0"):
        quantize(None, "Q9_9")
    r = cli("quantize", "smollm2", "--type", "Q9_9")
    assert r.returncode == 2
    assert "not a llama.cpp quantization type" in r.stderr and "Traceback" not in r.stderr


def test_variant_names_are_checked_before_quantizing(home, cli):
    for bad in ("../evil", "a b/c", ".hidden", "x/y"):
        with pytest.raises(InvalidArgument, match=r"--name .* is not allowed; use letters, digits"):
            quantize(None, "Q4_0", bad, allow_requantize=True)
    r = cli("quantize", "smollm2", "--type", "Q4_0", "--allow-requantize", "--name", "../evil")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "--name '../evil' is not allowed" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not list((home / "models").glob("*")) if (home / "models").exists() else True


def test_requantize_must_be_asked_for(home):
    with pytest.raises(InvalidArgument, match="--allow-requantize"):
        quantize(None, "Q8_0")  # the shipped file is Q4_1
    with pytest.raises(InvalidArgument, match="only when the target type is quantized"):
        quantize(None, "F16", overrides=["ffn_down=Q8_0"], allow_requantize=True)


def test_f16_then_q8_0_with_override_is_loadable_and_typed(home):
    import ondevice

    f16 = quantize(None, "F16", allow_requantize=True, threads=2)  # dequantize the shipped Q4_1
    assert f16.name == "smollm2-135m-instruct-f16"
    assert set(weight_types(f16.path).values()) == {"F16"}
    q8 = quantize(f16.name, "Q8_0", name="smol-q8-mixed", overrides=["ffn_down=Q4_0"], threads=2)
    types = weight_types(q8.path)  # read back by gguf-py's GGUFReader
    assert {t for n, t in types.items() if "ffn_down" in n} == {"Q4_0"}
    assert {t for n, t in types.items() if "ffn_down" not in n} == {"Q8_0"}
    prov = q8.provenance["provenance"]
    assert prov["type"] == "Q8_0" and prov["overrides"] == ["ffn_down=Q4_0"]
    assert prov["source_sha256"] == f16.provenance["sha256"]
    assert prov["tensor_types"]["warnings"] == []
    # quantize checked the output with our header walk; gguf-py's reader, independent of it, agrees
    assert prov["tensor_types"]["quant_mix"] == dict(Counter(types.values()))
    assert ondevice.models.resolve("smol-q8-mixed").path == q8.path
    m = ondevice.load("smol-q8-mixed", n_ctx=64, n_threads=2)
    try:
        res = m.generate("Hi", temp=0, max_tokens=4)
        assert len(res.tokens) >= 1
    finally:
        m.close()
    with pytest.raises(InvalidArgument, match="already exists"):
        quantize(f16.name, "Q8_0", name="smol-q8-mixed")


def test_llama_cpp_failure_is_reported_not_fatal(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(OndeviceError, match="could not quantize|crashed"):
        run_worker(bad, tmp_path / "out.gguf", 7, [], False, 1, timeout=60)


def test_type_numbers_are_llama_quantizes(home, cli):
    """llama-quantize takes a file type's number as well as its name (7: Q8_0, as `--type list` shows)."""
    r = cli("quantize", "smollm2", "--type", "7", "--allow-requantize", "--name", "smol-by-number", "--threads", "2")
    assert r.returncode == 0, r.stderr
    assert "matrices: Q8_0" in r.stdout, r.stdout
    r = cli("quantize", "smollm2", "--type", "999")
    assert r.returncode == 2 and "--type 999 is no llama.cpp file type number" in r.stderr


def test_llama_quantizes_order_writes_the_file_given_not_a_variant(home, cli, tmp_path):
    """``ondevice quantize IN OUT TYPE [THREADS]``, as llama-quantize; the store is untouched."""
    out = tmp_path / "out" / "smol-q8.gguf"  # its folder is made, as `cascade export -o` and every writer make it
    r = cli("quantize", "smollm2", str(out), "q8_0", "2", "--allow-requantize")
    assert r.returncode == 0, r.stderr
    assert f"{out} (" in r.stdout and "matrices: Q8_0" in r.stdout, r.stdout
    assert set(weight_types(out).values()) <= {"Q8_0", "F32"} and not list(out.parent.glob(".*tmp"))
    assert not (home / "models").exists() or not list((home / "models").glob("*.gguf"))
    before = out.stat().st_mtime_ns
    for args, said in (
        ((str(out), "Q8_0", "--allow-requantize"), "exists; pass --force"),
        (("-o", str(out / "x.gguf"), "-t", "Q8_0"), f"{out} is a file, not a folder; give another -o"),
        (("-o", str(out.parent), "-t", "Q8_0"), "is a folder; give the file to write, e.g. "
                                                 f"{out.parent}/SmolLM2-135M-Instruct.Q8_0.gguf"),
        (("-o", str(tmp_path / "newdir") + "/", "-t", "Q8_0"), "is a folder (it ends in /)"),  # wrote a FILE 'newdir'
        (("-o", str(out), "--name", "v", "-t", "Q8_0"), "give one of them"),
        (("Q9_9",), "'Q9_9' names no llama.cpp file type"),
        ((), "no file type given"),
        ((str(out), "Q8_0", "2", "extra"), "cannot read 'extra'"),
    ):
        r = cli("quantize", "smollm2", *args)
        assert r.returncode == 2 and said in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)
    r = cli("quantize", str(out), str(out), "Q4_0", "--allow-requantize", "--force")
    assert r.returncode == 2 and "is the model being quantized" in r.stderr, r.stderr
    assert out.stat().st_mtime_ns == before  # nothing the user had was touched
    assert not (tmp_path / "newdir").exists()
    r = cli("quantize", str(out), str(out.with_name("q4.gguf")), "2", "--allow-requantize")  # 2 is Q4_0
    assert r.returncode == 0 and "matrices: Q4_0" in r.stdout, r.stderr
