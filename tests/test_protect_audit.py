"""``ondevice protect`` as an app developer uses it: a key given where its name belongs is refused without being
shown, ``keygen -o`` writes a key file only its owner can read (and never replaces one unasked), and a key
file that other users can read is warned about. Real files, the real cipher and the real CLI."""

from __future__ import annotations

import json
import os
import stat
import warnings

import pytest

pytest.importorskip("cryptography")

from ondevice.errors import InvalidArgument
from ondevice.protect.keys import load_key, new_key, parse_key


@pytest.fixture(scope="module")
def enc(smol_path, tmp_path_factory):
    """The default model encrypted under a fresh key; (container path, key text)."""
    from ondevice.protect import encrypt

    key = new_key()
    folder = tmp_path_factory.mktemp("audit")
    (folder / "model.key").write_text(key + "\n")
    os.chmod(folder / "model.key", 0o600)
    path = folder / "smollm2.enc"
    encrypt(str(smol_path), path, f"file:{folder / 'model.key'}")
    return path, key


@pytest.mark.parametrize("flag", ["--key-env", "--key-file"])
def test_a_key_given_where_its_name_belongs_is_refused_without_being_shown(cli, enc, smol_path, flag):
    path, key = enc
    for verb in (["run", "-m", str(path), "-n", "1", "Hi"], ["protect", "verify", str(path)]):
        r = cli(*verb, flag, key)  # `--key-env $MODEL_KEY`: the shell put the key where its name belongs
        assert r.returncode == 2, r.stderr
        assert key not in r.stdout + r.stderr and key[:16] not in r.stderr
        assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
        assert f"{flag} was given a key itself" in r.stderr and "not shown" in r.stderr
    import base64

    b64 = base64.b64encode(bytes.fromhex(key)).decode()
    # the base64 form as well, also one with a "/" in it (which --key-file must not read as a folder)
    slashed = next(k for k in iter(lambda: base64.b64encode(os.urandom(32)).decode(), None) if "/" in k[1:-2])
    for given in (b64, slashed):
        r = cli("protect", "encrypt", str(smol_path), "-o", str(path) + ".2", flag, given)
        assert r.returncode == 2 and given not in r.stderr and "not shown" in r.stderr, r.stderr
        assert given.rpartition("/")[2] not in r.stderr
    assert not os.path.exists(str(path) + ".2")
    r = cli("protect", "verify", str(path), flag, "NO_SUCH_NAME_HERE")  # an ordinary name is still named
    assert r.returncode == 2 and "NO_SUCH_NAME_HERE" in r.stderr and "not shown" not in r.stderr


def test_a_key_given_as_a_keyring_name_is_refused_without_being_shown(enc):
    """A real keyring backend (in memory, keyring's own plug-in API) that does not hold the entry."""
    keyring = pytest.importorskip("keyring")
    from keyring.backend import KeyringBackend

    class Memory(KeyringBackend):
        priority = 1

        def __init__(self):
            super().__init__()
            self.entries = {}

        def get_password(self, service, username):
            return self.entries.get((service, username))

        def set_password(self, service, username, password):
            self.entries[(service, username)] = password

        def delete_password(self, service, username):
            self.entries.pop((service, username), None)

    _, key = enc
    before = keyring.get_keyring()
    keyring.set_keyring(Memory())
    try:
        with pytest.raises(InvalidArgument) as e:
            load_key(f"keyring:{key}")
        assert key not in str(e.value) and "--key-keyring was given a key itself" in str(e.value)
        with pytest.raises(Exception, match="no such key in the OS keyring"):
            load_key("keyring:my-app-model")  # an ordinary name is still named
    finally:
        keyring.set_keyring(before)


def test_keygen_writes_a_key_file_only_its_owner_can_read(cli, tmp_path):
    out = tmp_path / "keys" / "app.key"
    r = cli("protect", "keygen", "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    key = out.read_text()
    assert len(parse_key(key, "the written file")) == 32
    assert key.strip() not in r.stdout + r.stderr  # the key went to the file, not the terminal
    assert f"--key-file {out}" in r.stdout
    assert not [p for p in out.parent.iterdir() if p != out]  # no temp file left beside it
    r = cli("protect", "keygen", "-o", str(out))  # it may be the only copy of the key a container needs
    assert r.returncode == 2 and "--force" in r.stderr and out.read_text() == key
    r = cli("protect", "keygen", "-o", str(out), "--force")
    assert r.returncode == 0 and out.read_text() != key and stat.S_IMODE(out.stat().st_mode) == 0o600
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a 0600 key file gets no warning
        assert len(load_key(f"file:{out}")) == 32


def test_a_key_file_other_users_can_read_is_warned_about(cli, enc):
    path, key = enc
    key_file = path.parent / "model.key"
    os.chmod(key_file, 0o644)
    try:
        with pytest.warns(UserWarning, match=r"readable by other users \(mode 0644\); restrict it with: chmod 600"):
            assert load_key(f"file:{key_file}") == bytes.fromhex(key)
        r = cli("protect", "verify", str(path), "--key-file", str(key_file))
        assert r.returncode == 0, r.stderr
        assert r.stderr.count("warning: key file") == 1 and key not in r.stderr
        os.chmod(key_file, 0o600)
        r = cli("protect", "verify", str(path), "--key-file", str(key_file))
        assert r.returncode == 0 and "warning" not in r.stderr
    finally:
        os.chmod(key_file, 0o600)


_FILE_KEYRING = '''
"""A keyring backend that keeps its entries in a JSON file (keyring's plug-in API), for CLI subprocesses."""
import json, os
from keyring.backend import KeyringBackend


class FileKeyring(KeyringBackend):
    priority = 1
    path = os.environ["TEST_KEYRING_FILE"]

    def _load(self):
        return json.load(open(self.path)) if os.path.exists(self.path) else {}

    def get_password(self, service, username):
        return self._load().get(f"{service}/{username}")

    def set_password(self, service, username, password):
        d = self._load()
        d[f"{service}/{username}"] = password
        json.dump(d, open(self.path, "w"))

    def delete_password(self, service, username):
        d = self._load()
        d.pop(f"{service}/{username}", None)
        json.dump(d, open(self.path, "w"))
'''


def test_keygen_never_replaces_a_keyring_entry_unasked(cli, smol_path, tmp_path):
    """The keyring entry is usually the only copy of the key: a second `keygen --keyring NAME` (a setup script
    run again) must not lock every container made with it. Real CLI, a real keyring backend (file-backed)."""
    pytest.importorskip("keyring")
    (tmp_path / "kr").mkdir()
    (tmp_path / "kr" / "filekeyring.py").write_text(_FILE_KEYRING)
    store = tmp_path / "kr" / "entries.json"
    env = {"PYTHONPATH": os.pathsep.join([str(tmp_path / "kr"), os.environ.get("PYTHONPATH", "")]),
           "PYTHON_KEYRING_BACKEND": "filekeyring.FileKeyring", "TEST_KEYRING_FILE": str(store)}
    r = cli("protect", "keygen", "--keyring", "k1", env=env)
    assert r.returncode == 0 and "stored in the OS keyring as 'k1'" in r.stdout, r.stderr
    first = json.loads(store.read_text())["ondevice/k1"]
    container = tmp_path / "kr.enc"
    r = cli("protect", "encrypt", str(smol_path), "-o", str(container), "--key-keyring", "k1", env=env)
    assert r.returncode == 0, r.stderr
    r = cli("protect", "keygen", "--keyring", "k1", env=env)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "'k1'" in r.stderr and "--force" in r.stderr and "unreadable" in r.stderr and "Traceback" not in r.stderr
    assert first not in r.stdout + r.stderr and json.loads(store.read_text())["ondevice/k1"] == first
    r = cli("protect", "verify", str(container), "--key-keyring", "k1", env=env)  # the container still opens
    assert r.returncode == 0 and "authentic" in r.stdout, r.stderr
    r = cli("protect", "keygen", "--keyring", "k1", "--force", env=env)
    assert r.returncode == 0, r.stderr
    assert json.loads(store.read_text())["ondevice/k1"] != first


def test_plaintext_left_unlocked_with_swap_on_is_warned_about(enc, tmp_path, monkeypatch):
    """An ordinary user's locked-memory limit (8 MiB, systemd's default) is below any model: the decrypted weights
    were silently not mlocked, and could reach the swap device. The real load of a container; the user is made an
    ordinary one (root's CAP_IPC_LOCK ignores the limit) and the swap table a file (this machine has none)."""
    import resource

    import ondevice
    from ondevice.protect import load as protect_load

    path, _ = enc
    swaps = tmp_path / "swaps"
    swaps.write_text("Filename\tType\tSize\tUsed\tPriority\n/swapfile\tfile\t1048572\t0\t-2\n")
    monkeypatch.setattr(protect_load, "SWAPS", str(swaps), raising=False)
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    soft, hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    resource.setrlimit(resource.RLIMIT_MEMLOCK, (8 << 20, hard))
    source = f"file:{path.parent / 'model.key'}"
    try:
        with pytest.warns(UserWarning, match=r"are not locked in memory \(the locked-memory limit is 8 MiB\) and "
                                             r"swap is on.*`ulimit -l unlimited`, LimitMEMLOCK=infinity"):
            ondevice.load(str(path), n_ctx=256, n_threads=2, key_source=source, warmup=False).close()
        swaps.write_text("Filename\tType\tSize\tUsed\tPriority\n")  # no swap: nothing to say
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            ondevice.load(str(path), n_ctx=256, n_threads=2, key_source=source, warmup=False).close()
        assert not [w for w in seen if "not locked in memory" in str(w.message)]
    finally:
        resource.setrlimit(resource.RLIMIT_MEMLOCK, (soft, hard))


def test_models_describes_a_container_with_its_key_and_says_another_key_is_not_invalid(cli, enc):
    path, key = enc
    r = cli("models", str(path), "--json")
    assert r.returncode == 0, r.stderr
    status = json.loads(r.stdout)[0]["status"]
    assert "give its key to describe it (--key-env NAME, --key-file PATH, --key-keyring NAME" in status, status
    r = cli("models", str(path), "--json", "--key-env", "OTHER_KEY", env={"OTHER_KEY": new_key()})
    status = json.loads(r.stdout)[0]["status"]
    assert status.startswith("encrypted (ondevice protect), not described: the key does not open"), status
    assert "invalid" not in status
    r = cli("models", str(path), "--json", "--key-env", "MY_KEY", env={"MY_KEY": key})
    assert json.loads(r.stdout)[0]["architecture"] == "llama", r.stdout


def test_a_missing_key_is_asked_for_in_the_callers_terms(cli, enc):
    """The library names its key_source forms; the command line names its flags."""
    import subprocess
    import sys

    path, _ = enc
    env = {k: v for k, v in os.environ.items() if k not in ("ONDEVICE_MODEL_KEY", "ONDEVICE_KEY_SOURCE")}
    lib = subprocess.run([sys.executable, "-c", "import sys, ondevice; ondevice.load(sys.argv[1])", str(path)],
                         capture_output=True, text=True, env=env, timeout=120, check=False)
    last = lib.stderr.strip().splitlines()[-1]
    assert 'key_source="env:NAME", "file:PATH" or "keyring:NAME"' in last and "--key-env" not in last, lib.stderr
    r = cli("run", "-m", str(path), "-n", "1", "Hi", env={"ONDEVICE_MODEL_KEY": "", "ONDEVICE_KEY_SOURCE": ""})
    assert r.returncode == 2 and "give the key with --key-env NAME, --key-file PATH or --key-keyring NAME" in r.stderr
    assert "key_source" not in r.stderr, r.stderr
