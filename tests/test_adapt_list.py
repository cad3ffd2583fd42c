"""`ondevice adapt list` shows interrupted runs into the store (as HF's checkpoint-N folders are there to see), with
their step and the command that resumes them; small sizes read in KiB (a 30 KB checkpoint said "0.0 MiB")."""

from __future__ import annotations

import json
import re
import shlex

import pytest

from ondevice.adapt import store, tasks

try:
    import torch  # noqa: F401

    HAVE_TORCH = True
except ImportError:
    HAVE_TORCH = False
needs_torch = pytest.mark.skipif(not HAVE_TORCH, reason="torch is not installed: pip install 'ondevice[adapt]'")


def test_sizes_read_in_the_unit_that_says_something():
    assert store.size_text(512) == "512 B"
    assert store.size_text(36_000) == "35.2 KiB"
    assert store.size_text(5 << 20) == "5.0 MiB"


@needs_torch
def test_an_interrupted_run_is_listed_with_the_command_that_resumes_it(cli, tmp_path, monkeypatch):
    from ondevice.adapt import train

    monkeypatch.setenv("ONDEVICE_HOME", str(tmp_path / "home"))  # the store the cli fixture's processes use
    path = tasks.write_jsonl(tasks.iso_dates(6, seed=2), tmp_path / "d.jsonl")
    real = train._progress

    def progress(step, *a):  # Ctrl-C after step 1, its checkpoint saved
        real(step, *a)
        if step == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(train, "_progress", progress)
    with pytest.raises(KeyboardInterrupt):
        train.train(train.AdaptConfig(data=str(path), name="half", steps=6, batch=2, max_len=80, rank=2,
                                      modules=("attn_q",), layers=(29,), threads=1, heldout=0, checkpoint_every=1))
    monkeypatch.setattr(train, "_progress", real)

    r = cli("adapt", "list")
    assert r.returncode == 0, r.stderr
    row = next(line for line in r.stdout.splitlines() if line.startswith("half"))
    resume = (f"ondevice adapt {path} --name half --batch 2 --max-len 80 --rank 2 --modules attn_q --layers 29 "
              f"--heldout 0 --steps 6 --resume")
    assert f"interrupted at step 1/6: `{resume}` to continue" in row, row
    assert "smollm2-135m-instruct" in row and re.search(r"\d+\.\d KiB", row), row
    rec = json.loads(cli("adapt", "list", "--json").stdout)[0]
    assert rec["name"] == "half" and rec["interrupted"] == {"step": 1, "steps": 6, "resume": resume}

    done = cli(*shlex.split(resume)[1:], "-t", "1")  # the command as listed finishes the run
    assert done.returncode == 0, done.stderr
    assert "6 steps = 2 epochs of 6 examples" in done.stdout, done.stdout
    row = next(line for line in cli("adapt", "list").stdout.splitlines() if line.startswith("half"))
    assert "6 steps, 1 tensors" in row and "interrupted" not in row and re.search(r"\d+\.\d KiB", row), row
    r = cli("adapt", "rm", "half")
    assert r.returncode == 0 and re.fullmatch(r"removed adapter half \(\d+\.\d KiB\)\n", r.stdout), r.stdout
