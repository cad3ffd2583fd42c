"""ondevice.models.pull against a real HTTP server on 127.0.0.1 (Range, drops, redirects, checksums)."""

from __future__ import annotations

import hashlib
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import gguf
import numpy as np
import pytest

from ondevice.errors import InvalidArgument, InvalidModelFile, OndeviceError
from ondevice.models import DownloadInterrupted, models_dir, pull, resolve
from ondevice.models.hub import _OVERLAP as OVERLAP
from ondevice.models.hub import parse_source


def make_gguf(path: Path, n_tensors: int = 8, seed: int = 0, split_max_tensors: int = 0) -> Path:
    """A valid GGUF of ~70 KB written by gguf's own writer (big enough to cut mid-way); with ``split_max_tensors``,
    split as llama-gguf-split does, in ``STEM-0000N-of-0000M.gguf`` files beside ``path``."""
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), "llama", split_max_tensors=split_max_tensors)
    w.add_name(f"served-{seed}")
    w.add_context_length(128)
    for i in range(n_tensors):
        w.add_tensor(f"blk.{i}.w", rng.standard_normal((64, 32)).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


class Server:
    """Serves ``files`` (url path -> bytes) with optional Range support, drops, ETags and redirects."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.range = True  # honour Range (206) or ignore it (200)
        self.drop_after: int | None = None  # close the connection after this many body bytes...
        self.drops_left = 0  # ...this many times
        self.stall_after: int | None = None  # send this many bytes, then go silent for 3 s (once)
        self.etags: dict[str, str] = {}  # url path -> ETag header value
        self.redirects: dict[str, tuple[str, dict[str, str]]] = {}  # path -> (location, extra headers)
        self.log: list[dict] = []
        self.heads: list[str] = []  # paths asked for with HEAD
        self.busy: list[tuple[int, dict[str, str]]] = []  # the next GETs' answers: (status, headers), e.g. 503
        srv = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):  # keep pytest output clean
                pass

            def do_HEAD(self):  # what the file is now (its ETag), without its bytes; kept apart from the GETs
                srv.heads.append(self.path)
                body = srv.files.get(self.path)
                self.send_response(404 if body is None else 200)
                self.send_header("Content-Length", "0" if body is None else str(len(body)))
                if body is not None and self.path in srv.etags:
                    self.send_header("ETag", srv.etags[self.path])
                self.end_headers()

            def do_GET(self):
                path = self.path
                entry = {"path": path, "range": self.headers.get("Range"), "if_range": self.headers.get("If-Range"),
                         "auth": self.headers.get("Authorization"), "sent": 0, "status": None}
                srv.log.append(entry)
                if srv.busy:
                    entry["status"], extra = srv.busy.pop(0)
                    self.send_response(entry["status"])
                    for k, v in {**extra, "Content-Length": "0"}.items():
                        self.send_header(k, v)
                    self.end_headers()
                    return
                if path in srv.redirects:
                    location, extra = srv.redirects[path]
                    entry["status"] = 302
                    self.send_response(302)
                    self.send_header("Location", location)
                    for k, v in extra.items():
                        self.send_header(k, v)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                body = srv.files.get(path)
                if body is None:
                    entry["status"] = 404
                    self.send_error(404)
                    return
                etag = srv.etags.get(path)
                start = 0
                rng = self.headers.get("Range")
                if_range = self.headers.get("If-Range")
                if srv.range and rng and (if_range is None or if_range == etag):
                    start = int(rng.split("=")[1].split("-")[0])
                    if start >= len(body):
                        entry["status"] = 416
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(body)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                    entry["status"] = 206
                else:
                    self.send_response(200)
                    entry["status"] = 200
                chunk = body[start:]
                self.send_header("Content-Length", str(len(chunk)))
                if etag:
                    self.send_header("ETag", etag)
                self.end_headers()
                if srv.drop_after is not None and srv.drops_left > 0:
                    srv.drops_left -= 1
                    self.wfile.write(chunk[: srv.drop_after])
                    self.wfile.flush()
                    entry["sent"] = min(len(chunk), srv.drop_after)
                    self.connection.shutdown(socket.SHUT_RDWR)
                    self.close_connection = True
                    return
                if srv.stall_after is not None:
                    srv.stall_after, k = None, srv.stall_after
                    self.wfile.write(chunk[:k])
                    self.wfile.flush()
                    entry["sent"] = k
                    time.sleep(3)
                    return
                self.wfile.write(chunk)
                entry["sent"] = len(chunk)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self.base = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def gets(self, path: str) -> list[dict]:
        return [e for e in self.log if e["path"] == path]

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(autouse=True)
def isolated_home(tmp_path, monkeypatch):
    monkeypatch.setenv("ONDEVICE_HOME", str(tmp_path / "home"))
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_TOKEN_PATH", "HF_ENDPOINT", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # no `huggingface-cli login` token of the machine's


@pytest.fixture()
def model_bytes(tmp_path) -> bytes:
    return make_gguf(tmp_path / "served.gguf").read_bytes()


def _leftovers() -> list[str]:
    return sorted(p.name for p in models_dir().iterdir())


def test_pull_plain_http(server, model_bytes):
    server.files["/m/tiny.gguf"] = model_bytes
    path = pull(f"{server.base}/m/tiny.gguf", progress=False)
    assert path == models_dir() / "tiny.gguf" and path.read_bytes() == model_bytes
    assert _leftovers() == ["tiny.gguf", "tiny.json"]  # no .part, .part.json or lock left
    prov = json.loads((models_dir() / "tiny.json").read_text())
    assert prov["sha256"] == hashlib.sha256(model_bytes).hexdigest()
    assert prov["sha256_verified_against"] is None  # nothing to check against: said so, not faked
    ref = resolve("tiny")
    assert ref.source == "store" and ref.info.name == "served-0"


def test_drop_then_rerun_resumes_with_range(server, model_bytes):
    server.files["/tiny.gguf"] = model_bytes
    server.etags["/tiny.gguf"] = '"v1"'  # a strong validator: without one a resume could splice versions
    server.drop_after, server.drops_left = 30_000, 1
    with pytest.raises(DownloadInterrupted, match="run the same command again to resume"):
        pull(f"{server.base}/tiny.gguf", name="t", retries=0, progress=False)
    part = models_dir() / "t.gguf.part"
    assert part.read_bytes() == model_bytes[:30_000]  # the partial is kept...
    assert not (models_dir() / "t.gguf").exists()  # ...but never under the final name
    path = pull(f"{server.base}/tiny.gguf", name="t", retries=0, progress=False)
    assert path.read_bytes() == model_bytes
    second = server.gets("/tiny.gguf")[-1]
    # 4 KiB before the end of the .part: re-read and compared, so a changed file is never spliced
    assert second["range"] == f"bytes={30_000 - OVERLAP}-" and second["status"] == 206
    assert second["if_range"] == '"v1"'
    assert second["sent"] == len(model_bytes) - 30_000 + OVERLAP
    assert not part.exists()


def test_automatic_resume_within_one_call(server, model_bytes):
    server.files["/tiny.gguf"] = model_bytes
    server.etags["/tiny.gguf"] = '"v1"'
    server.drop_after, server.drops_left = 20_000, 2
    path = pull(f"{server.base}/tiny.gguf", retries=3, progress=False)
    assert path.read_bytes() == model_bytes
    second = 20_000 - OVERLAP  # then 20,000 bytes more, of which the first OVERLAP were already there
    third = second + 20_000 - OVERLAP
    assert [e["range"] for e in server.gets("/tiny.gguf")] == [None, f"bytes={second}-", f"bytes={third}-"]


def test_stalled_server_times_out_and_resumes(server, model_bytes):
    server.files["/tiny.gguf"] = model_bytes
    server.etags["/tiny.gguf"] = '"v1"'
    server.stall_after = 10_000
    path = pull(f"{server.base}/tiny.gguf", timeout=0.5, retries=1, progress=False)
    assert path.read_bytes() == model_bytes
    assert [e["range"] for e in server.gets("/tiny.gguf")] == [None, f"bytes={10_000 - OVERLAP}-"]


def test_server_ignoring_range_restarts_cleanly(server, model_bytes):
    server.files["/tiny.gguf"] = model_bytes
    server.drop_after, server.drops_left = 25_000, 1
    with pytest.raises(DownloadInterrupted):
        pull(f"{server.base}/tiny.gguf", retries=0, progress=False)
    server.range = False  # now answers 200 with the whole file to a Range request
    path = pull(f"{server.base}/tiny.gguf", retries=0, progress=False)
    assert path.read_bytes() == model_bytes  # not the first 25 KB twice
    assert server.gets("/tiny.gguf")[-1]["status"] == 200


def test_changed_upstream_between_attempts_is_not_spliced(server, tmp_path, model_bytes):
    newer = make_gguf(tmp_path / "newer.gguf", seed=1).read_bytes()
    server.files["/tiny.gguf"] = model_bytes
    server.etags["/tiny.gguf"] = '"v1"'
    server.drop_after, server.drops_left = 25_000, 1
    with pytest.raises(DownloadInterrupted):
        pull(f"{server.base}/tiny.gguf", retries=0, progress=False)
    server.files["/tiny.gguf"], server.etags["/tiny.gguf"] = newer, '"v2"'
    path = pull(f"{server.base}/tiny.gguf", retries=0, progress=False)
    assert server.gets("/tiny.gguf")[-1]["if_range"] == '"v1"'
    assert path.read_bytes() == newer


def test_changed_under_the_same_etag_restarts_instead_of_splicing(server, tmp_path, model_bytes):
    """A server that swaps the file but keeps its ETag (so If-Range cannot tell): the re-read overlap differs."""
    newer = make_gguf(tmp_path / "newer.gguf", seed=1).read_bytes()
    assert len(newer) == len(model_bytes)  # same size: only the bytes say that it changed
    server.files["/tiny.gguf"], server.etags["/tiny.gguf"] = model_bytes, '"same"'
    server.drop_after, server.drops_left = 25_000, 1
    with pytest.raises(DownloadInterrupted):
        pull(f"{server.base}/tiny.gguf", retries=0, progress=False)
    server.files["/tiny.gguf"] = newer
    path = pull(f"{server.base}/tiny.gguf", retries=1, progress=False)
    assert path.read_bytes() == newer  # the whole new file, not old[:25000] + new[25000:]
    assert [e["range"] for e in server.gets("/tiny.gguf")] == [None, f"bytes={25_000 - OVERLAP}-", None]


@pytest.mark.parametrize("etag", [None, 'W/"weak"'])
def test_no_strong_validator_means_no_resume(server, model_bytes, etag):
    """Without a strong validator If-Range is not allowed (RFC 9110): the partial file is dropped, not resumed."""
    server.files["/tiny.gguf"] = model_bytes
    if etag:
        server.etags["/tiny.gguf"] = etag
    server.drop_after, server.drops_left = 25_000, 1
    path = pull(f"{server.base}/tiny.gguf", retries=1, progress=False)
    assert path.read_bytes() == model_bytes
    assert [(e["range"], e["if_range"]) for e in server.gets("/tiny.gguf")] == [(None, None), (None, None)]


def test_complete_part_gets_416_and_finishes(server, model_bytes):
    server.files["/tiny.gguf"] = model_bytes
    server.drop_after, server.drops_left = len(model_bytes), 1  # all bytes sent, then the socket is cut
    server.etags["/tiny.gguf"] = '"v1"'
    path = pull(f"{server.base}/tiny.gguf", retries=0, progress=False)
    assert path.read_bytes() == model_bytes


def test_sha256_mismatch_rejected_and_nothing_kept(server, model_bytes):
    server.files["/tiny.gguf"] = model_bytes
    with pytest.raises(InvalidModelFile, match="does not match the expected 0{64} \\(given\\)"):
        pull(f"{server.base}/tiny.gguf", sha256="0" * 64, progress=False)
    assert _leftovers() == []
    good = hashlib.sha256(model_bytes).hexdigest()
    path = pull(f"{server.base}/tiny.gguf", sha256=good.upper(), progress=False)
    assert json.loads(path.with_suffix(".json").read_text())["sha256_verified_against"] == "given"
    with pytest.raises(InvalidArgument, match="not a sha256"):
        pull(f"{server.base}/tiny.gguf", name="other", sha256="abc", progress=False)


def test_sha256_from_etag_and_sidecar(server, model_bytes):
    good = hashlib.sha256(model_bytes).hexdigest()
    server.files["/a.gguf"] = model_bytes
    server.etags["/a.gguf"] = f'"{"f" * 64}"'  # a sha256-shaped ETag that disagrees: corrupted in transit
    with pytest.raises(InvalidModelFile, match=r"\(ETag\)"):
        pull(f"{server.base}/a.gguf", progress=False)
    assert _leftovers() == []
    server.etags["/a.gguf"] = f'"{good}"'
    p = pull(f"{server.base}/a.gguf", progress=False)
    assert json.loads(p.with_suffix(".json").read_text())["sha256_verified_against"] == "ETag"

    server.files["/b.gguf"] = model_bytes
    server.files["/b.gguf.sha256"] = f"{'1' * 64}  b.gguf\n".encode()
    with pytest.raises(InvalidModelFile, match=r"\(\.sha256 file\)"):
        pull(f"{server.base}/b.gguf", progress=False)
    server.files["/b.gguf.sha256"] = f"{good}  b.gguf\n".encode()
    p = pull(f"{server.base}/b.gguf", progress=False)
    assert json.loads(p.with_suffix(".json").read_text())["sha256_verified_against"] == ".sha256 file"


def test_hf_url_redirect_linked_etag_and_token(server, model_bytes, monkeypatch):
    good = hashlib.sha256(model_bytes).hexdigest()
    monkeypatch.setenv("HF_ENDPOINT", server.base)
    monkeypatch.setenv("HF_TOKEN", "secret-token")
    # HF answers the resolve URL with a redirect to its CDN and the LFS sha256 in X-Linked-Etag.
    cdn = f"http://localhost:{server.port}/cdn/blob"  # another host name: credentials must not follow
    server.redirects["/org/repo/resolve/main/sub/tiny.gguf"] = (cdn, {"X-Linked-Etag": f'"{good}"'})
    server.files["/cdn/blob"] = model_bytes
    path = pull("hf://org/repo/sub/tiny.gguf", progress=False)
    assert path.name == "tiny.gguf" and path.read_bytes() == model_bytes
    first, = server.gets("/org/repo/resolve/main/sub/tiny.gguf")
    assert first["auth"] == "Bearer secret-token"
    assert all(e["auth"] is None for e in server.gets("/cdn/blob"))
    prov = json.loads(path.with_suffix(".json").read_text())
    assert prov["sha256_verified_against"] == "X-Linked-Etag" and prov["url"] == "hf://org/repo/sub/tiny.gguf"

    server.redirects["/org/repo/resolve/main/bad.gguf"] = (cdn, {"X-Linked-Etag": f'"{"e" * 64}"'})
    with pytest.raises(InvalidModelFile, match="X-Linked-Etag"):
        pull("hf://org/repo/bad.gguf", progress=False)
    assert not (models_dir() / "bad.gguf").exists()


def test_not_a_gguf_is_rejected(server):
    server.files["/fake.gguf"] = b"<html>rate limited</html>" * 100
    with pytest.raises(InvalidModelFile, match="not a usable GGUF model and was deleted.*bad magic"):
        pull(f"{server.base}/fake.gguf", progress=False)
    assert _leftovers() == []


def test_http_errors_and_unreachable(server):
    with pytest.raises(OndeviceError, match="HTTP 404"):
        pull(f"{server.base}/missing.gguf", progress=False)
    port = server.port
    server.close()
    with pytest.raises(DownloadInterrupted, match="cannot reach"):
        pull(f"http://127.0.0.1:{port}/x.gguf", retries=0, progress=False)


def test_retry_messages_say_resume_only_with_bytes_to_resume_from(server, model_bytes, capsys):
    port = server.port
    server.close()  # a refused connection, nothing downloaded: a retry, not a resume
    with pytest.raises(DownloadInterrupted, match="cannot reach"):
        pull(f"http://127.0.0.1:{port}/x.gguf", retries=1, progress=True)
    err = capsys.readouterr().err
    assert "retrying (attempt 2 of 2)" in err and "resum" not in err
    s = Server()
    try:
        s.files["/tiny.gguf"] = model_bytes
        s.drop_after, s.drops_left = 20_000, 1
        pull(f"{s.base}/tiny.gguf", retries=1, progress=True)
    finally:
        s.close()
    assert "resuming at byte 20000 (attempt 2 of 2)" in capsys.readouterr().err


def test_a_split_model_is_pulled_by_its_first_shard_or_shard_by_shard(server, tmp_path, cli):
    """A later shard is a download of its own (checked alone: the others may come later); the first shard's address
    brings the shards not yet in the store with it (as llama.cpp's -hff does), and the model is its first shard."""
    make_gguf(tmp_path / "big.gguf", split_max_tensors=3)
    names = [f"big-0000{i}-of-00003.gguf" for i in (1, 2, 3)]
    for n in names:
        server.files[f"/m/{n}"] = (tmp_path / n).read_bytes()
    r = cli("pull", f"{server.base}/m/{names[1]}")  # a later shard first: kept, and said what it waits for
    assert r.returncode == 0, r.stderr
    assert "not runnable yet: this is shard 2 of a model split in 3 files" in r.stdout
    r = cli("pull", f"{server.base}/m/{names[0]}")  # the first: shard 3 comes with it, shard 2 is there already
    assert r.returncode == 0 and "use it with: ondevice run -m big-00001-of-00003 ..." in r.stdout
    whole = hashlib.sha256(b"".join((tmp_path / n).read_bytes() for n in names)).hexdigest()
    assert f"  sha256 {whole} (its 3 shards' bytes in order; this shard's " in r.stdout, r.stdout
    assert [len(server.gets(f"/m/{n}")) for n in names] == [1, 1, 1]
    r = cli("pull", f"{server.base}/m/{names[2]}")  # the last one: there already
    assert r.returncode == 0 and "use it with: ondevice run -m big-00001-of-00003 (its first shard)" in r.stdout
    for n in (names[1], names[0], names[2]):  # in any order
        assert pull(f"{server.base}/m/{n}", progress=False) == models_dir() / n
    info = resolve("big-00001-of-00003").info
    assert info.split_paths == tuple(models_dir() / n for n in names[1:])
    assert len(info.tensors) == 8 and info.name == "served-0"
    assert json.loads((models_dir() / "big-00002-of-00003.json").read_text())["architecture"] == ""
    assert pull(f"{server.base}/m/{names[1]}", progress=False) == models_dir() / names[1]  # present: not again
    assert len(server.gets(f"/m/{names[1]}")) == 1


def test_already_present_is_not_downloaded_again(server, model_bytes):
    server.files["/tiny.gguf"] = model_bytes
    pull(f"{server.base}/tiny.gguf", progress=False)
    pull(f"{server.base}/tiny.gguf", progress=False)
    assert len(server.gets("/tiny.gguf")) == 1
    pull(f"{server.base}/tiny.gguf", progress=False, force=True)
    assert len(server.gets("/tiny.gguf")) == 2


def test_parse_source(monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "https://mirror.example/")
    assert parse_source("hf://o/r/dir/f.Q4_0.gguf") == ("https://mirror.example/o/r/resolve/main/dir/f.Q4_0.gguf",
                                                        "f.Q4_0")
    assert parse_source("hf://o/r@v1.0/f.gguf")[0] == "https://mirror.example/o/r/resolve/v1.0/f.gguf"
    assert parse_source("https://x.test/a/My%20Model.gguf?download=1")[1] == "My-Model"
    for bad in ("hf://o/f.gguf", "ftp://x/f.gguf", "/local/file.gguf"):
        with pytest.raises(InvalidArgument):
            parse_source(bad)
    with pytest.raises(InvalidArgument, match="catalog"):  # no --name: stored as -x.test (test_pull_names.py)
        pull("https://x.test/smollm2-135m-instruct.gguf", name="smollm2-135m-instruct", progress=False)


def test_cli_pull(server, model_bytes, cli):
    server.files["/tiny.gguf"] = model_bytes
    r = cli("pull", f"{server.base}/tiny.gguf", "--name", "via-cli")
    assert r.returncode == 0, r.stderr
    assert "via-cli" in r.stdout and "not verified" in r.stdout
    r = cli("pull", f"{server.base}/tiny.gguf", "--name", "bad", "--sha256", "0" * 64)
    assert r.returncode == 2 and "does not match" in r.stderr


def test_a_file_larger_than_the_free_space_is_refused_before_writing(server, model_bytes, monkeypatch):
    import shutil

    from ondevice.errors import OndeviceError
    from ondevice.models import hub

    server.files["/m/big.gguf"] = model_bytes
    real = shutil.disk_usage
    monkeypatch.setattr(hub.shutil, "disk_usage", lambda p: real(p)._replace(free=len(model_bytes) // 2))
    with pytest.raises(OndeviceError, match="GB free; free some space"):
        pull(f"{server.base}/m/big.gguf", progress=False, retries=0)
    assert not [f for f in _leftovers() if f.startswith("big") and not f.endswith(".lock")]
