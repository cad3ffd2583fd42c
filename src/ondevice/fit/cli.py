"""``ondevice fit MODEL --budget "size<=110MB,tg>=100,kld<=0.02"``: the best variant for this device."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    from .groups import CANDIDATES
    from .measure import REPETITIONS

    p.add_argument("model", nargs="?", default=None, help="catalog name, stored variant or .gguf path "
                   "(default: the embedded model)")
    p.add_argument("--budget", "-b", default="",
                   help="bounds, comma-separated: size<=110MB (the file's bytes), mem<=300MB (alias ram: peak "
                        "RSS running the --tests alone in a process, at the context they need, 256 for the default "
                        "tests: weights, KV cache, compute and repack buffers; plans predicted, candidates "
                        "measured), tg>=100 (decode tok/s, or 1.1x the shipped file), pp>=N, kld<=0.02 (KLD from "
                        "the family's F16); none: least KLD. E.g. -b 'mem<=250MB,kld<=0.05'")
    p.add_argument("--ref", default=None, help="reference variant (default: the family's F16, made from the "
                   "shipped file when missing)")
    p.add_argument("--name", "-n", default=None, help="name of the stored variant (default: <model>-fit-<hash>)")
    p.add_argument("--types", default=",".join(CANDIDATES), help="candidate ggml types (Q8_0 is the base)")
    p.add_argument("--bands", type=int, default=1, help="split each kind of matrix into N bands of layers")
    p.add_argument("--groups", default=None, help="fit only these kinds, comma-separated (attn_qk, "
                   "attn_v, attn_output, ffn_gate_up, ffn_down, token_embd, output; attn_qkv: both attn "
                   "kinds); default: all")
    p.add_argument("--threads", "-t", type=int, default=None, help="threads for the speed measurements "
                   "(default: the profile's, else 2)")
    p.add_argument("--profile", default=None, help="device profile the benches run under: host, phone-4g, "
                   "edge-1g or threads=1,mem=2G,cpus=0 (as ondevice bench); its memory cap bounds the file")
    p.add_argument("--quality", default=None, help="also measure the validated candidates by ppl (held-out "
                   "perplexity) or an eval suite (e.g. smartbench; a name or a JSONL path)")
    p.add_argument("--quality-limit", type=int, default=10, help="items of the --quality suite (a stratified "
                   "subset)")
    p.add_argument("--text", default=None, help="calibration text file (default: Python's pydoc topics)")
    p.add_argument("--calib-ctx", type=int, default=128, help="KLD chunk size on the calibration text")
    p.add_argument("--calib-chunks", type=int, default=4, help="KLD chunks on the calibration text")
    p.add_argument("--eval-ctx", type=int, default=256, help="KLD chunk size on the held-out text")
    p.add_argument("--eval-chunks", type=int, default=8, help="KLD chunks on the held-out text")
    p.add_argument("--validate", type=int, default=3, help="best predicted plans to build and measure")
    p.add_argument("--imatrix", choices=("auto", "on", "off"), default="auto",
                   help="importance matrix: auto keeps it only where it lowers the held-out KLD")
    p.add_argument("--transform", choices=("auto", "on", "off"), default="off",
                   help="equivalent per-channel scaling before quantizing (AWQ/SmoothQuant-style, folded into the "
                        "norms; llama architecture): auto tries it where it lowers the lowest plan's held-out KLD and "
                        "keeps it for each validated candidate it lowers (default off: measured no gain in a "
                        "whole fit, a loss at Q4_1/Q4_K)")
    p.add_argument("--tests", default="pp128,tg64", help="bench tests of the speed measurements (a prompt "
                   "and a decode test)")
    p.add_argument("--repetitions", "-r", type=int, default=REPETITIONS,
                   help="bench rounds: the variants measured together are loaded in one process and each is run "
                        "once per round, in turn; the drift between rounds is taken out (under a memory-capped "
                        "profile: a process per variant and round)")
    p.add_argument("--resume", action="store_true", help="reuse the measurements of an earlier (killed) fit")
    p.add_argument("--reprobe", action="store_true", help="measure the device speed table again")
    p.add_argument("--no-store", action="store_true", help="do not store the chosen variant")
    p.add_argument("--force", action="store_true", help="replace a stored variant of the same name")
    p.add_argument("--knobs", action="store_true", help="also time the chosen variant's runtime knobs (threads, "
                   "flash attention, ubatch, KV type) with the bench and keep the fastest")
    p.add_argument("--knobs-depth", type=int, default=1024, metavar="N",
                   help="--knobs also decodes at this KV depth (tokens already in the cache, as in a chat with "
                        "history), where flash attention's cost or gain shows, and judges decode on both tests "
                        "(their mean time per token; 0: the --tests alone)")


def run(args: argparse.Namespace) -> int:
    import signal
    import sys

    from ..stop_signals import Terminated, interrupt_on_signals
    from .api import fit

    try:
        with interrupt_on_signals():  # a `kill` unwinds as Ctrl-C does: no half-built variant file stays behind
            _fit(fit, args)
    except KeyboardInterrupt as e:  # the measurements so far are cached: say how to use them
        how = f"stopped by {signal.Signals(e.signal).name}" if isinstance(e, Terminated) else "interrupted"
        print(f"\nondevice fit: {how}; the measurements so far are kept: run the same command with --resume to "
              f"continue from them", file=sys.stderr)
        if isinstance(e, Terminated):
            return e.exit_code
        e.said = True  # main() adds no line of its own
        raise
    return 0


def _fit(fit, args: argparse.Namespace) -> None:
    fit(args.model, args.budget, ref=args.ref, name=args.name, types=[t for t in args.types.split(",") if t],
        bands=args.bands, groups=[g for g in args.groups.split(",") if g] if args.groups else None,
        threads=args.threads, text=args.text, calib_ctx=args.calib_ctx, calib_chunks=args.calib_chunks,
        eval_ctx=args.eval_ctx, eval_chunks=args.eval_chunks, validate=args.validate, imatrix=args.imatrix,
        transform=args.transform, repetitions=args.repetitions,
        speed_tests=tuple(t for t in args.tests.split(",") if t), resume=args.resume, reprobe=args.reprobe,
        store=not args.no_store, force=args.force, knobs=args.knobs, knobs_depth=args.knobs_depth,
        profile=args.profile,
        quality=args.quality, quality_limit=args.quality_limit, progress=lambda m: print(m, flush=True))
