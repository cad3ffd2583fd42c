"""``ondevice protect`` on the real embedded model: same tokens as the plaintext, no plaintext on disk,
tampering rejected before any token, and the key reaching every verb (bench workers included) off argv."""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("cryptography")

from ondevice.errors import OndeviceError
from ondevice.protect.container import ProtectError, read_header
from ondevice.protect.keys import new_key

KEY_ENV = "ONDEVICE_TEST_MODEL_KEY"


@pytest.fixture(scope="module")
def enc(smol_path, tmp_path_factory, request):
    """The default model encrypted with a fresh key (in KEY_ENV for this module); the container's path."""
    from ondevice.protect import encrypt

    mp = pytest.MonkeyPatch()
    mp.setenv(KEY_ENV, new_key())
    request.addfinalizer(mp.undo)
    path = tmp_path_factory.mktemp("enc") / "smollm2.enc"
    encrypt(str(smol_path), path, f"env:{KEY_ENV}")
    return path


def test_encrypted_model_generates_the_same_tokens(enc, smol):
    import ondevice

    want = smol.generate("Name three colours.", temp=0, max_tokens=8).tokens
    for mode in ("pipelined", "strawman"):
        m = ondevice.load(str(enc), n_ctx=1024, n_threads=2, key_source=f"env:{KEY_ENV}", restore=mode)
        try:
            assert m.generate("Name three colours.", temp=0, max_tokens=8).tokens == want
            assert m.engine._restored.ready
        finally:
            m.close()


def test_an_adapter_of_the_plain_model_loads_on_its_encrypted_copy(enc, smol_path, tmp_path):
    """An adapter records its base's sha256; an encrypted base is checked by its plaintext's (the container's
    own hash differs), so the adapter trained on the plain file serves with the encrypted one."""
    from test_adapt import _lora_tensors

    import ondevice
    from ondevice.adapt import adapter_file
    from ondevice.models.store import cached_sha256

    ad = adapter_file.write(tmp_path / "a.gguf", "llama", 8.0, _lora_tensors(4, 0.5),
                            {"base_sha256": cached_sha256(smol_path)})
    plain = ondevice.load(str(smol_path), n_ctx=256, n_threads=2, adapters=(str(ad),))
    want = plain.generate("Name three colours.", temp=0, max_tokens=8).tokens
    plain.close()
    m = ondevice.load(str(enc), n_ctx=256, n_threads=2, key_source=f"env:{KEY_ENV}", adapters=(str(ad),))
    try:
        assert m.generate("Name three colours.", temp=0, max_tokens=8).tokens == want
    finally:
        m.close()


def test_load_reads_the_weight_types_without_walking_the_header_again(enc, smol_path, tmp_path, monkeypatch):
    """encrypt validated the GGUF and the tags prove it unchanged: the load takes the weight types from
    llama.cpp's parser, not ondevice's Python walk (the same label as the walk gives the plain file, so the
    kernels' self-test cache is shared); a container of something else fails in one line."""
    from ondevice.device.kernels import types_of
    from ondevice.models import gguf_check
    from ondevice.protect import load
    from ondevice.protect.container import encrypt_file
    from ondevice.protect.keys import load_key

    def walk(*_a, **_k):
        raise AssertionError("validate_gguf walked the restored header")

    walked = types_of(smol_path)
    monkeypatch.setattr(gguf_check, "validate_gguf", walk)
    r = load.begin(enc, f"env:{KEY_ENV}")
    try:
        assert r.types == walked == "Q4_1+Q8_0+F32"  # the default model: Q4_1 69%, Q8_0 31% of its bytes; F32 norms
    finally:
        r.close()
    (tmp_path / "not.gguf").write_bytes(b"not a model " * 1000)
    encrypt_file(tmp_path / "not.gguf", tmp_path / "not.enc", load_key(f"env:{KEY_ENV}"), meta_size=4096)
    before = [x for x in _fd_targets() if "memfd:ondevice-model" in x]
    with pytest.raises(OndeviceError, match="not.enc.*encrypt the model again"):
        load.begin(tmp_path / "not.enc", f"env:{KEY_ENV}")
    assert [x for x in _fd_targets() if "memfd:ondevice-model" in x] == before  # closed on failure


def test_tampered_model_is_rejected_before_any_token(enc, tmp_path):
    """A flip in the metadata, in the weights and in the very last tag: the load fails, no model exists."""
    import ondevice

    data = enc.read_bytes()
    h = read_header(enc)
    rng = random.Random(3)
    positions = [h.chunk_offset(0) + 100, h.chunk_offset(h.n_chunks // 2) + rng.randrange(h.chunk_size),
                 len(data) - 1, 20]
    for pos in positions:
        bad = bytearray(data)
        bad[pos] ^= 0x40
        (tmp_path / "bad.enc").write_bytes(bytes(bad))
        with pytest.raises(ProtectError):
            ondevice.load(str(tmp_path / "bad.enc"), n_ctx=256, n_threads=2, key_source=f"env:{KEY_ENV}")
    assert not [x for x in _fd_targets() if "memfd:ondevice-model" in x]  # wiped and closed


def _fd_targets() -> list[str]:
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            out.append(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            pass
    return out


_HOLDER = textwrap.dedent("""
    import json, os, sys, ondevice
    m = ondevice.load(sys.argv[1], n_ctx=256, n_threads=2)
    r = m.generate("Hello", temp=0, max_tokens=4)
    maps = open("/proc/self/maps").read()
    fds = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            fds.append(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            pass
    print(json.dumps({"maps": maps, "fds": fds, "tokens": r.tokens}))
    m.close()
""")


def test_no_plaintext_reaches_any_file(enc, smol_path, tmp_path):
    """Load the container in a fresh process with its own store and temp dir; then (a) every file that
    process has mapped or open is checked not to be a GGUF, and the model lives in a memfd; (b) no file in
    its store or its temp dir holds a sample of the plaintext's bytes. (System-wide temp dirs are not
    scanned: other tests running beside this one keep plaintext GGUF mutants there.)"""
    home, tmpdir = tmp_path / "home", tmp_path / "tmp"
    tmpdir.mkdir()
    env = dict(os.environ, ONDEVICE_HOME=str(home), TMPDIR=str(tmpdir), ONDEVICE_KEY_SOURCE=f"env:{KEY_ENV}")
    out = subprocess.run([sys.executable, "-c", _HOLDER, str(enc)], capture_output=True, text=True, env=env,
                         timeout=300, check=False)
    assert out.returncode == 0, out.stderr
    rec = json.loads(out.stdout.strip().splitlines()[-1])
    assert rec["tokens"]
    files, memfd = set(), False
    for line in rec["maps"].splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and parts[4] != "0":  # inode != 0: backed by a file (or a memfd)
            if parts[5].startswith("/memfd:ondevice-model"):
                memfd = True
            else:
                files.add(parts[5].removesuffix(" (deleted)"))
    assert memfd, "the model should be mapped from the memfd"
    for target in rec["fds"]:
        if target.startswith("/") and not target.startswith("/proc/"):
            files.add(target.removesuffix(" (deleted)"))
    for f in files:
        if os.path.isfile(f):
            with open(f, "rb") as fh:
                assert fh.read(4) != b"GGUF", f"{f} is a GGUF file mapped by the process"
    plain = smol_path.read_bytes()
    rng = random.Random(5)
    samples = [plain[:64]] + [plain[o:o + 64] for o in rng.sample(range(1 << 20, len(plain) - 64), 16)]
    control = tmp_path / "control"
    control.mkdir()
    (control / "leak.bin").write_bytes(b"x" * 100 + samples[3] + b"y" * 100)
    assert _files_holding([control], samples) == [str(control / "leak.bin")]  # the scan can find a leak
    assert _files_holding([home, tmpdir], samples) == []


def _files_holding(roots, samples: list[bytes]) -> list[str]:
    found = []
    for root in roots:
        for dirpath, _dirs, names in os.walk(root):
            for name in names:
                p = os.path.join(dirpath, name)
                try:
                    with open(p, "rb") as fh:
                        blob = fh.read()
                except OSError:
                    continue
                if any(x in blob for x in samples):
                    found.append(p)
    return found


def test_cli_keygen_encrypt_info_verify_run(cli, smol_path, tmp_path):
    r = cli("protect", "keygen")
    assert r.returncode == 0, r.stderr
    key = r.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"[0-9a-f]{64}", key)
    env = {"MYKEY": key}
    out = tmp_path / "m.enc"
    r = cli("protect", "encrypt", str(smol_path), "-o", str(out), "--key-env", "MYKEY", env=env)
    assert r.returncode == 0, r.stderr
    assert key not in r.stdout + r.stderr
    r = cli("protect", "info", str(out), "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["format_version"] == 1 and info["plaintext_size"] == smol_path.stat().st_size
    r = cli("protect", "verify", str(out), "--key-env", "MYKEY", env=env)
    assert r.returncode == 0 and "authentic" in r.stdout, r.stderr
    (tmp_path / "key.txt").write_text(key + "\n")
    r = cli("run", "-m", str(out), "--key-file", str(tmp_path / "key.txt"), "--temp", "0", "-n", "6", "-t", "2", "Hi")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip()
    # bad input: one line each, exit 2, no traceback
    r = cli("run", "-m", str(out), "--temp", "0", "-n", "4", "Hi", env={"ONDEVICE_MODEL_KEY": "", "MYKEY": ""})
    assert r.returncode == 2 and "this model is encrypted" in r.stderr and "Traceback" not in r.stderr
    r = cli("run", "-m", str(out), "--key-env", "MYKEY", "-n", "4", "Hi", env={"MYKEY": new_key()})
    assert r.returncode == 2 and "the key does not open this container" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    (tmp_path / "cut.enc").write_bytes(out.read_bytes()[:-1000])
    r = cli("run", "-m", str(tmp_path / "cut.enc"), "--key-env", "MYKEY", "-n", "4", "Hi", env=env)
    assert r.returncode == 2 and "truncated" in r.stderr and "Traceback" not in r.stderr


def test_bench_worker_gets_the_key_without_argv(cli, enc):
    """bench runs each configuration in a worker subprocess; the key source travels in its environment."""
    r = cli("bench", "-m", str(enc), "--key-env", KEY_ENV, "--tests", "tg8", "-r", "1", "-t", "2", "--no-store",
            "--no-report", "--no-roofline", "--no-progress", "-o", "jsonl")
    assert r.returncode == 0, r.stderr
    recs = [json.loads(x) for x in r.stdout.splitlines() if x.startswith("{")]
    assert recs and all(x["status"] == "ok" for x in recs), r.stdout + r.stderr
    assert os.environ[KEY_ENV] not in r.stdout + r.stderr


def test_cli_file_errors_are_one_line(cli, smol_path, tmp_path):
    """A missing container, an -o that cannot be written or that exists (--force replaces it): one line, exit 2."""
    env = {"MYKEY": new_key()}
    for args in (("info", str(tmp_path / "none.enc")), ("verify", str(tmp_path / "none.enc"), "--key-env", "MYKEY")):
        r = cli("protect", *args, env=env)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        assert f"{tmp_path / 'none.enc'}: no such file" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    (tmp_path / "k.txt").write_text("a file, not a folder")
    r = cli("protect", "encrypt", str(smol_path), "-o", str(tmp_path / "k.txt" / "x.enc"), "--key-env", "MYKEY",
            env=env)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert f"cannot write {tmp_path / 'k.txt' / 'x.enc'}: {tmp_path / 'k.txt'} is a file, not a folder" in r.stderr
    out = tmp_path / "m.enc"
    out.write_bytes(b"precious")
    r = cli("protect", "encrypt", str(smol_path), "-o", str(out), "--key-env", "MYKEY", env=env)
    assert r.returncode == 2 and "already exists; pass --force" in r.stderr and out.read_bytes() == b"precious"
    r = cli("protect", "encrypt", str(smol_path), "-o", str(out), "--key-env", "MYKEY", "--force", env=env)
    assert r.returncode == 0, r.stderr
    assert read_header(out).plain_size == smol_path.stat().st_size
    r = cli("protect", "encrypt", str(smol_path), "-o", str(tmp_path / "n.enc"),
            env={"ONDEVICE_MODEL_KEY": "", "ONDEVICE_KEY_SOURCE": ""})  # no key given: the plain model is not "encrypted"
    assert r.returncode == 2 and "encrypting needs a key" in r.stderr and "is encrypted" not in r.stderr, r.stderr
    with pytest.raises(ProtectError, match="no such file"):
        read_header(tmp_path / "none.enc")


def test_a_key_passed_as_its_source_is_never_shown(tmp_path):
    from ondevice.protect.keys import load_key

    key = new_key()  # hex text
    for wrong in (key, bytes.fromhex(key)):  # the key itself where env:NAME, file:PATH or keyring:NAME belongs
        with pytest.raises(OndeviceError, match="not shown: it may be the key itself") as e:
            load_key(wrong)
        assert key[:8] not in str(e.value)


def test_a_key_flag_given_in_vain_is_an_error_even_for_a_plain_model(cli, tmp_path):
    """--key-file that does not exist or --key-env that is not set was ignored for an unencrypted model."""
    r = cli("run", "--key-file", str(tmp_path / "none.key"), "-n", "2", "Hi")
    assert r.returncode == 2 and "none.key: cannot read it" in r.stderr, r.stderr
    r = cli("run", "--key-env", "ONDEVICE_TEST_NO_SUCH_VAR", "-n", "2", "Hi")
    assert r.returncode == 2 and "ONDEVICE_TEST_NO_SUCH_VAR is not set" in r.stderr, r.stderr
    # a good key for a plain model: it runs, and says the key was not used (it was silently ignored)
    r = cli("run", "--key-env", "MYKEY", "-n", "2", "Hi", env={"MYKEY": new_key()})
    assert r.returncode == 0 and "smollm2-135m-instruct: note: it is not encrypted, so the key given" in r.stderr, \
        r.stderr
