"""A model split by llama-gguf-split (``NAME-00001-of-00003.gguf`` ...), as Hugging Face repos ship large
models: named by its first shard it runs, and is summarised as a whole; any other shard, a missing one or a
foreign one gets an error that names the file to pass or to fetch. The shards are written by gguf-py's own
splitting writer (what convert_hf_to_gguf.py --split-max-tensors uses) from the real default model."""

from __future__ import annotations

import shutil

import pytest

gguf = pytest.importorskip("gguf")

from ondevice.errors import InvalidArgument, InvalidModelFile
from ondevice.models import validate_gguf


@pytest.fixture(scope="module")
def split(smol_path, tmp_path_factory):
    """The default model written again in 3 shards; the first shard's path."""
    from ondevice.models.gguf_copy import writer_like

    folder = tmp_path_factory.mktemp("split")
    reader = gguf.GGUFReader(str(smol_path))
    per_shard = -(-len(reader.tensors) // 3)
    w = writer_like(reader, folder / "smol.gguf")
    w.split_max_tensors = per_shard
    for t in reader.tensors:
        w.add_tensor(t.name, t.data, raw_shape=None, raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    shards = sorted(folder.iterdir())
    assert [p.name for p in shards] == [f"smol-0000{i}-of-00003.gguf" for i in (1, 2, 3)]
    return shards[0]


def test_the_first_shard_summarises_the_whole_model(split, smol_path):
    whole, info = validate_gguf(smol_path), validate_gguf(split)
    shards = sorted(split.parent.glob("smol-*.gguf"))
    assert info.split_paths == tuple(shards[1:])
    assert info.file_size == sum(p.stat().st_size for p in shards)
    assert (info.parameters, info.tensor_bytes, info.quant_summary) == (
        whole.parameters, whole.tensor_bytes, whole.quant_summary)
    assert sorted(t.name for t in info.tensors) == sorted(t.name for t in whole.tensors)
    assert validate_gguf(split, deep=True).split_paths == info.split_paths  # gguf's reader agrees on shard 1


def test_it_runs_from_its_first_shard_as_the_single_file_does(cli, split, smol_path):
    one = cli("run", "-m", str(smol_path), "--temp", "0", "-n", "8", "The capital of France is")
    three = cli("run", "-m", str(split), "--temp", "0", "-n", "8", "The capital of France is")
    assert one.returncode == 0 and three.returncode == 0, three.stderr
    assert three.stdout == one.stdout and three.stdout.strip()
    r = cli("models", str(split))
    assert r.returncode == 0, r.stderr
    assert f"{validate_gguf(smol_path).params_label}" in r.stdout


def test_another_shard_names_the_first(cli, split):
    second = split.with_name("smol-00002-of-00003.gguf")
    with pytest.raises(InvalidModelFile, match=r"shard 2 of a model split in 3 files.*pass smol-00001-of-00003\.gguf"):
        validate_gguf(second)
    r = cli("run", "-m", str(second), "-n", "1", "Hi")
    assert r.returncode == 2 and "pass smol-00001-of-00003.gguf" in r.stderr and "Traceback" not in r.stderr


def test_a_missing_or_foreign_shard_is_named(split, tmp_path):
    for name in ("smol-00001-of-00003.gguf", "smol-00002-of-00003.gguf"):
        shutil.copy(split.with_name(name), tmp_path / name)
    with pytest.raises(InvalidModelFile, match=r"shard 3 of 3, smol-00003-of-00003\.gguf, is not beside it"):
        validate_gguf(tmp_path / "smol-00001-of-00003.gguf")
    shutil.copy(split.with_name("smol-00002-of-00003.gguf"), tmp_path / "smol-00003-of-00003.gguf")
    with pytest.raises(InvalidModelFile, match=r"smol-00003-of-00003\.gguf: not shard 3 of 3.*split\.no 1"):
        validate_gguf(tmp_path / "smol-00001-of-00003.gguf")
    shutil.copy(split, tmp_path / "renamed.gguf")
    with pytest.raises(InvalidModelFile, match=r"its name does not end in -00001-of-00003\.gguf"):
        validate_gguf(tmp_path / "renamed.gguf")


def test_one_file_readers_say_how_to_merge(split, tmp_path):
    pytest.importorskip("cryptography")
    from ondevice.protect import encrypt

    with pytest.raises(InvalidArgument, match=r"split in 3 files.*ondevice quantize .*smol\.gguf COPY"):
        encrypt(str(split), tmp_path / "smol.enc", "env:NOT_READ")
    assert not (tmp_path / "smol.enc").exists()


def test_quantize_copy_merges_the_shards_into_one_file(cli, split, smol_path, tmp_path):
    """llama-quantize's COPY: llama.cpp's quantizer loads every shard and writes each tensor as it is, so the
    merged file holds the model's tensors byte for byte (what the refusals above tell users to run)."""
    out = tmp_path / "whole.gguf"
    r = cli("quantize", str(split), str(out), "COPY")  # llama-quantize's argument order
    assert r.returncode == 0, r.stderr
    merged, whole = validate_gguf(out), validate_gguf(smol_path)
    assert merged.split_paths == () and merged.quant_summary == whole.quant_summary
    a, b = gguf.GGUFReader(str(out)), gguf.GGUFReader(str(smol_path))
    assert {t.name: bytes(t.data) for t in a.tensors} == {t.name: bytes(t.data) for t in b.tensors}
    r = cli("quantize", str(split), "-t", "Q8_0", "--allow-requantize")  # a variant, named after the model
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("smol-q8_0: ") and "Q8_0 " in r.stdout


def test_in_the_store_a_split_model_is_one_row_and_removed_whole(cli, split, tmp_path):
    """Shards pulled one by one land side by side in the store: `models` lists the model once (its whole size),
    `rm` of a later shard names the first, and `rm` of the first removes every shard."""
    store = tmp_path / "home" / "models"
    store.mkdir(parents=True)
    for p in sorted(split.parent.glob("smol-*.gguf")):
        shutil.copy(p, store / p.name)
    r = cli("models")
    assert r.returncode == 0, r.stderr
    rows = [ln for ln in r.stdout.splitlines() if ln.startswith("smol-")]
    assert len(rows) == 1 and rows[0].split()[0] == "smol-00001-of-00003", r.stdout
    assert f"{validate_gguf(split).size_mb:.1f} MB" in rows[0]
    r = cli("rm", "smol-00002-of-00003")
    assert r.returncode == 2 and "ondevice rm smol-00001-of-00003" in r.stderr
    assert len(list(store.glob("smol-*.gguf"))) == 3
    r = cli("rm", "smol-00001-of-00003")
    assert r.returncode == 0, r.stderr
    assert not list(store.glob("smol-*"))


def test_eval_records_the_whole_size_and_identity(cli, split):
    import hashlib

    r = cli("eval", "-m", str(split), "--ppl", "--ctx-size", "128", "--chunks", "2")
    assert r.returncode == 0, r.stderr
    # the model's sha256 is of every shard's bytes in order, not of the first shard alone
    whole = hashlib.sha256(b"".join(p.read_bytes() for p in sorted(split.parent.glob("smol-*.gguf")))).hexdigest()
    assert hashlib.sha256(split.read_bytes()).hexdigest() != whole
    assert f"smol-00001-of-00003 ({validate_gguf(split).size_mb:.1f} MB, sha256 {whole[:12]}, kernels " \
        in r.stdout + r.stderr


def test_serve_answers_from_it_and_reports_its_whole_size(split, tmp_path):
    """Served as llama-server serves it (-m FIRST): Ollama's /api/tags gives the whole model's size."""
    import json
    import urllib.request

    from conftest import serve_process

    with serve_process(tmp_path, "-m", str(split)) as (_, url, _log):  # url: the OpenAI base, .../v1
        with urllib.request.urlopen(f"{url.removesuffix('/v1')}/api/tags", timeout=30) as r:
            tags = json.load(r)["models"]
        assert [m["size"] for m in tags] == [validate_gguf(split).file_size]
        req = urllib.request.Request(f"{url}/completions", data=json.dumps(
            {"prompt": "The capital of France is", "max_tokens": 4, "temperature": 0}).encode(),
            headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            assert json.load(r)["choices"][0]["text"].strip()
