"""A path that is not a readable file gets one wording everywhere, naming what it is: no such file, a broken
link, a symbolic link loop, a directory, a device, a FIFO."""

from __future__ import annotations

import os

import pytest

from ondevice.errors import InvalidArgument, InvalidModelFile, ModelNotFound, path_problem


def test_path_problem_names_what_the_path_is(tmp_path):
    (tmp_path / "f.gguf").write_bytes(b"x")
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    (tmp_path / "dangling").symlink_to(tmp_path / "gone")
    (tmp_path / "ok").symlink_to(tmp_path / "f.gguf")
    os.mkfifo(tmp_path / "fifo")
    assert path_problem(tmp_path / "f.gguf") is None and path_problem(tmp_path / "ok") is None
    assert path_problem(tmp_path / "missing") == "no such file"
    assert path_problem(tmp_path / "dangling") == "a broken symbolic link"
    assert path_problem(tmp_path / "a") == "a symbolic link loop"
    assert path_problem(tmp_path) == "a directory, not a file"
    assert path_problem("/dev/null") == "a character device, not a file"
    assert path_problem(tmp_path / "fifo") == "a named pipe (FIFO), not a file"


def test_models_and_adapters_say_what_is_wrong_with_the_path(tmp_path):
    import ondevice

    (tmp_path / "a.gguf").symlink_to(tmp_path / "b.gguf")
    (tmp_path / "b.gguf").symlink_to(tmp_path / "a.gguf")
    with pytest.raises(ModelNotFound, match="a symbolic link loop; check the path"):
        ondevice.load(str(tmp_path / "a.gguf"))
    with pytest.raises(InvalidModelFile, match="/dev/null: a character device, not a file; pass the path of a"):
        ondevice.load("/dev/null")
    with pytest.raises(InvalidArgument, match="--adapter /dev/zero: a character device, not a file; give the"):
        ondevice.load(adapters=["/dev/zero"])
    with pytest.raises(InvalidArgument, match="a symbolic link loop; give the .gguf"):
        ondevice.load(adapters=[str(tmp_path / "a.gguf")])


def test_a_file_name_of_the_longest_length_is_written_through_its_temp_file(tmp_path):
    """The temp file beside the destination adds characters to its name; a destination whose own name is
    valid (up to 255 bytes, multi-byte characters too) must not fail as "File name too long"."""
    from ondevice.models.store import write_json

    for name in ("a" * 250 + ".json", "模" * 84 + ".js"):  # 255 bytes each
        assert len(name.encode()) == 255
        write_json(tmp_path / name, {"ok": 1})
        assert (tmp_path / name).read_text().strip().endswith("}")
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temp file left


def test_a_store_name_too_long_says_the_limit():
    from ondevice.models.catalog import check_variant_name

    with pytest.raises(InvalidArgument, match=r"has 130 characters; a store name has at most 128"):
        check_variant_name("a" * 130)
    with pytest.raises(InvalidArgument, match="use letters, digits"):
        check_variant_name("a/b")
    check_variant_name("a" * 128)
