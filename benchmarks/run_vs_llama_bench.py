"""`ondevice run` against llama.cpp's own `llama-bench`, same llama.cpp build, same model, same threads.

Goal (issue 2): ondevice >= 0.97x llama-bench on prompt (pp128) and decode (tg128) tok/s: no Python tax.

llama-bench: `-p 128 -n 128 -r R -t T` (it warms up, then R repetitions; random tokens).
ondevice:   R separate `ondevice run` processes with a 128-token raw prompt, `-n 128 --ignore-eos --temp 0`;
            prompt tok/s and decode tok/s are read from each run's last Generation record (`--timings json`).
The two run interleaved-free, one after the other, on an otherwise idle machine; both use mmap.

    python benchmarks/run_vs_llama_bench.py [-m MODEL] [-t 2] [-r 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peers import ensure_tool  # noqa: E402


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


def llama_bench(model: Path, threads: int, reps: int) -> dict[str, tuple[float, float]]:
    out = subprocess.run([str(ensure_tool("llama-bench")), "-m", str(model), "-t", str(threads), "-p", "128",
                          "-n", "128", "-r", str(reps), "-o", "json"], capture_output=True, text=True, check=True)
    res = {}
    for row in json.loads(out.stdout):
        key = "pp" if row["n_prompt"] else "tg"
        res[key] = (row["avg_ts"], row["stddev_ts"])
    return res


def ondevice_run(model: Path, threads: int, reps: int, prompt: str) -> dict[str, tuple[float, float]]:
    pp, tg = [], []
    for _ in range(reps):
        out = subprocess.run([sys.executable, "-m", "ondevice.cli", "run", "-m", str(model), "-t", str(threads),
                              "--raw", "--temp", "0", "-n", "128", "--ignore-eos", "--timings", "json", "-"],
                             input=prompt, capture_output=True, text=True, check=True)
        rec = json.loads(out.stderr.strip().splitlines()[-1])
        assert rec["generation_tokens"] == 128, rec
        pp.append(rec["prompt_tps"])
        tg.append(rec["generation_tps"])
    return {"pp": (statistics.mean(pp), statistics.stdev(pp)), "tg": (statistics.mean(tg), statistics.stdev(tg))}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", default=None)
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("-r", "--reps", type=int, default=5)
    a = ap.parse_args()
    from ondevice.models import resolve

    model = resolve(a.model).path
    prompt, n_prompt = prompt_of(128, model)
    ours = ondevice_run(model, a.threads, a.reps, prompt)
    peer = llama_bench(model, a.threads, a.reps)
    print(f"model {model.name}, {a.threads} threads, {a.reps} repetitions; ondevice prompt = {n_prompt} tokens")
    print(f"{'test':6} {'llama-bench t/s':>18} {'ondevice run t/s':>18} {'ratio':>7}")
    for key, name in (("pp", "pp128"), ("tg", "tg128")):
        (pm, ps), (om, os_) = peer[key], ours[key]
        print(f"{name:6} {pm:>10.1f} ± {ps:<5.1f} {om:>10.1f} ± {os_:<5.1f} {om / pm:>7.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
