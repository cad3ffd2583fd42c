"""``ondevice chat``: interactive multi-turn chat with Ollama's habits.

``/set temperature 0`` (any sampling parameter), ``/set stop ...``, ``/set system ...``, ``/show [info]``,
``/reset`` (``/clear``), ``/bye``, ``/help``; ``\"\"\"`` starts and ends a multi-line message (or system prompt);
Ctrl-C stops an answer. Keys typed while an answer streams are neither echoed into it nor sent as the next
message. llama-cli's ``-p``/``-f`` (the first message), ``-st``, ``-r`` and ``-cnv`` work as there.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import re
import sys
import warnings
from collections.abc import Callable, Iterator

from ..errors import ContextOverflow, InvalidArgument, OndeviceError
from .args import (
    UNTIL_END,
    add_model_args,
    add_prompt_args,
    add_sampling_args,
    add_system_arg,
    load_from,
    sampling_from,
    system_from,
    unescape,
)
from .llama_flags import add_llama_flags
from .model import BaseModelWarning, peak_rss_bytes
from .records import Sampling

# /set NAME VALUE: Ollama's parameter names and ours -> (Sampling field, type)
PARAMS: dict[str, tuple[str, type]] = {
    "temperature": ("temp", float), "temp": ("temp", float), "top_p": ("top_p", float), "top_k": ("top_k", int),
    "min_p": ("min_p", float), "repeat_penalty": ("repeat_penalty", float),
    "presence_penalty": ("presence_penalty", float), "frequency_penalty": ("frequency_penalty", float),
    "seed": ("seed", int), "num_predict": ("max_tokens", int), "max_tokens": ("max_tokens", int),
}
RANDOM_SEED = 0xFFFFFFFF  # llama.cpp's LLAMA_DEFAULT_SEED: a random seed (--seed -1)
SHOWN = ("temp", "top_p", "top_k", "min_p", "repeat_penalty", "presence_penalty", "frequency_penalty", "seed",
         "max_tokens")

HELP = """commands:
  /set temperature 0      change a sampling parameter: temperature, top_p, top_k, min_p, repeat_penalty,
                          presence_penalty, frequency_penalty, seed, max_tokens (num_predict)
  /set stop TEXT ...      stop strings (\\n: a newline); /set stop alone: none
  /set system TEXT        a new system prompt (starts a new conversation); /set system \"\"\" spans lines
  /set verbose | quiet    timings after each answer on or off
  /set format json        answers are JSON objects (/set noformat: as the command line said)
  /show                   the model, its context window, the parameters and the system prompt
                          (/show info, parameters, system, template or license: one of them)
  /load MODEL             talk to another model (a new conversation; the same load flags)
  /reset                  start a new conversation (also /clear)
  /bye                    quit (also /exit, Ctrl-D)
  \"\"\"                     begin and end a multi-line message
Ctrl-C stops the current answer."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_word", nargs="?", default=None, metavar="MODEL",
                   help="the model to talk to, as `ollama run MODEL` (or -m MODEL); default: smollm2-135m-instruct")
    p.add_argument("words", nargs="*", metavar="MESSAGE", help="after MODEL: the first message, as -p")
    add_model_args(p)
    add_llama_flags(p, "chat")
    add_sampling_args(p, max_tokens=512)
    add_system_arg(p)
    p.add_argument("--timings", action="store_true", help="print timings after each answer (/set verbose)")
    g = p.add_argument_group("llama-cli's conversation flags")
    add_prompt_args(g, "the first message, answered before the >>> prompt, as llama-cli -cnv -p (\\n, \\t, \\xHH "
                       "... are the characters unless --no-escape); then chat goes on (>>> or stdin)",
                    "the first message read from a UTF-8 text file, as llama-cli's -f")
    g.add_argument("-st", "--single-turn", action="store_true",
                   help="quit after the first answer (to -p/-f, or to the first message typed or piped)")
    g.add_argument("-r", "--reverse-prompt", action="append", dest="stop", metavar="TEXT",
                   help="llama-cli's: end the reply before this text and give the prompt back (as --stop)")
    g.add_argument("-cnv", "--conversation", "-i", "--interactive", action="store_true",
                   help="llama-cli's conversation mode: chat always is one (accepted, changes nothing)")


@dataclasses.dataclass
class Session:
    """What the commands change: sampling, system prompt, timings, and the conversation."""

    sampling: Sampling
    system: str | None
    verbose: bool
    grammar: str | None = None  # the command line's (--grammar, -j ...): what /set noformat goes back to
    history: list[dict] = dataclasses.field(default_factory=list)
    outgrown: bool = False  # the window is full: older exchanges are being forgotten (said once)

    def reset(self) -> None:
        self.history = [{"role": "system", "content": self.system}] if self.system else []
        self.outgrown = False

    def make_room(self, model) -> int:
        """Forget the oldest exchanges (a message and its answer; never the system prompt or the new message)
        until the conversation leaves room for an answer in the context window, as ``ollama run`` and
        ``llama-cli`` do; returns how many were forgotten."""
        n_ctx = model.engine.n_ctx
        room = max(1, min(self.sampling.max_tokens, n_ctx // 2))  # an answer's worth, as -n allows
        first = int(bool(self.history) and self.history[0]["role"] == "system")
        dropped = 0
        while len(self.history) - first > 1 and len(model.tokenize_prompt(self.history)) + room > n_ctx:
            del self.history[first:first + 2]
            dropped += 1
        return dropped


def command(line: str, s: Session, model) -> str | None:
    """Apply a ``/command``; returns what to print (None: quit)."""
    word, _, rest = line[1:].partition(" ")
    rest = rest.strip()
    if word in ("bye", "exit", "quit"):
        return None
    if word in ("help", "?"):
        return HELP
    if word in ("reset", "clear"):
        s.reset()
        model.reset()
        return "(conversation cleared)"
    if word == "show":
        return _show(rest, s, model)
    if word == "load":  # the run loop loads it: it needs the command line's load flags
        return "usage: /load MODEL (a name, a stored variant or a .gguf path)"
    if word == "set":
        return _set(rest, s, model)
    return f"unknown command '/{word}'; /help lists the commands"


def _show(what: str, s: Session, model) -> str:
    """/show (all) or Ollama's /show info, /show parameters, /show system (one part)."""
    params = ", ".join(f"{k} {_shown(s.sampling, k)}" for k in SHOWN if k != "seed" or s.sampling.seed != RANDOM_SEED)
    params += f", stop {list(s.sampling.stop)}" if s.sampling.stop else ""
    if s.sampling.grammar:
        params += ", format json" if s.sampling.grammar == _json_grammar() else ", grammar (the command line's)"
    parts = {"info": f"model: {model.name} ({'chat template' if model.is_chat else 'base model, no chat template'})"
                     f"\ncontext: {model.engine.n_ctx} tokens (trained: {model.engine.n_ctx_train}; -c/--ctx sets it)",
             "parameters": f"parameters: {params}", "system": f"system: {s.system or '(none)'}"}
    if not what:
        return "\n".join([*parts.values(), f"timings: {'on' if s.verbose else 'off'}"])
    if what in parts:
        return parts[what]
    if what == "template":
        return model.template or "(none: a base model; chat gets a plain-text transcript)"
    if what == "license":
        from ..models import resolve
        from ..models.cli import licence_of

        try:  # the catalog's name for it, else its file's (an encrypted one read with the key it was loaded with)
            ref = resolve(str(model.path))
            with contextlib.suppress(OndeviceError):
                named = resolve(model.name)  # a catalog model loaded by its name: the catalog's word for it
                ref = named if named.path == ref.path else ref
            return licence_of(ref) or "(the model's file names no licence)"
        except OndeviceError as e:
            return f"(its file cannot be read for it: {e})"
    return (f"/show takes info, parameters, system, template or license (nothing: the first three); `ondevice models "
            f"{model.name}` describes the model's file")


@functools.lru_cache(maxsize=1)
def _json_grammar() -> str:
    """Ollama's format json: the answer is a JSON object."""
    from .grammar import schema_grammar

    return schema_grammar({"type": "object"}, "/set format json")


def _set(rest: str, s: Session, model) -> str:
    key, _, value = rest.partition(" ")
    if key == "parameter":  # Ollama's long form: /set parameter temperature 0
        key, _, value = value.strip().partition(" ")
    value = value.strip()
    if not key:
        return "usage: /set PARAMETER VALUE, /set stop TEXT ..., /set system TEXT or /set verbose|quiet (/help)"
    if key == "stop":  # Ollama's /set parameter stop A B: each word a stop string
        stop = tuple(unescape(w) for w in value.split())
        s.sampling = dataclasses.replace(s.sampling, stop=stop)
        return f"stop = {list(stop)}"
    if key == "num_ctx":  # Ollama reloads the model for it; here the window is the one it was loaded with
        return (f"the context window is set when the model loads ({model.engine.n_ctx} tokens now): start chat "
                f"again with -c/--ctx N")
    if key == "format" or key == "noformat":
        if key == "format" and value != "json":
            return "/set format takes json (a JSON object per answer); /set noformat: free text"
        s.sampling = dataclasses.replace(s.sampling, grammar=_json_grammar() if key == "format" else s.grammar)
        if key == "format":
            return "answers are JSON objects"
        return "answers follow the command line's grammar again" if s.grammar else "answers are free text"
    if key in ("verbose", "quiet"):
        s.verbose = key == "verbose"
        return f"timings {'on' if s.verbose else 'off'}"
    if key == "system":
        if not value:
            return "usage: /set system TEXT"
        s.system = value
        s.reset()
        model.reset()
        return "(system prompt set; conversation cleared)"
    if key not in PARAMS:
        import difflib

        close = difflib.get_close_matches(key, [*PARAMS, "stop", "system", "verbose", "quiet", "format"], 1, 0.7)
        hint = f"did you mean '{close[0]}'? " if close else ""
        return (f"cannot set '{key}'; {hint}/set takes {', '.join(sorted(PARAMS))}, stop, system, verbose, quiet or "
                f"format json")
    field, typ = PARAMS[key]
    try:
        v = typ(value)
        s.sampling = dataclasses.replace(s.sampling, **{field: UNTIL_END if field == "max_tokens" and v in (-1, -2) else v})
    except ValueError:
        example = 1 if typ is int else 0.7
        return f"/set {key} needs a {'whole number' if typ is int else 'number'}, e.g. /set {key} {example}"
    except OndeviceError as e:
        return f"/set {key}: {e}"
    return f"{field} = {_shown(s.sampling, field)}"


def _shown(sampling: Sampling, field: str):
    """A parameter as /show and /set print it (max_tokens -1: until the text or the context ends)."""
    v = getattr(sampling, field)
    if field == "seed" and v == RANDOM_SEED:
        return "-1 (random)"
    return -1 if field == "max_tokens" and v == UNTIL_END else v


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
    except Exception:  # noqa: BLE001 — no termios, not a terminal, or no fileno: nothing to do
        yield
        return
    new = list(old)
    new[3] &= ~termios.ECHO  # lflags
    termios.tcsetattr(fd, termios.TCSANOW, new)
    try:
        yield
    finally:
        termios.tcflush(fd, termios.TCIFLUSH)
        termios.tcsetattr(fd, termios.TCSANOW, old)


def run(args: argparse.Namespace) -> int:
    from ..models.hf_repo import hf_address

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
                line = read_message(input, interactive)
            except EOFError:  # Ctrl-D: the shell's prompt goes on a line of its own, not after ">>> "
                if interactive:
                    print(file=sys.stderr)
                break
            except KeyboardInterrupt:
                print(file=sys.stderr)
                continue
            if not line.strip():
                continue
            if line.startswith("/load ") and line[6:].strip():  # Ollama's: another model, a new conversation
                model = _load(line[6:].strip(), args, model, s)
                continue
            if line.startswith("/"):
                out = command(line.strip(), s, model)
                if out is None:
                    break
                print(out, file=sys.stderr)
                continue
        ok = answer(line, s, model, interactive)
        if args.single_turn:  # -st: one answer, then quit (2: it could not be given, said above)
            return 0 if ok else 2
    return 0


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
        text, flag = unescape(args.prompt) if args.escape else args.prompt, "-p/--prompt"
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
