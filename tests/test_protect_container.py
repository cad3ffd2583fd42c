"""The encrypted container on small synthetic files: round trips, keys, and every kind of bad input.

Fast (no model is loaded): the restore path here is the very one the engine uses (memfd, threads).
"""

from __future__ import annotations

import os
import random
import struct

import pytest

pytest.importorskip("cryptography")

from ondevice.errors import OndeviceError
from ondevice.protect import keys
from ondevice.protect.container import HEADER_SIZE, TAG, ProtectError, encrypt_file, read_header
from ondevice.protect.restore import restore

CHUNK = 4096


@pytest.fixture(scope="module")
def box(tmp_path_factory):
    """A 61 KiB plaintext (15 chunks, the last one short) in a container; (plain, container path, key)."""
    d = tmp_path_factory.mktemp("protect")
    plain = random.Random(1).randbytes(15 * CHUNK - 1234)
    (d / "plain.bin").write_bytes(plain)
    key = keys.parse_key(keys.new_key(), "test key")
    encrypt_file(d / "plain.bin", d / "model.enc", key, meta_size=5000, chunk_size=CHUNK)
    return plain, d / "model.enc", key


def _restored_bytes(path, key, **kw) -> bytes:
    r = restore(path, key, **kw)
    try:
        r.wait()
        with open(r.path, "rb") as f:
            return f.read()
    finally:
        r.close()


@pytest.mark.parametrize("threads,overlap", [(1, False), (2, False), (2, True), (3, True)])
def test_restore_gives_back_the_plaintext(box, threads, overlap):
    plain, path, key = box
    assert _restored_bytes(path, key, threads=threads, overlap=overlap) == plain


def test_header_readable_without_key_and_sizes_add_up(box):
    plain, path, _ = box
    h = read_header(path)
    assert (h.version, h.plain_size, h.n_chunks, h.meta_size) == (1, len(plain), 15, 5000)
    assert os.path.getsize(path) == HEADER_SIZE + len(plain) + 15 * TAG == h.file_size
    assert plain[:64] not in path.read_bytes()  # the ciphertext does not carry the plaintext


def test_same_plaintext_encrypts_differently_each_time(box, tmp_path):
    _, path, key = box
    plain_path = path.parent / "plain.bin"
    encrypt_file(plain_path, tmp_path / "again.enc", key, meta_size=5000, chunk_size=CHUNK)
    assert (tmp_path / "again.enc").read_bytes()[HEADER_SIZE:HEADER_SIZE + 64] != path.read_bytes()[HEADER_SIZE:
                                                                                                    HEADER_SIZE + 64]


def test_wrong_key_is_named_before_any_chunk(box):
    _, path, _ = box
    with pytest.raises(ProtectError, match="the key does not open this container"):
        restore(path, bytes(32))


def test_truncated_and_extended_files(box, tmp_path):
    _, path, key = box
    data = path.read_bytes()
    for n, what in ((len(data) - 1, "truncated"), (len(data) - CHUNK - TAG, "truncated"), (50, "truncated"),
                    (HEADER_SIZE, "truncated")):
        (tmp_path / "t.enc").write_bytes(data[:n])
        with pytest.raises(ProtectError, match=what):
            restore(tmp_path / "t.enc", key)
    (tmp_path / "t.enc").write_bytes(data + b"\0")
    with pytest.raises(ProtectError, match="bytes after its last chunk"):
        restore(tmp_path / "t.enc", key)


def test_newer_format_version_is_named(box, tmp_path):
    _, path, key = box
    data = bytearray(path.read_bytes())
    struct.pack_into("<H", data, 8, 2)
    (tmp_path / "v2.enc").write_bytes(bytes(data))
    with pytest.raises(ProtectError, match="format version 2, newer than this ondevice reads"):
        restore(tmp_path / "v2.enc", key)
    # a flipped bit there reads as a newer format too: the line says what to do if the file was written as this one
    with pytest.raises(ProtectError, match="if it was written as format 1 .*the file is damaged: copy it again"):
        restore(tmp_path / "v2.enc", key)


def test_chunks_cannot_be_swapped_or_spliced_from_another_file(box, tmp_path):
    plain, path, key = box
    data = bytearray(path.read_bytes())
    h = read_header(path)
    a, b = h.chunk_offset(3), h.chunk_offset(4)
    size = CHUNK + TAG
    swapped = data[:a] + data[b:b + size] + data[a:a + size] + data[b + size:]
    (tmp_path / "s.enc").write_bytes(bytes(swapped))
    with pytest.raises(ProtectError, match="chunk 3 failed authentication"):
        _restored_bytes(tmp_path / "s.enc", key, threads=1, overlap=False)
    # same key, same plaintext, another file: its chunk 3 does not belong here (per-file key and header AAD)
    (path.parent / "plain2.bin").write_bytes(plain)
    encrypt_file(path.parent / "plain2.bin", tmp_path / "other.enc", key, meta_size=5000, chunk_size=CHUNK)
    other = (tmp_path / "other.enc").read_bytes()
    spliced = data[:a] + other[a:a + size] + data[a + size:]
    (tmp_path / "x.enc").write_bytes(bytes(spliced))
    with pytest.raises(ProtectError, match="chunk 3 failed authentication"):
        _restored_bytes(tmp_path / "x.enc", key, threads=1, overlap=False)


def _flip_rejected(data: bytes, pos: int, tmp, key, **kw) -> bool:
    bad = bytearray(data)
    bad[pos] ^= random.Random(pos).randrange(1, 256)
    tmp.write_bytes(bytes(bad))
    try:
        _restored_bytes(tmp, key, **kw)
    except ProtectError:
        return True
    return False


def test_every_header_byte_flip_is_rejected(box, tmp_path):
    _, path, key = box
    data = path.read_bytes()
    missed = [p for p in range(HEADER_SIZE) if not _flip_rejected(data, p, tmp_path / "f.enc", key,
                                                                  threads=1, overlap=False)]
    assert missed == []


def test_single_byte_flips_at_1000_random_positions_are_rejected(box, tmp_path):
    _, path, key = box
    data = path.read_bytes()
    positions = random.Random(7).sample(range(len(data)), 1000)
    missed = [p for p in positions if not _flip_rejected(data, p, tmp_path / "f.enc", key, threads=1, overlap=False)]
    assert missed == []
    # the pipelined path (background threads) rejects them too
    missed = [p for p in positions[:100] if not _flip_rejected(data, p, tmp_path / "f.enc", key, threads=2)]
    assert missed == []


def test_a_failed_restore_leaves_no_memfd_open(box, tmp_path):
    _, path, key = box
    data = bytearray(path.read_bytes())
    data[-5] ^= 1  # the last chunk's tag: found last, after the metadata was already handed out
    (tmp_path / "late.enc").write_bytes(bytes(data))
    before = _memfds()
    r = restore(tmp_path / "late.enc", key, threads=2)
    with pytest.raises(ProtectError, match="failed authentication"):
        r.wait()
    r.close()
    assert _memfds() == before


def test_pipelined_restore_runs_in_worker_processes_and_reaps_them(box):
    plain, path, key = box
    r = restore(path, key, threads=2)
    try:
        assert len(r._procs) == 2
        # the per-file key reaches the workers through a pipe, never their command line
        file_key = read_header(path).file_key(key).hex()
        assert all(file_key not in " ".join(p.args) and key.hex() not in " ".join(p.args) for p in r._procs)
        r.wait()
        assert [p.returncode for p in r._procs] == [0, 0]
        with open(r.path, "rb") as f:
            assert f.read() == plain
    finally:
        r.close()


def test_restore_falls_back_to_threads_when_no_worker_can_start(box, monkeypatch):
    import subprocess

    def no_spawn(*a, **kw):
        raise OSError("no processes here")

    monkeypatch.setattr(subprocess, "Popen", no_spawn)
    plain, path, key = box
    r = restore(path, key, threads=2)
    try:
        assert r._procs == []
        r.wait()
        with open(r.path, "rb") as f:
            assert f.read() == plain
    finally:
        r.close()


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    """An 8 MiB plaintext in 4 KiB chunks (2,048): a restore that is still running when a test acts on it."""
    d = tmp_path_factory.mktemp("protect-big")
    key = keys.parse_key(keys.new_key(), "test key")
    (d / "big.bin").write_bytes(random.Random(2).randbytes(8 << 20))
    encrypt_file(d / "big.bin", d / "big.enc", key, meta_size=5000, chunk_size=CHUNK)
    return d / "big.enc", key


def test_a_worker_that_dies_opens_the_barrier_with_an_error(big):
    """A killed worker must fail the load with a message, never leave the loader waiting forever."""
    before = _memfds()
    r = restore(*big, threads=1)
    r._procs[0].kill()  # still starting: 2,000 chunks are far from done
    with pytest.raises(OndeviceError, match="restore worker process failed"):
        r.wait()
    r.close()
    assert r._procs[0].returncode is not None and _memfds() == before


def test_close_while_restoring_stops_and_reaps_the_workers(big):
    before = _memfds()
    r = restore(*big, threads=2)
    r.close()
    assert all(p.returncode is not None for p in r._procs) and _memfds() == before


def _memfds() -> set[str]:
    out = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if "memfd:ondevice-model" in target:
            out.add(fd)
    return out


# -- key sources -----------------------------------------------------------------------------------------

def test_key_from_env_file_and_forms(tmp_path, monkeypatch):
    hexkey = keys.new_key()
    raw = bytes.fromhex(hexkey)
    monkeypatch.setenv("T_KEY", hexkey)
    assert keys.load_key("env:T_KEY") == raw
    (tmp_path / "k.txt").write_text(hexkey + "\n")
    assert keys.load_key(f"file:{tmp_path / 'k.txt'}") == raw
    (tmp_path / "k.bin").write_bytes(raw)
    assert keys.load_key(f"file:{tmp_path / 'k.bin'}") == raw
    import base64

    monkeypatch.setenv("T_KEY", base64.b64encode(raw).decode())
    assert keys.load_key("env:T_KEY") == raw
    monkeypatch.setenv("ONDEVICE_MODEL_KEY", hexkey)
    assert keys.load_key(None) == raw


def test_key_errors_are_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.delenv("ONDEVICE_MODEL_KEY", raising=False)
    monkeypatch.delenv("T_NOPE", raising=False)
    monkeypatch.setattr(keys, "COMMAND_LINE", True)  # the command line's terms (the library's: below)
    cases = [(None, "this model is encrypted; give the key with --key-env"),
             ("env:T_NOPE", "^--key-env T_NOPE: the environment variable T_NOPE is not set"),
             (f"file:{tmp_path / 'missing'}", "cannot read it"),
             ("env:T_SHORT", "does not hold a 256-bit key")]
    monkeypatch.setenv("T_SHORT", "abcd")
    for source, msg in cases:
        with pytest.raises(OndeviceError, match=msg) as e:
            keys.load_key(source)
        assert "\n" not in str(e.value)
    monkeypatch.setattr(keys, "COMMAND_LINE", False)
    with pytest.raises(OndeviceError, match='encrypted; say where the key is with key_source="env:NAME"'):
        keys.load_key(None)
    with pytest.raises(OndeviceError, match='^key_source "env:T_NOPE": the environment variable T_NOPE is not set'):
        keys.load_key("env:T_NOPE")


def test_keyring_without_backend_says_so(monkeypatch):
    keyring = pytest.importorskip("keyring")
    from keyring.backends import fail

    monkeypatch.setattr(keyring, "get_keyring", lambda: fail.Keyring())
    with pytest.raises(OndeviceError, match="no OS keyring backend is available"):
        keys.load_key("keyring:model")


def test_a_kill_just_after_the_rename_ends_the_process_with_the_container_whole(box, tmp_path):
    """A SIGTERM in the microseconds after atomic_write renamed the container into place raised Stopped: "nothing
    was written (a file it would have replaced is unchanged)", with the new container in place. Now the rename
    stands, the signal waits for it and then ends the process as it was told (a shell's 143)."""
    import signal
    import subprocess
    import sys
    import textwrap

    plain, _, key = box
    (tmp_path / "plain.bin").write_bytes(plain)
    script = textwrap.dedent(f"""
        import os, signal
        from ondevice.models import store
        from ondevice.protect.container import encrypt_file
        real = os.replace
        def replace_then_killed(a, b):  # the signal lands right after the rename
            real(a, b)
            os.kill(os.getpid(), signal.SIGTERM)
        store.os.replace = replace_then_killed
        encrypt_file({str(tmp_path / "plain.bin")!r}, {str(tmp_path / "model.enc")!r}, {key!r}, meta_size=5000,
                     chunk_size={CHUNK})
        print("went on after the signal")
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert r.returncode == -signal.SIGTERM, (r.returncode, r.stdout, r.stderr)
    assert "nothing was written" not in r.stderr and "went on" not in r.stdout, r.stderr
    assert _restored_bytes(tmp_path / "model.enc", key) == plain
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.enc", "plain.bin"]  # no temp file left
