"""A new user's walk through ``ondevice adapt``: settings that cannot train are refused in one line before
anything loads or trains (the CLI in a subprocess, torch installed)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("torch")


def test_settings_that_cannot_train_are_refused_before_training(cli, tmp_path):
    data = tmp_path / "double.jsonl"
    data.write_text("".join(json.dumps({"input": f"Double {i}.", "target": str(2 * i)}) + "\n" for i in range(3)))
    out_dir = tmp_path / "adapters"
    out_dir.mkdir()
    tiny = ("--steps", "1", "--batch", "1", "--max-len", "16", "--layers", "29")
    cases = {
        ("--lr", "-1"): "--lr -1: must be a number > 0, e.g. --lr 1e-3",
        ("--lr", "nan"): "--lr nan: must be a number > 0",
        ("-o", str(out_dir)): f"-o {out_dir} is a directory; give the adapter's file, e.g. -o {out_dir / 'double.gguf'}",
        ("--alpha", "0"): "--alpha 0: must be a number > 0, e.g. --alpha 16",
        ("--heldout", "1.5"): "--heldout 1.5: the share of examples held out must be >= 0 and < 1",
        ("--checkpoint-every", "-1"): "--checkpoint-every -1: must be >= 0",
    }
    for flags, want in cases.items():
        r = cli("adapt", str(data), "--name", "double", *tiny, *flags)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        assert f"ondevice adapt: error: {want}" in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and "step 1/1" not in r.stderr, r.stderr
    assert list(out_dir.iterdir()) == [] and not (tmp_path / "home" / "adapters" / "double.gguf").exists()
