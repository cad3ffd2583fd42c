"""ondevice adapt against its goals (issue #14), on SmolLM2-135M-Instruct with the generated ISO-date task.

    python benchmarks/adapt_bench.py [--steps 24] [--threads 2] [--budget 600M] [--json OUT.json]
    python benchmarks/adapt_bench.py --adapters-from DIR --serve-only   # section 5 on an earlier run's adapters
    python benchmarks/adapt_bench.py --adapters-from DIR --merge-only   # section 6 on an earlier run's adapters
    python benchmarks/adapt_bench.py --checkpointing-only [--ckpt-steps 4] [--ckpt-pairs 1]   # section 7
    python benchmarks/adapt_bench.py --precision-only [--precision-pairs 2] [--memory lean]    # section 2
    python benchmarks/adapt_bench.py --budget-only [--steps 20]        # sections 1 and 3
    python benchmarks/adapt_bench.py --budget-only --context-words 150 --max-len 256   # the same, long inputs

Each training run is its own `ondevice adapt --json` process, so its peak RSS is its own. Figures:
1. budgeted sparse LoRA (--budget) vs all-module LoRA (every module of every layer, rank 8): held-out loss
   reduction and peak RSS (total, and above the loaded base: the process's RSS before training starts is
   reported by the planner as fixed_rss_bytes);
2. bf16 vs fp32: seconds per step and final held-out loss of the same small configuration, alternated;
3. the task: exact match of llama.cpp's greedy answers on held-out prompts, base vs adapters, and general
   perplexity (pydoc corpus) with and without each adapter;
4. llama.cpp with the adapter vs torch: identical greedy sequences, token agreement, logit differences;
5. serving: aggregate tok/s of 8 streams, base only vs base + 2 adapters (3 base, 3 +all, 2 +budget: one
   decode per adapter set each step), alternated on one server; and why, from llama_decode itself: a decode
   of 8 base rows vs the three decodes (3/3/2 rows) of a mixed step, and what switching adapters costs;
6. merge: the budgeted adapter folded into the base (`ondevice adapt merge`, F16 where adapted) vs base + adapter
   in llama.cpp: identical greedy tokens on the held-out prompts, logit differences, and decode tok/s of the
   base, base + adapter and the merged model;
7. gradient checkpointing: peak RSS and seconds per step of the same run (every module of every layer, rank 8)
   with --checkpointing off and on, alternated --ckpt-pairs times.
The machine is shared: the load average is printed, and every comparison is between runs of this script.
Training memory above the base grows with the tokens kept for the backward pass, so section 1's RSS ratio depends
on the workload: --context-words N puts each date sentence in an e-mail of N words (~250 tokens at 150) and
--max-len sets the tokens trained per example (64 by default, which cuts the short task's system prompt).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ondevice.adapt import tasks

# the run in a memory cgroup capped at the budget (device/limits.py, as bench's profiles): over it, the kernel
# kills it; the child prints its cgroup's path first so the bench can remove the empty cgroup afterwards
_CAPPED = ("import sys; from ondevice.device.limits import apply_profile; a = apply_profile(sys.argv[1]); "
           "print(a.mem_mechanism, a.cgroup_path, file=sys.stderr, flush=True); "
           "from ondevice.cli import main; sys.exit(main(sys.argv[2:]))")


def adapt_run(data: Path, out: Path, args: list[str], threads: int, cap: str | None = None,
              passive: bool = True) -> dict:
    """One ``ondevice adapt --json`` run in its own process; ``passive``: with OMP_WAIT_POLICY=PASSIVE (idle
    OpenMP threads sleep at once: steadier on a shared machine, slower on a quiet one than a user's default)."""
    argv = ["adapt", str(data), "-o", str(out), "-t", str(threads), "--json", *args]
    cmd = ([sys.executable, "-c", _CAPPED, f"mem={cap}"] if cap else [sys.executable, "-m", "ondevice.cli"]) + argv
    t0 = time.perf_counter()
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE") if passive else os.environ
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if cap:
        from ondevice.device.limits import remove_cgroup

        mech, _, path = p.stderr.partition("\n")[0].partition(" ")
        remove_cgroup(path if path != "None" else None)
        print(f"    capped at {cap} by {mech}; exit {p.returncode}" + (" (killed: over the cap)"
                                                                        if p.returncode in (-9, 137) else ""))
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{p.stderr[-2000:]}")
    r = json.loads(p.stdout.strip().splitlines()[-1])
    r["cmd"] = " ".join(["ondevice adapt", str(data), "-o", str(out), "-t", str(threads), *args])
    r["wall"] = time.perf_counter() - t0
    print(f"  {r['cmd']}\n    loss {r['heldout_loss_before']:.4f} -> {r['heldout_loss_after']:.4f}, "
          f"{r['seconds_per_step']:.2f} s/step, peak RSS {r['peak_rss_bytes'] / 2**20:.0f} MiB, "
          f"{r['trainable_params']:,} params, {r['wall']:.0f} s" + (", gradient checkpointing" if r.get("checkpointing")
                                                                   else ""), flush=True)
    if r.get("plan_info"):
        pi = r["plan_info"]
        print(f"    plan: layers {pi['lowest_layer']}-, {pi['n_modules']} tensors, {pi['score_share']:.0%} of the gradient "
              f"mass, estimated peak {pi['estimated_peak_bytes'] / 2**20:.0f} MiB; without/with checkpointing: "
              + ", ".join(f"{k} from layer {v['lowest_layer']} ({v['score_share'] or 0:.0%})"
                          for k, v in pi.get("checkpointing", {}).items()), flush=True)
    return r


def exact_match(base: str, adapter: str | None, rows: list[dict], threads: int) -> float:
    import ondevice

    m = ondevice.load(base, n_ctx=1024, n_threads=threads, adapters=(adapter,) if adapter else ())
    try:
        hits = sum(m.generate([{"role": "user", "content": r["input"]}], temp=0.0, max_tokens=16).text.strip()
                   == r["target"] for r in rows)
    finally:
        m.close()
    return hits / len(rows)


def perplexity(base: str, adapter: str | None, threads: int) -> float:
    import ondevice

    recs = ondevice.evaluate(base, ppl=True, ctx=256, chunks=8, threads=threads, store=False,
                             **({"adapter": adapter} if adapter else {}))
    return recs[0].ppl  # an EvalRecord


MIXED = ["", "all", "budget", "", "all", "budget", "", "all"]  # 8 streams: 3 base, 3 +all, 2 +budget


def serve_rounds(base: str, adapters: dict[str, str], threads: int, rounds: int, n_tokens: int = 48) -> list:
    """(base-only tok/s, mixed tok/s) of 8 concurrent streams, alternated ``rounds`` times on one server (the
    pairs share the machine's load of the moment)."""
    from concurrent.futures import ThreadPoolExecutor

    import openai

    from ondevice.serve import BackgroundServer, ServeSettings

    s = ServeSettings(model=base, port=0, parallel=8, ctx=512, threads=threads, embeddings=False,
                      adapter=[f"{k}={v}" for k, v in adapters.items()])
    with BackgroundServer(s) as srv:
        c = openai.OpenAI(base_url=srv.base_url + "/v1", api_key="x")
        base_id = c.models.list().data[0].id

        def one(i_model):
            i, name = i_model
            r = c.completions.create(model=base_id + (f"+{name}" if name else ""), prompt=f"Story {i}: Once upon a",
                                     max_tokens=n_tokens, temperature=0.0,
                                     extra_body={"ignore_eos": True})
            return r.usage.completion_tokens

        def tps(models: list[str]) -> float:
            t0 = time.perf_counter()
            with ThreadPoolExecutor(len(models)) as ex:
                toks = sum(ex.map(one, enumerate(models)))
            return toks / (time.perf_counter() - t0)

        tps(MIXED)  # warm (every adapter's tensors paged in)
        return [(tps([""] * 8), tps(MIXED)) for _ in range(rounds)]


def decode_costs(base: str, adapters: dict[str, str], threads: int, rounds: int = 30) -> dict:
    """Median ms of llama_decode steps, interleaved round by round: 8 base rows; a mixed step's three decodes
    (3 base, 3 +all, 2 +budget: starting from the base, two switches, as the generator does it); each of them
    alone, its set already active; a 1-row base decode as such and right after a switch from +budget (what a
    switch itself costs: llama.cpp re-reserves its graphs before that decode)."""
    import statistics

    from ondevice.engine.base import EngineConfig
    from ondevice.engine.llama import LlamaEngine

    eng = LlamaEngine(base, EngineConfig(n_ctx=8 * 256, n_seq_max=8, n_threads=threads))
    for k, v in adapters.items():
        eng.adapters.load(v, k)
    pos = dict.fromkeys(range(8), 0)

    def dec(ads, seqs):
        eng.adapters.use(ads)
        eng.decode_batch([(100 + s, pos[s], s, True) for s in seqs])
        for s in seqs:
            pos[s] += 1

    groups = (((), [0, 1, 2]), (("all",), [3, 4, 5]), (("budget",), [6, 7]))
    cases = {  # name: (the set made active before the clock starts, the decodes timed)
        "base x8": ((), lambda: dec((), range(8))),
        "mixed step (3 decodes)": ((), lambda: [dec(a, s) for a, s in groups]),
        "base x3": ((), lambda: dec(*groups[0])), "+all x3": (("all",), lambda: dec(*groups[1])),
        "+budget x2": (("budget",), lambda: dec(*groups[2])),
        "base x1": ((), lambda: dec((), [0])),
        "base x1 after a switch": (("budget",), lambda: dec((), [0]))}
    ts: dict[str, list[float]] = {k: [] for k in cases}
    try:
        for _ in range(rounds):
            for k, (ads, fn) in cases.items():
                dec(ads, [7])  # untimed: llama.cpp re-reserves at the first decode after a switch, not at it
                t0 = time.perf_counter()
                fn()
                ts[k].append(time.perf_counter() - t0)
            if max(pos.values()) > 200:
                for s in pos:
                    eng.truncate(0, s)
                    pos[s] = 0
    finally:
        eng.close()
    return {k: 1000 * statistics.median(v) for k, v in ts.items()}


def serving(a, tmp: Path) -> dict:
    """Section 5."""
    print("5. serving 8 streams: base only vs base + 2 adapters (3 base, 3 +all, 2 +budget)", flush=True)
    ads = {"all": str(tmp / "all.gguf"), "budget": str(tmp / "budget.gguf")}
    print(f"  load average {os.getloadavg()}", flush=True)
    pairs = serve_rounds(a.base, ads, a.threads, a.serve_rounds)
    for tb, tm in pairs:
        print(f"  base only {tb:.1f} tok/s, mixed {tm:.1f} tok/s = {tm / tb:.2f}", flush=True)
    ratios = sorted(tm / tb for tb, tm in pairs)
    med = ratios[len(ratios) // 2]
    print(f"  median ratio {med:.2f} over {len(pairs)} pairs (goal >= 0.90); load average {os.getloadavg()}",
          flush=True)
    costs = decode_costs(a.base, ads, a.threads)
    print("  llama_decode, median ms: " + ", ".join(f"{k} {v:.1f}" for k, v in costs.items()), flush=True)
    print(f"  a mixed step costs {costs['mixed step (3 decodes)'] / costs['base x8']:.2f}x a base step of 8 "
          f"(decode-bound ceiling of the ratio {costs['base x8'] / costs['mixed step (3 decodes)']:.2f}); an "
          f"adapter switch adds {costs['base x1 after a switch'] - costs['base x1']:+.1f} ms to the next decode "
          f"(llama.cpp re-reserves its graphs); load average {os.getloadavg()}", flush=True)
    return {"serve_pairs": pairs, "serve_ratio_median": med, "decode_ms": costs}


def decode_tps(model: str, adapter: str | None, threads: int, n: int = 64) -> float:
    """Decode tok/s of one greedy generation of ``n`` tokens (EOS ignored)."""
    import ondevice

    m = ondevice.load(model, n_ctx=256, n_threads=threads, adapters=(adapter,) if adapter else ())
    try:
        return m.generate("Once upon a time", chat_template=False, temp=0.0, max_tokens=n,
                          ignore_eos=True).last.generation_tps
    finally:
        m.close()


def merging(a, tmp: Path, test_rows: list[dict]) -> dict:
    """Section 6: each adapter of --merge-adapters merged in each type of --merge-types."""
    from ondevice.adapt.check import merged_agreement
    from ondevice.adapt.merge import merge

    print("6. adapters merged into the base vs base + adapter, both in llama.cpp", flush=True)
    out, models = {}, {"base": (a.base, None)}
    for name in a.merge_adapters.split(","):
        adapter = str(tmp / f"{name}.gguf")
        models[f"base + {name}"] = (a.base, adapter)
        for t in a.merge_types.split(","):
            dest = tmp / f"merged-{name}-{t}.gguf"
            t0 = time.perf_counter()
            mg = merge(adapter, dest, out_type=t)
            print(f"  ondevice adapt merge {adapter} -o {dest} --type {t}: {mg['tensors_merged']} tensors, "
                  f"{time.perf_counter() - t0:.1f} s, {mg['size_bytes'] / 2**20:.1f} MiB (base "
                  f"{mg['base_size_bytes'] / 2**20:.1f} MiB); requantized to Q4_1, the rounding error would be "
                  f"{mg['requantize_loss_share']:.2f}x the adapter's whole change (L1)", flush=True)
            ag = merged_agreement(dest, a.base, adapter, [r["input"] for r in test_rows[:20]], n_tokens=12,
                                  threads=a.threads)
            print(f"    {ag['identical_generations']}/{ag['prompts']} identical greedy generations "
                  f"({ag['token_agreement']:.1%} of base + adapter's tokens predicted); logits max |diff| "
                  f"{ag['logit_max_abs_diff']:.3f}, mean {ag['logit_mean_abs_diff']:.4f}", flush=True)
            out[f"{name}-{t}"] = {"merge": mg, "agreement": ag}
            models[f"merged {name} {t}"] = (str(dest), None)
    tps: dict[str, list[float]] = {}
    for _ in range(a.merge_rounds):  # alternated: the machine's load of the moment is shared
        for k, (model, ad) in models.items():
            tps.setdefault(k, []).append(decode_tps(model, ad, a.threads))
    print("  decode tok/s (64 tokens, greedy): " + ", ".join(f"{k} {max(v):.1f}" for k, v in tps.items())
          + f" (best of {a.merge_rounds}); load average {os.getloadavg()}", flush=True)
    return {"merges": out, "merge_tps": tps}


def checkpointing(a, train: Path, tmp: Path) -> dict:
    """Section 7."""
    print("7. gradient checkpointing off vs on (every module of every layer, rank 8)", flush=True)
    args = ["--steps", str(a.ckpt_steps), "--max-len", str(a.max_len), "--batch", "4", "--modules", "all", "--rank", "8",
            "--memory", "lean"]  # as under a budget, where checkpointing is chosen
    runs: dict[str, list[dict]] = {"off": [], "on": []}
    for _ in range(a.ckpt_pairs):
        for mode in ("off", "on"):
            runs[mode].append(adapt_run(train, tmp / f"ckpt-{mode}.gguf", [*args, "--checkpointing", mode], a.threads))
    off, on = (min(r["peak_rss_bytes"] for r in runs[k]) for k in ("off", "on"))
    s_off, s_on = (min(r["seconds_per_step"] for r in runs[k]) for k in ("off", "on"))
    print(f"  peak RSS {on / 2**20:.0f} vs {off / 2**20:.0f} MiB ({on / off:.2f}x); {s_on:.2f} vs {s_off:.2f} s/step "
          f"({s_on / s_off:.2f}x; best of {a.ckpt_pairs}); load average {os.getloadavg()}", flush=True)
    return {"checkpointing": runs}


def train_and_compare(a, train: Path, tmp: Path) -> dict:
    """Sections 1 and 2, each training run its own process."""
    common = ["--steps", str(a.steps), "--max-len", str(a.max_len), "--batch", "4"]
    out: dict = {}
    print("1. budgeted sparse LoRA vs all-module LoRA", flush=True)
    # all-module LoRA with the budgeted run's lean memory (its default without a budget is fast, which holds more):
    # the RSS ratio compares the plans, not the allocators
    full = adapt_run(train, tmp / "all.gguf", [*common, "--modules", "all", "--rank", "8", "--memory", "lean"],
                     a.threads)
    sparse = adapt_run(train, tmp / "budget.gguf", [*common, "--budget", f"mem={a.budget}"], a.threads,
                       cap=a.budget if a.cap else None)
    red = {k: r["heldout_loss_before"] - r["heldout_loss_after"] for k, r in (("all", full), ("budget", sparse))}
    fixed = sparse["plan_info"]["fixed_rss_bytes"]
    print(f"  budget/all held-out loss reduction: {red['budget'] / red['all']:.2f} (goal >= 0.90); peak RSS "
          f"{sparse['peak_rss_bytes'] / 2**20:.0f} vs {full['peak_rss_bytes'] / 2**20:.0f} MiB = "
          f"{sparse['peak_rss_bytes'] / full['peak_rss_bytes']:.2f} (goal <= 0.33); above the loaded base "
          f"({fixed / 2**20:.0f} MiB): {(sparse['peak_rss_bytes'] - fixed) / 2**20:.0f} vs "
          f"{(full['peak_rss_bytes'] - fixed) / 2**20:.0f} MiB = "
          f"{(sparse['peak_rss_bytes'] - fixed) / max(1, full['peak_rss_bytes'] - fixed):.2f}", flush=True)
    out.update(all=full, budget=sparse)
    if a.budget_only:
        return out
    out.update(precision(a, train, tmp))
    return out


def precision(a, train: Path, tmp: Path) -> dict:
    """Section 2: the same small run (top 6 layers, q+v, rank 8) in fp32 and bf16, alternated ``--precision-pairs``
    times; each run's ``--memory`` is ``a.memory`` (glibc's defaults unless asked: lean memory's fresh mmaps
    cost bf16 more than fp32)."""
    from ondevice.device.info import cpu_flags

    flags = cpu_flags()
    hw = [f for f in ("amx_bf16", "avx512_bf16") if f in flags]
    print(f"2. bf16 vs fp32 (top 6 layers, q+v, rank 8, {a.precision_steps} steps, --memory {a.memory}, OpenMP wait "
          f"policy {'PASSIVE' if a.omp_passive else 'as a user runs it (unset)'}); this CPU: "
          + (f"bf16 in hardware ({', '.join(hw)})" if hw else "no bf16 instructions (torch emulates bf16)"),
          flush=True)
    small = ["--steps", str(a.precision_steps), "--max-len", str(a.max_len), "--batch", "4", "--layers", "24-29",
             "--modules", "attn_q,attn_v", "--memory", a.memory]
    runs: dict[str, list[dict]] = {"fp32": [], "bf16": []}
    for _ in range(a.precision_pairs):  # alternated: the machine's load of the moment is shared
        for p in ("fp32", "bf16"):
            runs[p].append(adapt_run(train, tmp / f"{p}.gguf", [*small, "--precision", p], a.threads,
                                     passive=a.omp_passive))
    s32, s16 = (statistics.median(r["seconds_per_step"] for r in runs[p]) for p in ("fp32", "bf16"))
    l32, l16 = (runs[p][-1]["heldout_loss_after"] for p in ("fp32", "bf16"))
    print(f"  bf16/fp32 step speed: {s32 / s16:.2f}x (medians of {a.precision_pairs}: {s16:.3f} vs {s32:.3f} s/step; "
          f"goal >= 1.3 where the CPU has bf16); final held-out loss {l16:.4f} vs {l32:.4f} "
          f"({(l16 - l32) / l32:+.1%}; goal within 2%); load average {os.getloadavg()}", flush=True)
    return {"fp32": runs["fp32"], "bf16": runs["bf16"], "bf16_hw": hw}


def task(a, tmp: Path, test_rows: list[dict]) -> dict:
    """Section 3."""
    print("3. the task (ISO dates, exact match on held-out prompts) and general perplexity", flush=True)
    cases = (("base", None), ("all", str(tmp / "all.gguf")), ("budget", str(tmp / "budget.gguf")))
    score = {k: exact_match(a.base, p, test_rows, a.threads) for k, p in cases}
    ppl = {k: perplexity(a.base, p, a.threads) for k, p in cases}
    for k, s in score.items():
        print(f"  {k:7s} exact match {s:.1%}  PPL(pydoc, 8x256) {ppl[k]:.3f} ({ppl[k] / ppl['base'] - 1:+.1%})",
              flush=True)
    return {"score": score, "ppl": ppl}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--budget", default="600M")
    ap.add_argument("--train", type=int, default=200)
    ap.add_argument("--test", type=int, default=40)
    ap.add_argument("--json", default=None)
    ap.add_argument("--context-words", type=int, default=0, metavar="N",
                    help="each date sentence inside an e-mail of N filler words (long inputs); 0: the sentence alone")
    ap.add_argument("--max-len", type=int, default=64, help="tokens trained per example (the prompt's start is cut)")
    ap.add_argument("--adapters-from", default=None, metavar="DIR",
                    help="skip sections 1-2 and use all.gguf and budget.gguf of an earlier run's directory")
    ap.add_argument("--serve-only", action="store_true", help="with --adapters-from: only section 5")
    ap.add_argument("--merge-only", action="store_true", help="with --adapters-from: only section 6")
    ap.add_argument("--merge-rounds", type=int, default=3, help="decode tok/s rounds in section 6")
    ap.add_argument("--merge-adapters", default="budget", help="section 6: which of budget,all to merge")
    ap.add_argument("--merge-types", default="f16,q8_0", help="section 6: merged tensor types")
    ap.add_argument("--checkpointing-only", action="store_true", help="only section 7")
    ap.add_argument("--budget-only", action="store_true", help="only sections 1 and 3")
    ap.add_argument("--precision-only", action="store_true", help="only section 2")
    ap.add_argument("--precision-steps", type=int, default=12, help="training steps per run in section 2")
    ap.add_argument("--precision-pairs", type=int, default=2, help="fp32/bf16 pairs in section 2")
    ap.add_argument("--omp-passive", action="store_true",
                    help="section 2 with OMP_WAIT_POLICY=PASSIVE as the other sections (default: unset, as a user runs "
                         "it; PASSIVE slowed bf16 more than fp32 on a quiet machine)")
    ap.add_argument("--memory", choices=("auto", "lean", "fast"), default="auto",
                    help="section 2's --memory (auto = fast there: no budget)")
    ap.add_argument("--ckpt-steps", type=int, default=4, help="training steps per run in section 7")
    ap.add_argument("--ckpt-pairs", type=int, default=1, help="off/on pairs in section 7")
    ap.add_argument("--serve-rounds", type=int, default=3, help="base-only/mixed pairs in section 5")
    ap.add_argument("--no-cap", dest="cap", action="store_false",
                    help="do not run the budgeted training in a memory cgroup capped at the budget")
    a = ap.parse_args()
    from ondevice.models import resolve

    base = a.base = str(resolve(None).path)
    if (a.serve_only or a.merge_only) and not a.adapters_from:
        ap.error("--serve-only and --merge-only need --adapters-from DIR (with all.gguf and budget.gguf)")
    tmp = Path(a.adapters_from or tempfile.mkdtemp(prefix="adapt-bench-"))
    train = tasks.write_jsonl(tasks.iso_dates(a.train, seed=1, context_words=a.context_words), tmp / "train.jsonl")
    test_rows = tasks.iso_dates(a.test, seed=2, context_words=a.context_words)
    print(f"load average at start: {os.getloadavg()}; task: ISO dates, {a.context_words} context words, "
          f"--max-len {a.max_len}")
    out: dict = {"load_start": os.getloadavg()}
    if a.checkpointing_only:
        out.update(checkpointing(a, train, tmp))
        return _finish(a, out)
    if a.precision_only:
        out.update(precision(a, train, tmp))
        return _finish(a, out)
    if a.adapters_from is None:
        out.update(train_and_compare(a, train, tmp))
    if a.serve_only:
        out.update(serving(a, tmp))
        return _finish(a, out)
    if a.merge_only:
        out.update(merging(a, tmp, test_rows))
        return _finish(a, out)
    out.update(task(a, tmp, test_rows))
    if a.budget_only:
        return _finish(a, out)
    print("4. llama.cpp with the adapter vs torch", flush=True)
    from ondevice.adapt.check import agreement

    ag = agreement(base, tmp / "budget.gguf", [r["input"] for r in test_rows[:20]], n_tokens=12, threads=a.threads)
    print(f"  {ag['identical_sequences']}/{ag['prompts']} identical greedy sequences (goal >= 95%), "
          f"{ag['token_agreement']:.1%} of tokens; logits max |diff| {ag['logit_max_abs_diff']:.3f}, mean "
          f"{ag['logit_mean_abs_diff']:.4f}", flush=True)
    out["agreement"] = ag
    out.update(serving(a, tmp))
    out.update(merging(a, tmp, test_rows))
    out.update(checkpointing(a, train, tmp))
    return _finish(a, out)


def _finish(a, out: dict) -> int:
    out["load_end"] = os.getloadavg()
    print(f"load average at end: {os.getloadavg()}")
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
