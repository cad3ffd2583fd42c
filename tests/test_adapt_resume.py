"""`ondevice adapt --resume`: it continues the run its checkpoint was made from (with --from deferred, on the data
exported for that run, whatever the cascade kept since) and refuses settings that differ from that run's,
naming each. Ctrl-C is simulated as in test_adapt.py: KeyboardInterrupt raised from the progress line."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from ondevice.adapt import adapter_file, tasks
from ondevice.errors import InvalidArgument
from ondevice.models.store import cached_sha256, sha256_file

try:
    import torch  # noqa: F401

    HAVE_TORCH = True
except ImportError:
    HAVE_TORCH = False
needs_torch = pytest.mark.skipif(not HAVE_TORCH, reason="torch is not installed: pip install 'ondevice[adapt]'")


def _interrupt_at(monkeypatch, at: int):
    """Ctrl-C right after step ``at``; returns the undo."""
    from ondevice.adapt import train

    real = train._progress

    def progress(step, *a):
        real(step, *a)
        if step == at:
            raise KeyboardInterrupt

    monkeypatch.setattr(train, "_progress", progress)
    return lambda: monkeypatch.setattr(train, "_progress", real)


def keep_hard(db, sha: str, q: str, a: str) -> None:
    """What serve --cascade-keep-hard does with a deferred request: the question and the cloud's answer kept."""
    from ondevice.store import Store

    with Store(db) as s:
        s.add_hard_sample(source="test", device_model="smollm2", device_sha256=sha, cloud_model="cloud",
                          confidence=0.1, messages=[{"role": "user", "content": q}], device_answer="?",
                          cloud_answer=a)


@needs_torch
def test_resume_from_deferred_trains_on_the_data_exported_for_that_run(tmp_path, smol_path, monkeypatch, capsys):
    from ondevice.cli import main

    monkeypatch.setenv("ONDEVICE_HOME", str(tmp_path / "home"))
    db, sha = tmp_path / "store.sqlite", cached_sha256(smol_path)

    for q, a in (("Capital of Peru?", "Lima."), ("2+2?", "4."), ("Opposite of hot?", "Cold.")):
        keep_hard(db, sha, q, a)
    args = ["adapt", "--from", "deferred", "--db", str(db), "-m", str(smol_path), "--name", "hard2", "--steps", "3",
            "--checkpoint-every", "1", "--layers", "29", "--modules", "attn_q", "--max-len", "48", "--heldout", "0",
            "-t", "1", "--batch", "1"]
    restore = _interrupt_at(monkeypatch, 2)
    assert main(args) == 130
    assert "continue with the same command plus --resume" in capsys.readouterr().err
    restore()
    exported = tmp_path / "home" / "adapters" / "hard2.gguf.deferred.jsonl"
    made_from = exported.read_bytes()
    keep_hard(db, sha, "Colour of the sky?", "Blue.")  # the server keeps one more meanwhile: it is for the next run
    assert main([*args, "--resume"]) == 0, capsys.readouterr().err
    assert exported.read_bytes() == made_from
    meta = adapter_file.read_meta(tmp_path / "home" / "adapters" / "hard2.gguf")
    assert meta["ondevice.adapter.data_sha256"] == sha256_file(exported)
    assert meta["ondevice.adapter.figures"]["steps"] == 3
    assert not (tmp_path / "home" / "adapters" / "hard2.gguf.ckpt.pt").exists()


def interrupted_run(tmp_path, monkeypatch) -> dict:
    """A tiny run (3 steps, a checkpoint each) Ctrl-C'd after step 2: its settings (``out``: walk.gguf)."""
    from ondevice.adapt import train

    path = tasks.write_jsonl(tasks.iso_dates(4, seed=3), tmp_path / "walk.jsonl")
    cfg = {"data": str(path), "out": str(tmp_path / "walk.gguf"), "steps": 3, "batch": 1, "max_len": 48, "rank": 8,
           "modules": ("attn_q",), "layers": (29,), "threads": 1, "heldout": 0, "checkpoint_every": 1}
    restore = _interrupt_at(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        train.train(train.AdaptConfig(**cfg))
    restore()
    return cfg


@needs_torch
def test_resume_refuses_changed_settings_naming_each_and_allows_more_steps(tmp_path, monkeypatch):
    from ondevice.adapt import train

    cfg = interrupted_run(tmp_path, monkeypatch)
    tail = " or start over without --resume (only --steps or --epochs, --checkpoint-every and -t may change on resume)"
    with pytest.raises(InvalidArgument, match=re.escape(
            "--resume: --rank 4 differs from the checkpoint's 8; resume with --rank 8" + tail)):
        train.train(train.AdaptConfig(**{**cfg, "rank": 4}, resume=True))
    changed = {"lr": 1e-2, "alpha": 8.0, "modules": ("attn_q", "attn_v"), "layers": None}
    with pytest.raises(InvalidArgument) as e:
        train.train(train.AdaptConfig(**{**cfg, **changed}, resume=True))
    assert str(e.value) == ("--resume: --lr 0.01 differs from the checkpoint's 0.001, --alpha 8 differs from the "
                            "checkpoint's 16, --modules attn_q,attn_v differs from the checkpoint's attn_q, --layers "
                            "(not given) differs from the checkpoint's 29; resume with --lr 0.001 --alpha 16 "
                            "--modules attn_q --layers 29" + tail)
    with pytest.raises(InvalidArgument, match=r"--steps 1 is fewer than the 2 steps the checkpoint has done"):
        train.train(train.AdaptConfig(**{**cfg, "steps": 1}, resume=True))
    # what may change: a longer run, other checkpoint intervals and threads
    r = train.train(train.AdaptConfig(**{**cfg, "steps": 4, "threads": 2, "checkpoint_every": 3}, resume=True))
    assert r["steps"] == 4 and len(r["history"]) == 4
    meta = adapter_file.read_meta(cfg["out"])
    assert meta["ondevice.adapter.settings"]["rank"] == 8 and meta["ondevice.adapter.settings"]["steps"] == 4
    assert meta["tensors"]["blk.29.attn_q.weight.lora_a"] == (576, 8)


@needs_torch
def test_a_run_interrupted_mid_step_resumes_as_the_run_that_was_not(tmp_path, monkeypatch):
    """Ctrl-C inside a step (after its batch was drawn, before the update): the resume trains that batch, so its
    losses are the uninterrupted run's. The checkpoint used to keep the rng after the draw, so the batch was
    skipped and every later one shifted."""
    from ondevice.adapt import train

    path = tasks.write_jsonl(tasks.iso_dates(16, seed=5), tmp_path / "d.jsonl")
    cfg = {"data": str(path), "steps": 5, "batch": 1, "max_len": 80, "modules": ("attn_q",), "layers": (29,),
           "threads": 1, "heldout": 0.25, "checkpoint_every": 0, "progress": False}
    straight = train.train(train.AdaptConfig(**cfg, out=str(tmp_path / "a.gguf")))["history"]
    real, calls = train.loss_on, []

    def loss_on(model, batch):
        calls.append(1)
        if len(calls) == 5:  # a step's forward pass (the held-out loss came first): batch drawn, nothing updated
            raise KeyboardInterrupt
        return real(model, batch)

    monkeypatch.setattr(train, "loss_on", loss_on)
    with pytest.raises(KeyboardInterrupt) as e:
        train.train(train.AdaptConfig(**cfg, out=str(tmp_path / "b.gguf")))
    assert re.match(r"interrupted at step [1-4]/5;", e.value.__notes__[0]), e.value.__notes__  # inside the loop
    monkeypatch.setattr(train, "loss_on", real)
    resumed = train.train(train.AdaptConfig(**cfg, out=str(tmp_path / "b.gguf"), resume=True))["history"]
    assert resumed == pytest.approx(straight, rel=1e-4), (resumed, straight)


@needs_torch
def test_a_kill_during_training_keeps_a_checkpoint_as_ctrl_c_does(tmp_path):
    """SIGTERM (a `kill`, `timeout`, a container stop) ended the run at once: every step since the last checkpoint
    lost, with --checkpoint-every 0 all of them. Now it unwinds as Ctrl-C: checkpoint, the line, exit 143."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from conftest import as_a_shell_starts_it

    path = tasks.write_jsonl(tasks.iso_dates(16, seed=5), tmp_path / "d.jsonl")
    out, err_path = tmp_path / "k.gguf", tmp_path / "err.txt"
    with open(err_path, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "ondevice.cli", "adapt", str(path), "-o", str(out), "--steps",
                                 "200", "--batch", "1", "--max-len", "48", "--modules", "attn_q", "--layers", "29",
                                 "--rank", "2", "-t", "1", "--checkpoint-every", "0"], stderr=err,
                                env=dict(os.environ, ONDEVICE_HOME=str(tmp_path / "home")),
                                preexec_fn=as_a_shell_starts_it)  # noqa: PLW1509 — no threads yet
        try:
            deadline = time.monotonic() + 300
            while " step 1/200 " not in err_path.read_text():  # not a terminal: a line at step 1, then every 20
                assert proc.poll() is None and time.monotonic() < deadline, err_path.read_text()
                time.sleep(0.1)
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    text = err_path.read_text()
    assert proc.returncode == 143, text
    assert re.search(r"interrupted at step \d+/200; checkpoint saved to .*k\.gguf\.ckpt\.pt; continue with the same "
                     r"command plus --resume", text), text
    assert Path(f"{out}.ckpt.pt").is_file() and not out.exists()
    assert "Traceback" not in text
