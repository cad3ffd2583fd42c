"""Two sources, one file name: bartowski/, unsloth/ and lmstudio-community/ all ship ``X-Q4_K_M.gguf``. A pull
(or pull-on-use from ``run``) whose default store name is held by another source keeps both, under a name that
says whose (``FILE-OWNER``), and says so; another address's interrupted download is kept to be resumed, never
deleted. Real HTTP servers on 127.0.0.1 (test_pull_repo's Hub, test_pull's Server) and the real CLI."""

from __future__ import annotations

import json

import pytest
from test_pull_on_use import SMOL, smol_hub  # noqa: F401 (fixture)
from test_pull_repo import _repo, ggufs, hub  # noqa: F401 (fixtures)

from ondevice.errors import InvalidArgument
from ondevice.models import DownloadInterrupted, models_dir, pull, resolve


def test_a_second_repositorys_file_of_the_same_name_is_kept_beside_the_first(hub, ggufs, cli):  # noqa: F811
    a = _repo(hub, ggufs, "bart/Smol-GGUF", ["smol-Q8_0.gguf"])
    b = {"smol-Q8_0.gguf": ggufs(7)}
    hub.repos["other/Smol-GGUF"] = b
    first = cli("pull", "hf.co/bart/Smol-GGUF:Q8_0", "-q")
    assert first.returncode == 0 and "smol-Q8_0: " in first.stdout, first.stderr
    second = cli("pull", "hf.co/other/Smol-GGUF:Q8_0")
    assert second.returncode == 0, second.stderr
    assert ("smol-Q8_0 is already in the store as another model (pulled from hf://bart/Smol-GGUF/smol-Q8_0.gguf); "
            "storing hf://other/Smol-GGUF/smol-Q8_0.gguf as smol-Q8_0-other") in second.stderr
    assert "use it with: ondevice run -m smol-Q8_0-other ..." in second.stdout
    store = models_dir()
    assert (store / "smol-Q8_0.gguf").read_bytes() == a["smol-Q8_0.gguf"]
    assert (store / "smol-Q8_0-other.gguf").read_bytes() == b["smol-Q8_0.gguf"]
    # each address finds its own file, with no network; pulling either again downloads nothing
    n = len(hub.log)
    assert resolve("hf.co/bart/Smol-GGUF:Q8_0").path == store / "smol-Q8_0.gguf"
    assert resolve("hf.co/other/Smol-GGUF:Q8_0").path == store / "smol-Q8_0-other.gguf"
    assert len(hub.log) == n
    assert pull("hf.co/other/Smol-GGUF:Q8_0", progress=False) == store / "smol-Q8_0-other.gguf"
    assert [e["path"] for e in hub.log[n:]] == ["/api/models/other/Smol-GGUF"]
    # a third repository takes the next free name; an explicit --name still refuses to take another's
    hub.repos["third/Smol-GGUF"] = {"smol-Q8_0.gguf": ggufs(8)}
    assert pull("hf.co/third/Smol-GGUF:Q8_0", progress=False).name == "smol-Q8_0-third.gguf"
    with pytest.raises(InvalidArgument, match=r"^smol-Q8_0 is already in the store as another model \(pulled from "
                                              r"hf://bart/Smol-GGUF/smol-Q8_0.gguf\); pass --name NEW"):
        pull("hf://third/Smol-GGUF/smol-Q8_0.gguf", name="smol-Q8_0", progress=False)


def test_run_pulls_a_second_repositorys_same_named_file_instead_of_failing(smol_hub, cli):  # noqa: F811
    """`run` has no --name: it used to fail with "pass --name NEW to keep both, or --force"."""
    smol_hub.repos["other/Smol-GGUF"] = dict(smol_hub.repos["o/Smol-GGUF"])
    assert cli("pull", "hf.co/o/Smol-GGUF:Q4_1", "-q").returncode == 0
    r = cli("run", "hf.co/other/Smol-GGUF:Q4_1", "Hi", "-n", "2", "--temp", "0")
    assert r.returncode == 0, r.stderr
    assert f"storing hf://other/Smol-GGUF/{SMOL} as {SMOL[:-5]}-other" in r.stderr and "--force" not in r.stderr
    again = cli("run", "hf.co/other/Smol-GGUF:Q4_1", "Hi", "-n", "2", "--temp", "0")
    assert again.returncode == 0 and "pulling" not in again.stderr, again.stderr


def test_another_addresss_interrupted_download_is_kept_not_deleted(server, tmp_path, monkeypatch):
    """A's pull is interrupted (A's .part, to resume); B's same-named file used to delete it without a word."""
    from test_pull import make_gguf

    monkeypatch.setenv("ONDEVICE_HOME", str(tmp_path / "home"))
    first, second = (make_gguf(tmp_path / f"{k}.gguf", seed=k).read_bytes() for k in (1, 2))
    server.files["/a/model.gguf"], server.files["/b/model.gguf"] = first, second
    server.etags["/a/model.gguf"] = '"a1"'
    server.drop_after, server.drops_left = 20_000, 1
    with pytest.raises(DownloadInterrupted, match="run the same command again to resume"):
        pull(f"{server.base}/a/model.gguf", retries=0, progress=False)
    part = models_dir() / "model.gguf.part"
    assert part.stat().st_size == 20_000
    with pytest.raises(InvalidArgument, match=rf"^model is an unfinished download of another address, a partial "
                                              rf"download \(0.0 of 0.\d MB\): `ondevice pull {server.base}/a/model"
                                              rf".gguf` resumes it, `ondevice rm model` deletes it; pass --name NEW"):
        pull(f"{server.base}/b/model.gguf", name="model", progress=False)
    got = pull(f"{server.base}/b/model.gguf", progress=False)
    assert got == models_dir() / "model-b.gguf" and got.read_bytes() == second
    assert part.stat().st_size == 20_000  # A's partial download is still there...
    done = pull(f"{server.base}/a/model.gguf", progress=False)  # ...and resumes
    assert done == models_dir() / "model.gguf" and done.read_bytes() == first
    assert server.gets("/a/model.gguf")[-1]["range"] is not None  # resumed, not started over
    assert json.loads(done.with_suffix(".json").read_text())["url"] == f"{server.base}/a/model.gguf"


def test_pulling_again_updates_a_file_changed_on_the_server(server, tmp_path, monkeypatch):
    """A re-upload (a fixed template, a broken quant replaced) was never fetched: pull said "already in the store"
    with the OLD sha "verified". Now one HEAD asks the server's sha256 (its ETag, HF's X-Linked-Etag)."""
    import hashlib

    from test_pull import make_gguf

    monkeypatch.setenv("ONDEVICE_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    old, new = (make_gguf(tmp_path / f"{k}.gguf", seed=k).read_bytes() for k in (1, 2))
    url = f"{server.base}/r/model.gguf"

    def serve(body: bytes) -> None:
        server.files["/r/model.gguf"] = body
        server.etags["/r/model.gguf"] = f'"{hashlib.sha256(body).hexdigest()}"'

    serve(old)
    path = pull(url, progress=False)
    assert path.read_bytes() == old and len(server.gets("/r/model.gguf")) == 1
    assert pull(url, progress=False) == path and len(server.gets("/r/model.gguf")) == 1  # unchanged: a HEAD only
    assert server.heads == ["/r/model.gguf"]
    serve(new)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # offline: the stored file, no request at all
    assert pull(url, progress=False).read_bytes() == old and server.heads == ["/r/model.gguf"]
    monkeypatch.delenv("HF_HUB_OFFLINE")
    assert pull(url, progress=False).read_bytes() == new  # changed: fetched again, under the same name
    record = json.loads(path.with_suffix(".json").read_text())
    assert record["sha256"] == hashlib.sha256(new).hexdigest() and record["sha256_verified_against"] == "ETag"
    assert pull(url, sha256=hashlib.sha256(new).hexdigest(), progress=False) == path  # pinned: not even a HEAD
    assert len(server.heads) == 2
