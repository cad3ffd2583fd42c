"""A PEFT/axolotl user's walk through ``ondevice adapt``: other tools' data formats named with the way to write
them, flag combinations that would drop one flag without a word refused naming it, a layer range that trains
nothing refused (was a traceback), and a rerun that forgot --resume refused before it replaces the checkpoint
of that same run. Ctrl-C is simulated as in test_adapt_resume.py: KeyboardInterrupt from the progress line."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from test_adapt_resume import _interrupt_at, interrupted_run, keep_hard, needs_torch

from ondevice.adapt import data, store, tasks
from ondevice.errors import InvalidArgument
from ondevice.models.store import cached_sha256, sha256_file

TINY = ["--steps", "3", "--batch", "1", "--max-len", "48", "--heldout", "0", "-t", "1", "--checkpoint-every", "1"]


def test_other_tools_data_formats_are_named_with_the_way_to_write_them(tmp_path):
    p = tmp_path / "d.jsonl"
    cases = {  # a line as another tool writes it -> what the error says after the line number
        json.dumps({"instruction": "Double 2", "input": "", "output": "4"}):
            "\"target\" must be a string, and the line has none: got 'instruction', 'input', 'output' (Alpaca's "
            "instruction/input/output: write {\"input\": instruction and input, \"target\": output})",
        json.dumps({"prompt": "hi", "completion": "yo"}):
            "expected \"messages\" or \"input\"/\"target\" keys, got 'prompt', 'completion' (prompt/completion: "
            "write {\"input\": prompt, \"target\": completion})",
        json.dumps({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}):
            "expected \"messages\" or \"input\"/\"target\" keys, got 'conversations' (ShareGPT's conversations of "
            "from/value: write {\"messages\": [{\"role\": \"user\", \"content\": ...}, {\"role\": \"assistant\", "
            "\"content\": ...}]})",
        json.dumps({"text": "Once upon a time"}):
            "expected \"messages\" or \"input\"/\"target\" keys, got 'text' (TRL's plain text: adapt trains a chat "
            "model on answers to prompts, not on running text; write {\"input\": the prompt, \"target\": the "
            "answer})",
        json.dumps([{"input": "a", "target": "b"}]):
            "expected a JSON object, got list (a JSON array: put each of its objects on a line of its own, JSONL)",
    }
    for line, want in cases.items():
        p.write_text(line + "\n")
        with pytest.raises(InvalidArgument) as e:
            data.read_jsonl(p)
        assert str(e.value) == f"{p}:1: {want}"
    p.write_text('[\n  {"input": "a",\n   "target": "b"}\n]\n')  # pretty-printed JSON
    with pytest.raises(InvalidArgument, match=re.escape(f"{p}:1: not valid JSON (Expecting value at column 1); one "
                                                        f"JSON object per line (it does not end on this line: JSONL "
                                                        f"has each object whole on one line)")):
        data.read_jsonl(p)
    p.write_text(json.dumps({"instruction": "Give the date.", "input": "3 May 2031", "target": "2031-05-03"}) + "\n")
    with pytest.raises(InvalidArgument) as e:  # a half-converted Alpaca line trained without its instruction
        data.read_jsonl(p)
    assert str(e.value) == (f"{p}:1: an \"input\"/\"target\" line takes those two keys only, and this one also has "
                            f"'instruction', which would be dropped; put what they say into \"input\", or write the "
                            f"line as {{\"messages\": [...]}} (a \"system\" message first)")
    p.write_text('{"input": "a", "target": "b"}\n{not json}\n')  # a mistake inside a line: no such hint
    with pytest.raises(InvalidArgument) as e:
        data.read_jsonl(p)
    assert str(e.value).endswith("one JSON object per line"), e.value


@needs_torch
def test_flags_that_would_drop_another_or_train_nothing_are_one_line(tmp_path, monkeypatch, capsys):
    from ondevice.cli import main

    monkeypatch.setenv("ONDEVICE_HOME", str(tmp_path / "home"))
    path = tasks.write_jsonl(tasks.iso_dates(4, seed=3), tmp_path / "walk.jsonl")
    cases = {
        ("--budget", "mem=600M", "--rank", "4", "--layers", "29"):
            "--budget chooses the layers, modules and ranks itself; drop --rank --layers, or drop --budget to choose "
            "them by hand",
        ("--name", "a", "-o", str(tmp_path / "a.gguf")):
            f"-o {tmp_path / 'a.gguf'} and --name a both given: -o writes the adapter to that file, --name stores it "
            f"by name (`ondevice adapt list`, `--adapter a`); give one of them",
        ("--layers", "29-26"): "--layers '29-26': the range 29-26 is empty; write the lower layer first, e.g. 26-29",
        ("--layers", "29", "--modules", ","):
            "--modules '' --layers 29: no tensor to train; give at least one of attn_q,attn_k,attn_v,attn_output,"
            "ffn_gate,ffn_up,ffn_down (or 'all') and one layer",
    }
    for flags, want in cases.items():
        assert main(["adapt", str(path), *TINY, *flags]) == 2
        err = capsys.readouterr().err
        assert err == f"ondevice adapt: error: {want}\n", err  # one line, before any step
    for verb in (["merge", "walk", "--name", "m"], ["average", "x", "y", "--name", "s", "-o", "s.gguf"]):
        assert main(["adapt", *verb]) == 2
        err = capsys.readouterr().err
        assert len(err.splitlines()) == 1 and ("--name with merge" in err or "both given" in err), err
    assert not (tmp_path / "home" / "adapters").exists() or not list((tmp_path / "home" / "adapters").iterdir())


@needs_torch
def test_a_rerun_that_forgot_resume_keeps_the_checkpoint_of_that_run(tmp_path, monkeypatch):
    from ondevice.adapt import train

    cfg = interrupted_run(tmp_path, monkeypatch)
    out, ckpt = tmp_path / "walk.gguf", tmp_path / "walk.gguf.ckpt.pt"
    saved = ckpt.read_bytes()
    with pytest.raises(InvalidArgument) as e:  # the same command again, without --resume
        train.train(train.AdaptConfig(**cfg))
    assert str(e.value) == (f"{ckpt} holds this same run, interrupted after step 2: add --resume to continue it (in "
                            f"Python: resume=True), or delete that file to start over")
    assert ckpt.read_bytes() == saved and not out.exists()
    r = train.train(train.AdaptConfig(**cfg, resume=True))  # what it kept still continues
    assert r["steps"] == 3 and len(r["history"]) == 3 and not ckpt.exists()
    # another run's checkpoint (other settings: the start-over a resume refusal advises) is replaced, and said so
    restore = _interrupt_at(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt):
        train.train(train.AdaptConfig(**cfg))
    restore()
    with pytest.warns(UserWarning, match=re.escape(f"starting over: {ckpt} (another run's, interrupted after step "
                                                   f"1) is replaced by this run's checkpoints")):
        r = train.train(train.AdaptConfig(**{**cfg, "rank": 4}))
    assert r["steps"] == 3 and not ckpt.exists()


@needs_torch
def test_from_deferred_without_resume_keeps_the_samples_the_checkpoint_was_made_from(tmp_path, smol_path,
                                                                                      monkeypatch, capsys):
    from ondevice.cli import main

    monkeypatch.setenv("ONDEVICE_HOME", str(tmp_path / "home"))
    db, sha = tmp_path / "store.sqlite", cached_sha256(smol_path)

    for q, a in (("Capital of Peru?", "Lima."), ("2+2?", "4.")):
        keep_hard(db, sha, q, a)
    args = ["adapt", "--from", "deferred", "--db", str(db), "-m", str(smol_path), "--name", "hard", "--layers", "29",
            "--modules", "attn_q", *TINY]
    restore = _interrupt_at(monkeypatch, 2)
    assert main(args) == 130
    restore()
    adapters = tmp_path / "home" / "adapters"
    exported, ckpt = adapters / "hard.gguf.deferred.jsonl", adapters / "hard.gguf.ckpt.pt"
    made_from = exported.read_bytes()
    capsys.readouterr()
    keep_hard(db, sha, "Colour of the sky?", "Blue.")  # kept meanwhile: a new export would replace the checkpoint's samples
    assert main(args) == 2
    assert capsys.readouterr().err == (f"ondevice adapt: error: {ckpt} holds an interrupted run on {exported}: add "
                                       f"--resume to continue it on those samples, or delete {ckpt} to start over on "
                                       f"the samples kept now\n")
    assert exported.read_bytes() == made_from and ckpt.is_file()
    assert main([*args, "--resume"]) == 0
    assert exported.read_bytes() == made_from and not ckpt.exists()


@needs_torch
def test_a_run_named_after_its_data_file_does_not_replace_an_adapter_of_other_data(tmp_path, monkeypatch):
    """Everyone's file is train.jsonl: a second project's run without --name would have replaced the first's."""
    from ondevice.adapt import adapter_file, train

    monkeypatch.setenv("ONDEVICE_HOME", str(tmp_path / "home"))
    first, second = tmp_path / "a" / "train.jsonl", tmp_path / "b" / "train.jsonl"
    for p, seed in ((first, 3), (second, 4)):
        p.parent.mkdir()
        tasks.write_jsonl(tasks.iso_dates(4, seed=seed), p)
    cfg = {"steps": 1, "batch": 1, "max_len": 48, "modules": ("attn_q",), "layers": (29,), "threads": 1,
           "heldout": 0, "progress": False}
    stored = tmp_path / "home" / "adapters" / "train.gguf"
    train.train(train.AdaptConfig(data=str(first), **cfg))
    train.train(train.AdaptConfig(data=str(first), **cfg))  # the same data again: its own adapter, replaced
    with pytest.raises(InvalidArgument) as e:
        train.train(train.AdaptConfig(data=str(second), **cfg))
    assert re.fullmatch(rf"the stored adapter 'train' \(\d{{4}}-\d\d-\d\d \d\d:\d\d, from {re.escape(str(first))}\) "
                        rf"was not made from {re.escape(str(second))}; give this run its own --name "
                        rf"\(e\.g\. --name train-2\), or --name train to replace that adapter", str(e.value)), e.value
    assert adapter_file.read_meta(stored)["ondevice.adapter.data_sha256"] == sha256_file(first)
    train.train(train.AdaptConfig(data=str(second), name="train", **cfg))  # named: replacing it is what was asked
    assert adapter_file.read_meta(stored)["ondevice.adapter.data_sha256"] == sha256_file(second)
    with open(second, "a") as f:  # the file edited since its run: said so, not "was not made from" it
        f.write(json.dumps({"input": "one more", "target": "example"}) + "\n")
    with pytest.raises(InvalidArgument, match=rf"was made from an earlier version of {re.escape(str(second))} \(it "
                                              rf"has changed since\); give this run its own --name"):
        train.train(train.AdaptConfig(data=str(second), **cfg))
    odd = tmp_path / "train (1).jsonl"
    odd.write_bytes(first.read_bytes())
    with pytest.raises(InvalidArgument, match=re.escape("the adapter is named after its data file, 'train (1)', "
                                                        "which is not an adapter name (letters, digits and . _ -); "
                                                        "give --name train-1 or -o train-1.gguf")):
        store.target(None, None, odd.stem)


def test_adapt_rm_deletes_stored_adapters_and_a_typo_deletes_nothing(tmp_path, monkeypatch, capsys):
    """`adapt list` showed them and nothing removed them but a hand `rm` in the store (`adapt rm x` was 'unexpected
    argument'); `ondevice rm`'s aliases remove/delete work too."""
    from ondevice.adapt import adapter_file, store
    from ondevice.cli import main

    monkeypatch.setenv("ONDEVICE_HOME", str(tmp_path / "home"))
    a, b = (np.zeros((4, 576), np.float32), np.zeros((192, 4), np.float32))
    for n in ("dates", "style"):
        adapter_file.write(store.path_for(n), "llama", 8.0, {"blk.29.attn_v.weight": (a, b)}, {})
    Path(f"{store.path_for('dates')}.ckpt.pt").write_bytes(b"an interrupted rerun's checkpoint")
    assert main(["adapt", "rm", "dates", "dtaes"]) == 2
    assert capsys.readouterr().err == ("ondevice adapt: error: adapt rm dtaes: no such stored adapter or interrupted "
                                       "run; stored: dates, style (a file of your own is yours to delete)\n")
    assert store.names() == ["dates", "style"]
    assert main(["adapt", "rm", "dates"]) == 0
    assert re.fullmatch(r"removed adapter dates \(\d+\.\d KiB\)\n", capsys.readouterr().out)  # not "0.0 MiB"
    assert store.names() == ["style"] and sorted(p.name for p in store.adapters_dir().iterdir()) == ["style.gguf"]
    assert main(["adapt", "delete", "style"]) == 0 and store.names() == []
    assert main(["adapt", "rm"]) == 2
    assert "ondevice adapt rm NAME [NAME ...]" in capsys.readouterr().err
    Path(f"{store.path_for('cut')}.ckpt.pt").write_bytes(b"a first run's checkpoint, interrupted")  # no .gguf yet
    assert main(["adapt", "rm", "cut"]) == 0 and not any(store.adapters_dir().iterdir())


@needs_torch
def test_ctrl_c_while_planning_or_measuring_the_held_out_loss_is_said_and_keeps_the_steps(tmp_path, monkeypatch):
    """Both ran outside the loop's Ctrl-C handler: planning under --budget (minutes on a busy CPU) exited 130 in
    silence, and Ctrl-C on the held-out loss after the last step lost the steps since the last checkpoint.
    Ctrl-C is simulated by raising KeyboardInterrupt where it would land."""
    from ondevice.adapt import budget, train

    path = tasks.write_jsonl(tasks.iso_dates(12, seed=3), tmp_path / "walk.jsonl")
    out, ckpt = tmp_path / "walk.gguf", tmp_path / "walk.gguf.ckpt.pt"
    cfg = {"data": str(path), "out": str(out), "steps": 3, "batch": 1, "max_len": 48, "modules": ("attn_q",),
           "layers": (29,), "threads": 1, "heldout": 0.25, "checkpoint_every": 0, "progress": False}

    def ctrl_c(*_a, **_k):
        raise KeyboardInterrupt

    monkeypatch.setattr(budget, "plan_under_budget", ctrl_c)
    with pytest.raises(KeyboardInterrupt) as e:
        train.train(train.AdaptConfig(**{**cfg, "layers": None, "budget_bytes": 600 << 20}))
    (note,) = e.value.__notes__
    assert note == ("interrupted before the first step (planning under --budget); nothing was trained, so there is "
                    "nothing to resume: run the same command again")
    assert not ckpt.exists() and not out.exists()
    real, calls = train.mean_loss, []

    def mean_loss(model, examples, *a):
        calls.append(len(examples))
        if len(calls) == 2:  # the held-out loss after the last step
            raise KeyboardInterrupt
        return real(model, examples, *a)

    monkeypatch.setattr(train, "mean_loss", mean_loss)
    with pytest.raises(KeyboardInterrupt) as e:
        train.train(train.AdaptConfig(**cfg))
    (note,) = e.value.__notes__
    assert note == (f"interrupted at step 3/3 (measuring the held-out loss); checkpoint saved to {ckpt}; continue "
                    f"with the same command plus --resume (in Python: resume=True)")
    assert ckpt.is_file() and not out.exists()
    monkeypatch.setattr(train, "mean_loss", real)
    r = train.train(train.AdaptConfig(**cfg, resume=True))  # no step left to run: the held-out loss, the export
    assert r["steps"] == 3 and len(r["history"]) == 3 and r["heldout_loss_after"] is not None
    assert out.is_file() and not ckpt.exists()


def test_from_deferred_with_no_samples_names_the_flag_that_keeps_them(cli):
    """It said to serve with --cascade, which alone keeps nothing (--cascade-keep-hard does)."""
    r = cli("adapt", "--from", "deferred", "--name", "hard", "--steps", "1")
    assert r.returncode == 2 and "serve it with --cascade URL --cascade-keep-hard (or a request's \"keep\": true)" \
        in r.stderr, r.stderr


def test_an_open_layer_range_is_refused_not_read_as_one_layer():
    from ondevice.adapt.cli import parse_layers

    assert parse_layers("20-22,25") == (20, 21, 22, 25)
    with pytest.raises(InvalidArgument, match="give both ends of the range 20-, e.g. 20-29"):
        parse_layers("20-")  # trained layer 20 alone


@needs_torch
def test_a_heldout_share_that_holds_out_nothing_is_said(tmp_path):
    from ondevice.adapt import train

    path = tasks.write_jsonl(tasks.iso_dates(8, seed=3), tmp_path / "few.jsonl")
    cfg = train.AdaptConfig(data=str(path), out=str(tmp_path / "f.gguf"), heldout=0.5, max_len=80, threads=1)
    with pytest.warns(UserWarning, match="--heldout 0.5 holds out no example of 8 .*reports no held-out loss"):
        _, kept, held = train.prepare(cfg)
    assert len(kept) == 8 and held == []


@needs_torch
def test_a_model_adapt_cannot_train_is_named_for_its_architecture_first(cli, tmp_path):
    """gemma3-270m (a base model of another architecture) was refused for its missing chat template, so following
    the advice (an instruct Gemma) led to a second refusal."""
    from ondevice.errors import OndeviceError
    from ondevice.models import resolve

    try:
        gemma = resolve("gemma3-270m").path
    except OndeviceError as e:
        pytest.skip(f"gemma3-270m not installed: {e}")
    path = tasks.write_jsonl(tasks.iso_dates(4, seed=3), tmp_path / "d.jsonl")
    r = cli("adapt", str(path), "-o", str(tmp_path / "g.gguf"), "-m", str(gemma), "--steps", "1")
    assert r.returncode == 2 and "ondevice adapt trains llama-architecture models (SmolLM2, Llama); " in r.stderr, \
        r.stderr


@needs_torch
def test_a_run_whose_held_out_loss_went_up_says_so(cli, tmp_path):
    path = tasks.write_jsonl(tasks.iso_dates(20, seed=3), tmp_path / "d.jsonl")
    r = cli("adapt", str(path), "-o", str(tmp_path / "hot.gguf"), "--lr", "1000", "--steps", "3", "--layers",
            "28-29", "--modules", "attn_q,attn_v", "--rank", "2", "--batch", "2", "--max-len", "80", "--alpha", "64",
            "--heldout", "0.25", "-t", "1")
    assert r.returncode == 0, r.stderr
    assert "batch loss " in r.stdout and "(first step) -> " in r.stdout
    assert "warning: the held-out loss went up (" in r.stderr and "try a lower --lr or fewer --steps" in r.stderr


def test_peft_and_trl_flag_names_are_taken_or_explained(cli):
    r = cli("adapt", "x.jsonl", "--num_train_epochs", "3", "--steps", "4")  # taken as --epochs (test_adapt_epochs.py)
    assert r.returncode == 2 and "--num_train_epochs 3 and --steps 4 both given" in r.stderr, r.stderr
    r = cli("adapt", "x.jsonl", "--learning-rate", "1e-3", "--lora-r", "2", "--lora-alpha", "4", "--steps", "0")
    assert r.returncode == 2 and "--steps, --batch and --lora-r must be >= 1" in r.stderr, r.stderr  # all taken
