"""`ondevice rm` of the model a running `ondevice serve` uses: the server keeps answering from memory, and its
Ollama listings (/api/tags, /api/ps, /api/show, polled by Open WebUI and the `ollama` client) stay 200 with the
facts of the file it loaded, instead of a 500 per poll; `rm` says which process still has it loaded. A real
server process, a real store, the real CLI; the model is pulled over HTTP from 127.0.0.1."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
from conftest import serve_process


def _listings(base: str) -> tuple[httpx.Response, httpx.Response, httpx.Response]:
    return (httpx.get(f"{base}/api/tags"), httpx.get(f"{base}/api/ps"),
            httpx.post(f"{base}/api/show", json={"model": "t1"}))


def test_removing_a_served_model_keeps_the_ollama_listings_and_is_said(server, smol_path, tmp_path, cli):
    server.files["/m/t1.gguf"] = smol_path.read_bytes()
    assert cli("pull", f"{server.base}/m/t1.gguf", "-q").returncode == 0
    with serve_process(tmp_path, "-m", "t1") as (proc, url, _):
        base = url.removesuffix("/v1")
        before = [r.json() for r in _listings(base)]
        gone = cli("rm", "t1")
        assert gone.returncode == 0 and gone.stdout.startswith("removed t1 ("), gone.stderr
        said = re.search(r"warning: t1 is loaded by running process pid (\d+) \(ondevice serve\)", gone.stderr)
        assert said, gone.stderr
        pid = int(said[1])  # the server (or the worker its supervisor started)
        assert pid == proc.pid or Path(f"/proc/{pid}/stat").read_text().split()[3] == str(proc.pid)
        assert "keeps running it from memory until stopped" in gone.stderr
        after = _listings(base)
        assert [r.status_code for r in after] == [200, 200, 200], [r.text for r in after]
        assert [r.json() for r in after] == before  # the size, date and digest of the file it loaded
        tags = before[0]["models"][0]
        assert tags["size"] == smol_path.stat().st_size and tags["digest"].startswith("sha256:")
        reply = httpx.post(f"{base}/api/generate", json={"model": "t1", "prompt": "Hi", "stream": False,
                                                         "options": {"num_predict": 2}}, timeout=120)
        assert reply.status_code == 200, reply.text


def test_a_model_removed_before_its_first_listing_is_listed_not_a_500(server, smol_path, tmp_path, cli):
    server.files["/m/t1.gguf"] = smol_path.read_bytes()
    assert cli("pull", f"{server.base}/m/t1.gguf", "-q").returncode == 0
    with serve_process(tmp_path, "-m", "t1") as (_, url, log):
        assert cli("rm", "t1").returncode == 0
        after = _listings(url.removesuffix("/v1"))
        assert [r.status_code for r in after] == [200, 200, 200], [r.text for r in after]
        assert [m["name"] for m in after[0].json()["models"]] == ["t1:latest"]  # as Ollama names it
        assert "Traceback" not in log.read_text()
