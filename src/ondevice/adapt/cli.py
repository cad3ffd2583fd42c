"""``ondevice adapt DATA.jsonl [--name NAME | -o OUT.gguf] [-m MODEL] [--budget mem=600M] [--resume]``, and the
stored adapters: ``ondevice adapt list``, ``ondevice adapt rm NAME...``, ``ondevice adapt merge NAME [-o OUT.gguf]``
and ``ondevice adapt average A B [...] [--weights W,W,...] (-o OUT.gguf | --name NAME)``."""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from ..errors import InvalidArgument


def add_arguments(p: argparse.ArgumentParser) -> None:
    from .train import AdaptConfig

    d = AdaptConfig(data="")
    p.add_argument("data", nargs="?", metavar="DATA.jsonl | list | rm | merge | average",
                   help="JSONL, one {\"messages\": [...]} (last one the assistant's answer) or {\"input\": ..., "
                        "\"target\": ...} per line; 'list': the stored adapters; 'rm NAME ...': delete stored "
                        "adapters; 'merge NAME': the adapter folded into its base, written as one GGUF (as "
                        "llama-export-lora); 'average A B ...': one adapter whose change is the weighted sum of "
                        "theirs (a soup of runs that differ by seed)")
    p.add_argument("adapter", nargs="*", metavar="NAME",
                   help="with rm: stored adapters' names; with merge: a stored adapter's name or a .gguf; with "
                        "average: two or more")
    p.add_argument("--from", dest="source", choices=("file", "deferred"), default="file",
                   help="deferred: train on the hard samples the cascade kept for this model (its inputs with the "
                        "cloud's answers), written next to the adapter as OUT.deferred.jsonl")
    p.add_argument("--db", default=None, metavar="PATH", help="the store for --from deferred (default: the data dir)")
    p.add_argument("-m", "--model", default=None, help="base model (catalog name or .gguf); default: "
                                                       "smollm2-135m-instruct")
    p.add_argument("--name", default=None, help="store the adapter under this name (`ondevice adapt list`; "
                                                "`--adapter NAME` of run, chat, eval, serve); default: the data "
                                                "file's name")
    p.add_argument("-o", "--out", default=None, metavar="OUT.gguf",
                   help="write the adapter here instead of the store (with merge: the merged model; default: the "
                        "model store as BASE-NAME)")
    p.add_argument("--type", dest="out_type", default="q8_0", choices=("q8_0", "f16", "f32"),
                   help="with merge: the merged tensors' type (f16 is llama-export-lora's: twice the bytes, slower "
                        "decoding; the other tensors are copied)")
    p.add_argument("--weights", default=None, metavar="W,W,...",
                   help="with average: one weight per adapter, in order (default: 1/n each)")
    from .train import DEFAULT_STEPS

    p.add_argument("--steps", type=int, default=None,
                   help=f"optimizer steps of --batch examples (default {DEFAULT_STEPS}, or what --epochs makes)")
    p.add_argument("--epochs", "--num-train-epochs", "--num_train_epochs", dest="epochs", type=float, default=None,
                   metavar="E", help="passes over the training examples, each seen once per pass in a shuffled order "
                                     "(TRL's --num_train_epochs): ceil(E * examples / batch) steps; not with --steps")
    p.add_argument("--lr", "--learning-rate", type=float, default=d.lr,  # the second: peft's and TRL's name
                   help=f"AdamW's peak learning rate: a short linear warm-up, then cosine decay to 0 "
                        f"(default {d.lr:g})")
    p.add_argument("--batch", type=int, default=d.batch, help="examples per step")
    p.add_argument("--max-len", type=int, default=d.max_len, help="tokens per example at most")
    p.add_argument("--rank", "--lora-r", type=int, default=None, help=f"LoRA rank (without --budget; default {d.rank})")
    p.add_argument("--alpha", "--lora-alpha", type=float, default=d.alpha, help="LoRA alpha (scale = alpha / rank)")
    p.add_argument("--modules", default=None,
                   help="LoRA targets without --budget: attn_q,attn_k,attn_v,attn_output,ffn_gate,ffn_up,ffn_down "
                        f"or 'all' (default {','.join(d.modules)})")
    p.add_argument("--layers", default=None, help="layers without --budget, e.g. 20-29 or 0,5,9 (default: all)")
    p.add_argument("--budget", default=None, metavar="mem=600M",
                   help="peak memory for the whole run: picks layers, modules and ranks by measured gradient "
                        "contribution per measured byte")
    p.add_argument("--checkpointing", choices=("auto", "on", "off"), default=d.checkpointing,
                   help="gradient checkpointing (recompute each trained layer in backward: less memory, slower "
                        "steps); auto: on only when --budget finds a better plan fits with it")
    p.add_argument("--precision", choices=("fp32", "bf16"), default=d.precision,
                   help="compute dtype (LoRA weights and optimizer stay fp32); bf16 is fast where the CPU has it "
                        "(AMX, AVX512-BF16: see 'ondevice device') and emulated, slower, elsewhere")
    p.add_argument("--memory", choices=("auto", "lean", "fast"), default=d.memory,
                   help="lean: freed memory goes back to the OS at once (lower peak RSS, slower steps: 2x fp32, "
                        "3x bf16 measured); fast: glibc malloc as it comes; auto: lean with --budget, else fast")
    p.add_argument("-t", "--threads", type=int, default=d.threads, help=f"torch's threads (default {d.threads})")
    p.add_argument("--seed", type=int, default=d.seed,
                   help=f"seeds the LoRA init, the shuffle and the held-out split (default {d.seed})")
    p.add_argument("--heldout", type=float, default=d.heldout, help="share of examples held out for the loss check")
    p.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every, help="steps between checkpoints")
    p.add_argument("--resume", action="store_true",
                   help="continue from OUT.ckpt.pt (after Ctrl-C or a crash) with the same data and settings; only "
                        "--steps (a longer run stretches the learning-rate decay from there), --checkpoint-every "
                        "and -t may change; with --from deferred, on the samples exported for that run")
    p.add_argument("--check", type=int, default=0, metavar="N",
                   help="after export, compare llama.cpp with the adapter against torch on the prompts of the first "
                        "N conversations of DATA (training ones too: it checks the export, not generalisation; with "
                        "merge: the merged model against base + adapter on N general prompts)")
    p.add_argument("--json", action="store_true", help="print the figures (or the list) as JSON")
    p.add_argument("--force", action="store_true", help="replace the adapter (merge: the model) that would be "
                                                        "written where one is there already; never the base model, "
                                                        "the data, an input or a file of another kind")


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
            lo, dash, hi = part.partition("-")
            if dash and not hi:  # "20-" read as layer 20 alone
                raise InvalidArgument(f"--layers {s!r}: give both ends of the range {part}, e.g. {lo}-29 (the "
                                      f"model's last layer is its block count - 1)")
            if int(hi or lo) < int(lo):  # an empty range would train nothing
                raise InvalidArgument(f"--layers {s!r}: the range {part} is empty; write the lower layer first, "
                                      f"e.g. {hi}-{lo}")
            out += range(int(lo), int(hi or lo) + 1)
    except ValueError:
        raise InvalidArgument(f"--layers {s!r}: use e.g. 20-29 or 0,5,9") from None
    return tuple(out)


def deferred_data(args: argparse.Namespace) -> str:
    """The cascade's kept hard samples of this base model, exported as the training file (device -> cloud ->
    device: "Cloud-device collaborative adaptation"). With --resume, the file exported for the interrupted run:
    samples kept since are for the next run, and the checkpoint was made from that file."""
    from ..cascade.samples import export_hard_samples
    from ..models import resolve
    from ..models.store import cached_sha256
    from .store import target

    if args.data:
        raise InvalidArgument("--from deferred takes its data from the store; drop the data file argument")
    adapter = target(args.out, args.name, "deferred")
    out, ckpt = Path(f"{adapter}.deferred.jsonl"), Path(f"{adapter}.ckpt.pt")
    if args.resume and out.is_file():
        return str(out)
    if ckpt.is_file() and out.is_file():  # a new export would replace the samples that run was made from
        raise InvalidArgument(f"{ckpt} holds an interrupted run on {out}: add --resume to continue it on those "
                              f"samples, or delete {ckpt} to start over on the samples kept now")
    ref = resolve(args.model)
    part = out.with_name(out.name + ".part")  # the last run's file stays until this export has samples
    try:
        if export_hard_samples(part, store=args.db, device_sha256=cached_sha256(ref.path)) == 0:
            raise InvalidArgument(f"the store holds no hard samples for {ref.name}; serve it with --cascade URL "
                                  f"--cascade-keep-hard (or a request's \"keep\": true), which keeps deferred "
                                  f"requests with the cloud's answers, before --from deferred")
        part.replace(out)
    finally:
        part.unlink(missing_ok=True)
    return str(out)


def list_adapters(args: argparse.Namespace) -> int:
    from . import store

    rows = store.listing()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(store.table(rows) if rows else "no stored adapters")
    print(f"\nstore: {store.adapters_dir()}  (train one with `ondevice adapt DATA.jsonl --name NAME`; use it with "
          f"`--adapter NAME`)", file=sys.stderr)
    return 0


def remove_adapters(args: argparse.Namespace) -> int:
    from . import store

    if not args.adapter:
        raise InvalidArgument(f"adapt {args.data} takes the stored adapters' names: ondevice adapt rm NAME "
                              f"[NAME ...] (`ondevice adapt list` shows them)")
    for name, freed in store.remove(args.adapter):
        print(f"removed adapter {name} ({store.size_text(freed)})")
    return 0


def merge_adapter(args: argparse.Namespace) -> int:
    from .merge import merge

    if len(args.adapter) != 1:
        raise InvalidArgument("merge takes one adapter: ondevice adapt merge NAME [-o OUT.gguf] (to combine several "
                              "first: ondevice adapt average A B --name NAME)")
    from ..stop_signals import said_as_stopped

    with said_as_stopped(args.out or "the merged model"):  # a `kill` mid-write: said as quantize and protect say it
        r = merge(args.adapter[0], args.out, model=args.model, out_type=args.out_type, force=args.force)
    if args.check:
        from .check import GENERIC_PROMPTS, merged_agreement

        r["agreement"] = merged_agreement(r["path"], r["base"], r["adapter"], GENERIC_PROMPTS[:args.check],
                                          threads=args.threads)
    if args.json:
        print(json.dumps(r, default=str))
        return 0
    lost = r["requantize_loss_share"]
    print(f"merged {r['tensors_merged']} tensors of {Path(r['adapter']).stem} into {Path(r['base']).name} "
          f"({r['type']}): {r['path']}, {r['size_bytes'] / 2**20:.1f} MiB (base {r['base_size_bytes'] / 2**20:.1f} "
          f"MiB)" + ("" if lost is None else f"; requantized to the base's own types, the rounding error would be "
                                                  f"{lost:.2f}x the adapter's whole change (L1)"))
    if "agreement" in r:
        a = r["agreement"]
        print(f"merged vs base + adapter in llama.cpp: {a['identical_generations']}/{a['prompts']} identical greedy "
              f"generations, {a['token_agreement']:.1%} of tokens; logits max |diff| {a['logit_max_abs_diff']:.3f}, "
              f"mean {a['logit_mean_abs_diff']:.4f}")
    use = f"-m {r['name']}" if r["name"] else f"-m {r['path']}"
    print(f"use it: ondevice run {use} \"...\"", file=sys.stderr)
    return 0


def average_adapters(args: argparse.Namespace) -> int:
    from .average import average
    from .store import size_text

    try:
        weights = None if args.weights is None else [float(w) for w in args.weights.split(",")]
    except ValueError:
        raise InvalidArgument(f"--weights {args.weights!r}: give numbers separated by commas, one per adapter, "
                              f"e.g. --weights 0.5,0.5") from None
    from ..stop_signals import said_as_stopped

    with said_as_stopped(args.out or "the averaged adapter"):
        r = average(args.adapter, args.out, args.name, weights, force=args.force)
    if args.json:
        print(json.dumps(r))
        return 0
    # each input as the user named it (a stored name and a path to another file of that stem stay apart)
    parts = ", ".join(f"{a} x {w:g}" for a, w in zip(args.adapter, r["weights"], strict=True))
    ranks = " or ".join(map(str, r["ranks"]))
    print(f"adapter {r['path']}: {parts}; {r['tensors']} tensors, rank {ranks} (the inputs' ranks add up where "
          f"they share a tensor), {size_text(r['size_bytes'])}")
    print(f"use it: ondevice run --adapter {r['name'] or r['path']} \"...\"", file=sys.stderr)
    return 0


def run(args: argparse.Namespace) -> int:
    if args.data == "list" and args.source == "file":
        return list_adapters(args)
    if args.data in ("rm", "remove", "delete") and args.source == "file":  # `ondevice rm`'s aliases
        return remove_adapters(args)
    from ..stop_signals import interrupt_on_signals

    if args.data == "merge" and args.source == "file":
        if args.name is not None:  # merge() names the model itself
            raise InvalidArgument("--name with merge: the merged model is stored as BASE-ADAPTER (`ondevice run -m "
                                  "BASE-ADAPTER`); to choose its file give -o OUT.gguf instead of --name")
        with interrupt_on_signals():  # a `kill` unwinds as Ctrl-C: no half-written .part left in the store
            return merge_adapter(args)
    if args.data == "average" and args.source == "file":
        with interrupt_on_signals():
            return average_adapters(args)
    if args.adapter:
        raise InvalidArgument(f"unexpected argument {args.adapter[0]!r}: train with `ondevice adapt DATA.jsonl`, or "
                              f"use `ondevice adapt list` / `rm NAME` / `merge NAME` / `average A B ...`")
    from . import require_torch

    require_torch()
    from .model import MODULES
    from .train import AdaptConfig, check_settings, train

    layers, budget = parse_layers(args.layers), parse_budget(args.budget) if args.budget else None  # before export
    d = AdaptConfig(data="")
    rank = d.rank if args.rank is None else args.rank
    modules = d.modules if args.modules is None else MODULES if args.modules == "all" else \
        tuple(m for m in args.modules.split(",") if m)

    data = deferred_data(args) if args.source == "deferred" else args.data
    if data is None:
        raise InvalidArgument("give a data file (JSONL) or --from deferred")
    from .store import refuse_replacing_other_data, target

    out = target(args.out, args.name, "deferred" if args.source == "deferred" else Path(data).stem)
    if args.source == "file" and args.out is None and args.name is None and not args.resume:
        refuse_replacing_other_data(out, data, " --force")
    cfg = AdaptConfig(data=data, out=str(out), model=args.model, steps=args.steps, epochs=args.epochs, lr=args.lr,
                      batch=args.batch, max_len=args.max_len, rank=rank, alpha=args.alpha, modules=modules,
                      layers=layers, precision=args.precision, threads=args.threads,
                      seed=args.seed, heldout=args.heldout, checkpoint_every=args.checkpoint_every,
                      resume=args.resume, budget_bytes=budget,
                      checkpointing=args.checkpointing, memory=args.memory)
    from .store import made_note
    from .train import check_target

    # an adapter there already (hours of training) only with --force, as merge and average; a resume of a rerun was
    # given it when it started. The base, the data or another file: never. All before the model loads.
    check_target(cfg, args.force or args.resume, given=args.out)
    check_settings(cfg)  # its refusals (--memory fast with --budget among them) first, as train() makes them
    hand = [flag for flag, v in (("--rank", args.rank), ("--modules", args.modules), ("--layers", args.layers))
            if v is not None]
    if budget and hand:  # the planner picks all three: a hand choice would be dropped without a word
        raise InvalidArgument(f"--budget chooses the layers, modules and ranks itself; drop {' '.join(hand)}, or "
                              f"drop --budget to choose them by hand")
    if out.is_file():
        print(f"ondevice adapt: note: this run replaces {out}{made_note(out)} when it ends", file=sys.stderr)
    with interrupt_on_signals():  # a `kill` (a timeout, a container stop) keeps a checkpoint as Ctrl-C does
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
    n, e = r["n_train"], r["epochs"]
    epochs = f"{e:.2g}" if e < 1 else f"{e:.1f}".removesuffix(".0")  # 4.4, 1, 0.33
    print(f"{r['steps']} step{'' if r['steps'] == 1 else 's'} = {epochs} epoch{'' if epochs == '1' else 's'} of {n} "
          f"example{'' if n == 1 else 's'}, batch loss {r['first_loss']:.4f} (first step) -> {r['last_loss']:.4f} "
          f"(last){held}; "
          f"{r['seconds_per_step']:.2f} s/step; peak RSS {r['peak_rss_bytes'] / 2**20:.0f} MiB"
          + (f" (budget {cfg.budget_bytes / 2**20:.0f} MiB)" if cfg.budget_bytes else "")
          + ("; gradient checkpointing" if r["checkpointing"] else ""))
    before, after = r["heldout_loss_before"], r["heldout_loss_after"]
    if before is not None and after is not None and after > before:  # stored and offered all the same: say so
        print(f"ondevice adapt: warning: the held-out loss went up ({before:.4f} -> {after:.4f}): on examples it did "
              f"not train on, the adapter does worse than the base; try a lower --lr or fewer --steps",
              file=sys.stderr)
    if "agreement" in r:
        a = r["agreement"]
        print(f"llama.cpp vs torch: {a['identical_sequences']}/{a['prompts']} identical greedy sequences, "
              f"{a['token_agreement']:.1%} of tokens; logits max |diff| {a['logit_max_abs_diff']:.3f}, "
              f"mean {a['logit_mean_abs_diff']:.4f}")
    from .store import adapters_dir

    stored = out.parent.resolve() == adapters_dir().resolve()
    base = f"-m {args.model} " if args.model else ""  # a base other than the default: the command names it
    print(f"use it: ondevice run {base}--adapter {out.stem if stored else out} \"...\"", file=sys.stderr)
    return 0
