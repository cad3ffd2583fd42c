"""The ``ondevice`` command: dispatch only. Each verb lives in its capability's package.

A verb module exposes ``add_arguments(parser)`` and ``run(args) -> int``; it is imported only when
its verb is used, so ``ondevice --help`` stays fast.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import sys

from .errors import OndeviceError

# verb -> (module, one-line help)
VERBS: dict[str, tuple[str, str]] = {
    "run": ("ondevice.engine.cli_run", "generate from a prompt and print timings"),
    "chat": ("ondevice.engine.cli_chat", "interactive multi-turn chat"),
    "models": ("ondevice.models.cli", "list embedded and stored models (or describe one)"),
    "pull": ("ondevice.models.cli_pull", "download a GGUF (hf.co/owner/repo:Q4_K_M, hf://owner/repo/file.gguf)"),
    "rm": ("ondevice.models.cli_rm", "remove stored models (quantized, pulled or assembled)"),
    "bench": ("ondevice.bench.cli", "measure speed, memory, energy and %% of roofline"),
    "report": ("ondevice.report.cli", "tables, exports, HTML report and comparisons of stored runs"),
    "quantize": ("ondevice.quant.cli", "make a quantized variant of a model"),
    "fit": ("ondevice.fit.cli", "the best variant of a model for this device under a budget"),
    "eval": ("ondevice.eval.cli", "perplexity, KL divergence and task suites"),
    "serve": ("ondevice.serve.cli", "OpenAI-compatible local server"),
    "device": ("ondevice.device.cli", "this machine: CPU, memory, energy counters and measured roofs"),
    "agent": ("ondevice.agent.cli", "plan and call tools (Python, MCP) with small models"),
    "cascade": ("ondevice.cascade.cli", "device -> cloud cascade: fit its confidence, export hard samples"),
    "protect": ("ondevice.protect.cli", "encrypted model files, decrypted only in memory"),
    "adapt": ("ondevice.adapt.cli", "fine-tune a LoRA adapter on the CPU under a memory budget (torch extra)"),
}


EXAMPLES = """examples:
  ondevice run "Write a haiku about RAM."          stream an answer from the default model
  ondevice run gemma3-270m "Once upon a time"      a model name first, then the prompt (as ollama run)
  ondevice chat -m smollm2-135m-instruct           multi-turn chat; /help inside lists the commands
  ondevice models                                  what is installed and stored
  ondevice bench -t 1,2 -p 128,512 -n 64           speed sweep (llama-bench's flags), then an HTML report
  ondevice eval --ppl                              perplexity of the default model
  ondevice serve --port 8080                       OpenAI-compatible server on 127.0.0.1

`ondevice VERB --help` (or `ondevice help VERB`) shows a verb's flags."""


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a default only when it says something: not None/False, and not already in the help text. The usage
    line is ``ondevice VERB [options] POSITIONALS``: every flag in it came to 30-40 lines above a one-line error."""

    def add_usage(self, usage, actions, groups, prefix=None) -> None:
        if usage is None and any(a.option_strings for a in actions):
            f = argparse.HelpFormatter(self._prog)
            f.add_usage(None, [a for a in actions if not a.option_strings], [], prefix="")
            positionals = f.format_help().strip()[len(self._prog):].strip()
            usage = "%(prog)s [options]" + (f" {positionals}" if positionals else "")
        super().add_usage(usage, actions, groups, prefix)

    def _get_help_string(self, action: argparse.Action) -> str:
        help_ = action.help or ""
        if "default" in help_ or action.default in (None, False, argparse.SUPPRESS) or not help_:
            return help_
        return super()._get_help_string(action)


def build_parser(verb: str | None = None) -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="ondevice", description="Fit language models to the device in hand.",
                                     epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"ondevice {__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    for name, (module, help_) in VERBS.items():
        # flags exact, as llama.cpp's tools take them: no prefix of one flag silently taken for another (run's
        # --verbose was --verbose-prompt)
        p = sub.add_parser(name, help=help_, description=help_.replace("%%", "%"),
                           formatter_class=_Help, allow_abbrev=False)
        if name == verb:
            importlib.import_module(module).add_arguments(p)
    return parser


def _warnings_as_lines(verb: str) -> None:
    """Python warnings (a --ctx past the trained one, a base model given chat messages...) as one line each,
    ``ondevice VERB: warning: ...``, not a source file, line number and the code of that line."""
    import warnings

    def show(message, category, filename, lineno, file=None, line=None) -> None:  # warnings.showwarning's shape
        print(f"ondevice {verb}: warning: {message}", file=file or sys.stderr)

    warnings.showwarning = show
    import logging  # and the library's notes before a pause (the kernels self-test), logged at INFO there

    class Notes(logging.Handler):  # to sys.stderr as it is when a note comes (a caller may have replaced it)
        def emit(self, record: logging.LogRecord) -> None:
            print(f"ondevice {verb}: note: {record.getMessage()}", file=sys.stderr, flush=True)

    log = logging.getLogger("ondevice.kernels")
    log.handlers = [h for h in log.handlers if type(h).__name__ != "Notes"] + [Notes()]  # one: this verb's
    log.setLevel(logging.INFO)
    log.propagate = False


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt as e:  # Ctrl-C anywhere (while imports or a model load run too): no traceback
        if argv is None:  # the command itself: a second Ctrl-C while it exits changes nothing
            import signal

            signal.signal(signal.SIGINT, signal.SIG_IGN)
        if not _mute_gone() and not getattr(e, "said", False):  # a verb that said what it left: no second line
            import signal

            verb = next((a for a in (sys.argv[1:] if argv is None else argv) if not a.startswith("-")), None)
            how = f"stopped by {signal.Signals(e.signal).name}" if hasattr(e, "signal") else "interrupted (Ctrl-C)"
            print(f"\nondevice{f' {verb}' if verb in VERBS else ''}: {how}", file=sys.stderr)
        return getattr(e, "exit_code", 130)  # 128 + the signal for a `kill` taken as an interrupt (Terminated)
    except OSError as e:  # an error's own line, written to a terminal that hung up: no traceback (there, or exit 1)
        if e.errno != errno.EIO or not terminal_gone():
            raise
        words = [a for a in (sys.argv[1:] if argv is None else argv) if not a.startswith("-")]
        return _hung_up(words[0] if words else "")


def _gone(fd: int) -> bool:
    """Whether ``fd`` is a terminal that hung up (its window closed, its ssh connection dropped): the kernel answers
    every write and termios call on it with EIO from then on (a file's EIO, a failing disk, is not this)."""
    import os
    import stat

    try:
        import termios
    except ImportError:  # no terminals as POSIX has them (Windows): none hung up
        return False
    try:
        if not stat.S_ISCHR(os.fstat(fd).st_mode):
            return False
        termios.tcgetattr(fd)
    except termios.error as e:
        return e.args[0] == errno.EIO
    except OSError:
        return False
    return False


def terminal_gone() -> bool:
    """Whether stdin, stdout or stderr is a terminal that hung up."""
    return any(_gone(fd) for fd in (0, 1, 2))


def _mute_gone() -> bool:
    """Points stdin, stdout and stderr that are a hung-up terminal at /dev/null: what is still buffered for them,
    flushed as Python exits, would fail again (a traceback, exit 120). Whether stderr was one of them."""
    import os

    gone = [fd for fd in (0, 1, 2) if _gone(fd)]
    if gone:  # (most exits: none, and nothing to open)
        null = os.open(os.devnull, os.O_RDWR)
        for fd in gone:
            os.dup2(null, fd)
        os.close(null)
    return 2 in gone


def _hung_up(verb: str) -> int:
    """The end of a command whose terminal went away: 129 (128 + SIGHUP), as a program the hang-up ended, with no
    traceback or advice. Nothing more is written there (:func:`_mute_gone`); a line on stderr only where that is not
    the terminal (a log)."""
    import signal

    if not _mute_gone():
        try:
            print(f"ondevice {verb}: stopped: its terminal went away (hang-up)", file=sys.stderr, flush=True)
        except (OSError, ValueError):
            pass
    return 128 + signal.SIGHUP


def _flag_hint(parser: argparse.ArgumentParser, extra: list[str]) -> str:
    """"; did you mean --temp?" for the first unknown flag that is close to one of the verb's (or is the name
    another tool gives it: --temperature, --max-new-tokens ...)."""
    import difflib

    from .fields import ALIASES

    def shown(p: argparse.ArgumentParser) -> list[str]:  # not llama.cpp's ignored or refused flags (hidden)
        return [o for a in p._actions if a.help != argparse.SUPPRESS for o in a.option_strings if o.startswith("--")]

    flags = shown(parser)
    formats = next((a for a in parser._actions if "--output" in a.option_strings and a.choices), None)
    verb = parser.prog.split()[-1]
    sibling = {"run": "chat", "chat": "run"}.get(verb)  # one prompt vs a conversation: flags users mix up
    for x in extra:
        name = x.split("=", 1)[0]
        if not name.startswith("--"):
            continue
        if sibling:
            other = build_parser(sibling)
            verbs = next(a for a in other._actions if isinstance(a, argparse._SubParsersAction))
            if name in shown(verbs.choices[sibling]):
                return f"; {name} is a flag of `ondevice {sibling}`, not of `ondevice {verb}`"
        if formats is not None and name[2:] in formats.choices and name not in flags:  # --json: llama-bench's -o json
            return f"; did you mean {formats.option_strings[0]} {name[2:]}?"
        alias = "--" + ALIASES.get(name[2:].replace("-", "_"), "").replace("_", "-")
        for guess in ([alias] if alias in flags else []) + difflib.get_close_matches(name, flags, 1, 0.7):
            return f"; did you mean {guess}?"
    return ""


def _refuse_glued_flags(parser: argparse.ArgumentParser, argv: list[str], verb: str) -> None:
    """An unknown flag of one dash and letters (llama.cpp's -sp, -cnv, -np, -mu ...) is an error naming it:
    argparse alone reads it as a known one-letter flag with the rest as its value (-sp: -s p, a system prompt
    'p'; -np 4: -n p) or as the start of a longer one (-hfd: -h)."""
    import re

    verbs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    sub = verbs.choices[verb]
    actions, parsers = [], [sub]
    while parsers:  # with the actions' own (protect keygen -o)
        mine = parsers.pop()._actions
        actions += mine
        parsers += [p for a in mine if isinstance(a, argparse._SubParsersAction) for p in a.choices.values()]
    known = {o for a in actions for o in a.option_strings}
    takes_value = {o for a in actions for o in a.option_strings if a.nargs != 0}
    skip = False
    for word in argv[argv.index(verb) + 1:]:
        if word == "--":
            return
        if skip:  # the value of the flag before: -p "-hello" is a prompt
            skip = False
            continue
        if word in takes_value:
            skip = True
            continue
        # (one letter too: argparse would take serve's -f 4 as the start of -fa)
        if re.fullmatch(r"-[A-Za-z]([A-Za-z_-]+)?(=.*)?", word) and word.split("=", 1)[0] not in known:
            sub.error(f"unrecognized argument {word.split('=', 1)[0]}: not a flag of `{sub.prog}` (`{sub.prog} "
                      f"--help` lists them)")


def _chosen_parser(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.ArgumentParser:
    """The parser of the verb the command line chose, or of its action (``cascade fit``, ``protect keygen``)."""
    while chosen := [a.choices[getattr(args, a.dest)] for a in parser._actions
                     if isinstance(a, argparse._SubParsersAction) and getattr(args, a.dest, None) in a.choices]:
        parser = chosen[0]
    return parser


def _as_typed(message: str, parser: argparse.ArgumentParser, typed: set[str]) -> str:
    """``message`` with the flag it is about spelled as the user typed it (``typed``: the flags on the command
    line): an error about --adapter says --lora to one who typed --lora, and --text says -f (the first mention,
    the error's subject; not in -s/--system)."""
    import re

    for action in parser._actions:
        used = [o for o in action.option_strings if o in typed]
        if len(used) == 1:
            for other in action.option_strings:
                if other != used[0] and other.startswith("--"):
                    message = re.sub(rf"(?<![\w/-]){re.escape(other)}(?![\w/-])", used[0], message, count=1)
    return message


# verbs that take a model and pull a download address given as one when the store lacks it
PULL_ON_USE = ("run", "chat", "bench", "eval", "serve", "fit", "quantize", "agent", "cascade", "adapt")

# Ollama's and llama.cpp's verbs for what ondevice does under another name
OTHER_TOOLS = {"list": "models", "ls": "models", "show": "models", "ps": "models", "delete": "rm", "remove": "rm",
               "perplexity": "eval", "quantise": "quantize", "server": "serve", "cli": "run", "generate": "run"}


def _main(argv: list[str] | None) -> int:
    console, argv = argv is None, sys.argv[1:] if argv is None else argv
    verb = next((a for a in argv if not a.startswith("-")), None)
    if verb == "help" and argv[0] == "help":  # `ollama help run`: the verb's --help (its action's: protect encrypt)
        words = argv[1:]
        while words[:1] == ["help"]:
            words = words[1:]
        if not words or words[0].startswith("-"):
            build_parser().print_help()
            return 0
        argv = [*words, "--help"]
        verb = words[0]
    if verb is not None and verb not in VERBS:
        import difflib

        close = [OTHER_TOOLS[verb]] if verb in OTHER_TOOLS else difflib.get_close_matches(verb, [*VERBS, "help"], n=1,
                                                                                          cutoff=0.6)
        hint = f"did you mean '{close[0]}'? " if close else ""
        print(f"ondevice: error: unknown verb '{verb}'; {hint}verbs: {', '.join(VERBS)} "
              f"(`ondevice --help` shows examples)", file=sys.stderr)
        return 2
    from . import supervise

    if console and supervise.wanted(verb):  # llama.cpp runs in a child: a native crash becomes a clear line
        return supervise.run_supervised(verb, argv)
    supervise.crash_test_hook()
    parser = build_parser(verb)
    if verb is not None:
        _refuse_glued_flags(parser, argv, verb)
        from .engine.llama_flags import settle_optional

        verbs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        argv = settle_optional(argv, verbs.choices[verb])
    args, extra = parser.parse_known_args(argv)
    if extra and isinstance(getattr(args, "words", None), list) and not any(x.startswith("-") for x in extra):
        args.words += extra  # `run MODEL -n 8 PROMPT`: argparse ends the words at the first option (ollama doesn't)
    elif extra:  # the verb's own usage and error (its action's: cascade fit), as for a bad value
        sub = _chosen_parser(parser, args)
        sub.error(f"unrecognized arguments: {' '.join(extra)}{_flag_hint(sub, extra)}")
    if args.verb is None:
        parser.print_help()
        return 2
    module = importlib.import_module(VERBS[args.verb][0])
    args.typed = {w.split("=", 1)[0] for w in argv if w.startswith("-")}  # the flags as spelled (errors, notes)
    _warnings_as_lines(args.verb)
    from .models import sources

    # `run hf.co/OWNER/REPO:QUANT` pulls it first, as ollama run and llama-cli -hf; for this command only (the
    # library never downloads on its own, even in a process that ran a command)
    sources.PULL_ON_USE = args.verb in PULL_ON_USE
    try:
        return int(module.run(args) or 0)
    except OndeviceError as e:
        print(f"ondevice {args.verb}: error: {_as_typed(str(e), _chosen_parser(parser, args), args.typed)}",
              file=sys.stderr)
        return getattr(e, "exit_code", 2)  # stop_signals.Stopped: 128 + the signal, as a shell reports a kill
    except BrokenPipeError:
        return 0
    except OSError as e:  # a path, a permission, a full disk: the user's to fix, said in one line
        if e.errno == errno.EIO and terminal_gone():  # not a file's fault: the terminal written to hung up
            return _hung_up(args.verb)
        name = str(e.filename or "")
        where = f": {name[:120]}{'...' if len(name) > 120 else ''}" if name else ""
        print(f"ondevice {args.verb}: error: {e.strerror or e}{where}; check the path, its permissions and the "
              f"free space", file=sys.stderr)
        return 2
    except RuntimeError as e:
        if "home directory" not in str(e):  # pathlib's answer to ~user for a user that does not exist
            raise
        print(f"ondevice {args.verb}: error: a path starts with ~USER for a user this machine does not have; "
              f"give the path in full", file=sys.stderr)
        return 2
    finally:
        from .protect import keys

        sources.PULL_ON_USE = keys.COMMAND_LINE = False  # the library's wording and habits again after a command


if __name__ == "__main__":
    sys.exit(main())
