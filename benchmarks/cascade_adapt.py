"""Cloud-device collaborative adaptation for the cascade: the device model learns from the cloud's answers.

"Cloud-device collaborative adaptation" keeps the inputs the device deferred, with the cloud's answers, and
fine-tunes the device model on them; "Towards an On-device Agent for Text Rewriting" fine-tunes its
on-device rewriter for the task. This bench runs that loop with ondevice's own verbs, as a user would:

1. Prompts: the messages of ``benchmarks/data/cascade_adapt_messages.json`` (630, 840 prompts; written for this bench by
   hand in the suites' style on other topics, none taken from model output; none is an evaluation item's:
   every message is checked here against every item cascade_bench draws, word-set Jaccard < 0.5) under the
   instructions of cascade_bench's tasks, in the suites' own wording.
2. Collection: ``ondevice serve --cascade CLOUD --cascade-keep-hard`` (in its own ``ONDEVICE_HOME``) gets each
   prompt from the ``openai`` client with ``"cascade": {"always_defer": true, "keep": true}``: the cloud (a
   real ``ondevice serve -m qwen2.5-coder-0.5b-instruct`` on loopback) answers and the server keeps the input
   and the cloud's answer in its SQLite store.
3. Adaptation: ``ondevice adapt --from deferred`` trains a LoRA adapter on those kept samples (torch extra).
4. The deferral curve with the adapted device: run the printed ``cascade_bench.py --device-adapter`` command
   (same items, same dev/test split, same combiner fitting as without the adapter).

    python benchmarks/cascade_adapt.py [--steps 450] [--work /tmp/ondevice-cascade-adapt]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cascade_bench import load_items, start_server, stop

MESSAGES = Path(__file__).resolve().parent / "data" / "cascade_adapt_messages.json"
# message kind -> the tasks whose instruction it is put under (the first item of each task gives the wording)
KINDS = {"casual": ("rewrite_formal", "rewrite_tone/formal"), "stiff": ("rewrite_friendly", "rewrite_tone/casual"),
         "rude": ("rewrite_polite",), "misspelled": ("rewrite_grammar",), "long": ("rewrite_shorter",),
         "notifications": ("notification_summary",)}


def _words(text: str) -> set[str]:
    return set("".join(c if c.isalnum() else " " for c in text.lower()).split())


def instructions(items) -> dict[str, str]:
    """task -> the instruction before the message, as the suites word it (rewrite_tone has two tones)."""
    out: dict[str, str] = {}
    for it in items:
        head = it.input.rsplit("\n\n", 1)[0] + "\n\n"
        key = it.task
        if it.task == "rewrite_tone":
            key += "/formal" if "formal" in head else "/casual"
        out.setdefault(key, head)
    return out


def prompts(items) -> list[str]:
    heads = instructions(items)
    data = json.loads(MESSAGES.read_text(encoding="utf-8"))
    evals = [_words(it.input.rsplit("\n\n", 1)[1]) for it in items]
    out = []
    for kind, tasks in KINDS.items():
        for msg in data[kind]:
            msg = msg[0] if isinstance(msg, list) else msg  # misspelled: [wrong, corrected]; the cloud corrects
            w = _words(msg)
            near = max(len(w & e) / len(w | e) for e in evals)
            if near >= 0.5:
                sys.exit(f"{MESSAGES.name}: {msg!r} is too close to an evaluation item (Jaccard {near:.2f})")
            for task in tasks:
                head = heads[task]
                if task == "rewrite_shorter":  # vary the word limit as the suites do (10..14)
                    n = 10 + int(hashlib.sha256(msg.encode()).hexdigest(), 16) % 5
                    head = head.replace("at most 10 words", f"at most {n} words")
                label = "Notifications:\n" if kind == "notifications" else "Message: "
                out.append(head + label + msg)
    return out


def collect(args, texts: list[str], home: Path) -> None:
    from openai import OpenAI

    cloud, cloud_url = start_server("-m", args.cloud_model, threads=args.threads, slots=args.slots)
    env_home = os.environ.get("ONDEVICE_HOME")
    os.environ["ONDEVICE_HOME"] = str(home)  # the device server's store (its kept samples) is the work dir's
    try:
        dev, dev_url = start_server("--cascade", cloud_url + "/v1", "--cascade-keep-hard", "--cascade-timeout",
                                    "600", threads=1, slots=args.slots)
    finally:
        os.environ.pop("ONDEVICE_HOME") if env_home is None else os.environ.update(ONDEVICE_HOME=env_home)
    client = OpenAI(base_url=dev_url + "/v1", api_key="none", timeout=900, max_retries=0)

    def ask(text: str) -> str:
        r = client.chat.completions.create(model="smollm2-135m-instruct", temperature=0, max_tokens=args.max_tokens,
                                           messages=[{"role": "user", "content": text}],
                                           extra_body={"cascade": {"always_defer": True, "keep": True}})
        tier = (r.model_extra or {}).get("cascade", {}).get("tier")
        if tier != "cloud":
            raise SystemExit(f"the cloud did not answer ({tier}): {text[:80]!r}")
        return r.choices[0].message.content

    t0 = time.perf_counter()
    try:
        with ThreadPoolExecutor(args.slots) as pool:
            for i, _ in enumerate(pool.map(ask, texts), 1):
                if i % 50 == 0 or i == len(texts):
                    print(f"  {i}/{len(texts)} kept ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    finally:
        stop(dev)
        stop(cloud)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default="/tmp/ondevice-cascade-adapt", help="ONDEVICE_HOME of the collection and "
                                                                          "where the adapter is written")
    ap.add_argument("--cloud-model", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--max-tokens", type=int, default=48, help="as cascade_bench's --max-tokens")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--slots", type=int, default=2, help="requests in flight")
    ap.add_argument("--steps", type=int, default=450)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--modules", default="all")
    ap.add_argument("--seed", type=int, default=0, help="the training seed (held-out split, initial weights, batch "
                                                        "order): another seed checks that a result is not one draw's")
    args = ap.parse_args()
    work = Path(args.work)
    texts = prompts(load_items(None))
    db = work / "data" / "ondevice.sqlite"
    kept = set()
    if db.is_file():  # a killed or earlier run: what the store holds is not asked again
        from ondevice.store import Store

        with Store(db) as s:
            kept = {h["messages"][-1]["content"] for h in s.hard_samples()}
    todo = [t for t in texts if t not in kept]
    print(f"{len(texts) - len(todo)} of {len(texts)} prompts already kept in {db}", file=sys.stderr)
    if todo:
        collect(args, todo, work)
    adapter = work / f"hard-r{args.rank}-{args.steps}{f'-s{args.seed}' if args.seed else ''}.gguf"
    cmd = [sys.executable, "-m", "ondevice.cli", "adapt", "--from", "deferred", "--db", str(db), "-o", str(adapter),
           "--modules", args.modules, "--rank", str(args.rank), "--steps", str(args.steps), "--lr", str(args.lr),
           "--max-len", "192", "-t", str(args.threads), "--seed", str(args.seed), "--json"]
    print(" ".join(cmd[2:]), file=sys.stderr)
    t0 = time.perf_counter()
    r = subprocess.run(cmd, check=False, capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"adapt failed ({r.returncode}):\n{r.stderr[-3000:]}")
    got = json.loads(r.stdout)
    print(f"adapted in {time.perf_counter() - t0:.0f} s: {got['n_train']} examples ({got['n_heldout']} held out), "
          f"{got['steps']} steps, {got['seconds_per_step']:.1f} s/step, held-out loss "
          f"{got['heldout_loss_before']:.3f} -> {got['heldout_loss_after']:.3f}, peak RSS "
          f"{got['peak_rss_bytes'] / 2**20:.0f} MiB; {adapter}")
    print(f"\nnow: python benchmarks/cascade_bench.py --max-tokens {args.max_tokens} --threads 1 --skip-overhead "
          f"--resplits 60 --device-adapter {adapter}")


if __name__ == "__main__":
    main()
