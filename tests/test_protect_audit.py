"""``ondevice protect`` as an app developer uses it: a key given where its name belongs is refused without being
shown, ``keygen -o`` writes a key file only its owner can read (and never replaces one unasked), and a key
file that other users can read is warned about. Real files, the real cipher and the real CLI."""

from __future__ import annotations

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
