"""Epochs: each step's batch comes from a shuffled order of the training examples, without replacement, so every
example is seen once per epoch (TRL's SFTTrainer over a shuffled DataLoader); ``--epochs E`` (TRL's
``--num_train_epochs``) sets the steps, and a resumed run keeps the order. Batches used to be drawn at random with
replacement: "one epoch's worth" of steps saw about 60% of the examples."""

from __future__ import annotations

import json

import pytest

from ondevice.adapt import tasks
from ondevice.adapt.batches import Batches, epochs_of, steps_for

try:
    import torch  # noqa: F401

    HAVE_TORCH = True
except ImportError:
    HAVE_TORCH = False
needs_torch = pytest.mark.skipif(not HAVE_TORCH, reason="torch is not installed: pip install 'ondevice[adapt]'")

TINY = {"max_len": 80, "rank": 2, "modules": ("attn_q",), "layers": (29,), "threads": 1, "heldout": 0,
        "checkpoint_every": 0, "progress": False}


def test_batches_cover_every_example_once_per_epoch_and_stay_full():
    b = Batches(10, 4, seed=0)
    drawn = [b.next() for _ in range(5)]  # 20 draws: two epochs of 10
    assert all(len(x) == 4 and len(set(x)) == 4 for x in drawn)  # full, no example twice in a batch
    flat = [i for x in drawn for i in x]
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:]) == list(range(10))
    assert flat[:10] != list(range(10))  # shuffled
    assert Batches(3, 8, seed=1).next().__len__() == 3  # fewer examples than --batch: all of them per step
    assert steps_for(1, 36, 4) == 9 and steps_for(4.4, 36, 4) == 40 and steps_for(1, 10, 4) == 3
    assert epochs_of(40, 36, 4) == pytest.approx(40 * 4 / 36)


def _recording(monkeypatch):
    """The token lists of every example a training step (or the held-out loss) computes a loss on."""
    from ondevice.adapt import train

    real, seen = train.loss_on, []

    def loss_on(model, batch):
        seen.append([tuple(e.tokens) for e in batch])
        return real(model, batch)

    monkeypatch.setattr(train, "loss_on", loss_on)
    return seen


@needs_torch
def test_a_run_of_one_epochs_steps_trains_on_every_example(tmp_path, monkeypatch):
    import ondevice

    path = tasks.write_jsonl(tasks.iso_dates(12, seed=4), tmp_path / "d.jsonl")
    seen = _recording(monkeypatch)
    r = ondevice.adapt(str(path), out=str(tmp_path / "a.gguf"), batch=4, epochs=2, **TINY)
    assert r["steps"] == 6 and r["epochs"] == 2 and r["n_train"] == 12
    assert len(seen) == 6 and all(len(b) == 4 for b in seen)
    first, second = [x for b in seen[:3] for x in b], [x for b in seen[3:] for x in b]
    assert len(set(first)) == 12 and set(first) == set(second)  # each epoch: all 12, none twice


@needs_torch
def test_epochs_on_the_cli_set_the_steps_and_the_summary_says_so(cli, tmp_path):
    path = tasks.write_jsonl(tasks.iso_dates(10, seed=4), tmp_path / "d.jsonl")
    small = ["--max-len", "80", "--rank", "2", "--modules", "attn_q", "--layers", "29", "-t", "1", "--heldout", "0",
             "--batch", "4"]
    r = cli("adapt", str(path), "-o", str(tmp_path / "e.gguf"), "--num_train_epochs", "1", *small)
    assert r.returncode == 0, r.stderr
    assert "3 steps = 1.2 epochs of 10 examples, batch loss " in r.stdout, r.stdout  # ceil(10 / 4): the last is full
    # stderr is no terminal here (a log, CI): the progress is whole lines, not one line redrawn with \r
    bars = [ln for ln in r.stderr.splitlines() if "] step " in ln]
    assert [ln.split("] step ")[1].split()[0] for ln in bars] == ["1/3", "2/3", "3/3"], r.stderr
    assert "\r" not in r.stderr
    r = cli("adapt", str(path), "-o", str(tmp_path / "s.gguf"), "--steps", "2", "--json", *small)
    assert r.returncode == 0, r.stderr
    rec = json.loads(r.stdout)
    assert rec["steps"] == 2 and rec["epochs"] == 0.8
    r = cli("adapt", str(path), "--epochs", "2", "--steps", "5", *small)
    assert r.returncode == 2 and "--epochs 2 and --steps 5 both given: --epochs counts the steps itself" in r.stderr
    r = cli("adapt", str(path), "--num-train-epochs", "0", *small)
    assert r.returncode == 2 and "--num-train-epochs 0: must be a number > 0, e.g. --epochs 3" in r.stderr, r.stderr


@needs_torch
def test_a_resume_across_an_epochs_end_draws_the_batches_the_straight_run_did(tmp_path, monkeypatch):
    from ondevice.adapt import train

    path = tasks.write_jsonl(tasks.iso_dates(5, seed=6), tmp_path / "d.jsonl")
    cfg = {"data": str(path), "batch": 3, "steps": 4, **TINY}
    seen = _recording(monkeypatch)
    straight = train.train(train.AdaptConfig(**cfg, out=str(tmp_path / "a.gguf")))["history"]
    order, seen[:] = list(seen), []
    real = train._progress

    def progress(step, *a):  # Ctrl-C after step 2 (its checkpoint saved): the next batch crosses the epoch's end
        if step == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(train, "_progress", progress)
    with pytest.raises(KeyboardInterrupt):
        train.train(train.AdaptConfig(**{**cfg, "progress": True}, out=str(tmp_path / "b.gguf")))
    monkeypatch.setattr(train, "_progress", real)
    resumed = train.train(train.AdaptConfig(**cfg, out=str(tmp_path / "b.gguf"), resume=True))["history"]
    assert seen == order  # the same batches, in the same order
    assert resumed == pytest.approx(straight, rel=1e-4), (resumed, straight)
