"""ondevice adapt: data errors by line, LoRA training on the real SmolLM2 GGUF, export to a llama.cpp adapter
that llama.cpp loads and that agrees with torch, adapters refused for another base, per-request adapters in
the server. The torch tests skip only when the ``adapt`` extra (torch) is not installed."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest

from ondevice.adapt import adapter_file, data, tasks
from ondevice.errors import InvalidArgument
from ondevice.models.store import cached_sha256, sha256_file

try:
    import torch  # noqa: F401

    HAVE_TORCH = True
except ImportError:
    HAVE_TORCH = False
needs_torch = pytest.mark.skipif(not HAVE_TORCH, reason="torch is not installed: pip install 'ondevice[adapt]'")


def test_malformed_lines_are_named_by_line_number(tmp_path):
    p = tmp_path / "d.jsonl"
    good = json.dumps({"input": "a", "target": "b"})
    cases = {
        "{not json": "d.jsonl:3: not valid JSON",
        json.dumps({"input": "a"}): "d.jsonl:3: \"target\" must be a string",
        json.dumps({"messages": [{"role": "user", "content": "hi"}]}): "d.jsonl:3: the last message must be",
        json.dumps({"messages": [{"role": "user"}]}): "d.jsonl:3: message 0 needs",
        json.dumps({"text": "x"}): "d.jsonl:3: expected \"messages\" or \"input\"/\"target\"",
        "[1, 2]": "d.jsonl:3: expected a JSON object",
        json.dumps({"messages": [{"role": "bogus", "content": "hi"}, {"role": "assistant", "content": "x"}]}):
            "d.jsonl:3: messages[0].role 'bogus' is not one of system, user, assistant, tool",
    }
    for bad, msg in cases.items():
        p.write_text(f"{good}\n\n{bad}\n{good}\n")
        with pytest.raises(InvalidArgument, match=msg.replace("(", r"\(").replace("[", r"\[")):
            data.read_jsonl(p)
    p.write_text("\n")
    with pytest.raises(InvalidArgument, match="no examples"):
        data.read_jsonl(p)
    with pytest.raises(InvalidArgument, match="no such data file"):
        data.read_jsonl(tmp_path / "missing.jsonl")


def test_loss_is_on_the_answer_tokens_only(smol):
    convs = [[{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "Hello there"}]]
    (ex,) = data.tokenize(smol, convs, max_len=256)
    answer = ex.tokens[ex.n_prompt:]
    assert smol.engine.detokenize(answer[:-1]) == "Hello there"
    assert answer[-1] in smol.engine.eos_tokens  # the end-of-turn token is learnt, so the model stops
    assert smol.engine.detokenize(ex.tokens[:ex.n_prompt], special=True).endswith("assistant\n")
    # too long: the prompt's start goes, the answer stays, and the run says so once with the length that fits
    with pytest.warns(UserWarning, match=rf"^1 of 1 examples are longer than --max-len 8 tokens: they lose the start "
                                         rf"of their prompt; --max-len {len(ex.tokens)} keeps every example whole$"):
        (cut,) = data.tokenize(smol, convs, max_len=8)
    assert len(cut.tokens) == 8 and cut.tokens[cut.n_prompt:] == answer
    # an answer longer than --max-len loses its end-of-turn token: that example teaches no stop
    long = [{"role": "user", "content": "Count"}, {"role": "assistant", "content": " ".join(map(str, range(40)))}]
    with pytest.warns(UserWarning, match=r"^2 of 2 examples .* and 1 also the end of its answer \(which then teaches "
                                         r"no stop\); --max-len \d+ keeps every example whole$"):
        _, short = data.tokenize(smol, [*convs, long], max_len=8)
    assert len(short.tokens) == 8 and short.tokens[-1] not in smol.engine.eos_tokens


def _lora_tensors(rank: int, scale: float, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {f"blk.{i}.attn_v.weight": (rng.standard_normal((rank, 576)).astype(np.float32) * scale,
                                       rng.standard_normal((192, rank)).astype(np.float32) * scale)
            for i in (27, 28, 29)}


def _logits(model, text: str) -> np.ndarray:
    model.reset()
    model.engine.prefill(model.tokenize_prompt(text), logits_all=False)
    out = model.engine.logits()
    model.reset()
    return out


def test_adapter_loads_in_llama_cpp_and_wrong_base_is_refused(tmp_path, smol_path, smol, cli):
    import ondevice

    sha = cached_sha256(smol_path)
    zero = adapter_file.write(tmp_path / "zero.gguf", "llama", 8.0,
                              {k: (a, b * 0) for k, (a, b) in _lora_tensors(4, 0.1).items()},
                              {"base_sha256": sha, "base_name": "smollm2"})
    live = adapter_file.write(tmp_path / "live.gguf", "llama", 8.0, _lora_tensors(4, 0.5),
                              {"base_sha256": sha, "base_name": "smollm2"})
    base = _logits(smol, "What is the capital of France?")
    for path, same in ((zero, True), (live, False)):
        m = ondevice.load(str(smol_path), n_ctx=256, n_threads=2, adapters=(str(path),))
        try:
            got = _logits(m, "What is the capital of France?")
        finally:
            m.close()
        assert np.allclose(got, base, atol=1e-4) == same  # B = 0 changes nothing; a live adapter does
    wrong = adapter_file.write(tmp_path / "other.gguf", "llama", 8.0, _lora_tensors(4, 0.1),
                               {"base_sha256": "0" * 64, "base_name": "another-model"})
    with pytest.raises(InvalidArgument, match="trained on another base model .*another-model"):
        ondevice.load(str(smol_path), n_ctx=256, adapters=(str(wrong),))
    r = cli("run", "--adapter", str(wrong), "-n", "2", "hi")
    assert r.returncode == 2 and "trained on another base model" in r.stderr and "Traceback" not in r.stderr
    assert f"or train an adapter for this model with `ondevice adapt -m {smol_path}`" in r.stderr, r.stderr
    r = cli("run", "-m", "gemma3-270m", "--adapter", str(wrong), "-n", "2", "hi")  # adapt trains llama models only
    assert r.returncode == 2 and r.stderr.rstrip().endswith("load it with its own base (-m)"), r.stderr
    shapes = adapter_file.write(tmp_path / "shape.gguf", "llama", 8.0,  # no provenance: llama.cpp's checks
                                {"blk.0.attn_q.weight": (np.zeros((4, 100), np.float32), np.zeros((576, 4),
                                                                                                   np.float32))}, {})
    with pytest.raises(ondevice.OndeviceError, match="could not load the adapter"):
        ondevice.load(str(smol_path), n_ctx=256, adapters=(str(shapes),))


@needs_torch
def test_the_packed_base_dequantizes_as_gguf_py(smol_path):
    """Each frozen weight's rows, dequantized in place a chunk at a time, equal gguf-py's reference dequantize
    (SmolLM2: Q4_1 blocks and the Q8_0 embedding)."""
    import torch
    from gguf import GGUFReader
    from gguf.quants import dequantize

    from ondevice.adapt.model import Packed, _chunks

    kinds = set()
    for t in GGUFReader(smol_path).tensors:
        if t.name not in ("token_embd.weight", "blk.0.attn_k.weight", "blk.29.ffn_down.weight"):
            continue
        w = Packed(t)
        ref = torch.from_numpy(np.array(dequantize(t.data, t.tensor_type), np.float32).reshape(w.out, w.inp))
        got = torch.cat([w.rows(lo, hi) for lo, hi in _chunks(w)])
        assert torch.equal(got, ref), t.name
        assert torch.equal(w.rows(3, 9, torch.bfloat16), ref[3:9].to(torch.bfloat16)), t.name
        kinds.add(t.tensor_type.name)
    assert kinds == {"Q4_1", "Q8_0"}


@needs_torch
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_torch_model_matches_llama_cpp_on_the_base(smol_path, smol, dtype):
    import torch

    from ondevice.adapt.model import LlamaLoRA

    torch.set_num_threads(2)
    toks = smol.tokenize_prompt("Name three colours.")
    smol.reset()
    smol.engine.prefill(toks, logits_all=True)
    ref = smol.engine.all_logits()
    smol.reset()
    with torch.no_grad():
        got = LlamaLoRA(smol_path, dtype=getattr(torch, dtype))(torch.tensor([toks])).numpy()
    # same weights; llama.cpp quantizes activations to 8 bits in its dot products, hence a small difference
    # (bf16 keeps 8 bits of mantissa: --precision bf16 computes the same model, a little less exactly)
    assert np.abs(got - ref).mean() < (0.3 if dtype == "float32" else 0.4)  # measured: 0.26, 0.29
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.8


@needs_torch
def test_training_lowers_loss_exports_and_llama_cpp_agrees(tmp_path, smol_path, monkeypatch):
    from ondevice.adapt import check, train

    path = tasks.write_jsonl(tasks.iso_dates(24, seed=3), tmp_path / "iso.jsonl")
    out = tmp_path / "iso.gguf"
    cfg = {"data": str(path), "out": str(out), "steps": 6, "batch": 3, "max_len": 48, "lr": 5e-3, "rank": 8,
           "modules": ("attn_q", "attn_v"), "layers": (26, 27, 28, 29), "threads": 2, "heldout": 0.25,
           "checkpoint_every": 2}
    # Ctrl-C after step 3: a checkpoint of step 2 is kept, and --resume finishes the run from there
    real = train._progress

    def interrupt(step, *a):
        real(step, *a)
        if step == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(train, "_progress", interrupt)
    with pytest.raises(KeyboardInterrupt):
        train.train(train.AdaptConfig(**cfg))
    assert (tmp_path / "iso.gguf.ckpt.pt").is_file() and not out.exists()
    monkeypatch.setattr(train, "_progress", real)
    r = train.train(train.AdaptConfig(**cfg, resume=True))
    assert len(r["history"]) == 6
    assert r["memory"] == "fast"  # no budget: glibc malloc as it comes (lean is 2-3x slower a step)
    assert r["heldout_loss_after"] < 0.85 * r["heldout_loss_before"], r["history"]
    meta = adapter_file.read_meta(out)
    assert meta["general.type"] == "adapter" and meta["adapter.type"] == "lora"
    assert meta["ondevice.adapter.base_sha256"] == cached_sha256(smol_path)
    assert meta["ondevice.adapter.data_sha256"] == sha256_file(path)
    assert meta["tensors"]["blk.29.attn_q.weight.lora_a"] == (576, 8)  # ggml order: ne = [in, rank]
    prompts = [row["input"] for row in tasks.iso_dates(3, seed=77)]
    a = check.agreement(smol_path, out, prompts, n_tokens=8)
    assert a["token_agreement"] >= 0.9, a
    # a greedy step where llama.cpp's top two logits are close can flip under the two backends' differences
    # (Q4_1 kernels vs torch: logit_mean_abs_diff 0.23, max 2.8-3.0 on Zen 4): the seed's batches decide whether
    # the adapter has one. Measured margins at the flips: 0.04 and 0.04 (AVX-512 build of llama.cpp), 0.22 and
    # 0.03 (AVX2 build, the same CPU and torch)
    assert a["identical_sequences"] >= 2 or all(m < 0.3 for m in a["divergence_margins"]), a
    # merged into the base (Q8_0 where adapted): llama.cpp gives base + adapter's tokens
    from ondevice.adapt.merge import merge
    from ondevice.models.gguf_check import validate_gguf

    mg = merge(out, tmp_path / "merged.gguf")
    types = {t.name: t.type_name for t in validate_gguf(mg["path"]).tensors}
    assert mg["tensors_merged"] == 8 and types["blk.29.attn_v.weight"] == "Q8_0" and types["blk.0.attn_v.weight"] == "Q4_1"
    ma = check.merged_agreement(mg["path"], smol_path, out, prompts, n_tokens=8)
    assert ma["identical_generations"] >= 2 and ma["token_agreement"] >= 0.9, ma
    # merged Q8_0 weights vs Q4_1 ones plus the LoRA in fp32: close, not bit-equal; and
    # far closer to base + adapter than the base is (the merge carries the adapter)
    ref = check.llama_runs(smol_path, out, prompts, n_tokens=8)
    plain = check.llama_runs(smol_path, None, prompts, n_tokens=8, score=[t + g for t, g, _ in ref])
    base_diff = np.mean([np.abs(b - r).mean() for (_, _, b), (_, _, r) in zip(plain, ref)])
    assert ma["logit_mean_abs_diff"] < 0.5 * base_diff, (ma, base_diff)
    (tmp_path / "iso.gguf.ckpt.pt").write_bytes(b"garbage")
    with pytest.raises(InvalidArgument, match="cannot read the checkpoint"):
        train.train(train.AdaptConfig(**cfg, resume=True))


def test_generator_runs_adapters_together_as_each_runs_alone(tmp_path, smol_path):
    """The generator driven directly: base, +a and +b in flight at once (one decode per adapter set, +a and +b
    prefilling while the base decodes) give the greedy tokens each gives alone; KV is reused only under the
    adapter set it was computed with."""
    from ondevice.engine.base import EngineConfig
    from ondevice.engine.generator import BatchGenerator, Request
    from ondevice.engine.llama import LlamaEngine
    from ondevice.engine.records import Generation, Sampling

    sha = cached_sha256(smol_path)
    eng = LlamaEngine(smol_path, EngineConfig(n_ctx=4 * 128, n_seq_max=4, n_threads=2))
    try:
        for n, seed in (("a", 1), ("b", 2)):
            eng.adapters.load(adapter_file.write(tmp_path / f"{n}.gguf", "llama", 8.0, _lora_tensors(8, 0.6, seed),
                                                 {"base_sha256": sha}), n)
        gen = BatchGenerator(eng)
        toks = eng.tokenize("Once upon a time, in a small village,")
        sets = [(), ("a",), ("b",)]

        def req(ads):
            return Request(tokens=toks, sampling=Sampling(temp=0, max_tokens=12, ignore_eos=True), adapters=ads)

        def run(reqs, late=()):
            """Insert ``reqs``, step twice, insert ``late``, step until all end; generated tokens per request."""
            out = {id(r): [] for r in (*reqs, *late)}
            for r in reqs:
                gen.insert(r)
            for i in range(10**4):
                if i == 2:
                    for r in late:
                        gen.insert(r)
                for r, ev in gen.step():
                    if isinstance(ev, Generation) and ev.token >= 0:
                        out[id(r)].append(ev.token)
                if i >= 2 and not gen.busy:
                    return list(out.values())

        alone = []
        for ads in sets:
            eng.reset()
            gen.reset()
            alone += run([req(ads)])
        assert len({tuple(t) for t in alone}) == 3, alone  # each adapter changes the answer
        eng.reset()
        gen.reset()
        mixed = run([req(())], late=[req(("a",)), req(("b",))])
        assert mixed == alone
        # every slot now holds the prompt under its own set: a request reuses only its own set's KV
        assert gen.insert(req(("b",))) == len(toks)  # the whole prompt, with the logits saved under that set
        assert gen.insert(req(("a", "b"))) == 0
        with pytest.raises(InvalidArgument, match="no adapter named 'c'"):
            gen.insert(req(("c",)))
        assert gen.free == 2  # the refused request took no slot
        gen.fail()
    finally:
        eng.close()


def test_serve_applies_adapters_per_request(tmp_path, smol_path):
    """base, base+a and base+b in flight together give what each gives alone (one decode per adapter set)."""
    from concurrent.futures import ThreadPoolExecutor

    import openai

    import ondevice
    from ondevice.serve import BackgroundServer, ServeSettings

    sha = cached_sha256(smol_path)
    paths = {n: adapter_file.write(tmp_path / f"{n}.gguf", "llama", 8.0, _lora_tensors(8, 0.6, seed),
                                   {"base_sha256": sha}) for n, seed in (("a", 1), ("b", 2))}
    prompt = [{"role": "user", "content": "Write one sentence about the sea."}]
    want, want_tokens = {}, {}
    for name in ("", "a", "b"):
        m = ondevice.load(str(smol_path), n_ctx=256, n_threads=2, adapters=(str(paths[name]),) if name else ())
        try:
            r = m.generate(prompt, temp=0.0, max_tokens=8)
            want[name], want_tokens[name] = r.text, [m.detokenize([t]) for t in r.tokens]
        finally:
            m.close()
    assert len(set(want.values())) == 3, want  # each adapter changes the answer
    settings = ServeSettings(model=str(smol_path), port=0, parallel=4, ctx=256, threads=2, embeddings=False,
                             adapter=[f"{n}={p}" for n, p in paths.items()])
    with BackgroundServer(settings) as srv:
        client = openai.OpenAI(base_url=srv.base_url + "/v1", api_key="x")
        ids = [m.id for m in client.models.list().data]
        assert ids[1:] == [f"{ids[0]}+a", f"{ids[0]}+b"]

        def ask(name: str):
            asked = ids[0] + (f"+{name}" if name else "")
            r = client.chat.completions.create(model=asked, messages=prompt, temperature=0.0, max_tokens=8,
                                               logprobs=True, top_logprobs=5)
            assert r.model == asked  # the reply names what answered: the base and its adapter
            return name, r.choices[0]

        with ThreadPoolExecutor(6) as ex:
            got = list(ex.map(ask, ["a", "", "b", "a", "b", ""]))
        for name, choice in got:
            # decoded in a batch with other requests, a near-tie may go the other way (float sums in another
            # order): then the library's token must be the runner-up within 0.5 nats, as tests/test_serve.py
            # checks batch against single; any other difference is a wrong adapter
            toks = [e.token for e in choice.logprobs.content]
            if toks != want_tokens[name]:
                i = next(k for k, (x, y) in enumerate(zip(want_tokens[name], toks)) if x != y)
                alt = {t.token: t.logprob for t in choice.logprobs.content[i].top_logprobs}
                assert want_tokens[name][i] in alt and choice.logprobs.content[i].logprob - alt[
                    want_tokens[name][i]] < 0.5, (name, choice.message.content, want[name])
            else:
                assert choice.message.content == want[name]
        with pytest.raises(openai.BadRequestError, match="no adapter named 'c'"):
            client.chat.completions.create(model=ids[0] + "+c", messages=prompt, max_tokens=2)


def test_eval_with_an_adapter_records_it(tmp_path, smol_path, cli):
    sha = cached_sha256(smol_path)
    live = adapter_file.write(tmp_path / "live.gguf", "llama", 8.0, _lora_tensors(4, 0.5), {"base_sha256": sha})
    args = ("eval", "-m", str(smol_path), "--ppl", "--ctx", "128", "--chunks", "2", "--threads", "2", "--json",
            "--no-store")
    plain, adapted = (cli(*args, *extra) for extra in ((), ("--adapter", str(live))))
    assert plain.returncode == 0 and adapted.returncode == 0, adapted.stderr
    p, a = json.loads(plain.stdout.splitlines()[0]), json.loads(adapted.stdout.splitlines()[0])
    assert a["adapter_sha256"] == cached_sha256(live) and "adapter_sha256" not in p
    assert a["ppl"] != p["ppl"]
    from ondevice.eval.cli import print_record
    from ondevice.eval.record import EvalRecord

    heads = []
    for rec in (p, a):  # the printed record says which run had the adapter
        buf = io.StringIO()
        print_record(EvalRecord.from_dict(rec), buf)
        heads.append(buf.getvalue().splitlines()[0])
    assert "adapter" not in heads[0]
    assert f"+ adapter live.gguf (sha256 {cached_sha256(live)[:12]})" in heads[1], heads[1]


@needs_torch
def test_adapt_from_the_cascades_deferred_samples(tmp_path, smol_path, cli):
    from ondevice.store import Store

    db = tmp_path / "store.sqlite"
    out = tmp_path / "home" / "adapters" / "hard.gguf"  # stored by name in the cli fixture's home
    args = ("adapt", "--from", "deferred", "--db", str(db), "-m", str(smol_path), "--name", "hard", "--steps", "1",
            "--layers", "29", "--modules", "attn_q", "--max-len", "48", "--heldout", "0")
    for empty in (db, tmp_path / "empty.sqlite"):  # stores with no samples (a --db naming none is refused)
        Store(empty).close()
    r = cli(*args)
    assert r.returncode == 2 and "no hard samples" in r.stderr
    assert not list((tmp_path / "home").rglob("*.jsonl*"))  # nothing left behind
    with Store(db) as s:
        for q, a in (("Capital of Peru?", "Lima."), ("2+2?", "4."), ("Opposite of hot?", "Cold.")):
            s.add_hard_sample(source="test", device_model="smollm2", device_sha256=cached_sha256(smol_path),
                              cloud_model="cloud", confidence=0.1, messages=[{"role": "user", "content": q}],
                              device_answer="?", cloud_answer=a)
    r = cli(*args)
    assert r.returncode == 0, r.stderr
    assert f"use it: ondevice run -m {smol_path} --adapter hard" in r.stderr  # the base it was given names the run
    meta = adapter_file.read_meta(out)
    assert meta["ondevice.adapter.data_sha256"] == sha256_file(f"{out}.deferred.jsonl")
    assert len(data.read_jsonl(f"{out}.deferred.jsonl")) == 3
    (row,) = json.loads(cli("adapt", "list", "--json").stdout)
    assert row["name"] == "hard" and row["steps"] == 1 and row["tensors"] == 1 and row["base_sha256"] == \
        cached_sha256(smol_path)
    made_from = Path(f"{out}.deferred.jsonl").read_bytes()
    r = cli(*args[:4], str(tmp_path / "empty.sqlite"), *args[5:])  # no samples there: the last run's data stays
    assert r.returncode == 2 and "no hard samples" in r.stderr
    assert Path(f"{out}.deferred.jsonl").read_bytes() == made_from
    assert not list(out.parent.glob("*.part"))


@needs_torch
def test_a_budget_below_the_smallest_plan_says_the_minimum(tmp_path):
    from ondevice.adapt import train

    path = tasks.write_jsonl(tasks.iso_dates(8, seed=5), tmp_path / "iso.jsonl")
    with pytest.raises(InvalidArgument, match=r"below the \d+ MiB that torch and the packed base take here .* give "
                                              r"at least mem=\d+M"):
        train.train(train.AdaptConfig(data=str(path), out=str(tmp_path / "x.gguf"), budget_bytes=100 << 20,
                                      max_len=48, batch=2, threads=2, progress=False))


@needs_torch
def test_a_budgeted_run_stays_under_its_budget_on_long_inputs(tmp_path, cli):
    """Peak RSS of the whole run, the planner's own probes included, within --budget: on ~250-token inputs
    the probes once peaked at 782 MiB (a full-depth backward to score every module, a 6-layer step without
    checkpointing), over mem=600M and this test's 700M. 700M, not 600M: torch's resident pages alone differ
    by ~50 MiB between two venvs of the same wheels here (219 vs 267 MiB after `import torch`), and in the
    fuller one 600M is below the smallest plan."""
    path = tasks.write_jsonl(tasks.iso_dates(40, seed=6, context_words=150), tmp_path / "long.jsonl")
    r = cli("adapt", str(path), "-o", str(tmp_path / "long.gguf"), "--budget", "mem=700M", "--steps", "1",
            "--max-len", "256", "--batch", "4", "-t", "2", "--json", timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["plan_info"]["estimated_peak_bytes"] <= 700 << 20
    assert out["peak_rss_bytes"] <= 700 << 20, (out["peak_rss_bytes"] >> 20, out["plan_info"])
