"""A download address given where a model goes: ``ondevice run hf.co/OWNER/REPO:QUANT`` pulls it first when the
store lacks it (as ``ollama run`` does), llama-cli/llama-server's ``-hf OWNER/REPO[:QUANT]`` and ``-hff FILE`` do
the same, and an address pulled before resolves from the store with no network (the library never downloads on
its own). The Hub is a real HTTP server on 127.0.0.1 (test_pull_repo's), serving the real SmolLM2 file."""

from __future__ import annotations

import pytest
from conftest import serve_process
from test_pull_repo import BARTOWSKI, Hub, _repo, ggufs, hub  # noqa: F401 (fixtures)

from ondevice.errors import InvalidArgument, ModelNotFound
from ondevice.models import pull, resolve
from ondevice.models.hf_repo import hf_address

SMOL = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture()
def smol_hub(hub, smol_path):  # noqa: F811 — test_pull_repo's fixture
    """The Hub serving the real default model's file in ``o/Smol-GGUF`` (as a Q4_1 quant)."""
    hub.repos["o/Smol-GGUF"] = {"README.md": b"smol\n", SMOL: smol_path.read_bytes()}
    return hub


def _files(h: Hub) -> list[str]:
    return [e["path"] for e in h.log if e["path"].endswith(".gguf")]


def test_the_library_resolves_a_pulled_address_offline_and_never_downloads(hub, ggufs):  # noqa: F811
    files = _repo(hub, ggufs, "bartowski/Tiny-GGUF", BARTOWSKI)
    with pytest.raises(ModelNotFound, match=r"^hf.co/bartowski/Tiny-GGUF:Q8_0 is a download address, not a model "
                                            r"here yet; fetch it first \(`ondevice pull hf.co/bartowski/Tiny-GGUF"
                                            r":Q8_0`, or ondevice.pull\(\) in Python\)"):
        resolve("hf.co/bartowski/Tiny-GGUF:Q8_0")
    assert hub.log == []
    path = pull("hf.co/bartowski/Tiny-GGUF:Q8_0", progress=False)
    n = len(hub.log)
    # the same repository and quant in every spelling: Ollama's, hf://, a browser's, llama.cpp's -hf (as pull
    # records it), any case of the tag
    for word in ("hf.co/bartowski/Tiny-GGUF:Q8_0", "hf.co/bartowski/Tiny-GGUF:q8_0", "hf://bartowski/Tiny-GGUF:Q8_0",
                 "https://huggingface.co/bartowski/Tiny-GGUF:Q8_0", "HF.CO/bartowski/tiny-gguf:Q8_0"):
        ref = resolve(word)
        assert (ref.path, ref.name, ref.source) == (path, "Tiny-Q8_0", "store")
    assert len(hub.log) == n  # no network
    with pytest.raises(ModelNotFound, match="^hf.co/bartowski/Tiny-GGUF is a download address"):  # Q4_K_M: not it
        resolve("hf.co/bartowski/Tiny-GGUF")
    # a file's address matches the pull of that file however either is spelled, and so does its repository's tag
    q4 = pull("hf://bartowski/Tiny-GGUF/Tiny-Q4_K_M.gguf", progress=False)
    assert q4.read_bytes() == files["Tiny-Q4_K_M.gguf"]
    for word in ("hf://bartowski/Tiny-GGUF/Tiny-Q4_K_M.gguf", "hf://Bartowski/tiny-gguf@main/Tiny-Q4_K_M.gguf",
                 "hf.co/bartowski/Tiny-GGUF/Tiny-Q4_K_M.gguf", f"{hub.base}/bartowski/Tiny-GGUF/resolve/main/Tiny-Q4_K_M.gguf",
                 "https://huggingface.co/bartowski/Tiny-GGUF/resolve/main/Tiny-Q4_K_M.gguf?download=true",
                 "huggingface.co/bartowski/Tiny-GGUF/blob/main/Tiny-Q4_K_M.gguf",
                 "hf.co/bartowski/Tiny-GGUF:Q4_K_M", "hf.co/bartowski/Tiny-GGUF", "hf.co/bartowski/Tiny-GGUF@main:q4_k_m"):
        assert resolve(word).path == q4, word
    with pytest.raises(ModelNotFound, match="is a download address"):  # another revision: another file
        resolve("hf.co/bartowski/Tiny-GGUF@v2:Q4_K_M")
    with pytest.raises(ModelNotFound, match="is a download address"):
        resolve("hf://bartowski/Tiny-GGUF/other/Tiny-Q4_K_M.gguf")
    fetched = "/bartowski/Tiny-GGUF/resolve/main/Tiny-Q4_K_M.gguf"
    assert [e["path"] for e in hub.log[n:]] == [fetched, fetched + ".sha256"]  # the pull only: the rest is offline
    assert resolve(str(q4)).path == q4 and resolve("Tiny-Q4_K_M").path == q4  # as before: path and store name


def test_hf_flags_as_one_address():
    class A:
        def __init__(self, repo=None, file=None):
            self.hf_repo, self.hf_file = repo, file

    assert hf_address(A()) is None
    assert hf_address(A("o/r")) == "hf.co/o/r"  # a repository: Ollama's form (not hf://, a file's)
    assert hf_address(A("o/r:Q8_0")) == "hf.co/o/r:Q8_0"
    assert hf_address(A("o/r", "sub/m-Q8_0.gguf")) == "hf://o/r/sub/m-Q8_0.gguf"
    assert hf_address(A("o/r@v2", "m.gguf")) == "hf://o/r@v2/m.gguf"
    with pytest.raises(InvalidArgument, match=r"^-hff m.gguf names a file of a Hugging Face repository: give the "
                                              r"repository with -hf OWNER/REPO too \(or the file's address, "
                                              r"hf://OWNER/REPO/m.gguf\)$"):
        hf_address(A(None, "m.gguf"))
    with pytest.raises(InvalidArgument, match=r"^two models: smollm2 and -hf o/r; give the model once$"):
        hf_address(A("o/r"), "smollm2")
    with pytest.raises(InvalidArgument, match=r"the quant picks a file and -hff names one; give -hf o/r -hff m.gguf"):
        hf_address(A("o/r:Q8_0", "m.gguf"))
    with pytest.raises(InvalidArgument, match=r"^-hff README.md: give the repository's .gguf file"):
        hf_address(A("o/r", "README.md"))
    with pytest.raises(InvalidArgument, match=r"^-hf o/r/m.gguf: give a Hugging Face repository"):
        hf_address(A("o/r/m.gguf", "m.gguf"))


def test_run_pulls_an_address_it_is_given_then_runs_it_from_the_store(smol_hub, cli):
    prompt = ["Name a colour.", "-n", "8", "--temp", "0", "--seed", "1"]
    ref = cli("run", *prompt)
    assert ref.returncode == 0, ref.stderr
    first = cli("run", "hf.co/o/Smol-GGUF:Q4_1", *prompt)  # ollama run's form: the address first, then the prompt
    assert first.returncode == 0, first.stderr
    assert "ondevice: hf.co/o/Smol-GGUF:Q4_1 is not in the store yet: pulling it" in first.stderr
    assert first.stdout == ref.stdout  # the same model, the same greedy text
    assert _files(smol_hub) == [f"/o/Smol-GGUF/resolve/main/{SMOL}"]
    n = len(smol_hub.log)
    for args in (["hf.co/o/Smol-GGUF:q4_1", *prompt], ["-m", "hf://o/Smol-GGUF:Q4_1", *prompt],
                 ["-hf", "o/Smol-GGUF:Q4_1", "-p", prompt[0], *prompt[1:]]):
        again = cli("run", *args)
        assert again.returncode == 0, again.stderr
        assert again.stdout == ref.stdout and "pulling" not in again.stderr
    assert smol_hub.log[n:] == []  # already in the store: found with no network
    listed = cli("models")
    assert "SmolLM2-135M-Instruct.Q4_1" in listed.stdout, listed.stdout
    gone = cli("rm", "hf.co/o/Smol-GGUF:Q4_1")  # as ollama rm takes what ollama run pulled
    assert gone.returncode == 0 and gone.stdout.startswith("removed SmolLM2-135M-Instruct.Q4_1 ("), gone.stderr
    again = cli("rm", "hf.co/o/Smol-GGUF:Q4_1")
    assert again.returncode == 2 and "nothing in the store was pulled from hf.co/o/Smol-GGUF:Q4_1" in again.stderr


def test_chat_and_hff_pick_a_file_and_mistakes_are_said(smol_hub, cli):
    got = cli("chat", "-hf", "o/Smol-GGUF", "-hff", SMOL, "-n", "4", "--temp", "0", input="Hi\n")
    assert got.returncode == 0, got.stderr
    assert _files(smol_hub) == [f"/o/Smol-GGUF/resolve/main/{SMOL}"]
    got = cli("run", "-hf", "o/Smol-GGUF:Q8_0", "-p", "Hi", "-n", "2")  # no such quant: said, nothing runs
    assert got.returncode == 2 and "hf.co/o/Smol-GGUF has no Q8_0 file; it has Q4_1" in got.stderr, got.stderr
    got = cli("run", "-m", "smollm2", "-hf", "o/Smol-GGUF", "-p", "Hi")
    assert got.returncode == 2 and "two models: smollm2 and -hf o/Smol-GGUF; give the model once" in got.stderr
    got = cli("run", "-hff", SMOL, "-p", "Hi")
    assert got.returncode == 2 and "give the repository with -hf OWNER/REPO too" in got.stderr
    got = cli("pull", "-hf", "o/Smol-GGUF", "-hff", "README.md")
    assert got.returncode == 2 and "-hff README.md: give the repository's .gguf file" in got.stderr


def test_pull_takes_hff(smol_hub, cli):
    got = cli("pull", "-hf", "o/Smol-GGUF", "-hff", SMOL, "-q")
    assert got.returncode == 0, got.stderr
    assert f"use it with: ondevice run -m {SMOL[:-5]}" in got.stdout
    assert _files(smol_hub) == [f"/o/Smol-GGUF/resolve/main/{SMOL}"]


def test_serve_hf_pulls_and_serves_it(smol_hub, tmp_path):
    from openai import OpenAI

    with serve_process(tmp_path, "-hf", "o/Smol-GGUF:Q4_1") as (_, url, log):  # url: the OpenAI base, .../v1
        client = OpenAI(base_url=url, api_key="none")
        ids = [m.id for m in client.models.list().data]
        reply = client.chat.completions.create(model=ids[0], messages=[{"role": "user", "content": "Hi"}],
                                               max_tokens=4)
        import httpx  # Ollama's clients name the model by the address it was pulled from, as Ollama lists it

        base = url.removesuffix("/v1")
        tags = [m["name"] for m in httpx.get(f"{base}/api/tags").json()["models"]]
        shown = httpx.post(f"{base}/api/show", json={"model": "hf.co/o/Smol-GGUF:Q4_1"})
    assert ids == ["hf.co/o/Smol-GGUF:Q4_1"], ids  # named as Ollama names a model pulled from hf.co
    assert tags == ["hf.co/o/Smol-GGUF:Q4_1"] and shown.status_code == 200, shown.text
    assert reply.choices[0].message.content and reply.usage.completion_tokens >= 1
    assert "hf.co/o/Smol-GGUF:Q4_1 is not in the store yet: pulling it" in log.read_text()
    assert _files(smol_hub) == [f"/o/Smol-GGUF/resolve/main/{SMOL}"]


def test_a_split_model_by_a_shards_address(server, tmp_path, cli):
    """A later shard's address given as the model is refused before anything downloads, naming the first's; the
    first shard's brings every shard (as llama.cpp's -hff)."""
    from test_pull import make_gguf

    make_gguf(tmp_path / "big.gguf", split_max_tensors=3)
    names = [f"big-0000{i}-of-00003.gguf" for i in (1, 2, 3)]
    for n in names:
        server.files[f"/m/{n}"] = (tmp_path / n).read_bytes()
    env = {"ONDEVICE_HOME": str(tmp_path / "h")}
    r = cli("bench", "-m", f"{server.base}/m/{names[1]}", "-p", "4", "-n", "0", "-r", "1", "--no-report", env=env)
    assert r.returncode == 2 and f"is shard 2 of 3 of a split model, which runs from its first shard: give " \
                                 f"{server.base}/m/{names[0]}" in r.stderr, r.stderr
    assert server.log == []
    r = cli("pull", f"{server.base}/m/{names[0]}", "-q", env=env)
    assert r.returncode == 0 and "use it with: ondevice run -m big-00001-of-00003 ..." in r.stdout, r.stderr
    assert sorted(e["path"] for e in server.log if e["path"].endswith(".gguf")) == [f"/m/{n}" for n in names]
    assert sorted(p.name for p in (tmp_path / "h" / "models").glob("*.gguf")) == names


def test_the_library_stays_offline_after_a_command_in_the_same_process(hub, ggufs):  # noqa: F811
    from ondevice.cli import main

    _repo(hub, ggufs, "o/r", ["r-Q4_K_M.gguf"])
    assert main(["models", "--json"]) == 0
    with pytest.raises(ModelNotFound, match="is a download address, not a model here yet"):
        resolve("hf.co/o/r")
    assert hub.log == []


def test_odd_spellings_and_combinations(hub, ggufs, cli):  # noqa: F811
    files = _repo(hub, ggufs, "o/r", ["r-Q4_K_M.gguf"])
    assert pull("HF://o/r/r-Q4_K_M.gguf", progress=False).read_bytes() == files["r-Q4_K_M.gguf"]
    got = cli("run", "smollm2", "-hf", "o/r", "-p", "Hi")
    assert got.returncode == 2 and "two models: smollm2 and -hf o/r; give the model once" in got.stderr
    got = cli("run", "--raw", "--chat-template", "chatml", "-p", "Hi")
    assert got.returncode == 2 and "--raw turns the chat template off, and --chat-template gives one" in got.stderr


ODD = ["hf.co/", "hf://", "https://", "hf.co/a", "hf://a/b", "hf://a/b/", "hf://a/b@/f.gguf", "hf.co/a/b:",
       "hf.co/a/b:Q4:latest", "https://huggingface.co/a/b/resolve/main", "https://[::1/x.gguf", "hf.co/api/models",
       "https://hf.co/datasets/a/b/f.gguf", "https://huggingface.co/a/b/resolve/main/f.gguf?x=%ZZ", "hf.co/a/b/%00.gguf",
       "https://h/x-00002-of-00001.gguf", "hf://a/b/" + "x" * 5000 + ".gguf"]


def test_odd_addresses_are_errors_not_tracebacks(hub, ggufs):  # noqa: F811
    """With a pulled model in the store (so each is matched against its record), every odd address is an
    OndeviceError of its own or not found, never another exception."""
    from ondevice.errors import OndeviceError

    _repo(hub, ggufs, "o/r", ["r-Q4_K_M.gguf"])
    pull("hf.co/o/r", progress=False)
    for word in ODD:
        with pytest.raises(OndeviceError):
            resolve(word)
