"""``ondevice protect encrypt`` as a user meets it when things go wrong: killed mid-write, a full disk, a
container given back to it. Real CLI processes, the real embedded model, real signals and a real file-size
limit (``RLIMIT_FSIZE``: the kernel refuses the write, as a full disk does)."""

from __future__ import annotations

import os
import resource
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import as_a_shell_starts_it

pytest.importorskip("cryptography")

from ondevice.protect.container import read_header
from ondevice.protect.keys import new_key

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux signals and rlimits")


def _env(tmp_path, **extra) -> dict:
    return dict(os.environ, ONDEVICE_HOME=str(tmp_path / "home"), MYKEY=new_key(), **extra)


def _temps(folder) -> list:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def _temp_bytes(folder) -> int:
    """Bytes in the temp files in ``folder`` (one may be renamed away between the listing and its stat)."""
    total = 0
    for name in _temps(folder):
        try:
            total += (folder / name).stat().st_size
        except FileNotFoundError:
            pass
    return total


def _container_size(smol_path) -> int:
    """The container size of the default model at the default chunk size (header + data + one tag per MiB)."""
    plain = smol_path.stat().st_size
    return 96 + plain + -(-plain // (1 << 20)) * 16


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_killed_mid_encrypt_leaves_no_temp_file_and_the_old_container(smol_path, tmp_path, sig):
    """A `kill` (or a closed terminal) while the container is written: the old -o is untouched, no hidden
    half-written temp file stays next to it, and the user is told in one line."""
    out = tmp_path / "out" / "m.enc"
    out.parent.mkdir()
    env = _env(tmp_path)
    for _attempt in range(3):
        out.write_bytes(b"the user's previous container")
        # 4 KiB chunks: ~24,000 of them, so the write lasts long enough to be interrupted in the middle
        p = subprocess.Popen([sys.executable, "-m", "ondevice.cli", "protect", "encrypt", str(smol_path), "-o",
                              str(out), "--key-env", "MYKEY", "--force", "--chunk-size", "4096"], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             preexec_fn=as_a_shell_starts_it)  # noqa: PLW1509
        deadline = time.monotonic() + 60
        while _temp_bytes(out.parent) < 1 << 20 and p.poll() is None:
            assert time.monotonic() < deadline, "the container's temp file did not grow"
            time.sleep(0.002)
        if p.poll() is not None:
            p.communicate()
            continue  # it finished before it could be told to stop: try again
        p.send_signal(sig)
        _, err = p.communicate(timeout=30)
        assert p.returncode == 128 + sig, (p.returncode, err)
        assert err.strip() == (f"ondevice protect: error: stopped by {sig.name} before {out} was complete; nothing "
                               f"was written (a file it would have replaced is unchanged); run the command again "
                               f"to make it")
        assert _temps(out.parent) == []
        assert out.read_bytes() == b"the user's previous container"
        return
    pytest.fail("encrypting finished before the test could signal it, three times")


def test_a_write_the_disk_refuses_names_the_file_and_its_size(smol_path, tmp_path):
    """A full disk (here the kernel's file-size limit, which fails the write the same way): one line with
    the path, what the container needs and the fix; no traceback, no temp file."""
    out = tmp_path / "m.enc"

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (8 << 20, 8 << 20))

    r = subprocess.run([sys.executable, "-m", "ondevice.cli", "protect", "encrypt", str(smol_path), "-o", str(out),
                        "--key-env", "MYKEY"], env=_env(tmp_path), preexec_fn=limit,
                       capture_output=True, text=True, timeout=120, check=False)
    need = _container_size(smol_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.startswith(f"ondevice protect: error: cannot write {out}: File too large (the container needs "
                               f"{need / 1e6:.1f} MB, "), r.stderr
    assert "nothing was written; raise the file-size limit (ulimit -f)" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not out.exists() and _temps(tmp_path) == []


def test_a_container_given_to_encrypt_is_named_as_one(smol_path, tmp_path, cli):
    env = {"MYKEY": new_key()}
    enc = tmp_path / "m.enc"
    r = cli("protect", "encrypt", str(smol_path), "-o", str(enc), "--key-env", "MYKEY", env=env)
    assert r.returncode == 0, r.stderr
    assert read_header(enc).file_size == _container_size(smol_path)
    r = cli("protect", "encrypt", str(enc), "-o", str(tmp_path / "twice.enc"), "--key-env", "MYKEY", env=env)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip() == (f"ondevice protect: error: {enc} is already an encrypted container; encrypt the "
                                f".gguf it was made from (to change the key, encrypt that .gguf again with the "
                                f"new key)")
    assert not (tmp_path / "twice.enc").exists()


def test_models_describes_a_container_with_its_key_and_fit_refuses_one(smol_path, tmp_path, cli):
    """`ondevice models X.enc` called a container "invalid: bad magic"; `ondevice fit X.enc` asked for a
    --key-env that fit does not have."""
    import json

    key = new_key()
    enc = tmp_path / "m.enc"
    assert cli("protect", "encrypt", str(smol_path), "-o", str(enc), "--key-env", "MYKEY",
               env={"MYKEY": key}).returncode == 0
    def row(r):
        return next(x for x in json.loads(r.stdout) if x["path"] == str(enc))

    r = cli("models", str(enc), "--json", env={"ONDEVICE_MODEL_KEY": ""})
    assert row(r)["status"].startswith("encrypted (ondevice protect): give its key to describe it"), row(r)
    r = cli("models", str(enc), "--json", env={"ONDEVICE_MODEL_KEY": key})
    assert row(r)["architecture"] == "llama" and row(r)["size_bytes"] == smol_path.stat().st_size, row(r)
    r = cli("fit", str(enc), "--budget", "size<=100MB", env={"ONDEVICE_MODEL_KEY": ""})
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [(
        f"ondevice fit: error: {enc} is an encrypted container (ondevice protect): llama.cpp's quantizer reads only "
        f"a plain GGUF, and ondevice never writes decrypted weights to disk; give the .gguf it was encrypted from, "
        f"then `ondevice protect encrypt` the variant made of it")], r.stderr


def test_info_and_verify_of_a_named_pipe_answer_instead_of_hanging(cli, tmp_path):
    """`protect info` opened the path to read the header: a FIFO (or a terminal) blocked it forever."""
    fifo = tmp_path / "m.enc"
    os.mkfifo(fifo)
    for args in (("info", str(fifo)), ("verify", str(fifo), "--key-env", "MYKEY")):
        r = cli("protect", *args, env={"MYKEY": new_key()}, timeout=60)
        assert r.returncode == 2, r.stderr
        assert r.stderr.strip() == (f"ondevice protect: error: {fifo}: a named pipe (FIFO), not a file; give the "
                                    f"path of a container (`ondevice protect encrypt MODEL -o FILE` writes one)")


def test_an_output_that_names_a_folder_is_refused_not_written_as_a_file(cli, smol_path, tmp_path):
    """`-o new/` (a trailing slash: a folder meant) wrote a file called `new`; an empty -o named the cwd."""
    for out, what in ((f"{tmp_path / 'new'}/", f"{tmp_path / 'new'}/ names a folder"), ("", "is empty")):
        r = cli("protect", "encrypt", str(smol_path), "-o", out, "--key-env", "MYKEY", env={"MYKEY": new_key()})
        assert r.returncode == 2, r.stderr
        example = (tmp_path / "new" if out else Path()) / f"{smol_path.stem}.enc"
        assert r.stderr.strip() == (f"ondevice protect: error: -o {what}; give the path of the container file to "
                                    f"write, e.g. {example}")
    assert not (tmp_path / "new").exists()


def test_the_printed_load_command_runs_as_pasted(cli, smol_path, tmp_path):
    """The hint after encrypting said `ondevice run -m PATH --key-env NAME`: a placeholder instead of the user's
    own flag, and a path with a space unquoted, so pasting it failed twice."""
    key = new_key()
    (tmp_path / "my key.txt").write_text(key)
    out = tmp_path / "my models" / "smol lm.enc"
    r = cli("protect", "encrypt", str(smol_path), "-o", str(out), "--key-file", str(tmp_path / "my key.txt"))
    assert r.returncode == 0, r.stderr
    argv = shlex.split(r.stdout.split("load it with: ", 1)[1])
    assert argv == ["ondevice", "run", "-m", str(out), "--key-file", str(tmp_path / "my key.txt")]
    r = cli(*argv[1:], "-n", "2", "--temp", "0", "-t", "2", "Hi", env={"ONDEVICE_MODEL_KEY": ""})
    assert r.returncode == 0 and r.stdout.strip(), r.stderr
