"""``ondevice adapt DATA.jsonl [-m MODEL] [-o OUT.gguf] [--budget mem=600M] [--precision bf16] [--resume]``."""

from __future__ import annotations

import argparse
import json
import re
import sys

from ..errors import InvalidArgument


def add_arguments(p: argparse.ArgumentParser) -> None:
    from .train import AdaptConfig

    d = AdaptConfig(data="")
    p.add_argument("data", nargs="?", help="JSONL, one {\"messages\": [...]} (last one the assistant's answer) or "
                                           "{\"input\": ..., \"target\": ...} per line")
    p.add_argument("--from", dest="source", choices=("file", "deferred"), default="file",
                   help="deferred: train on the hard samples the cascade kept for this model (its inputs with the "
                        "cloud's answers), written next to the adapter as OUT.deferred.jsonl")
    p.add_argument("--db", default=None, metavar="PATH", help="the store for --from deferred (default: the data dir)")
    p.add_argument("-m", "--model", default=None, help="base model (catalog name or .gguf); default: "
                                                       "smollm2-135m-instruct")
    p.add_argument("-o", "--out", default=d.out, help="the adapter GGUF to write")
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--batch", type=int, default=d.batch, help="examples per step")
    p.add_argument("--max-len", type=int, default=d.max_len, help="tokens per example at most")
    p.add_argument("--rank", type=int, default=d.rank, help="LoRA rank (without --budget)")
    p.add_argument("--alpha", type=float, default=d.alpha, help="LoRA alpha (scale = alpha / rank)")
    p.add_argument("--modules", default=",".join(d.modules),
                   help="LoRA targets without --budget: attn_q,attn_k,attn_v,attn_output,ffn_gate,ffn_up,ffn_down "
                        "or 'all'")
    p.add_argument("--layers", default=None, help="layers without --budget, e.g. 20-29 or 0,5,9 (default: all)")
    p.add_argument("--budget", default=None, metavar="mem=600M",
                   help="peak memory for the whole run: picks layers, modules and ranks by measured gradient "
                        "contribution per measured byte")
    p.add_argument("--precision", choices=("fp32", "bf16"), default=d.precision,
                   help="compute dtype (LoRA weights and optimizer stay fp32)")
    p.add_argument("-t", "--threads", type=int, default=d.threads)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--heldout", type=float, default=d.heldout, help="share of examples held out for the loss check")
    p.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every, help="steps between checkpoints")
    p.add_argument("--resume", action="store_true", help="continue from OUT.ckpt.pt (after Ctrl-C or a crash)")
    p.add_argument("--check", type=int, default=0, metavar="N",
                   help="after export, compare llama.cpp with the adapter against torch on N held-out prompts")
    p.add_argument("--json", action="store_true", help="print the figures as JSON")


def parse_budget(s: str) -> int:
    m = re.fullmatch(r"mem=(\d+(?:\.\d+)?)([KMG]i?B?)?", s.strip(), re.IGNORECASE)
    if not m:
        raise InvalidArgument(f"--budget {s!r}: write it as mem=600M (K, M or G: binary units)")
    unit = {"K": 2**10, "M": 2**20, "G": 2**30}[(m.group(2) or "M")[0].upper()]
    return int(float(m.group(1)) * unit)


def parse_layers(s: str | None) -> tuple[int, ...] | None:
    if s is None:
        return None
    out = []
    try:
        for part in s.split(","):
            lo, _, hi = part.partition("-")
            out += range(int(lo), int(hi or lo) + 1)
    except ValueError:
        raise InvalidArgument(f"--layers {s!r}: use e.g. 20-29 or 0,5,9") from None
    return tuple(out)


def deferred_data(args: argparse.Namespace) -> str:
    """The cascade's kept hard samples of this base model, exported as the training file (device -> cloud ->
    device: "Cloud-device collaborative adaptation")."""
    from ..cascade.samples import export_hard_samples
    from ..models import resolve
    from ..models.store import cached_sha256

    if args.data:
        raise InvalidArgument("--from deferred takes its data from the store; drop the data file argument")
    ref = resolve(args.model)
    out = f"{args.out}.deferred.jsonl"
    if export_hard_samples(out, store=args.db, device_sha256=cached_sha256(ref.path)) == 0:
        raise InvalidArgument(f"the store holds no hard samples for {ref.name}; serve it with --cascade (deferred "
                              f"requests are kept with the cloud's answers) before --from deferred")
    return out


def run(args: argparse.Namespace) -> int:
    from . import require_torch

    require_torch()
    from .model import MODULES
    from .train import AdaptConfig, train

    data = deferred_data(args) if args.source == "deferred" else args.data
    if data is None:
        raise InvalidArgument("give a data file (JSONL) or --from deferred")
    modules = MODULES if args.modules == "all" else tuple(m for m in args.modules.split(",") if m)
    cfg = AdaptConfig(data=data, out=args.out, model=args.model, steps=args.steps, lr=args.lr,
                      batch=args.batch, max_len=args.max_len, rank=args.rank, alpha=args.alpha, modules=modules,
                      layers=parse_layers(args.layers), precision=args.precision, threads=args.threads,
                      seed=args.seed, heldout=args.heldout, checkpoint_every=args.checkpoint_every,
                      resume=args.resume, budget_bytes=parse_budget(args.budget) if args.budget else None)
    r = train(cfg)
    if args.check:
        from .check import agreement
        from .data import read_jsonl

        convs = read_jsonl(data)[:args.check]
        r["agreement"] = agreement(r["base"]["path"], r["adapter"], [c[:-1] for c in convs], threads=args.threads)
    if args.json:
        print(json.dumps({k: v for k, v in r.items() if k != "plan"}, default=str))
        return 0
    layers = sorted({int(n.split(".")[1]) for n in r["plan"]})
    mods = sorted({n.split(".")[2] for n in r["plan"]})
    held = ("" if r["heldout_loss_before"] is None else
            f"; held-out loss {r['heldout_loss_before']:.4f} -> {r['heldout_loss_after']:.4f}")
    print(f"adapter {r['adapter']}: LoRA on {len(r['plan'])} tensors (layers {layers[0]}-{layers[-1]}, "
          f"{','.join(mods)}, ranks {sorted(set(r['plan'].values()))}, {r['trainable_params']:,} parameters)")
    print(f"{r['steps']} steps, loss {r['first_loss']:.4f} -> {r['last_loss']:.4f}{held}; "
          f"{r['seconds_per_step']:.2f} s/step; peak RSS {r['peak_rss_bytes'] / 2**20:.0f} MiB"
          + (f" (budget {cfg.budget_bytes / 2**20:.0f} MiB)" if cfg.budget_bytes else ""))
    if "agreement" in r:
        a = r["agreement"]
        print(f"llama.cpp vs torch: {a['identical_sequences']}/{a['prompts']} identical greedy sequences, "
              f"{a['token_agreement']:.1%} of tokens; logits max |diff| {a['logit_max_abs_diff']:.3f}, "
              f"mean {a['logit_mean_abs_diff']:.4f}")
    print(f"use it: ondevice run --adapter {r['adapter']} \"...\"", file=sys.stderr)
    return 0
