"""``ondevice quantize`` as a user meets it off the happy path: a file name with spaces or another script, an
encrypted container, a disk that refuses the write, a `kill` after llama.cpp is done. Real CLI processes,
the real llama.cpp quantizer on the embedded model, real signals and a real file-size limit."""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import as_a_shell_starts_it

from ondevice.errors import InvalidArgument
from ondevice.quant.quantize import default_name, weight_types

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux signals, rlimits and /proc")


def _cli(home: Path, *args: str, env: dict | None = None, **kw) -> subprocess.Popen:
    e = dict(os.environ, ONDEVICE_HOME=str(home), **(env or {}))
    return subprocess.Popen([sys.executable, "-m", "ondevice.cli", *args], env=e, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def _run(home: Path, *args: str, **kw) -> tuple[int, str, str]:
    p = _cli(home, *args, **kw)
    out, err = p.communicate(timeout=300)
    return p.returncode, out, err


def _store(home: Path) -> list[str]:
    d = home / "models"
    return sorted(p.name for p in d.iterdir()) if d.exists() else []


def test_default_name_folds_a_file_name_the_store_cannot_hold():
    assert default_name("/x/My Modèl 模型.Q4_1.gguf", "Q8_0") == "my-model-q8_0"
    assert default_name("模型.gguf", "Q8_0") == "model-q8_0"
    assert default_name("Qwen2.5-Coder-0.5B-Instruct-Q4_K_M.gguf", "Q4_0") == "qwen2-5-coder-0-5b-instruct-q4_0"
    long = default_name("a" * 300 + ".gguf", "Q4_K_M")
    assert len(long) == 128 and long.endswith("a-q4_k_m")
    assert default_name("smollm2-135m-instruct", "Q8_0") == "smollm2-135m-instruct-q8_0"  # unchanged


def test_a_source_file_named_with_spaces_and_unicode_quantizes(smol_path, tmp_path):
    """No --name given: the variant's name comes from the file's, so its spaces and script are no user's
    fault (the old message blamed a --name that was never passed)."""
    src = tmp_path / "my models" / "Smöl LM 模型.gguf"
    src.parent.mkdir()
    shutil.copyfile(smol_path, src)
    rc, out, err = _run(tmp_path / "home", "quantize", str(src), "--type", "Q8_0", "--allow-requantize",
                        "--threads", "2")
    assert rc == 0 and "--name" not in err, err
    assert out.startswith("smol-lm-q8_0: "), out
    assert _store(tmp_path / "home") == ["smol-lm-q8_0.gguf", "smol-lm-q8_0.json"]
    record = json.loads((tmp_path / "home" / "models" / "smol-lm-q8_0.json").read_text())
    assert record["provenance"]["source_path"] == str(src) and record["quant"].startswith("Q8_0")


def test_an_encrypted_container_is_refused_with_what_to_do(smol_path, tmp_path):
    """quantize has no key flags: the old message asked for --key-env (then refused it as an unknown flag),
    or, with ONDEVICE_MODEL_KEY set, called the container a non-GGUF to convert with convert_hf_to_gguf.py."""
    pytest.importorskip("cryptography")
    from ondevice.protect import encrypt
    from ondevice.protect.keys import new_key

    key = new_key()
    enc = tmp_path / "m.enc"
    os.environ["ONDEVICE_TEST_QUANT_KEY"] = key
    try:
        encrypt(str(smol_path), enc, "env:ONDEVICE_TEST_QUANT_KEY")
    finally:
        del os.environ["ONDEVICE_TEST_QUANT_KEY"]
    want = (f"ondevice quantize: error: {enc} is an encrypted container (ondevice protect): llama.cpp's quantizer "
            f"reads only a plain GGUF, and ondevice never writes decrypted weights to disk; give the .gguf it "
            f"was encrypted from, then `ondevice protect encrypt` the variant made of it")
    for env in ({"ONDEVICE_MODEL_KEY": ""}, {"ONDEVICE_MODEL_KEY": key}):
        rc, _, err = _run(tmp_path / "home", "quantize", str(enc), "--type", "Q8_0", "--allow-requantize", env=env)
        assert rc == 2 and err.strip() == want, err
        assert not [n for n in _store(tmp_path / "home") if n.endswith((".gguf", ".tmp"))]
    for independent in (True, False):  # what `ondevice fit` reads a model's types with (gguf-py: a traceback)
        with pytest.raises(InvalidArgument, match=r"is an encrypted container \(ondevice protect\)"):
            weight_types(enc, independent=independent)


def test_a_write_the_disk_refuses_is_named_not_an_iostream_error(tmp_path):
    """A full disk (here the kernel's file-size limit, which fails llama.cpp's write the same way): llama.cpp
    itself only says "basic_ios::clear: iostream error"; the user is told where, how much, and the fix."""
    home = tmp_path / "home"

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (16 << 20, 16 << 20))

    rc, _, err = _run(home, "quantize", "smollm2", "--type", "Q8_0", "--allow-requantize", "--threads", "2",
                      preexec_fn=limit)
    assert rc == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"ondevice quantize: error: llama.cpp could not write the quantized "
                          f"SmolLM2-135M-Instruct.Q4_1.gguf to {home / 'models'} (16.8 MB written, "), err
    assert "the disk is full, or a quota or file-size limit was hit; free some space there, or set ONDEVICE_HOME" in err
    assert "iostream" not in err
    assert _store(home) == []


def _workers(marker: str) -> list[int]:
    """Live ``ondevice.quant.worker`` processes whose command line names ``marker``."""
    out = []
    for d in Path("/proc").iterdir():
        try:
            if d.name.isdigit() and b"ondevice.quant.worker" in (d / "cmdline").read_bytes() and \
                    marker.encode() in (d / "cmdline").read_bytes() and \
                    (d / "stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X"):
                out.append(int(d.name))
        except OSError:
            continue
    return out


def _quantizing(home: Path, type_: str = "Q8_0") -> tuple[subprocess.Popen, float]:
    """`ondevice quantize` of the default model to ``type_`` on one thread, once llama.cpp's worker runs; and a
    deadline for the test's waits."""
    p = _cli(home, "quantize", "smollm2", "--type", type_, "--allow-requantize", "--threads", "1",
             preexec_fn=as_a_shell_starts_it)  # Ctrl-C lands even where this run inherited it ignored (nohup, &)
    deadline = time.monotonic() + 120
    while not _workers(str(home)):
        assert p.poll() is None and time.monotonic() < deadline, p.communicate()
        time.sleep(0.005)
    return p, deadline


def test_sigterm_after_llama_cpp_finished_leaves_no_temp_file(tmp_path):
    """llama.cpp's worker is done; ondevice reads the file back, hashes it and renames it into the store (about
    a second here, a minute for a large model). A `kill` then used to leave the whole hidden temp file in the
    store. Now: either it stops before the rename (one line, exit 143, nothing in the store), or, if it came
    during the rename, the variant is finished whole with its record and the process then ends as told."""
    for attempt in range(3):
        home = tmp_path / f"home{attempt}"
        p, deadline = _quantizing(home)
        while _workers(str(home)) and time.monotonic() < deadline:
            time.sleep(0.002)
        if p.poll() is not None:
            continue  # finished before it could be told to stop: try again
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=60)
        names = _store(home)
        assert not [n for n in names if n.endswith(".tmp")], (names, err)
        if p.returncode == 128 + signal.SIGTERM and err.strip():
            assert err.strip() == ("ondevice quantize: error: stopped by SIGTERM before the variant "
                                   "smollm2-135m-instruct-q8_0 was complete; nothing was written (a file it would "
                                   "have replaced is unchanged); run the command again to make it")
            assert names == []
        else:
            assert p.returncode == 128 + signal.SIGTERM and names == [
                "smollm2-135m-instruct-q8_0.gguf", "smollm2-135m-instruct-q8_0.json"], (p.returncode, err, names)
        return
    pytest.fail("quantizing finished before the test could signal it, three times")


def test_ctrl_c_while_quantizing_says_so_in_one_line(tmp_path):
    """Ctrl-C while llama.cpp quantizes: exit 130 with a line that names the verb (it was an empty line), nothing
    in the store. (A signal that lands once the work is done finishes the variant: tried again then.)"""
    for attempt in range(3):
        home = tmp_path / f"home{attempt}"
        p, _ = _quantizing(home, "Q4_K_M")  # k-quants: a worker of ~1.4 s here (Q8_0's ~0.5 s ended first in CI)
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=60)
        if p.returncode == 0 or _store(home):  # the worker was done: the variant is whole (its test: above)
            continue
        assert p.returncode == 130 and err.strip().splitlines()[-1] == "ondevice quantize: interrupted (Ctrl-C)", err
        assert "Traceback" not in err
        return
    pytest.fail("quantizing finished before the test could interrupt it, three times")


def test_a_signal_during_finishing_waits_for_the_commit(tmp_path):
    """What makes the second outcome above whole: a SIGTERM inside ``finishing()`` waits for the block to end,
    then ends the process as sent (a real signal into a real process)."""
    script = textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from ondevice.stop_signals import StopOnSignals
        with StopOnSignals("the test file") as stop:
            with stop.finishing():
                print("ready", flush=True)
                time.sleep(1.0)
                Path({str(tmp_path / "done")!r}).write_text("whole")
            print("after the block", flush=True)
        print("never", flush=True)
    """)
    p = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert p.stdout.readline() == "ready\n"
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=30)
    assert p.returncode == -signal.SIGTERM, err
    assert (tmp_path / "done").read_text() == "whole" and out == "after the block\n"
