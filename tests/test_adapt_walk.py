"""A new user's walk through ``ondevice adapt``: settings, data and budgets that cannot train, and a merge that
cannot be written, are refused in one line before the slow work (the CLI in a subprocess, torch installed)."""

from __future__ import annotations

import json
import re

import pytest

torch = pytest.importorskip("torch")


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
        ("--name", ""): "adapter name '' is not allowed; use letters, digits and . _ - ",
        ("--memory", "fast", "--budget", "mem=600M"): "--memory fast with --budget: the budget is planned and kept "
                                                    "with lean memory",
    }
    for flags, want in cases.items():
        r = cli("adapt", str(data), "--name", "double", *tiny, *flags)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        assert f"ondevice adapt: error: {want}" in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and "step 1/1" not in r.stderr, r.stderr
    assert list(out_dir.iterdir()) == [] and not (tmp_path / "home" / "adapters" / "double.gguf").exists()


def test_an_empty_answer_is_refused_by_its_line(tmp_path):
    """Trained on, an empty answer teaches the model to stop at once whatever it is asked (the cascade refuses
    empty cloud answers as samples for that reason); a data file's is named by line before anything loads."""
    from ondevice.adapt.data import read_jsonl
    from ondevice.errors import InvalidArgument

    good = json.dumps({"input": "Double 2.", "target": "4"})
    p = tmp_path / "d.jsonl"
    for bad in ({"input": "Double 3.", "target": ""},
                {"messages": [{"role": "user", "content": "Double 3."}, {"role": "assistant", "content": " \n"}]}):
        p.write_text(f"{good}\n{json.dumps(bad)}\n")
        with pytest.raises(InvalidArgument, match=r"d\.jsonl:2: the answer \(the last assistant message or "
                                                  r"\"target\"\) is empty"):
            read_jsonl(p)


def test_a_utf8_file_with_a_byte_order_mark_reads(tmp_path):
    """Notepad and PowerShell's "UTF-8" start the file with a BOM: its first line was "not valid JSON (Unexpected
    UTF-8 BOM (decode using utf-8-sig))", a fix only a Python user could read."""
    from ondevice.adapt.data import read_jsonl

    p = tmp_path / "bom.jsonl"
    p.write_bytes(b"\xef\xbb\xbf" + json.dumps({"input": "Double 2.", "target": "4"}).encode() + b"\n")
    assert read_jsonl(p) == [[{"role": "user", "content": "Double 2."}, {"role": "assistant", "content": "4"}]]


def test_a_budget_below_what_is_already_loaded_is_refused_before_any_probe(cli, tmp_path):
    """mem=100M is below torch and the packed base alone: refused from the resident memory, in one line, before
    the planner's probes (minutes of training steps on 2 cores), naming the least budget worth trying."""
    data = tmp_path / "double.jsonl"
    data.write_text("".join(json.dumps({"input": f"Double {i}.", "target": str(2 * i)}) + "\n" for i in range(4)))
    r = cli("adapt", str(data), "-o", str(tmp_path / "d.gguf"), "--budget", "mem=100M", "--steps", "1",
            "--max-len", "64")  # the examples fit whole: no line about cut examples
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "measuring" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr  # no probe ran
    m = re.search(r"--budget mem=100M is below the (\d+) MiB that torch and the packed base take here before any "
                  r"training step; give at least mem=(\d+)M plus a training step's memory", r.stderr)
    assert m and 100 < int(m.group(1)) < int(m.group(2)), r.stderr
    assert not list(tmp_path.glob("d.gguf*"))


def test_a_budget_below_a_top_layer_step_is_refused_before_the_deeper_probes(smol, smol_path):
    """Above what is loaded but below one training step of the top layer: refused after that one step (each
    checkpointing way), before the deeper steps and the gradient scores, with the smallest plan's figure."""
    from ondevice.adapt import budget, data
    from ondevice.adapt.model import LlamaLoRA
    from ondevice.adapt.train import AdaptConfig, lean_malloc
    from ondevice.errors import InvalidArgument

    torch.set_num_threads(2)
    lean_malloc()  # as the planner runs: what earlier tests in this process freed is not "loaded"
    # 128-token examples: a training step's logits and their gradient alone are ~100 MiB, far over the slack
    # below, whatever memory earlier tests left for the allocator to reuse (with 32 tokens, ~25 MiB: a full run's
    # allocator state once let the step fit under the slack, and the planner went on to the deeper probes)
    convs = [[{"role": "user", "content": f"Double {i}. " + "Show the number twice as large. " * 16},
              {"role": "assistant", "content": str(2 * i)}] for i in range(2)]
    examples = data.tokenize(smol, convs, 128)
    assert min(len(e.tokens) for e in examples) >= 100
    model = LlamaLoRA(smol_path)
    smallest = budget.PARAM_BYTES * min(budget.RANKS) * min(lin.w.inp + lin.w.out
                                                            for lin in model.linears().values())
    just_above_loaded = int((budget._rss() + smallest + (8 << 20)) / budget.MARGIN)
    said = []
    with pytest.raises(InvalidArgument) as e:
        budget.plan_under_budget(model, examples, AdaptConfig(data="", budget_bytes=just_above_loaded, batch=2),
                                 said.append)
    assert said == ["measuring a training step on the top layer ..."]  # no deeper step, no gradient scores
    m = re.search(r"is below the smallest plan's (\d+) MiB \(torch, the packed base and a training step with a "
                  r"rank-2 LoRA on one module of the top layer, measured here\); give at least mem=(\d+)M$", str(e.value))
    assert m and int(m.group(1)) == int(m.group(2)) > just_above_loaded >> 20, str(e.value)


def test_merging_into_a_directory_is_refused_before_merging(cli, tmp_path, smol_path):
    """`adapt merge NAME -o DIR` once merged every tensor, then failed at the rename naming a temp file the user
    never gave; now refused first, with the file to give (as training's -o DIR is)."""
    import numpy as np

    from ondevice.adapt import adapter_file
    from ondevice.models.store import cached_sha256

    rng = np.random.default_rng(0)
    lora = {"blk.29.attn_v.weight": (rng.standard_normal((4, 576)).astype(np.float32),
                                     rng.standard_normal((192, 4)).astype(np.float32) * 0.01)}
    ad = adapter_file.write(tmp_path / "tiny.gguf", "llama", 8.0, lora,
                            {"base_sha256": cached_sha256(smol_path), "base_name": "smollm2-135m-instruct"})
    out_dir = tmp_path / "merged"
    out_dir.mkdir()
    r = cli("adapt", "merge", str(ad), "-o", str(out_dir))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip() == (f"ondevice adapt: error: -o {out_dir} is a directory; give the merged model's file, "
                                f"e.g. -o {out_dir / 'smollm2-135m-instruct-tiny.gguf'}"), r.stderr
    assert list(out_dir.iterdir()) == [] and not list(tmp_path.glob(".*.part"))
    r = cli("adapt", "merge", str(ad), "-o", str(out_dir / "m.gguf"))  # the file it names works
    assert r.returncode == 0 and (out_dir / "m.gguf").stat().st_size > 90 << 20, r.stderr


def test_a_run_that_replaces_an_adapter_needs_force_and_says_so_before_it_trains(cli, tmp_path):
    """-o FILE / --name NAME onto an adapter of hours of training: refused without --force (as merge and average),
    and said, with its date and data, when --force replaces it."""
    data = tmp_path / "double.jsonl"
    data.write_text("".join(json.dumps({"input": f"Double {i}.", "target": str(2 * i)}) + "\n" for i in range(3)))
    out = tmp_path / "d.gguf"
    tiny = ("-o", str(out), "--steps", "1", "--batch", "1", "--max-len", "16", "--layers", "29", "--heldout", "0")
    first = cli("adapt", str(data), *tiny)
    assert first.returncode == 0 and "this run replaces" not in first.stderr, first.stderr
    refused = cli("adapt", str(data), *tiny)
    assert refused.returncode == 2 and "step 1/1" not in refused.stderr, refused.stderr
    assert re.search(rf"error: adapt would replace the adapter {re.escape(str(out))} \(made [^)]*\); give another "
                     rf"name, or --force", refused.stderr), refused.stderr
    again = cli("adapt", str(data), *tiny, "--force")
    assert again.returncode == 0, again.stderr
    assert re.search(rf"note: this run replaces {re.escape(str(out))} \(made \d{{4}}-\d\d-\d\d \d\d:\d\d from "
                     rf"{re.escape(str(data))}\) when it ends", again.stderr), again.stderr
