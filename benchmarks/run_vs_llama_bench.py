"""`ondevice run` against llama.cpp's own `llama-bench`, same llama.cpp build, same model, same threads.

Goal (issue 2): ondevice >= 0.97x llama-bench on prompt (pp128) and decode (tg128) tok/s: no Python tax.

llama-bench: pp128, and tg128 at KV depth 127 (`-d`): decode after the prompt, which is what `ondevice run`
            measures (tg128 from an empty cache is ~5% faster: attention over fewer positions).
ondevice:   R separate `ondevice run` processes with a 128-token raw prompt, `-n 128 --ignore-eos --temp 0`;
            prompt tok/s and decode tok/s are read from each run's last Generation record (`--timings json`);
            the text goes to a file, as llama-bench prints none (a pipe read per token costs ~2.5% on 2 cores).
Both use the same extra CPU kernels (``peers.kernel_match``: ondevice's choice where llama-bench's ``--repack``
can express it, else none on both sides) and llama.cpp's defaults otherwise (mmap, flash attention "auto"). To spread machine drift evenly the
two alternate in ``--rounds`` short rounds; printed: mean ± std over all samples, their ratio, and the
median of the per-round (paired) ratios, which a host whose speed drifts over minutes distorts least; the
order within a round alternates. Last, the share of ondevice's prompt and decode time spent outside
``llama_decode`` (its Python per step), measured in this process: a figure the host's drift hardly moves.

    python benchmarks/run_vs_llama_bench.py [-m MODEL] [-t 2] [-r 2] [--rounds 10] [--bare]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peers import ensure_tool, kernel_match

REPACK = 1  # llama-bench --repack, set by main() from kernel_match


def prompt_of(n_tokens: int, model_path: Path) -> tuple[str, int]:
    """A text that tokenizes (with BOS) to about ``n_tokens`` tokens, from Python's own docs."""
    from pydoc_data.topics import topics

    from ondevice.engine.base import EngineConfig
    from ondevice.engine.llama import LlamaEngine

    eng = LlamaEngine(model_path, EngineConfig(n_ctx=512, n_threads=1, warmup=False))
    toks = eng.tokenize(topics["assert"] + topics["assignment"], add_special=True)
    text = eng.detokenize(toks[1:n_tokens])
    n = len(eng.tokenize(text, add_special=True))
    eng.close()
    return text, n


def llama_bench(model: Path, threads: int, reps: int, depth: int) -> dict[str, list[float]]:
    """pp128, and tg128 at KV depth ``depth``: `ondevice run` decodes after its prompt, not from an empty cache."""
    res = {}
    for key, args in (("pp", ["-p", "128", "-n", "0"]), ("tg", ["-p", "0", "-n", "128", "-d", str(depth)])):
        out = subprocess.run([str(ensure_tool("llama-bench")), "-m", str(model), "-t", str(threads), *args,
                              "-r", str(reps), "--repack", str(REPACK), "-o", "json"],
                             capture_output=True, text=True, check=True)
        res[key] = list(json.loads(out.stdout)[0]["samples_ts"])
    return res


def ondevice_run(model: Path, threads: int, reps: int, prompt: str) -> dict[str, list[float]]:
    pp, tg = [], []
    for _ in range(reps):
        # -fa auto: llama.cpp's default, given, so that knobs `ondevice fit --knobs` kept for this file do not apply;
        # the streamed text goes to a file: a parent reading a pipe wakes per token and, on 2 cores, takes
        # CPU from llama.cpp's threads (measured: 0.948 piped vs 0.974 to a file, paired over 8 rounds)
        with tempfile.TemporaryFile("w+") as text, tempfile.TemporaryFile("w+") as err:
            subprocess.run([sys.executable, "-m", "ondevice.cli", "run", "-m", str(model), "-t", str(threads), "--raw",
                            "--temp", "0", "-n", "128", "--ignore-eos", "--timings", "json", "-fa", "auto", "-"],
                           input=prompt, stdout=text, stderr=err, text=True, check=True)
            err.seek(0)
            rec = json.loads(err.read().strip().splitlines()[-1])
        assert rec["generation_tokens"] == 128, rec
        pp.append(rec["prompt_tps"])
        tg.append(rec["generation_tps"])
    return {"pp": pp, "tg": tg}


def bare_decode(model: Path, threads: int, reps: int, prompt: str) -> list[float]:
    """tok/s of a bare loop of 128 one-token ``llama_decode`` calls after the prompt, in this Python process:
    no sampling, no records. What is left between it and llama-bench is the cost of libllama as llama-cpp-python
    builds and loads it; what is left between it and `ondevice run` is ours."""
    import time

    from ondevice.engine.base import EngineConfig
    from ondevice.engine.llama import LlamaEngine

    eng = LlamaEngine(model, EngineConfig(n_threads=threads))
    toks = eng.tokenize(prompt)
    out = []
    for _ in range(reps):
        eng.reset()
        eng.prefill(toks)
        t0 = time.perf_counter()
        for _ in range(128):
            eng.decode(toks[-1])
        out.append(128 / (time.perf_counter() - t0))
    eng.close()
    return out


def python_tax(model: Path, threads: int, reps: int, prompt: str) -> dict[str, float]:
    """The share of ``Model.stream``'s prompt time and decode time spent outside ``llama_decode`` (tokenizing
    excluded), in this process: what ondevice adds on top of libllama. Both sides of the share come from the
    same steps, so a host whose speed drifts hardly moves it, unlike a ratio of two programs' tok/s."""
    import time

    import ondevice

    m = ondevice.load(str(model), n_threads=threads)
    eng, spent = m.engine, []
    decode = eng.decode_batch

    def timed(items):
        t0 = time.perf_counter()
        decode(items)
        spent.append((len(items), time.perf_counter() - t0))

    eng.decode_batch = timed
    pp, tg = [], []
    for _ in range(reps):
        m.reset()
        spent.clear()
        first = last = None
        for g in m.stream(prompt, chat_template=False, temp=0, max_tokens=128, ignore_eos=True):
            first, last = first or g, g
        prompt_dec = sum(d for n, d in spent if n > 1)
        # generation_tps spans the 127 one-token decodes after the first token, each with its sampling
        gen_dec = sum(d for n, d in spent if n == 1)
        pp.append(1 - prompt_dec / first.prompt_time)
        tg.append(1 - gen_dec / ((last.generation_tokens - 1) / last.generation_tps))
    m.close()
    return {"pp": statistics.median(pp), "tg": statistics.median(tg)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", default=None)
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("-r", "--reps", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--bare", action="store_true",
                    help="also time a bare llama_decode loop in this process (where the remaining gap sits)")
    a = ap.parse_args()
    from ondevice.models import resolve

    global REPACK
    model = resolve(a.model).path
    km = kernel_match(model)
    km.apply()  # ondevice run (a child) and the in-process engines read ONDEVICE_AMX / ONDEVICE_REPACK
    REPACK = km.repack
    prompt, n_prompt = prompt_of(128, model)
    ours: dict[str, list[float]] = {"pp": [], "tg": []}
    peer: dict[str, list[float]] = {"pp": [], "tg": []}
    paired: dict[str, list[float]] = {"pp": [], "tg": []}  # per-round ratio: immune to slow drift of the host
    bare: list[float] = []
    for rnd in range(a.rounds):
        if rnd % 2:  # alternate who goes first: no side gains from the order (a warm cache, a frequency step)
            o_res = ondevice_run(model, a.threads, a.reps, prompt)
            p_res = llama_bench(model, a.threads, a.reps, depth=n_prompt)
        else:
            p_res = llama_bench(model, a.threads, a.reps, depth=n_prompt)
            o_res = ondevice_run(model, a.threads, a.reps, prompt)
        if a.bare:
            bare.append(statistics.mean(bare_decode(model, a.threads, a.reps, prompt)) / statistics.mean(p_res["tg"]))
        for k in ours:
            peer[k] += p_res[k]
            ours[k] += o_res[k]
            paired[k].append(statistics.mean(o_res[k]) / statistics.mean(p_res[k]))
    print(f"model {model.name}, {a.threads} threads, {a.rounds} rounds x {a.reps} repetitions; "
          f"ondevice prompt = {n_prompt} tokens")
    print(km.describe())
    print(f"{'test':11} {'llama-bench t/s':>18} {'ondevice run t/s':>18} {'ratio':>7} {'paired ratio: median [min, max]':>34}")
    for key, name in (("pp", "pp128"), ("tg", f"tg128@d{n_prompt}")):
        sd = lambda xs: statistics.stdev(xs) if len(xs) > 1 else float("nan")  # noqa: E731 — one sample: none
        pm, ps = statistics.mean(peer[key]), sd(peer[key])
        om, os_ = statistics.mean(ours[key]), sd(ours[key])
        pr = paired[key]
        print(f"{name:11} {pm:>10.1f} ± {ps:<5.1f} {om:>10.1f} ± {os_:<5.1f} {om / pm:>7.3f} "
              f"{statistics.median(pr):>14.3f} [{min(pr):.3f}, {max(pr):.3f}]")
    tax = python_tax(model, a.threads, 3, prompt)
    print(f"time outside llama_decode in ondevice's own steps (this process, median of 3): prompt "
          f"{tax['pp']:.2%}, decode {tax['tg']:.2%}")
    if bare:
        print(f"bare llama_decode loop in this process / llama-bench tg: median {statistics.median(bare):.3f} "
              f"[{min(bare):.3f}, {max(bare):.3f}] (no sampling, no records)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
