"""`ondevice pull hf.co/OWNER/REPO:QUANT` (Ollama) and `-hf OWNER/REPO[:QUANT]` (llama.cpp): the repository's
file list from a real HTTP server on 127.0.0.1 answering as the Hugging Face Hub does (``/api/models/O/R`` with
``siblings``, ``/O/R/resolve/REV/FILE`` with the bytes), HF_ENDPOINT pointed at it, real GGUF files."""

from __future__ import annotations

import json
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from test_pull import make_gguf

from ondevice.errors import InvalidArgument, ModelNotFound, OndeviceError
from ondevice.models import models_dir, pull, resolve


class Hub:
    """Repositories (``owner/repo`` -> {path: GGUF bytes or other bytes}) served as the Hub serves them."""

    def __init__(self) -> None:
        self.repos: dict[str, dict[str, bytes]] = {}
        self.private: set[str] = set()  # answered 401 + X-Error-Code: RepoNotFound without a token, as the Hub
        self.tokens: dict[str, str] = {}  # gated repositories: owner/repo -> the only token that gets their files
        self.log: list[dict] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _send(self, code: int, body: bytes, ctype: str, extra: dict[str, str] | None = None) -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                for k, v in (extra or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)

            def _not_found(self) -> None:
                self._send(404, json.dumps({"error": "Repository not found"}).encode(), "application/json",
                           {"X-Error-Code": "RepoNotFound"})

            def do_GET(self):
                path = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path)
                hub.log.append({"path": path, "auth": self.headers.get("Authorization")})
                parts = path.strip("/").split("/")
                gated = hub.tokens.get("/".join(parts[2:4] if parts[0] == "api" else parts[:2]))
                if gated is not None and self.headers.get("Authorization") != f"Bearer {gated}":
                    self._send(401, b'{"error":"Access to this model is restricted."}', "application/json",
                               {"X-Error-Code": "GatedRepo"})
                    return
                if parts[:2] == ["api", "models"] and len(parts) in (4, 6):
                    repo_id = "/".join(parts[2:4])
                    if repo_id in hub.private and not self.headers.get("Authorization"):
                        self._send(401, b'{"error":"Invalid username or password."}', "application/json",
                                   {"X-Error-Code": "RepoNotFound"})
                        return
                    if repo_id not in hub.repos:
                        self._not_found()
                        return
                    sha = "0123456789abcdef0123456789abcdef01234567"
                    info = {"_id": "65f0c0ffee", "id": repo_id, "modelId": repo_id, "author": parts[2], "sha": sha,
                            "private": False, "gated": False, "disabled": False, "downloads": 1, "likes": 0,
                            "tags": ["gguf"], "library_name": "gguf", "lastModified": "2025-01-01T00:00:00.000Z",
                            "siblings": [{"rfilename": f} for f in hub.repos[repo_id]]}
                    self._send(200, json.dumps(info).encode(), "application/json; charset=utf-8")
                    return
                if len(parts) >= 5 and parts[2] == "resolve":
                    files = hub.repos.get("/".join(parts[:2]), {})
                    body = files.get("/".join(parts[4:]))
                    if body is None:
                        self._send(404, b"Entry not found", "text/plain", {"X-Error-Code": "EntryNotFound"})
                        return
                    self._send(200, body, "application/octet-stream", {"ETag": f'"{len(body)}-{hash(body)}"'})
                    return
                self._not_found()

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def api_calls(self) -> list[str]:
        return [e["path"] for e in self.log if e["path"].startswith("/api/")]

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture()
def hub(tmp_path, monkeypatch):
    monkeypatch.setenv("ONDEVICE_HOME", str(tmp_path / "home"))
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_TOKEN_PATH", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # no `huggingface-cli login` token of the machine's
    h = Hub()
    monkeypatch.setenv("HF_ENDPOINT", h.base)
    yield h
    h.close()


@pytest.fixture()
def ggufs(tmp_path):
    """Distinct valid GGUF files (by seed), so a test can tell which one was downloaded."""
    made: dict[int, bytes] = {}

    def get(seed: int) -> bytes:
        if seed not in made:
            made[seed] = make_gguf(tmp_path / f"g{seed}.gguf", n_tensors=2, seed=seed).read_bytes()
        return made[seed]

    return get


def _repo(hub: Hub, ggufs, repo_id: str, names: list[str]) -> dict[str, bytes]:
    files = {n: (ggufs(i) if n.endswith(".gguf") else b"text\n") for i, n in enumerate(names)}
    hub.repos[repo_id] = files
    return files


BARTOWSKI = ["README.md", ".gitattributes", "Tiny-Q2_K.gguf", "Tiny-Q4_K_M.gguf", "Tiny-Q8_0.gguf", "Tiny-IQ4_XS.gguf",
             "mmproj-Tiny-f16.gguf"]


def test_no_tag_pulls_q4_k_m_and_records_the_repo_and_tag(hub, ggufs):
    files = _repo(hub, ggufs, "bartowski/Tiny-GGUF", BARTOWSKI)
    for word in ("hf.co/bartowski/Tiny-GGUF", "huggingface.co/bartowski/Tiny-GGUF",
                 "https://huggingface.co/bartowski/Tiny-GGUF/"):
        path = pull(word, progress=False, force=True)
        assert path == models_dir() / "Tiny-Q4_K_M.gguf" and path.read_bytes() == files["Tiny-Q4_K_M.gguf"]
        prov = json.loads(path.with_suffix(".json").read_text())
        assert prov["repo"] == "bartowski/Tiny-GGUF" and prov["tag"] == "Q4_K_M" and prov["requested"] == word
        assert prov["url"] == "hf://bartowski/Tiny-GGUF/Tiny-Q4_K_M.gguf" and prov["source"] == "pull"
    assert hub.api_calls() == ["/api/models/bartowski/Tiny-GGUF"] * 3
    # the already-stored file is recognised as the same source: not downloaded again
    n = len(hub.log)
    assert pull("hf.co/bartowski/Tiny-GGUF:Q4_K_M", progress=False) == models_dir() / "Tiny-Q4_K_M.gguf"
    assert [e["path"] for e in hub.log[n:]] == ["/api/models/bartowski/Tiny-GGUF"]


def test_an_explicit_tag_any_case_and_the_hf_scheme(hub, ggufs, capsys):
    files = _repo(hub, ggufs, "bartowski/Tiny-GGUF", BARTOWSKI)
    path = pull("hf.co/bartowski/Tiny-GGUF:Q8_0", progress=True)
    assert path.name == "Tiny-Q8_0.gguf" and path.read_bytes() == files["Tiny-Q8_0.gguf"]
    assert "ondevice: hf.co/bartowski/Tiny-GGUF:Q8_0 is hf://bartowski/Tiny-GGUF/Tiny-Q8_0.gguf" in capsys.readouterr().err
    assert pull("hf://bartowski/Tiny-GGUF:q2_k", progress=False).read_bytes() == files["Tiny-Q2_K.gguf"]
    assert pull("hf.co/bartowski/Tiny-GGUF:iq4_xs", progress=False).read_bytes() == files["Tiny-IQ4_XS.gguf"]
    assert json.loads((models_dir() / "Tiny-Q2_K.json").read_text())["tag"] == "q2_k"


def test_lowercase_file_names_and_a_revision(hub, ggufs):
    files = _repo(hub, ggufs, "TheBloke/tiny-GGUF", ["tiny.q4_k_s.gguf", "tiny.q4_k_m.gguf", "tiny.q8_0.gguf"])
    assert pull("hf.co/TheBloke/tiny-GGUF", progress=False).read_bytes() == files["tiny.q4_k_m.gguf"]
    path = pull("hf://TheBloke/tiny-GGUF@main:Q8_0", progress=False)
    assert path.name == "tiny.q8_0.gguf" and path.read_bytes() == files["tiny.q8_0.gguf"]
    assert hub.api_calls()[-1] == "/api/models/TheBloke/tiny-GGUF/revision/main"


def test_mmproj_files_are_never_the_model(hub, ggufs):
    files = _repo(hub, ggufs, "o/vl-GGUF", ["mmproj-vl-Q4_K_M.gguf", "vl-Q4_K_M.gguf", "vl.mmproj.Q8_0.gguf"])
    assert pull("hf.co/o/vl-GGUF:Q4_K_M", progress=False).read_bytes() == files["vl-Q4_K_M.gguf"]
    with pytest.raises(InvalidArgument, match=r"^hf.co/o/vl-GGUF has no Q8_0 file; it has Q4_K_M: name one"):
        pull("hf.co/o/vl-GGUF:Q8_0", progress=False)
    _repo(hub, ggufs, "o/only-proj", ["mmproj-f16.gguf", "README.md"])
    with pytest.raises(InvalidArgument, match=r"^hf.co/o/only-proj has no .gguf model files"):
        pull("hf.co/o/only-proj", progress=False)


def test_a_tag_inside_a_longer_tag_does_not_match(hub, ggufs):
    files = _repo(hub, ggufs, "o/r", ["m-IQ4_K_M.gguf", "m-Q4_K_M.gguf", "m-Q4_K_S.gguf"])
    assert pull("hf.co/o/r:Q4_K_M", progress=False).read_bytes() == files["m-Q4_K_M.gguf"]
    _repo(hub, ggufs, "o/iq", ["m-IQ4_K_M.gguf", "m-Q8_0.gguf"])
    with pytest.raises(InvalidArgument, match=r"^hf.co/o/iq has no Q4_K_M file \(the default when no :QUANT is "
                                              r"given\); it has IQ4_K_M, Q8_0: name one, e.g. `ondevice pull "
                                              r"hf.co/o/iq:IQ4_K_M`$"):
        pull("hf.co/o/iq", progress=False)
    with pytest.raises(InvalidArgument, match=r"has no Q4_K file; it has IQ4_K_M, Q4_K_M, Q4_K_S"):
        pull("hf.co/o/r:Q4_K", progress=False)  # a prefix of Q4_K_M / Q4_K_S is not their tag


def test_a_tag_not_found_lists_the_tags_and_pulls_nothing(hub, ggufs):
    _repo(hub, ggufs, "o/r", ["README.md", "r-Q8_0.gguf", "r-F16.gguf", "r-Q5_K_M.gguf"])
    with pytest.raises(InvalidArgument, match=r"^hf.co/o/r has no Q6_K file; it has Q8_0, F16, Q5_K_M: name one, "
                                              r"e.g. `ondevice pull hf.co/o/r:Q8_0`$"):
        pull("hf.co/o/r:Q6_K", progress=False)
    assert not any(e["path"].endswith(".gguf") for e in hub.log)
    assert not models_dir().exists() or list(models_dir().iterdir()) == []


def test_missing_and_private_repositories(hub, ggufs, monkeypatch):
    with pytest.raises(OndeviceError, match=rf"^hf.co/o/nope: no such repository on {hub.base} \(HTTP 404\); check "
                                            r"the owner and the name"):
        pull("hf.co/o/nope:Q4_K_M", progress=False)
    _repo(hub, ggufs, "o/secret", ["s-Q4_K_M.gguf"])
    hub.private.add("o/secret")
    with pytest.raises(OndeviceError, match=r"^hf.co/o/secret: not found or not accessible on .* \(HTTP 401\); check "
                                            r"the owner and the name; a private or gated repository needs a token "
                                            r"with access .*: set HF_TOKEN, or run `huggingface-cli login`"):
        pull("hf.co/o/secret", progress=False)
    monkeypatch.setenv("HF_TOKEN", "tok-123")
    assert pull("hf.co/o/secret", progress=False).name == "s-Q4_K_M.gguf"
    assert {e["auth"] for e in hub.log if e["path"].startswith(("/api/models/o/secret", "/o/secret/"))} >= {
        "Bearer tok-123"}


def test_a_repository_without_gguf_files(hub, ggufs):
    _repo(hub, ggufs, "o/safetensors", ["README.md", "config.json", "model.safetensors", "tokenizer.json"])
    with pytest.raises(InvalidArgument, match=r"^hf.co/o/safetensors has no .gguf model files \(json, safetensors "
                                              r"files\); ondevice runs GGUF: look for a -GGUF repository"):
        pull("hf.co/o/safetensors:Q4_K_M", progress=False)


def test_a_split_quant_pulls_every_shard_and_a_single_file_beats_them(hub, ggufs, tmp_path):
    """As llama.cpp's -hf: every shard of the quant, under its own name, so the model runs from the first."""
    make_gguf(tmp_path / "big-Q4_K_M.gguf", n_tensors=4, split_max_tensors=2)
    names = ("big-Q4_K_M-00001-of-00002.gguf", "big-Q4_K_M-00002-of-00002.gguf")
    shards = {n: (tmp_path / n).read_bytes() for n in names}
    hub.repos["o/big"] = {**shards, "big-Q2_K.gguf": ggufs(7)}
    path = pull("hf.co/o/big", progress=False)
    assert path == models_dir() / "big-Q4_K_M-00001-of-00002.gguf"
    assert {n: (models_dir() / n).read_bytes() for n in shards} == shards
    info = resolve("big-Q4_K_M-00001-of-00002").info
    assert info.split_paths == (models_dir() / "big-Q4_K_M-00002-of-00002.gguf",) and len(info.tensors) == 4
    assert json.loads(path.with_suffix(".json").read_text())["tag"] == "Q4_K_M"
    with pytest.raises(InvalidArgument, match=r"split into 2 files: --name and --sha256 are for one file"):
        pull("hf.co/o/big", name="mine", progress=False)
    hub.repos["o/half"] = {"big-Q4_K_M-00001-of-00002.gguf": shards["big-Q4_K_M-00001-of-00002.gguf"]}
    with pytest.raises(InvalidArgument, match=r"^hf.co/o/half:Q4_K_M is split into 2 files but the repository holds 1 "
                                              r"of them \(big-Q4_K_M-00001-of-00002.gguf\); the model is incomplete"):
        pull("hf.co/o/half", progress=False)
    hub.repos["o/two"] = {f"{d}/{n}": b for d in ("a", "b") for n, b in shards.items()}
    with pytest.raises(InvalidArgument, match=r"matches 2 split models; pull one by its first shard's address: "
                                              r"hf://o/two/a/big-Q4_K_M-00001-of-00002.gguf, hf://o/two/b/"):
        pull("hf.co/o/two", progress=False)
    files = _repo(hub, ggufs, "o/both", ["Q4_K_M/b-Q4_K_M-00001-of-00002.gguf", "Q4_K_M/b-Q4_K_M-00002-of-00002.gguf",
                                         "b-Q4_K_M.gguf"])
    assert pull("hf.co/o/both", progress=False).read_bytes() == files["b-Q4_K_M.gguf"]
    _repo(hub, ggufs, "o/two", ["m-7B-Q4_K_M.gguf", "m-7B-1M-Q4_K_M.gguf"])  # two single files: no guess either
    with pytest.raises(InvalidArgument, match=r"^hf.co/o/two:Q4_K_M matches 2 files; pull one of them by name: "
                                              r"hf://o/two/m-7B-Q4_K_M.gguf, hf://o/two/m-7B-1M-Q4_K_M.gguf$"):
        pull("hf.co/o/two", progress=False)


def test_network_failure_names_the_fix(hub):
    hub.close()
    with pytest.raises(OndeviceError, match=r"^hf.co/o/r: cannot reach 127.0.0.1:\d+ to list its files \(.*\); check "
                                            r"the network \(HF_ENDPOINT selects a Hugging Face mirror\)"):
        pull("hf.co/o/r:Q4_K_M", progress=False)


def test_cli_hf_flag_as_llama_cpp(hub, ggufs, cli):
    files = _repo(hub, ggufs, "bartowski/Tiny-GGUF", BARTOWSKI)
    env = {"HF_ENDPOINT": hub.base}
    r = cli("pull", "-hf", "bartowski/Tiny-GGUF:Q8_0", "-q", env=env)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("Tiny-Q8_0: ") and lines[0].endswith("Tiny-Q8_0.gguf")
    assert "  Q8_0 of bartowski/Tiny-GGUF: hf://bartowski/Tiny-GGUF/Tiny-Q8_0.gguf" in lines
    assert lines[-1] == "  use it with: ondevice run -m Tiny-Q8_0 ..."
    r = cli("pull", "--hf-repo", "bartowski/Tiny-GGUF", "-q", env=env)
    assert r.returncode == 0 and r.stdout.startswith("Tiny-Q4_K_M: "), r.stderr
    r = cli("pull", "hf.co/bartowski/Tiny-GGUF:Q2_K", "-q", env=env)
    assert r.returncode == 0 and r.stdout.startswith("Tiny-Q2_K: "), r.stderr
    assert [e["path"] for e in hub.log if e["path"].endswith(".gguf")] == [
        f"/bartowski/Tiny-GGUF/resolve/main/{f}" for f in ("Tiny-Q8_0.gguf", "Tiny-Q4_K_M.gguf", "Tiny-Q2_K.gguf")]
    assert files  # served
    r = cli("pull", "-hf", "bartowski/Tiny-GGUF/Tiny-Q8_0.gguf", env=env)
    assert r.returncode == 2 and "-hf bartowski/Tiny-GGUF/Tiny-Q8_0.gguf: give a Hugging Face repository" in r.stderr
    r = cli("pull", "-hf", "o/r", "hf.co/o/r", env=env)
    assert r.returncode == 2 and "two models: hf.co/o/r and -hf o/r; give the model once" in r.stderr


def test_a_repository_not_pulled_yet(hub, cli):
    """The library names the pull; ``run`` pulls it first (as ollama run; tests/test_pull_on_use.py), and says
    when the Hub has no such repository."""
    with pytest.raises(ModelNotFound, match=r"fetch it first \(`ondevice pull hf.co/bartowski/X-GGUF:Q4_K_M`, or "
                                            r"ondevice.pull\(\) in Python\), then give the address or the name it "
                                            r"prints"):
        resolve("hf.co/bartowski/X-GGUF:Q4_K_M")
    r = cli("run", "-m", "hf.co/bartowski/X-GGUF:Q4_K_M", "Hi", env={"HF_ENDPOINT": hub.base})
    assert r.returncode == 2 and "ondevice run: error: hf.co/bartowski/X-GGUF: no such repository on" in r.stderr
    assert hub.api_calls() == ["/api/models/bartowski/X-GGUF"]


def test_ondevice_pull_is_the_library_door_its_errors_name(hub, ggufs):
    """The library's error and the README say `ondevice.pull()`: it exists, at the top level, and what it pulls
    resolves afterwards with no network."""
    import ondevice

    files = _repo(hub, ggufs, "bartowski/Tiny-GGUF", BARTOWSKI)
    with pytest.raises(ModelNotFound, match=r"or ondevice.pull\(\) in Python"):
        resolve("hf.co/bartowski/Tiny-GGUF:Q8_0")
    assert "pull" in ondevice.__all__ and "pull" in dir(ondevice)
    path = ondevice.pull("hf.co/bartowski/Tiny-GGUF:Q8_0", progress=False)
    assert path == models_dir() / "Tiny-Q8_0.gguf" and path.read_bytes() == files["Tiny-Q8_0.gguf"]
    n = len(hub.log)
    assert resolve("hf.co/bartowski/Tiny-GGUF:Q8_0").path == path and len(hub.log) == n
    assert ondevice.pull("hf://bartowski/Tiny-GGUF/Tiny-Q2_K.gguf", "tiny2", progress=False).name == "tiny2.gguf"


def test_a_split_quant_whose_first_shard_is_missing_is_pulled_again_not_run_from_a_later_shard(hub, tmp_path,
                                                                                                monkeypatch):
    """The later shards come first; when the first's download fails (interrupted, corrupted), the address must not
    resolve to the lone later shard (which fails naming a first shard that is not there): pull-on-use resumes."""
    from ondevice.models import sources

    make_gguf(tmp_path / "big-Q8_0.gguf", n_tensors=4, split_max_tensors=2)
    names = ("big-Q8_0-00001-of-00002.gguf", "big-Q8_0-00002-of-00002.gguf")
    shards = {n: (tmp_path / n).read_bytes() for n in names}
    hub.repos["o/big"] = {names[0]: b"GGUF but cut short", names[1]: shards[names[1]]}
    with pytest.raises(Exception, match="not a usable GGUF"):
        pull("hf.co/o/big:Q8_0", progress=False)
    assert (models_dir() / names[1]).is_file() and not (models_dir() / names[0]).exists()
    with pytest.raises(ModelNotFound, match="is a download address, not a model here yet"):
        resolve("hf.co/o/big:Q8_0")  # the library: not the later shard
    hub.repos["o/big"][names[0]] = shards[names[0]]  # the server is right again
    monkeypatch.setattr(sources, "PULL_ON_USE", True)  # as `run`/`serve` set it
    n = len(hub.log)
    ref = resolve("hf.co/o/big:Q8_0")
    assert ref.path == models_dir() / names[0] and len(ref.info.tensors) == 4
    fetched = [e["path"] for e in hub.log[n:] if e["path"].endswith(".gguf")]
    assert fetched == [f"/o/big/resolve/main/{names[0]}"]  # the later shard was kept, not fetched again


def test_no_tag_takes_the_repositorys_only_model_when_it_has_no_q4_k_m(hub, ggufs, cli):
    """`ollama run hf.co/X/Y` and `llama-cli -hf X/Y` copied from a model card: a repository of one model file
    (named without a quant, or of another quant) has nothing to choose from."""
    one = _repo(hub, ggufs, "one/Smol-GGUF", ["README.md", "smollm2-135m-instruct.gguf"])
    r = cli("pull", "hf.co/one/Smol-GGUF")
    assert r.returncode == 0, r.stderr
    assert "hf.co/one/Smol-GGUF (its only model) is hf://one/Smol-GGUF/smollm2-135m-instruct.gguf" in r.stderr
    assert "the only model of one/Smol-GGUF: hf://one/Smol-GGUF/smollm2-135m-instruct.gguf" in r.stdout
    # its file name is the catalog model's: stored beside it under its owner's name (pull-on-use has no --name)
    assert "smollm2-135m-instruct is the name of a catalog model; storing " in r.stderr
    path = models_dir() / "smollm2-135m-instruct-one.gguf"
    assert path.read_bytes() == one["smollm2-135m-instruct.gguf"]
    assert resolve("hf.co/one/Smol-GGUF").path == path  # found again by that address, with no network
    q8 = _repo(hub, ggufs, "onequant/Smol-GGUF", ["smol-Q8_0.gguf", "mmproj-smol-f16.gguf"])
    got = pull("hf.co/onequant/Smol-GGUF", progress=False)
    assert got.read_bytes() == q8["smol-Q8_0.gguf"]
    assert json.loads(got.with_suffix(".json").read_text())["tag"] == "Q8_0"
    with pytest.raises(InvalidArgument, match=r"has no Q2_K file; it has Q8_0"):  # a tag given is still that tag
        pull("hf.co/onequant/Smol-GGUF:Q2_K", progress=False)
    _repo(hub, ggufs, "two/Smol-GGUF", ["smol-Q8_0.gguf", "smol-Q5_K_M.gguf"])  # two models: no guess
    with pytest.raises(InvalidArgument, match=r"has no Q4_K_M file \(the default when no :QUANT is given\)"):
        pull("hf.co/two/Smol-GGUF", progress=False)


def test_ollama_library_names_and_huggingface_clis_order_are_answered_with_the_form_that_works(hub, cli):
    for word in ("qwen2.5:0.5b", "registry.ollama.ai/library/qwen2.5:0.5b"):
        r = cli("pull", word)
        assert r.returncode == 2 and "Ollama's library is not a source here" in r.stderr, r.stderr
        assert "hf.co/OWNER/REPO:QUANT" in r.stderr and "a web address is written" not in r.stderr
    r = cli("pull", "llama3.2")
    assert r.returncode == 2 and "use hf.co/OWNER/REPO:QUANT" in r.stderr, r.stderr
    r = cli("pull", "bart/Smol-GGUF", "smol-Q8_0.gguf")  # huggingface-cli download REPO FILE
    assert r.returncode == 2 and ("pull takes one address: a file of a repository is hf://bart/Smol-GGUF/smol-Q8_0.gguf"
                                  " (or -hf bart/Smol-GGUF -hff smol-Q8_0.gguf)") in r.stderr, r.stderr
    assert hub.log == []
