"""``ondevice chat``: interactive multi-turn chat with Ollama's habits.

``/set temperature 0`` (any sampling parameter), ``/set stop ...``, ``/set system ...``, ``/show [info]``,
``/reset`` (``/clear``), ``/save FILE`` and ``/load FILE.json``, ``/bye``, ``/help``; ``\"\"\"`` starts and ends a
multi-line message (or system prompt); piped stdin without commands is one message (``ollama run MODEL < doc``).
Ctrl-C stops an answer. Keys typed while an answer streams are neither echoed into it nor sent as the next
message. llama-cli's ``-p``/``-f`` (the first message), ``-st``, ``-r`` and ``-cnv`` work as there.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import os
import re
import sys
import warnings
from collections.abc import Callable, Iterator

from ..errors import ContextOverflow, InvalidArgument, OndeviceError
from .args import (
    add_model_args,
    add_prompt_args,
    add_sampling_args,
    add_system_arg,
    load_from,
    sampling_from,
    system_from,
    unescape,
    utf8_argument,
)
from .chat_commands import Session, command
from .llama_flags import add_llama_flags
from .model import BaseModelWarning, peak_rss_bytes


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_word", nargs="?", default=None, metavar="MODEL",
                   help="the model to talk to, as `ollama run MODEL` (or -m MODEL); default: smollm2-135m-instruct")
    p.add_argument("words", nargs="*", metavar="MESSAGE", help="after MODEL: the first message, as -p")
    add_model_args(p)
    add_llama_flags(p, "chat")
    add_sampling_args(p, max_tokens=512)
    add_system_arg(p)
    p.add_argument("--timings", "--verbose", "--show-timings", action="store_true",
                   help="print timings after each answer (/set verbose; --verbose as ollama run's)")
    p.add_argument("--no-show-timings", dest="timings", action="store_false", help=argparse.SUPPRESS)
    g = p.add_argument_group("llama-cli's conversation flags")
    add_prompt_args(g, "the first message, answered before the >>> prompt, as llama-cli -cnv -p (\\n, \\t ... are "
                       "the characters, \\xHH a byte of UTF-8, unless --no-escape); then chat goes on (>>> or stdin)",
                    "the first message read from a UTF-8 text file, as llama-cli's -f")
    g.add_argument("-st", "--single-turn", action="store_true",
                   help="quit after the first answer (to -p/-f, or to the first message typed or piped)")
    g.add_argument("-r", "--reverse-prompt", action="append", dest="stop", metavar="TEXT",
                   help="llama-cli's: end the reply before this text and give the prompt back (as --stop)")
    g.add_argument("-cnv", "--conversation", "-i", "--interactive", action="store_true",
                   help="llama-cli's conversation mode: chat always is one (accepted, changes nothing)")






MULTILINE = re.compile(r'(/set\s+system\s+)?"""')  # a message, or Ollama's /set system, over several lines


def read_message(read: Callable[[str], str], interactive: bool) -> str:
    """One message: a line, or the lines between two \"\"\" marks (or from one to the end of the input: what
    was written is sent, not dropped); ``/set system \"\"\"`` takes its text so too. Raises EOFError at the
    end of input."""
    line = read(">>> " if interactive else "")
    m = MULTILINE.match(line.lstrip())
    if m is None:
        return line
    head, text = m.group(1) or "", line.lstrip()[m.end():]
    lines = []
    while True:
        if text.rstrip().endswith('"""'):
            lines.append(text.rstrip()[:-3])
            break
        lines.append(text)
        try:
            text = read("... " if interactive else "")
        except EOFError:
            break
    return head + "\n".join(lines).strip("\n")


COMMAND_LINE = re.compile(r"\s*/(set|show|load|save|reset|clear|bye|exit|quit|help|\?)(\s|$)")


class PipedInput:
    """Stdin that is not a terminal, read whole at the first message (as ``ollama run MODEL < doc.txt`` reads it).

    A script (:func:`is_script`) is read a line at a time, as if typed; any other text is ONE message, a document
    as ollama sends it (a Python file's docstrings and a line that begins with /set included)."""

    def __init__(self) -> None:
        self.lines: list[str] | None = None

    def __call__(self, _prompt: str = "") -> str:
        """The next line, as ``input()`` gives it (EOFError at the end)."""
        if self.lines is None:
            from .cli_run import read_stdin

            self.lines = script_lines(read_stdin())
        if not self.lines:
            raise EOFError
        return self.lines.pop(0)

    def unread(self) -> int:
        """Lines with text that no message or command has taken yet."""
        return sum(bool(line.strip()) for line in self.lines or ())


QUIT_LINE = re.compile(r"/(bye|exit|quit)\s*")


def is_script(lines: list[str]) -> bool:
    """Whether piped lines are a chat script: its first line with text is a command or opens a \"\"\" message,
    or a line is /bye alone (messages, then /bye). A document rarely begins so, and never holds /bye alone."""
    first = next((line for line in lines if line.strip()), "")
    return bool(COMMAND_LINE.match(first) or MULTILINE.match(first.lstrip())
                or any(QUIT_LINE.fullmatch(line) for line in lines))


def script_lines(text: str) -> list[str]:
    """Piped stdin as the lines chat reads: a script's lines as typed, or the whole text as one line (message)."""
    lines = text.split("\n")
    if lines[-1] == "":  # the last line's newline ends it, as input() reads it
        lines.pop()
    if is_script(lines):
        return lines
    return [text.strip("\n")] if text.strip() else []


@contextlib.contextmanager
def quiet_keys(stream=None) -> Iterator[None]:
    """While an answer streams, keys typed are not echoed into it; they are dropped when it ends.

    Ctrl-C still works (ISIG stays on). Does nothing when ``stream`` is not a terminal.
    """
    stream = stream or sys.stdin
    try:
        import termios

        fd = stream.fileno()
        old = termios.tcgetattr(fd)
        new = list(old)
        new[3] &= ~termios.ECHO  # lflags
        termios.tcsetattr(fd, termios.TCSANOW, new)
    except Exception:  # noqa: BLE001 — no termios, not a terminal (or one that hung up), or no fileno: nothing to do
        yield
        return
    try:
        yield
    finally:
        # a terminal that hung up answers EIO: nothing to restore there, and the error that ends chat is its write's
        with contextlib.suppress(termios.error, OSError):
            termios.tcflush(fd, termios.TCIFLUSH)
        with contextlib.suppress(termios.error, OSError):
            termios.tcsetattr(fd, termios.TCSANOW, old)


def run(args: argparse.Namespace) -> int:
    from ..models.hf_repo import hf_address
    from .cli_run import replace_unwritable_output

    replace_unwritable_output()

    args.model = hf_address(args, args.model or args.model_word) or args.model  # -hf OWNER/REPO[:QUANT]
    if args.model_word is not None:
        if any(c.isspace() for c in args.model_word):  # `chat "Hello there"`: a message where a model goes
            raise InvalidArgument(f"'{args.model_word}' is not a model name: chat reads messages at its >>> prompt "
                                  f"or on stdin; to begin with it, ondevice chat -p \"{args.model_word}\"; for one "
                                  f"answer, ondevice run \"{args.model_word}\"")
        if args.model is not None and args.model != args.model_word:
            raise InvalidArgument(f"two models: '{args.model_word}' and -m {args.model}; chat talks to one, "
                                  f"give it once")
        args.model = args.model_word
    if args.words:  # `chat MODEL Hi there` (ollama run MODEL PROMPT's habit): the first message, as -p
        if args.prompt is not None or args.file is not None:
            raise InvalidArgument(f"two first messages: '{' '.join(args.words)}' and -p/-f; give one")
        args.prompt, args.escape = " ".join(args.words), False
    sampling = sampling_from(args)
    first = first_message(args)  # before the load: a wrong -f path is said at once
    model = load_from(args)
    if not model.is_chat:  # said once here, before the first message; the library's own would come after it
        warnings.simplefilter("ignore", BaseModelWarning)
        print(f"ondevice chat: warning: {model.name} has no chat template (a base model); answers continue a "
              f"plain-text transcript. Pick an instruct model for chat.", file=sys.stderr)
    s = Session(sampling, system_from(args), args.timings, grammar=sampling.grammar)
    s.reset()
    # llama-cli -st -p: one predefined turn, never interactive; otherwise a terminal on stdin is
    interactive = sys.stdin.isatty() and not (args.single_turn and first is not None)
    read = input if sys.stdin.isatty() else PipedInput()
    ok = True  # the last message was answered
    prompt = [""]  # the prompt of the line being read: Ctrl-C at an empty >>> gives a hint, as in ollama

    def reading(text: str) -> str:
        prompt[0] = text
        return read(text)

    if interactive:
        import readline  # noqa: F401 — input() gets line editing and history (arrows, Ctrl-A/E/R) as in ollama

        print(f"ondevice chat with {model.name}. /help for commands, /bye to quit, Ctrl-C stops an answer.",
              file=sys.stderr)
    while True:
        if first is not None:  # -p/-f: the first message, never a /command
            line, first = first, None
            if interactive:  # the transcript shows what was asked, as if typed
                print(">>> " + line.replace("\n", "\n... "))
        else:
            try:
                line = read_message(reading, interactive)
            except EOFError:  # Ctrl-D: the shell's prompt goes on a line of its own, not after ">>> "
                if interactive:
                    _raise_if_hung_up()
                    print(file=sys.stderr)
                break
            except KeyboardInterrupt:  # the line (or """ message) typed is dropped; at an empty >>>, how to quit
                print("\nUse Ctrl + d or /bye to exit." if interactive and prompt[0] == ">>> " and not _typed() else "",
                      file=sys.stderr)
                continue
            if not line.strip():
                continue
            if line.startswith("/load ") and line[6:].strip():  # Ollama's: another model, a new conversation
                name = line[6:].strip()
                model = _resume(name, args, model, s) if name.endswith(".json") else _load(name, args, model, s)
                continue
            if line.startswith("/"):
                out = command(line.strip(), s, model)
                if out is None:
                    break
                print(out, file=sys.stderr)
                continue
        ok = answer(line, s, model, interactive)
        if args.single_turn:  # -st: one answer, then quit (2: it could not be given, said above)
            _note_unread(read)
            return 0 if ok else 2
    # piped (a document, a script): 2 when the last message could not be answered, as run's exit says it
    return 0 if interactive or ok else 2


def _typed() -> str:
    """What readline held when Ctrl-C interrupted input() (the line typed so far)."""
    try:
        import readline

        return readline.get_line_buffer()
    except (ImportError, AttributeError):
        return ""


def _raise_if_hung_up() -> None:
    """input() reads an end of file from a terminal that hung up too: that is no Ctrl-D, but the end of the
    session, and the command ends as a hang-up does (cli.py says EIO on a gone terminal so)."""
    from ..cli import terminal_gone

    if terminal_gone():
        raise OSError(errno.EIO, os.strerror(errno.EIO))


def _note_unread(read) -> None:
    """-st quits after one answer: what stdin still held is said, never dropped unseen."""
    from .cli_run import stdin_is_piped

    if not isinstance(read, PipedInput):
        return
    if read.lines is None and stdin_is_piped():  # -st with -p/-f: stdin was never read
        print("ondevice chat: note: -st answered -p/-f's message; stdin was not read (leave -st out to go on with "
              "it)", file=sys.stderr)
    elif n := read.unread():
        print(f"ondevice chat: note: -st answered the first message; {n} more line(s) of stdin were not read (leave "
              f"-st out to go on with them)", file=sys.stderr)




def _resume(path: str, args: argparse.Namespace, model, s: Session):
    """/load FILE.json: a conversation /save wrote, its model loaded when it is another one; on an error the
    conversation and model stay."""
    import json

    try:
        with open(path, encoding="utf-8") as f:
            state = json.load(f)
        sampling = dataclasses.replace(s.sampling, **state["parameters"])
        system, messages = state["system"], list(state["messages"])
    except (OSError, ValueError, KeyError, TypeError, OndeviceError) as e:
        why = (f"{e.strerror}; give a file /save wrote" if isinstance(e, OSError) else str(e)
               if isinstance(e, OndeviceError) else f"not a conversation /save wrote ({type(e).__name__}: {e})")
        print(f"ondevice chat: error: /load {path}: {why} ({model.name} and the conversation stay)", file=sys.stderr)
        return model
    if state.get("model") and state["model"] != model.name:
        model = _load(state["model"], args, model, s)
    model.reset()
    s.sampling, s.system = sampling, system
    s.reset()
    s.history += messages
    print(f"(conversation of {len(messages)} messages resumed from {path} with {model.name})", file=sys.stderr)
    return model


def _load(name: str, args: argparse.Namespace, model, s: Session):
    """/load NAME: that model with the command line's load flags (its adapters and chat template aside: they were
    for the first model), the conversation started anew; on an error the current model stays."""
    before = (args.model, args.adapter, args.chat_template, args.chat_template_file)
    # adapters and a given chat template were for the first model: the new one runs as it is, with its own template
    args.model, args.adapter, args.chat_template, args.chat_template_file = name, [], None, None
    try:
        new = load_from(args)
    except OndeviceError as e:
        args.model, args.adapter, args.chat_template, args.chat_template_file = before
        print(f"ondevice chat: error: {e} ({model.name} stays)", file=sys.stderr)
        return model
    model.close()
    s.reset()
    if not new.is_chat:  # said here once, not by the library at every message
        warnings.simplefilter("ignore", BaseModelWarning)
    print(f"(now {new.name}; conversation cleared)" + ("" if new.is_chat else f"; {new.name} has no chat template "
          f"(a base model): answers continue a plain-text transcript"), file=sys.stderr)
    return new


def first_message(args: argparse.Namespace) -> str | None:
    """The message of -p (escapes processed unless --no-escape, as llama-cli's) or -f (read as it is, but for
    its last newline: llama-cli drops it)."""
    from .cli_run import read_file

    if args.prompt is not None:
        flag = "-p/--prompt"
        text = unescape(args.prompt, flag, "-f") if args.escape else utf8_argument(args.prompt, flag, "-f")
    elif args.file is not None:
        text, flag = read_file(args.file, "-f/--file").removesuffix("\n"), f"-f/--file {args.file}"
    else:
        return None
    if not text.strip():
        raise InvalidArgument(f"{flag}: the first message is empty; give some text (or leave {flag.split()[0]} out "
                              f"and type it at the >>> prompt)")
    return text


def answer(line: str, s: Session, model, interactive: bool) -> bool:
    """Send one message and stream the answer to stdout; False when it could not be answered (said on stderr)."""
    from .cli_run import format_timings, window_note

    s.history.append({"role": "user", "content": line})
    if s.make_room(model) and not s.outgrown:
        s.outgrown = True
        print(f"(the conversation outgrew the {model.engine.n_ctx}-token context window: from here on the "
              f"oldest exchanges are forgotten to make room; /reset starts over, -c/--ctx holds more)",
              file=sys.stderr)
    text, last = [], None
    try:
        with quiet_keys() if interactive else contextlib.nullcontext():
            for g in model.stream(s.history, sampling=s.sampling):
                sys.stdout.write(g.text)
                sys.stdout.flush()
                text.append(g.text)
                last = g
    except KeyboardInterrupt:  # stop this answer, keep the program and what was said
        sys.stdout.write(" [stopped]")
    except ContextOverflow as e:  # the conversation outgrew the window: say so, keep the program
        s.history.pop()
        # make_room left only the system prompt and this message: /reset would not help
        fixes = ("a shorter /set system",) if s.system else ()
        print(f"ondevice chat: error: {e.advise('-c/--ctx', model.engine.n_ctx_train, *fixes)}", file=sys.stderr)
        return False
    sys.stdout.write("\n")
    s.history.append({"role": "assistant", "content": "".join(text)})
    if note := window_note(last, s.sampling, model.engine.n_ctx, "older exchanges make room for the next",
                           "/set num_predict N gives it more tokens"):
        print(note, file=sys.stderr)
    if s.verbose:
        print(format_timings(last, peak_rss_bytes()), file=sys.stderr)
    return True
