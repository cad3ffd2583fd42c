"""What ``ondevice adapt``, ``adapt merge`` and ``adapt average`` write, checked by one rule before any work: never
the base model, the training data or an input (even with --force; a link or ``./x`` is the same file), never an
existing file of another kind, an existing adapter (merge: model) only with --force. A full disk at a checkpoint
or at the final write is one line that keeps the training; a --rank that cannot help is refused before it
allocates. The real CLI in a subprocess, with tiny training runs."""

from __future__ import annotations

import hashlib
import json
import re
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from conftest import tmpfs  # noqa: E402

TINY = ("--steps", "1", "--batch", "1", "--max-len", "16", "--layers", "29", "--heldout", "0", "-t", "1")


def _sha(p) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.fixture()
def work(tmp_path, smol_path):
    """A copy of the base (so a failure here cannot harm the shared one), a data file and a tiny adapter of it."""
    from ondevice.adapt import adapter_file
    from ondevice.models.store import cached_sha256

    base = tmp_path / "base.gguf"
    shutil.copyfile(smol_path, base)
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"input": f"Double {i}.", "target": str(2 * i)}) + "\n" for i in range(3)))
    rng = np.random.default_rng(0)
    lora = {"blk.29.attn_v.weight": (rng.standard_normal((4, 576)).astype(np.float32),
                                     rng.standard_normal((192, 4)).astype(np.float32) * 0.01)}
    ad = adapter_file.write(tmp_path / "ad.gguf", "llama", 8.0, lora,
                            {"base_sha256": cached_sha256(base), "base_name": "base"})
    return base, data, ad


def test_adapt_never_writes_over_its_base_or_its_data_even_with_force(cli, work, tmp_path):
    base, data, _ = work
    (tmp_path / "link.gguf").symlink_to(base)
    before = {p: _sha(p) for p in (base, data)}
    cases = [(("-m", str(base), "-o", f"{tmp_path}/./base.gguf"), "the base model"),
             (("-m", str(base), "-o", str(tmp_path / "link.gguf"), "--force"), "the base model"),
             (("-m", str(base), "-o", str(data), "--force"), "the training data")]
    for flags, role in cases:
        r = cli("adapt", str(data), *flags, *TINY)
        assert r.returncode == 2 and "step 1/1" not in r.stderr and "Traceback" not in r.stderr, r.stderr
        o = flags[flags.index("-o") + 1]
        assert re.search(rf"error: -o {re.escape(o)} is {role} \(.*\), which adapt reads; write to another path "
                         rf"\(--force does not change this\)", r.stderr), r.stderr
    assert {p: _sha(p) for p in before} == before


def test_adapt_never_replaces_a_file_that_is_no_adapter_and_an_adapter_only_with_force(cli, work, tmp_path):
    base, data, ad = work
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    r = cli("adapt", str(data), "-m", str(base), "-o", str(notes), "--force", *TINY)
    assert r.returncode == 2 and "step 1/1" not in r.stderr, r.stderr
    assert (f"error: -o {notes} is there already and is not a LoRA adapter; adapt does not replace it, even with "
            f"--force") in r.stderr, r.stderr
    assert notes.read_text() == "mine"
    other = tmp_path / "other.gguf"  # a model is no adapter either
    shutil.copyfile(base, other)
    r = cli("adapt", str(data), "-m", str(base), "-o", str(other), "--force", *TINY)
    assert r.returncode == 2 and "is there already and is not a LoRA adapter" in r.stderr, r.stderr
    before = _sha(ad)
    r = cli("adapt", str(data), "-m", str(base), "-o", str(ad), *TINY)
    assert r.returncode == 2 and "step 1/1" not in r.stderr, r.stderr
    assert f"error: adapt would replace the adapter {ad}; give another name, or --force" in r.stderr, r.stderr
    assert _sha(ad) == before
    r = cli("adapt", str(data), "-m", str(base), "-o", str(ad), "--force", *TINY)
    assert r.returncode == 0 and f"note: this run replaces {ad}" in r.stderr, r.stderr
    assert _sha(ad) != before


def test_a_stored_name_is_replaced_only_with_force_and_resume_needs_none(cli, work, tmp_path):
    _, data, ad = work
    home = tmp_path / "home" / "adapters"
    home.mkdir(parents=True)
    shutil.copyfile(ad, home / "dates.gguf")
    r = cli("adapt", str(data), "--name", "dates", *TINY)
    assert r.returncode == 2 and "step 1/1" not in r.stderr, r.stderr
    assert f"error: adapt would replace the adapter {home / 'dates.gguf'}; give another name, or --force" in r.stderr
    # a rerun's resume (the same command plus --resume, as `adapt list` gives it) is not stopped by the adapter
    r = cli("adapt", str(data), "--name", "dates", *TINY, "--resume")
    assert r.returncode == 2 and f"--resume: no checkpoint at {home / 'dates.gguf.ckpt.pt'}" in r.stderr, r.stderr
    r = cli("adapt", str(data), "--name", "dates", *TINY, "--force")
    assert r.returncode == 0 and f"note: this run replaces {home / 'dates.gguf'}" in r.stderr, r.stderr
    assert _sha(home / "dates.gguf") != _sha(ad)


def test_the_library_makes_the_same_check_of_out_worded_for_a_python_call(work, tmp_path, monkeypatch):
    """``ondevice.adapt(..., out=PATH)`` replaced an adapter there without a word (the CLI needs --force): now the
    CLI's one check, before any work, its fixes said as arguments (``force=True``, ``out=``)."""
    import ondevice
    from ondevice.errors import InvalidArgument

    base, data, ad = work
    monkeypatch.setenv("ONDEVICE_HOME", str(tmp_path / "home"))
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    tiny = {"model": str(base), "steps": 1, "batch": 1, "max_len": 16, "layers": (29,), "heldout": 0, "threads": 1,
            "progress": False}
    before = {p: _sha(p) for p in (base, data, ad, notes)}
    with pytest.raises(InvalidArgument) as e:
        ondevice.adapt(str(data), out=str(ad), **tiny)
    assert str(e.value) == f"ondevice.adapt would replace the adapter {ad}; give another name, or force=True to " \
                           f"replace it"
    for out, role in ((base, "the base model"), (data, "the training data")):
        with pytest.raises(InvalidArgument) as e:
            ondevice.adapt(str(data), out=str(out), force=True, **tiny)
        assert str(e.value) == f"out={str(out)!r} is {role} ({out if out == base else data}), which " \
                               f"ondevice.adapt reads; write to another path (force=True does not change this)"
    with pytest.raises(InvalidArgument) as e:
        ondevice.adapt(str(data), out=str(notes), force=True, **tiny)
    assert str(e.value) == f"out={str(notes)!r} is there already and is not a LoRA adapter; ondevice.adapt does " \
                           f"not replace it, even with force=True: give out= a new file, or move that one away first"
    stored = tmp_path / "home" / "adapters" / "dates.gguf"  # a stored name, as --name
    stored.parent.mkdir(parents=True)
    shutil.copyfile(ad, stored)
    with pytest.raises(InvalidArgument, match="^ondevice.adapt would replace the adapter .*dates.gguf; give another "
                                              "name, or force=True to replace it$"):
        ondevice.adapt(str(data), name="dates", **tiny)
    assert {p: _sha(p) for p in before} == before and _sha(stored) == before[ad]
    r = ondevice.adapt(str(data), out=str(ad), force=True, **tiny)
    assert r["adapter"] == str(ad) and _sha(ad) != before[ad]


def test_merge_and_average_never_write_over_their_own_inputs_even_with_force(cli, work, tmp_path):
    base, data, ad = work
    before = {p: _sha(p) for p in (base, data, ad)}
    r = cli("adapt", "merge", str(ad), "-m", str(base), "-o", str(base), "--force")
    assert r.returncode == 2 and (f"error: -o {base} is the base model ({base}), which adapt merge reads; write to "
                                  f"another path (--force does not change this)") in r.stderr, r.stderr
    r = cli("adapt", "merge", str(ad), "-m", str(base), "-o", str(data), "--force")
    assert r.returncode == 2 and "is there already and is not a GGUF model" in r.stderr, r.stderr
    ad2 = tmp_path / "ad2.gguf"
    shutil.copyfile(ad, ad2)
    dotted = f"{tmp_path}/./{ad2.name}"  # another spelling of the same file
    r = cli("adapt", "average", str(ad), str(ad2), "-o", dotted, "--force")
    assert r.returncode == 2, r.stderr
    assert f"error: -o {dotted} is one of the adapters it averages ({ad2})" in r.stderr, r.stderr
    r = cli("adapt", "average", str(ad), str(ad2), "-o", str(base), "--force")
    assert r.returncode == 2 and "is there already and is not a LoRA adapter" in r.stderr, r.stderr
    assert {p: _sha(p) for p in before} == before


def test_a_rank_above_the_adapted_matrices_is_refused_before_anything_is_allocated(cli, work):
    base, data, _ = work
    for rank in ("100000", "193"):
        r = cli("adapt", str(data), "-m", str(base), "-o", "r.gguf", "--rank", rank, *TINY, timeout=120)
        assert r.returncode == 2 and "step 1/1" not in r.stderr, r.stderr
        assert (f"error: --rank {rank}: above 192, the smallest dimension of the matrices it adapts (attn_v: "
                f"192x576), a LoRA adds nothing over a full-rank change, and costs memory; give --rank 192 or less"
                in r.stderr), r.stderr


def test_killed_for_memory_names_adapts_own_knobs_not_ctx(cli, tmp_path):
    r = cli("adapt", str(tmp_path / "d.jsonl"), env={"ONDEVICE_TEST_CRASH": "SIGKILL"})
    assert r.returncode == 137, r.stderr
    assert "--ctx" not in r.stderr and "--rank, --max-len or --batch" in r.stderr, r.stderr


def test_an_encrypted_or_empty_container_is_named_as_such(cli, work, tmp_path):
    base, _, ad = work
    key = tmp_path / "k.key"
    assert cli("protect", "keygen", "-o", str(key)).returncode == 0
    enc = tmp_path / "s.enc"
    r = cli("protect", "encrypt", str(base), "-o", str(enc), "--key-file", str(key))
    assert r.returncode == 0, r.stderr
    r = cli("adapt", "merge", str(ad), "-m", str(enc), "-o", str(tmp_path / "m.gguf"))
    assert r.returncode == 2 and "convert_hf_to_gguf" not in r.stderr, r.stderr
    assert "this is an encrypted model (`ondevice protect encrypt`)" in r.stderr and "plaintext .gguf" in r.stderr
    empty = tmp_path / "empty.enc"
    empty.write_bytes(b"")
    r = cli("run", "-m", str(empty), "--key-file", str(key), "-n", "2", "Hi")
    assert r.returncode == 2 and "ondevice pull" not in r.stderr, r.stderr
    assert "an encrypted container (`ondevice protect encrypt`) that is empty or cut short" in r.stderr, r.stderr


def test_a_full_disk_at_a_checkpoint_is_one_line_and_keeps_the_one_before(cli, work, tmp_path):
    base, data, _ = work
    with tmpfs(tmp_path / "full", "size=300k") as full:  # one checkpoint (190 KB) fits, a second beside it not
        out = full / "a.gguf"
        r = cli("adapt", str(data), "-m", str(base), "-o", str(out), *TINY, "--steps", "3", "--checkpoint-every", "1")
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        line = [x for x in r.stderr.splitlines() if "error:" in x]
        assert len(line) == 1 and re.search(
            rf"error: cannot write {re.escape(str(out))}.ckpt.pt: No space left on device \(the checkpoint needs "
            rf"[\d.]+ MB, [\d.]+ MB free there\); training stopped at step 2/3; {re.escape(str(out))}.ckpt.pt still "
            rf"holds step 1: free some space .* plus --resume$", line[0]), r.stderr
        assert sorted(p.name for p in full.iterdir()) == ["a.gguf.ckpt.pt"]  # no .part left
        assert torch.load(full / "a.gguf.ckpt.pt", weights_only=True)["step"] == 1


def test_a_full_disk_at_the_final_write_keeps_the_finished_training_to_resume(cli, work, tmp_path):
    base, data, _ = work
    spare = tmp_path / "spare"
    spare.mkdir()
    with tmpfs(tmp_path / "full", "size=400k") as full:
        filler = full / "filler"
        filler.write_bytes(b"\0" * 360_000)  # 40 KB left: neither the adapter (63 KB) nor its checkpoint fits
        out = full / "a.gguf"
        args = ("adapt", str(data), "-m", str(base), "-o", str(out), *TINY, "--steps", "2")
        r = cli(*args, env={"TMPDIR": str(spare)})
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        assert re.search(rf"error: cannot write {re.escape(str(out))}: No space left on device \(the adapter needs "
                         rf"[\d.]+ MB, [\d.]+ MB free there\); the finished training \(2 steps\) is kept in "
                         rf"{re.escape(str(spare / 'a.gguf.ckpt.pt'))} .*move it to {re.escape(str(out))}.ckpt.pt "
                         rf"and run the same command plus --resume", r.stderr), r.stderr
        assert sorted(p.name for p in full.iterdir()) == ["filler"]  # nothing half-written
        filler.unlink()
        shutil.move(spare / "a.gguf.ckpt.pt", full / "a.gguf.ckpt.pt")  # as the user would: another disk
        r = cli(*args, "--resume")
        assert r.returncode == 0 and "step 1/2" not in r.stderr, r.stderr  # written, no step trained again
        assert sorted(p.name for p in full.iterdir()) == ["a.gguf"]


def test_a_full_disk_during_merge_is_one_line_and_leaves_nothing_half_written(cli, work, tmp_path):
    """``adapt merge`` onto a disk without room for the merged model: one line (the disk is full, where, the room
    needed and free), its temp file gone, a model that was there kept as it was; -o, or the model store."""
    base, _, ad = work
    with tmpfs(tmp_path / "full", "size=20M") as full:  # the merged SmolLM2 is about 100 MB
        old = full / "m.gguf"
        old.write_bytes(b"GGUF an older model")
        said = r"\(the merged model needs ([\d.]+) MB, ([\d.]+) MB free there\)"
        fix = ": free some space there, or give -o on another disk, and run it again"
        r = cli("adapt", "merge", str(ad), "-m", str(base), "-o", str(old), "--force")
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        m = re.fullmatch(rf"ondevice adapt: error: cannot write {re.escape(str(old))}: No space left on device {said} "
                         rf"\(the file there before is kept as it was\){re.escape(fix)}\n", r.stderr)
        assert m and 15 < float(m[2]) < 21, r.stderr
        need = float(m[1])
        assert [p.name for p in full.iterdir()] == ["m.gguf"] and old.read_bytes() == b"GGUF an older model"
        for flags, home, where in ((("-o", str(full / "new.gguf")), tmp_path / "home", full / "new.gguf"),
                                   ((), full / "home", full / "home" / "models" / "base-ad.gguf")):
            r = cli("adapt", "merge", str(ad), "-m", str(base), *flags, env={"ONDEVICE_HOME": str(home)})
            assert r.returncode == 2 and re.fullmatch(
                rf"ondevice adapt: error: cannot write {re.escape(str(where))}: No space left on device {said}; "
                rf"nothing was written there \(no part file is left\){re.escape(fix)}\n", r.stderr), r.stderr
        left = sorted(str(p.relative_to(full)) for p in full.rglob("*") if p.is_file())
        assert [p for p in left if "gguf" in p or "part" in p] == ["m.gguf"], left
    r = cli("adapt", "merge", str(ad), "-m", str(base), "-o", str(tmp_path / "m.gguf"))
    assert r.returncode == 0, r.stderr
    assert abs((tmp_path / "m.gguf").stat().st_size / 1e6 - need) < 0.2  # the room it said it needed
