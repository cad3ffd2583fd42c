"""How long a protected model's plaintext and its decrypt workers live: engines of one container in one process
share one decrypted copy (serve's chat and embeddings engines included), the last close releases it, and a
worker dies with the process that started it, even one killed outright."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

pytest.importorskip("cryptography")

from ondevice.models.catalog import CATALOG, is_installed
from ondevice.protect.container import ProtectError
from ondevice.protect.keys import new_key

KEY_ENV = "ONDEVICE_TEST_LIFETIME_KEY"
QWEN = "qwen2.5-coder-0.5b-instruct"  # the largest model at hand (491 MB): its decrypt lasts long enough to catch
PORT = 18957


@pytest.fixture(scope="module")
def key_env(request):
    mp = pytest.MonkeyPatch()
    mp.setenv(KEY_ENV, new_key())
    request.addfinalizer(mp.undo)
    return KEY_ENV


def _encrypted(model, folder, key_env):
    from ondevice.protect import encrypt

    path = folder / "model.enc"
    encrypt(model, path, f"env:{key_env}")
    return path


@pytest.fixture(scope="module")
def enc(smol_path, tmp_path_factory, key_env):
    return _encrypted(str(smol_path), tmp_path_factory.mktemp("enc"), key_env)


def _plaintexts(pid: int | str = "self") -> int:
    """How many descriptors of process ``pid`` hold a decrypted model (protect/restore.py's memfd)."""
    n = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            n += "memfd:ondevice-model" in os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:  # closed meanwhile
            pass
    return n


def test_engines_of_one_container_share_one_plaintext_until_the_last_closes(enc, key_env, tmp_path, monkeypatch):
    import ondevice

    before = _plaintexts()
    a = ondevice.load(str(enc), n_ctx=256, n_threads=2, key_source=f"env:{key_env}")
    b = None
    try:
        want = a.generate("Name three colours.", temp=0, max_tokens=6).tokens
        assert len(a.embed("a second context of the same model")) == 576
        b = ondevice.load(str(enc), n_ctx=256, n_threads=2, key_source=f"env:{key_env}")
        assert _plaintexts() == before + 1  # three engines, one decrypted copy
        monkeypatch.setenv("WRONG_KEY", new_key())  # a load that shares must still prove it has the key
        with pytest.raises(ProtectError, match="the key does not open this container"):
            ondevice.load(str(enc), n_ctx=256, n_threads=2, key_source="env:WRONG_KEY")
        a.close()
        assert _plaintexts() == before + 1
        assert b.generate("Name three colours.", temp=0, max_tokens=6).tokens == want  # its copy was not wiped
    finally:
        a.close()
        if b is not None:
            b.close()
    assert _plaintexts() == before  # the last close released it


def test_serve_of_a_protected_model_decrypts_it_once_for_chat_and_embeddings(enc, key_env, tmp_path):
    import openai

    env = dict(os.environ, ONDEVICE_HOME=str(tmp_path / "home"), ONDEVICE_SUPERVISED="1")  # in-process: its pid
    log_path = tmp_path / "serve.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "ondevice.cli", "serve", "-m", str(enc), "--key-env", key_env,
                                 "--port", str(PORT), "--ctx", "512", "-t", "2"], stderr=log,
                                stdin=subprocess.DEVNULL, env=env)
    try:
        deadline = time.monotonic() + 120
        while "on http://" not in log_path.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.05)
        assert _plaintexts(proc.pid) == 1  # the embeddings engine shares the chat engine's copy
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{PORT}/v1", api_key="x")
        chat = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
        assert chat.choices[0].message.content
        assert len(client.embeddings.create(model="m", input="hello").data[0].embedding) == 576
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)


_LOADER = "import sys, ondevice; ondevice.load(sys.argv[1], n_ctx=256, n_threads=1, key_source=sys.argv[2])"


def _worker_of(parent: int) -> int | None:
    """The decrypt worker of ``parent`` once it is past its start (it has imported cryptography), else None."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            if (ppid == parent and b"restore import _child" in open(f"/proc/{pid}/cmdline", "rb").read()
                    and "cryptography" in open(f"/proc/{pid}/maps").read()):
                return int(pid)
        except (OSError, ValueError, IndexError):
            pass
    return None


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"  # dead, not yet reaped by its new parent
    except OSError:
        return True


@pytest.mark.skipif(not is_installed(CATALOG[QWEN]), reason="pip install 'ondevice[coder]'")
def test_a_decrypt_worker_dies_with_the_process_killed_during_its_load(tmp_path, key_env):
    """SIGKILL (as SIGTERM's and SIGHUP's default actions) runs no handler of the parent's; the worker must not
    go on decrypting into its memfd as an orphan. It is stopped first, so only its death can end it in time."""
    from ondevice.models import resolve

    enc = _encrypted(str(resolve(QWEN).path), tmp_path, key_env)
    parent = subprocess.Popen([sys.executable, "-c", _LOADER, str(enc), f"env:{key_env}"], stderr=subprocess.PIPE)
    worker = None
    try:
        while (worker := _worker_of(parent.pid)) is None:
            assert parent.poll() is None, parent.stderr.read().decode()
            time.sleep(0.01)
        os.kill(worker, signal.SIGSTOP)
        parent.kill()
        parent.wait()
        deadline = time.monotonic() + 5
        while not _gone(worker) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _gone(worker), "the decrypt worker outlived the process that started it"
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        if worker is not None and not _gone(worker):
            os.kill(worker, signal.SIGKILL)
