"""``ondevice run``: stream a completion to stdout, timings to stderr."""

from __future__ import annotations

import argparse
import json
import re
import sys

from ..errors import ContextOverflow
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
from .llama_flags import add_llama_flags
from .model import peak_rss_bytes
from .records import Generation


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("words", nargs="*", metavar="[MODEL] PROMPT",
                   help="the prompt ('-' or nothing reads stdin; text piped with words goes before them, as "
                        "`cat doc | ollama run MODEL \"Summarise this\"`); a model name first picks the model, as "
                        "`ollama run MODEL PROMPT` does (quote a prompt of several words for the default model)")
    add_prompt_args(p, "the prompt, as llama-cli's -p (\\n, \\t, \\\\ ... are the characters, \\xHH a byte "
                       "of UTF-8, unless --no-escape)", "read the prompt from a UTF-8 text file, as llama-cli's -f")
    add_model_args(p)
    add_llama_flags(p, "run")
    p.add_argument("-r", "--reverse-prompt", action="append", dest="stop", default=[], metavar="TEXT",
                   help="llama-cli's: end the reply before this text (as --stop)")
    add_sampling_args(p)
    add_system_arg(p)
    p.add_argument("--raw", action="store_true", help="no chat template: plain completion of the prompt")
    p.add_argument("--ignore-eos", action="store_true", help="keep generating past end-of-text (for measurements)")
    p.add_argument("--verbose-prompt", action="store_true",
                   help="print the prompt as the model gets it (chat template applied) and its tokens first, as "
                        "llama-cli's, on stderr")
    p.add_argument("--draft", "-md", "--model-draft", dest="draft", default=None, metavar="lookup|MODEL",
                   help="speculative decoding, same output: 'lookup' drafts from the prompt and text so far (fast "
                        "for rewriting, summaries, extraction); MODEL is a draft model sharing the vocabulary "
                        "(llama.cpp's -md)")
    p.add_argument("--draft-max", "--draft-n", dest="draft_max", type=int, default=16,
                   help="most tokens drafted per step (default: 16)")
    p.add_argument("--prompt-cache", default=None, metavar="FILE",
                   help="restore the prompt's KV from FILE when it exists (only what the prompt does not begin "
                        "with is computed) and save it there after, as llama-cli's --prompt-cache (llama.cpp's "
                        "sequence-state file: llama-server's /slots restores it too)")
    p.add_argument("--prompt-cache-all", action="store_true",
                   help="save the reply to --prompt-cache too, not only the prompt")
    p.add_argument("--prompt-cache-ro", action="store_true", help="use --prompt-cache but never write it")
    p.add_argument("--timings", choices=["text", "json", "none"], default="text",
                   help="timings on stderr: a line, the last record as JSON, or nothing")
    p.add_argument("--verbose", dest="timings", action="store_const", const="text",
                   help="ollama run's: the timings line (as --timings text, the default)")
    p.add_argument("--show-timings", dest="timings", action="store_const", const="text", help=argparse.SUPPRESS)
    p.add_argument("--no-show-timings", dest="timings", action="store_const", const="none",
                   help=argparse.SUPPRESS)  # llama-cli's names


def split_model_word(args: argparse.Namespace) -> str | None:
    """``run MODEL [PROMPT]``: take a leading known model name as ``--model``; returns the prompt (or None).

    Without ``-m``, two or more words start with a model, as in ``ollama run MODEL PROMPT``: an unknown first
    word is refused rather than silently sent as text to the default model (quoting the whole prompt, one
    argument, sends it to the default model)."""
    from ..errors import InvalidArgument
    from ..models.catalog import _looks_like_path, did_you_mean, is_model_name
    from ..models.hf_repo import is_address

    words = list(args.words)
    hub = bool(words) and is_address(words[0]) and not words[0].lower().startswith(("http://", "https://"))
    if args.model is None and words and (is_model_name(words[0]) or hub  # a Hub address, even a wrong one
                                         or len(words) >= 2 and _looks_like_path(words[0])):
        args.model = words.pop(0)
        args.named_model = True
    elif args.model is None and len(words) >= 2 and not any(c.isspace() for c in words[0]):
        close = did_you_mean(words[0])
        hint = f"did you mean '{close}'? " if close else ""
        text = " ".join(words).replace('"', '\\"')
        raise InvalidArgument(f"unknown model '{words[0]}'; {hint}list models with `ondevice models`; to run the "
                              f"default model on all the words, quote them: ondevice run \"{text}\"")
    elif len(words) == 1 and " " not in words[0] and (close := did_you_mean(words[0])):
        print(f"ondevice run: note: '{words[0]}' is taken as the prompt; for the model '{close}' run "
              f"`ondevice run {close} PROMPT`", file=sys.stderr)
    elif len(words) == 1 and re.fullmatch(r"[A-Za-z][\w.-]*[\d:/][\w.:/-]*", words[0]):  # llama3.2, qwen2.5:0.5b
        print(f"ondevice run: note: '{words[0]}' is not a model here (`ondevice models` lists them), so it is "
              f"taken as the prompt to the default model", file=sys.stderr)
    return " ".join(words) if words else None


STDIN_LIMIT = 16 << 20  # bytes: far more than any model's context holds (128k tokens are ~0.5 MB of text)


def read_stdin(stream=None, what: str = "stdin") -> str:
    """The prompt piped on stdin (or read from ``stream``, named ``what`` in errors): UTF-8 text of at most
    :data:`STDIN_LIMIT` bytes (``< /dev/zero`` is an error, not all the memory there is)."""
    from ..capped import read_capped, size_text
    from ..errors import InvalidArgument

    data = read_capped(stream or sys.stdin.buffer, STDIN_LIMIT)
    if data is None:
        raise InvalidArgument(f"{what} holds more than {size_text(STDIN_LIMIT)}; no model's context fits a prompt "
                              f"that long: send a part of it")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InvalidArgument(f"{what} is not UTF-8 text (byte {e.start}: {data[e.start:e.start + 1]!r}); "
                              f"convert it first, e.g. with iconv") from None


def read_file(path: str, flag: str = "-f/--file") -> str:
    """The text in the file ``path`` (given to ``flag``), read as :func:`read_stdin` reads stdin."""
    from ..errors import InvalidArgument

    try:
        with open(path, "rb") as f:
            return read_stdin(f, path)
    except FileNotFoundError:
        raise InvalidArgument(f"{path}: no such file; check the path given to {flag}") from None
    except IsADirectoryError:
        raise InvalidArgument(f"{path} is a directory; give {flag} a text file") from None
    except PermissionError:
        raise InvalidArgument(f"{path}: permission denied; give {flag} a file you can read") from None


def given_prompt(args: argparse.Namespace) -> str | None:
    """The prompt of the words (after a piped document), ``-p`` or ``-f`` (one of them; with ``-p``/``-f`` a
    single leading word may still name the model: ``ondevice run gemma3-270m -p TEXT``)."""
    from ..errors import InvalidArgument

    words = split_model_word(args)
    if words is not None:
        utf8_argument(words, "the prompt", "-f")
    if args.prompt is None and args.file is None:
        return with_piped_document(words)
    flag = "-p/--prompt" if args.prompt is not None else "-f/--file"
    if words is not None:
        raise InvalidArgument(f"the prompt is given twice: as words ({words[:40]!r}) and with {flag}; keep one "
                              f"(a word before {flag} must be a model name, see `ondevice models`)")
    if stdin_is_piped():  # llama-cli never reads it with -p/-f: say so rather than drop a document unseen
        print(f"ondevice run: note: stdin is not read when {flag} gives the prompt; to add a piped document to "
              f"the prompt, give the prompt as words: ... | ondevice run \"Summarise this\"", file=sys.stderr)
    if args.prompt is not None:
        return unescape(args.prompt, flag, "-f") if args.escape else utf8_argument(args.prompt, flag, "-f")
    return read_file(args.file).removesuffix("\n")  # llama-cli drops a prompt file's last newline (so does chat -f)


def stdin_is_piped() -> bool:
    """Whether something is piped or redirected to stdin: a pipe, a socket or a file that is not empty (not a
    terminal, /dev/null or a closed stdin, which hold nothing to read)."""
    import os
    import stat

    try:
        st = os.fstat(sys.stdin.fileno())
    except (AttributeError, OSError, ValueError):  # no stdin at all
        return False
    return stat.S_ISFIFO(st.st_mode) or stat.S_ISSOCK(st.st_mode) or (stat.S_ISREG(st.st_mode) and st.st_size > 0)


def with_piped_document(words: str | None) -> str | None:
    """``cat doc | ondevice run "Summarise this"``: the piped text before the prompt's words, as ``ollama run``
    prepends stdin to them. A blank line joins them (ollama joins with a space, which glues the instruction to
    the document's last line when the file has no final newline); nothing piped leaves the words as they are."""
    if words is None or words == "-" or not stdin_is_piped():
        return words
    _say_if_stdin_is_quiet()
    document = read_stdin().rstrip("\n")
    if not document.strip():
        return words
    lines = document.count("\n") + 1  # said: a `while read` loop's input is read here too, as ollama reads it
    print(f"ondevice run: note: the {lines} line(s) piped on stdin go before the prompt, as ollama run puts them "
          f"(</dev/null leaves them out)", file=sys.stderr)
    return f"{document}\n\n{words}"


STDIN_QUIET_S = 2.0  # a pipe that gives nothing for this long is said to be waited for (a parent left it open)


def _say_if_stdin_is_quiet() -> None:
    """A note when the piped stdin holds nothing yet: the run waits for it to end, which a parent that left an
    open pipe on stdin (a subprocess, a notebook) would never do."""
    import select

    try:
        ready = select.select([sys.stdin], [], [], STDIN_QUIET_S)[0]
    except (OSError, ValueError):  # a stdin select cannot watch: read it as it is
        return
    if not ready:
        print("ondevice run: note: waiting for stdin to end (what is piped goes before the prompt, as in ollama "
              "run); give </dev/null to leave it out", file=sys.stderr)


def read_prompt(arg: str | None, model: str | None = None) -> str:
    from ..errors import InvalidArgument

    if arg is None or arg == "-":
        if sys.stdin.isatty():
            if model:
                raise InvalidArgument(f"no prompt after the model name: `ondevice run {model} \"your prompt\"`, "
                                      f"pipe one on stdin, or talk to it with `ondevice chat -m {model}`")
            raise InvalidArgument("no prompt: give one as an argument or pipe it on stdin")
        arg = read_stdin()
    if not arg.strip():
        raise InvalidArgument("the prompt is empty; give some text")
    return arg


def format_timings(last: Generation | None, peak_rss: int, load_time: float | None = None) -> str:
    if last is None:
        return "no tokens generated"
    parts = [f"prompt {last.prompt_tokens} tok"]
    if last.cached_tokens:
        parts.append(f"{last.cached_tokens} cached")
    parts += [f"TTFT {last.ttft * 1000:.0f} ms", f"prompt {last.prompt_tps:.1f} tok/s",
              # the first token comes with the prompt: one token has no decode rate (it is not 0 tok/s)
              f"decode {last.generation_tokens} tok" + (f" at {last.generation_tps:.1f} tok/s"
                                                          if last.generation_tokens > 1 else ""),
              f"peak RSS {peak_rss / 2**20:.0f} MiB"]
    if last.draft_tokens:
        parts.insert(-1, f"drafts {last.draft_accepted}/{last.draft_tokens} accepted "
                         f"({last.tokens_per_step:.2f} tok/step)")
    if load_time is not None:
        parts.insert(0, f"load {load_time * 1000:.0f} ms")
    return " | ".join(parts)


def window_note(last: Generation | None, sampling, n_ctx: int, fix: str = "raise -c/--ctx",
                limit_fix: str = "raise -n") -> str | None:
    """The line that says a reply was cut: by the end of the context window, or by -n while a grammar (-j,
    --grammar, format json) was still open; else None (-n alone cuts where the user asked)."""
    if last is None or last.finish_reason != "length":
        return None
    if last.generation_tokens < sampling.max_tokens:
        return f"(the reply stopped at the end of the {n_ctx}-token context window; {fix})"
    if sampling.grammar is not None:
        return (f"(the reply stopped at the {sampling.max_tokens}-token limit, so it may not be complete as its "
                f"grammar asks; {limit_fix})")
    return None


def _restore(model, path: str) -> list[int]:
    """--prompt-cache: the tokens restored from ``path`` ([] when there is no such file yet)."""
    import os

    from .slotfile import SlotFileError

    if not os.path.exists(path):
        return []
    try:
        return model.load_prompt_cache(path)
    except SlotFileError as e:
        raise SlotFileError(f"--prompt-cache {e}; delete the file (or give another) to start a new cache") from None


def show_prompt(model, prompt, chat_template: bool | None) -> None:
    """llama-cli's --verbose-prompt: the prompt's text after the chat template, then each token id and piece."""
    text = model.render(prompt, chat_template=chat_template)[0]
    toks = model.tokenize_prompt(prompt, chat_template=chat_template)
    eng = model.engine
    lines = [f"prompt: '{text}'", f"number of tokens in prompt = {len(toks)}"]
    lines += [f"{t:6d} -> '{eng.token_bytes(t, special=True).decode('utf-8', 'replace')}'" for t in toks]
    print("\n".join(lines) + "\n", file=sys.stderr)


def replace_unwritable_output() -> None:
    """Text the terminal's or the pipe's encoding cannot write (Chinese to a latin-1 stdout) becomes '?', never a
    traceback in the middle of a reply."""
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="replace")


def run(args: argparse.Namespace) -> int:
    from ..models.catalog import is_model_name

    replace_unwritable_output()
    from ..models.hf_repo import hf_address

    words = args.words
    named = words[0] if words and (len(words) > 1 or args.prompt or args.file) and is_model_name(words[0]) else None
    args.model = hf_address(args, args.model or named) or args.model  # -hf OWNER/REPO[:QUANT] (-hff FILE)
    from ..errors import InvalidArgument
    from .llama_flags import draft_count

    if why := draft_count(args.draft):
        raise InvalidArgument(f"--draft {args.draft}: {why}")
    draft = None if args.draft is None else "lookup" if args.draft == "lookup" else "model"
    # validate flags before the model loads
    sampling = sampling_from(args, ignore_eos=args.ignore_eos, draft=draft, draft_max=args.draft_max)
    system = system_from(args)
    if system and args.raw:
        from ..errors import InvalidArgument

        raise InvalidArgument("--system goes through the chat template, which --raw turns off; drop one of them "
                              "(or write the system text into the raw prompt)")
    if args.raw and (args.chat_template or args.chat_template_file):
        from ..errors import InvalidArgument

        raise InvalidArgument("--raw turns the chat template off, and --chat-template gives one; drop one of them")
    prompt = read_prompt(given_prompt(args), args.model if getattr(args, "named_model", False) else None)
    if system:
        prompt = [{"role": "system", "content": system}, {"role": "user", "content": prompt}]
    if (args.prompt_cache_all or args.prompt_cache_ro) and not args.prompt_cache:
        from ..errors import InvalidArgument

        raise InvalidArgument("--prompt-cache-all and --prompt-cache-ro need --prompt-cache FILE")
    model = load_from(args, **({"draft_model": args.draft} if draft == "model" else {}))
    if args.verbose_prompt:
        show_prompt(model, prompt, chat_template=False if args.raw else None)
    cached = _restore(model, args.prompt_cache) if args.prompt_cache else None
    last = None
    out = sys.stdout
    interrupted = False
    try:
        for g in model.stream(prompt, sampling=sampling, chat_template=False if args.raw else None):
            out.write(g.text)
            out.flush()
            last = g
    except ContextOverflow as e:
        raise e.advise("-c/--ctx", model.engine.n_ctx_train) from None
    except KeyboardInterrupt:  # Ctrl-C: as llama-cli, the reply so far, the cache and the timings, then exit 130
        interrupted = True
    out.write("\n")
    if cached is not None and last is not None and not args.prompt_cache_ro:
        keep = None if args.prompt_cache_all else last.prompt_tokens
        if model.generator.slots[0].cached[:keep] != cached:  # the file would change
            model.save_prompt_cache(args.prompt_cache, keep)
    if interrupted:
        print("(interrupted)", file=sys.stderr)
    elif note := window_note(last, sampling, model.engine.n_ctx):
        print(note, file=sys.stderr)
    if args.timings == "text":
        print(format_timings(last, peak_rss_bytes(), model.engine.load_time), file=sys.stderr)
    elif args.timings == "json":
        rec = dict(last.to_dict() if last else {}, load_time=model.engine.load_time, peak_rss_bytes=peak_rss_bytes())
        rec.pop("text", None)
        print(json.dumps(rec), file=sys.stderr)
    return 130 if interrupted else 0
