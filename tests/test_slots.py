"""A slot's prompt cache saved to a file and restored (engine/slotfile.py, serve/slots.py): in the generator (no
HTTP), then through llama-server's routes (GET /slots, POST /slots/ID?action=save|restore|erase) across a restart,
with the real SmolLM2; broken and foreign files are clear errors (checked in a child process: never a signal)."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from conftest import serve_process
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_clients import _model_path

from ondevice.engine import slotfile
from ondevice.engine.base import EngineConfig
from ondevice.engine.generator import BatchGenerator, Request
from ondevice.engine.llama import LlamaEngine
from ondevice.engine.records import Generation, Sampling
from ondevice.errors import InvalidArgument
from ondevice.serve import BackgroundServer, ServeSettings, slots

DOC = ("The history of the printing press begins in the fifteenth century, when Johannes Gutenberg, a goldsmith "
       "of Mainz, combined movable metal type, oil-based ink and a screw press adapted from wine making. ") * 6


def _engine(n_seq: int = 2) -> LlamaEngine:
    return LlamaEngine(_model_path(), EngineConfig(n_ctx=n_seq * 1024, n_seq_max=n_seq, n_threads=2, type_k="f32",
                                                   type_v="f32"))


def _greedy(gen: BatchGenerator, tokens: list[int], n: int = 12) -> list[Generation]:
    gen.insert(Request(tokens=tokens, sampling=Sampling(temp=0, max_tokens=n)))
    out = []
    while gen.busy:
        out += [ev for _, ev in gen.step() if isinstance(ev, Generation)]
    return out


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A slot file of DOC's prompt (and its 12 greedy tokens), the greedy records that made it, the tokens."""
    eng = _engine()
    try:
        gen = BatchGenerator(eng)
        toks = eng.tokenize(DOC)
        recs = _greedy(gen, toks)
        path = tmp_path_factory.mktemp("slots") / "doc.bin"
        seq = next(s.seq for s in gen.slots if s.cached)
        n, size = slotfile.save(gen, seq, path)
        assert n == len(gen.slots[seq].cached) == len(toks) + 11 and size == path.stat().st_size
        return path, recs, toks
    finally:
        eng.close()


def test_restored_slot_gives_the_same_answer_without_the_prefill(saved):
    path, recs, toks = saved
    eng = _engine()  # a new process's engine: nothing cached
    try:
        gen = BatchGenerator(eng)
        n, size = slotfile.restore(gen, 1, path)
        assert (n, size) == (len(toks) + 11, path.stat().st_size) and gen.slots[1].cached[:len(toks)] == toks
        again = _greedy(gen, toks)
        assert [g.token for g in again] == [g.token for g in recs]
        assert again[-1].cached_tokens == len(toks) - 1  # only the last prompt token computed, in slot 1
        assert slotfile.erase(gen, 1) == len(toks) + 11 and gen.slots[1].cached == [] and eng.n_past(1) == 0
    finally:
        eng.close()


def test_a_slot_computed_under_other_adapters_is_refused_saying_what_to_do(tmp_path):
    """A file records no adapters, so a slot computed under a set other than the default is not saved. The
    message named "adapters none" and said to save "a slot whose last request named none", which the refused
    slot's last request already was when the default itself had changed (helper-146)."""
    from ondevice.errors import InvalidArgument

    eng = _engine(1)
    try:
        gen = BatchGenerator(eng)
        _greedy(gen, eng.tokenize("Hello there."), n=2)  # computed under no adapter
        with pytest.raises(InvalidArgument) as e:
            slotfile.save(gen, 0, tmp_path / "s.bin", ads=("dates@0.3",))
    finally:
        eng.close()
    assert str(e.value) == ("slot 0 holds a prompt computed under no adapter, not under the default (adapters "
                            "dates@0.3); a slot file records no adapters, so send the prompt again with no adapter "
                            "named (the default) and save the slot then")
    assert not (tmp_path / "s.bin").exists()


def test_a_file_that_is_not_for_this_slot_is_an_error_naming_it(saved, tmp_path):
    path, _, toks = saved
    blob = path.read_bytes()
    eng = _engine()
    small = LlamaEngine(_model_path(), EngineConfig(n_ctx=4 * 64, n_seq_max=4, n_threads=2, type_k="f32", type_v="f32"))
    try:
        gen = BatchGenerator(eng)
        cases = {
            "not a slot file": b"GGUF" + blob[4:],
            "cut short": blob[:40],
            "too short": blob[:6],
            "version 2": blob[:4] + struct.pack("<I", 2) + blob[8:],
            "outside this model's vocabulary": blob[:12 + 4 * 3] + struct.pack("<i", 10**6) + blob[12 + 4 * 4:],
            "the file is damaged": blob[:-1000],  # the KV part cut
        }
        for why, data in cases.items():
            (tmp_path / "f.bin").write_bytes(data)
            with pytest.raises(slotfile.SlotFileError, match=why):
                slotfile.restore(gen, 0, tmp_path / "f.bin")
            assert gen.slots[0].cached == [] and eng.n_past(0) == 0  # nothing half-restored
        with pytest.raises(slotfile.SlotFileError, match="no such file"):
            slotfile.restore(gen, 0, tmp_path / "none.bin")
        with pytest.raises(slotfile.SlotFileError, match=f"holds {len(toks) + 11} tokens but the context here holds 63; give a larger -c/--ctx"):
            slotfile.restore(BatchGenerator(small), 0, path)
        f16 = LlamaEngine(_model_path(), EngineConfig(n_ctx=2 * 1024, n_seq_max=2, n_threads=2))  # other KV type
        try:
            with pytest.raises(slotfile.SlotFileError, match=r"does not fit this model/context \(state_read_data: "
                                                             r"mismatched key type.*another model or other context"):
                slotfile.restore(BatchGenerator(f16), 0, path)
            assert f16.n_past(0) == 0 and f16.ll.llama_memory_seq_pos_max(f16.mem, 0) == -1
        finally:
            f16.close()
        gen.insert(Request(tokens=toks, sampling=Sampling(temp=0, max_tokens=4)))
        busy = next(s.seq for s in gen.slots if s.req is not None)
        with pytest.raises(slotfile.SlotBusy):
            slotfile.save(gen, busy, tmp_path / "g.bin")
        assert not (tmp_path / "g.bin").exists()
    finally:
        small.close()
        eng.close()


_RESTORE = """
import sys
from ondevice.engine import slotfile
from ondevice.engine.base import EngineConfig
from ondevice.engine.generator import BatchGenerator
from ondevice.engine.llama import LlamaEngine
eng = LlamaEngine(sys.argv[1], EngineConfig(n_ctx=2048, n_seq_max=2, n_threads=1, type_k="f32", type_v="f32"))
gen = BatchGenerator(eng)
for p in sys.argv[2:]:
    try:
        slotfile.restore(gen, 0, p)
        print("restored")
    except slotfile.SlotFileError:
        print("refused")
print("held", eng.ll.llama_memory_seq_pos_max(eng.mem, 0) + 1)  # after the last (the undamaged file)
"""


def test_corrupted_kv_bytes_never_crash_the_process(saved, tmp_path):
    """Bytes flipped across the KV part (its counts, cell positions, layer headers): each file is refused or
    restored, in a child process that must exit normally (a llama.cpp abort would be a signal), and none leaves
    a cell behind (a position llama.cpp cannot remove): the undamaged file then restores exactly its tokens."""
    path, _, toks = saved
    blob = bytearray(path.read_bytes())
    start = 12 + 4 * (len(toks) + 11 + 4)
    files = []
    for i, off in enumerate([start, start + 4, start + 8, start + 12, start + 20, start + 40, start + 200,
                             start + 1000, len(blob) // 2, len(blob) - 8]):
        bad = bytearray(blob)
        bad[off:off + 4] = b"\xff\xff\xff\x7f"
        f = tmp_path / f"m{i}.bin"
        f.write_bytes(bad)
        files.append(str(f))
    r = subprocess.run([sys.executable, "-c", _RESTORE, str(_model_path()), *files, str(path)], capture_output=True,
                       text=True, timeout=300, check=False)
    assert r.returncode == 0, r.stderr[-2000:]
    out = r.stdout.split()
    assert len(out) == len(files) + 3 and set(out[:-3]) <= {"restored", "refused"} and "refused" in out[:-3]
    assert out[-3:] == ["restored", "held", str(len(toks) + 11)]


def _post(base: str, path: str, body=None, status: int = 200):
    r = httpx.post(base + path, json=body, timeout=300) if body is not None else httpx.post(base + path, timeout=300)
    assert r.status_code == status, r.text
    return r.json()


def test_slots_routes_save_and_restore_across_a_restart(tmp_path):
    folder = tmp_path / "slots"
    folder.mkdir()
    settings = {"model": str(_model_path()), "port": 0, "parallel": 2, "ctx": 1024, "threads": 2, "kv_type": "f32",
                "slot_save_path": str(folder)}
    body = {"prompt": DOC, "n_predict": 12, "temperature": 0}
    with BackgroundServer(ServeSettings(**settings)) as s:
        base = s.base_url
        first = _post(base, "/completion", body)
        slots = httpx.get(base + "/slots", timeout=60).json()
        assert [d["id"] for d in slots] == [0, 1] and not any(d["is_processing"] for d in slots)
        used = slots[first["id_slot"]]
        assert used["n_prompt_tokens"] == first["tokens_evaluated"] and used["next_token"][0]["n_decoded"] == 12
        assert used["params"]["temperature"] == 0 and used["n_ctx"] == 1024
        saved = _post(base, f"/slots/{first['id_slot']}?action=save", {"filename": "doc.bin"})
        assert saved["filename"] == "doc.bin" and saved["n_saved"] == first["tokens_evaluated"] + 11
        assert saved["n_written"] == (folder / "doc.bin").stat().st_size and "save_ms" in saved["timings"]
        assert [p.name for p in folder.iterdir()] == ["doc.bin"]  # no temporary file left
        props = httpx.get(base + "/props", timeout=60).json()
        assert props["endpoint_slots"] is True
    with BackgroundServer(ServeSettings(**settings)) as s:  # a restart: nothing cached
        base = s.base_url
        got = _post(base, "/slots/1?action=restore", {"filename": "doc.bin"})
        assert got["n_restored"] == saved["n_saved"] and got["n_read"] == saved["n_written"]
        again = _post(base, "/completion", body)
        assert again["content"] == first["content"] and again["id_slot"] == 1
        assert first["timings"]["prompt_n"] == first["tokens_evaluated"] and again["timings"]["prompt_n"] == 1
        assert _post(base, "/slots/1?action=erase") == {"id_slot": 1, "n_erased": saved["n_saved"]}
        errors = {
            "/slots/1?action=restore": ({"filename": "../doc.bin"}, "Invalid filename"),
            "/slots/0?action=save": ({"name": "x"}, "filename is required"),
            "/slots/9?action=erase": (None, "no slot 9"),
            "/slots/one?action=erase": (None, "Invalid slot ID"),
            "/slots/0?action=load": (None, "Invalid action"),
            "/slots/0?action=restore": ({"filename": "gone.bin"}, "gone.bin: no such file"),
        }
        (folder / "adir").mkdir()
        errors["/slots/1?action=restore "] = ({"filename": "adir"}, "adir is a folder, not a slot file")
        for path, (b, why) in errors.items():
            err = _post(base, path.strip(), b, 400)["error"]
            assert err["code"] == 400 and err["type"] == "invalid_request_error" and why in err["message"], err
            assert str(folder) not in err["message"]  # the server's folder is not shown to clients
        err = _post(base, "/slots/1?action=save", {"filename": "adir"}, 400)["error"]  # a name that is taken
        assert "adir is not a regular file" in err["message"] and str(folder) not in err["message"]
        assert (folder / "adir").is_dir()


def test_an_action_on_a_busy_slot_waits_for_it(tmp_path):
    folder = tmp_path / "slots"
    folder.mkdir()
    settings = ServeSettings(model=str(_model_path()), port=0, parallel=1, ctx=1024, threads=2,
                             slot_save_path=str(folder))
    with BackgroundServer(settings) as s:
        done = {}
        t = threading.Thread(target=lambda: done.setdefault("r", _post(s.base_url, "/completion", {
            "prompt": "Once upon a time", "n_predict": 96, "temperature": 0, "ignore_eos": True})))
        t.start()
        deadline = time.monotonic() + 60
        while not httpx.get(s.base_url + "/slots", timeout=60).json()[0]["is_processing"]:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        saved = _post(s.base_url, "/slots/0?action=save", {"filename": "busy.bin"})
        t.join()
        # it waited for the request to end, and saved what the slot then held: the prompt and 95 tokens
        assert saved["n_saved"] == done["r"]["tokens_evaluated"] + 95


def test_without_the_flags_the_routes_say_how_to_turn_them_on():
    settings = ServeSettings(model=str(_model_path()), port=0, parallel=1, ctx=512, threads=1, slots=False)
    with BackgroundServer(settings) as s:
        r = httpx.get(s.base_url + "/slots", timeout=60)
        assert r.status_code == 501 and "--slots" in r.json()["error"]["message"]
        err = _post(s.base_url, "/slots/0?action=save", {"filename": "a.bin"}, 501)["error"]
        assert err["type"] == "not_supported_error" and "--slot-save-path" in err["message"]


def test_slot_save_path_must_be_a_folder(tmp_path):
    from ondevice.errors import InvalidArgument
    from ondevice.serve.settings import settings_from_args

    with pytest.raises(InvalidArgument, match=r"--slot-save-path.*is not a folder; make it first"):
        settings_from_args(slot_save_path=str(tmp_path / "nope"))


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("slotfuzz")
    (root / "slots").mkdir()
    settings = ServeSettings(model=str(_model_path()), port=0, parallel=1, ctx=256, threads=1,
                             slot_save_path=str(root / "slots"))
    with BackgroundServer(settings) as s:
        yield s, root


@settings(max_examples=150, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.text(max_size=20) | st.sampled_from(["..", ".", "a/../../b", "/etc/passwd", "..\\x", "con.", " a",
                                                     "a" * 256, "é" * 128, "x\x00y", "\ud800"]))
def test_any_filename_is_written_inside_the_folder_or_refused(fuzz_server, name):
    s, root = fuzz_server
    r = httpx.post(s.base_url + "/slots/0?action=save", content=json.dumps({"filename": name}), timeout=60)
    assert r.status_code in (200, 400), r.text
    assert {p.name for p in root.iterdir()} == {"slots"}  # nothing written beside the folder
    if r.status_code == 200:
        assert slots.valid_filename(name) and (root / "slots" / name).is_file()
        assert all(p.parent == root / "slots" for p in (root / "slots").rglob("*"))  # and no folder made in it
        again = httpx.post(s.base_url + "/slots/0?action=restore", content=json.dumps({"filename": name}), timeout=60)
        assert again.status_code == 200, again.text
    else:
        assert not slots.valid_filename(name) and "filename" in r.json()["error"]["message"].lower()


def test_run_prompt_cache_restores_the_prompt_and_keeps_the_file_of_another_model(cli, tmp_path):
    """llama-cli's --prompt-cache on `ondevice run`: the first run saves the prompt's KV, the next computes only
    the prompt's last token and answers the same; --prompt-cache-ro never writes; a file that does not fit is an
    error that leaves it as it was."""
    cache = tmp_path / "prompt.bin"
    args = ("run", "--temp", "0", "-n", "8", "-t", "2", "--timings", "json", "--prompt-cache", str(cache),
            DOC + "\n\nSummarise the text above in one sentence.")
    first = cli(*args)
    assert first.returncode == 0, first.stderr
    rec1 = json.loads(first.stderr.strip().splitlines()[-1])
    assert cache.is_file() and rec1["cached_tokens"] == 0
    saved = cache.read_bytes()
    assert struct.unpack_from("<I", saved, 8)[0] == rec1["prompt_tokens"] + 4  # the prompt only, in llama-server's form
    second = cli(*args)
    rec2 = json.loads(second.stderr.strip().splitlines()[-1])
    assert second.stdout == first.stdout and rec2["cached_tokens"] == rec1["prompt_tokens"] - 1
    assert cache.read_bytes() == saved  # nothing new to save: the file is not rewritten
    ro = tmp_path / "ro.bin"
    assert cli("run", "-n", "2", "--prompt-cache", str(ro), "--prompt-cache-ro", "Hi").returncode == 0
    assert not ro.exists()
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"not a slot file at all")
    bad = cli("run", "-n", "2", "--prompt-cache", str(junk), "Hi")
    assert bad.returncode == 2 and "is not a slot file" in bad.stderr and "delete the file" in bad.stderr
    assert "Traceback" not in bad.stderr and junk.read_bytes() == b"not a slot file at all"


def test_model_prompt_cache_in_python(tmp_path):
    import ondevice

    with ondevice.load(str(_model_path()), n_ctx=1024, n_threads=2) as m:
        a = m.generate(DOC, max_tokens=6, temp=0)
        for bad in (-1, 2.5, True):  # -1 cut the tokens and the KV apart: the next answer and the file were wrong
            with pytest.raises(InvalidArgument, match=rf"n_tokens must be a whole number of tokens >= 0 .*{bad!r}"):
                m.save_prompt_cache(tmp_path / "bad.bin", n_tokens=bad)
        assert not (tmp_path / "bad.bin").exists() and m.generate(DOC, max_tokens=6, temp=0).text == a.text
        n = m.save_prompt_cache(tmp_path / "p.bin", n_tokens=a.last.prompt_tokens)
        assert n == a.last.prompt_tokens
    blob = (tmp_path / "p.bin").read_bytes()
    (tmp_path / "cut.bin").write_bytes(blob[:len(blob) // 2])
    with ondevice.load(str(_model_path()), n_ctx=1024, n_threads=2) as m:
        with pytest.raises(slotfile.SlotFileError, match="cut.bin is cut short"):  # not "another model"
            m.load_prompt_cache(tmp_path / "cut.bin")
        with pytest.raises(slotfile.SlotFileError, match=r"no such file; write one with model.save_prompt_cache\("):
            m.load_prompt_cache(tmp_path / "none.bin")  # not the server's "save a slot under that name first"
        assert len(m.load_prompt_cache(tmp_path / "p.bin")) == n
        b = m.generate(DOC, max_tokens=6, temp=0)
        assert b.text == a.text and b.last.cached_tokens == n - 1


def test_prompt_cache_under_an_adapter_is_reused_under_it(tmp_path):
    """A model with an active LoRA adapter computes its prompts under it: its prompt cache is saved and restored
    under that set (reused: only the last token computed), and the text is the one the same reuse gives in the
    process that computed it (the last token alone takes llama.cpp's small-batch kernels: that adapter's
    near-ties can tip, so not the cold text)."""
    from test_adapt_average import _pairs

    import ondevice
    from ondevice.adapt import adapter_file
    from ondevice.models.store import cached_sha256

    prov = {"base_sha256": cached_sha256(_model_path()), "base_name": "smollm2-135m-instruct"}
    ad = adapter_file.write(tmp_path / "a.gguf", "llama", 8.0, _pairs(0, 4, scale=0.6), prov)
    kw = {"n_ctx": 1024, "n_threads": 2, "adapters": (str(ad),)}
    with ondevice.load(str(_model_path()), **kw) as m:
        a = m.generate(DOC, max_tokens=6, temp=0)
        n = m.save_prompt_cache(tmp_path / "p.bin", n_tokens=a.last.prompt_tokens)
        m.load_prompt_cache(tmp_path / "p.bin")  # the saved logits are dropped: the last token is computed again
        again = m.generate(DOC, max_tokens=6, temp=0)
        assert again.last.cached_tokens == n - 1
    with ondevice.load(str(_model_path()), **kw) as m:
        assert len(m.load_prompt_cache(tmp_path / "p.bin")) == n
        b = m.generate(DOC, max_tokens=6, temp=0)
        assert b.text == again.text and b.last.cached_tokens == n - 1


_WRITER = """
import sys, time
from pathlib import Path
from ondevice.engine.slotfile import _hold
from ondevice.models.store import atomic_path
with atomic_path(Path(sys.argv[1]), follow_links=False) as tmp, open(tmp, "wb") as f:
    _hold(f)  # as slotfile.save holds the file it writes
    f.write(b"half a slot")
    f.flush()
    print(tmp.name, flush=True)
    time.sleep(600)
"""


def _writing(path: Path) -> tuple[subprocess.Popen, str]:
    """A process in the middle of writing slot file ``path`` (its temp file, locked as a save holds it)."""
    p = subprocess.Popen([sys.executable, "-c", _WRITER, str(path)], stdout=subprocess.PIPE, text=True)
    return p, p.stdout.readline().strip()


def test_temp_files_of_saves_killed_mid_write_are_removed_at_start_others_kept(tmp_path):
    """A SIGKILL during a slot save left `.NAME.XXXXXXXX.tmp` in the folder for good. At start the server removes
    those no process holds any longer; a save in progress (another server sharing the folder), a temp file just
    made and other files stay."""
    folder = tmp_path / "slots"
    folder.mkdir()
    killed, stale = _writing(folder / "a.bin")
    killed.kill()
    killed.wait()
    live, busy = _writing(folder / "b.bin")
    try:
        fresh = folder / ".c.bin.Qq1w2e3r.tmp"  # not held, but just made: a save that has not locked it yet
        fresh.write_bytes(b"")
        (folder / "x.bin").write_bytes(b"a slot file")
        (folder / ".notes.tmp").write_bytes(b"someone else's")
        for name in (stale, busy, ".notes.tmp"):
            os.utime(folder / name, (time.time() - 3600, time.time() - 3600))
        with serve_process(tmp_path, "--slot-save-path", str(folder)) as (_, url, log):
            deadline = time.monotonic() + 60
            while "removed" not in log.read_text() and time.monotonic() < deadline:
                time.sleep(0.05)
            said = log.read_text()
        assert f"ondevice serve: note: removed 1 temp file that slot saves killed mid-write left in {folder}" in said
        assert sorted(p.name for p in folder.iterdir()) == sorted([busy, fresh.name, "x.bin", ".notes.tmp"])
    finally:
        live.kill()
        live.wait()
