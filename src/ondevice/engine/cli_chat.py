"""``ondevice chat``: interactive multi-turn chat. /reset clears, /bye quits, Ctrl-C stops an answer."""

from __future__ import annotations

import argparse
import sys

from ..errors import ContextOverflow
from .args import add_model_args, add_sampling_args, load_from, sampling_from
from .model import peak_rss_bytes

HELP = "commands: /reset (new conversation), /bye (quit), /help; Ctrl-C stops the current answer"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    add_sampling_args(p, max_tokens=512)
    p.add_argument("-s", "--system", default=None, help="system prompt")
    p.add_argument("--timings", action="store_true", help="print timings after each answer")


def run(args: argparse.Namespace) -> int:
    from .cli_run import format_timings

    sampling = sampling_from(args)
    model = load_from(args)
    if not model.is_chat:
        print(f"warning: {model.name} has no chat template (a base model); answers continue a plain-text "
              f"transcript. Pick an instruct model for chat.", file=sys.stderr)
    system = [{"role": "system", "content": args.system}] if args.system else []
    history = list(system)
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"ondevice chat with {model.name}. {HELP}", file=sys.stderr)
    while True:
        try:
            line = input(">>> " if interactive else "")
        except EOFError:
            break
        except KeyboardInterrupt:
            print("", file=sys.stderr)
            continue
        cmd = line.strip()
        if not cmd:
            continue
        if cmd in ("/bye", "/exit", "/quit"):
            break
        if cmd == "/reset":
            history = list(system)
            model.reset()
            print("(conversation cleared)", file=sys.stderr)
            continue
        if cmd in ("/help", "/?"):
            print(HELP, file=sys.stderr)
            continue
        history.append({"role": "user", "content": line})
        answer, last = [], None
        try:
            for g in model.stream(history, sampling=sampling):
                sys.stdout.write(g.text)
                sys.stdout.flush()
                answer.append(g.text)
                last = g
        except KeyboardInterrupt:  # stop this answer, keep the program and what was said
            sys.stdout.write(" [stopped]")
        except ContextOverflow as e:  # the conversation outgrew the window: say so, keep the program
            history.pop()
            print(f"error: {e.advise('-c/--ctx', model.engine.n_ctx_train, '/reset to start over')}",
                  file=sys.stderr)
            continue
        sys.stdout.write("\n")
        history.append({"role": "assistant", "content": "".join(answer)})
        if args.timings:
            print(format_timings(last, peak_rss_bytes()), file=sys.stderr)
    return 0
