"""Flags shared by the verbs that generate (run, chat, eval, bench): one declaration each."""

from __future__ import annotations

import argparse
import contextlib
import re
import sys
from collections.abc import Iterator

from ..models.hf_repo import add_hf_args
from ..protect.keys import add_key_args, apply_key_args
from .llama_flags import add_load_args, load_config
from .records import Sampling


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-m", "--model", default=None,
                   help="catalog name, stored variant, path to a .gguf or a download address (hf.co/OWNER/REPO:QUANT, "
                        "pulled when missing); default: smollm2-135m-instruct")
    add_hf_args(p)
    p.add_argument("-t", "--threads", type=int, default=None,
                   help="CPU threads; default (or 0, -1): one per physical performance core")
    p.add_argument("-c", "--ctx", "--ctx-size", type=int, default=0,
                   help="context size in tokens (0: the model's, capped at 4096)")
    p.add_argument("--adapter", "--lora", action="append", default=[], metavar="NAME|PATH[:SCALE]",
                   help="a LoRA adapter made by `ondevice adapt` for this model: its stored name (`ondevice adapt "
                        "list`) or a .gguf path, with :SCALE to scale its change (0.5: half; default 1) "
                        "(repeatable: applied together)")
    p.add_argument("--lora-scaled", nargs=2, action=Scaled, dest="adapter", metavar=("PATH", "SCALE"),
                   help="llama-cli's form of --adapter PATH:SCALE")
    p.add_argument("-fa", "--flash-attn", type=on_off_auto, metavar="{auto,on,off}", default=None,
                   help="flash attention, as llama-cli's (default auto: llama.cpp decides, on for CPUs; `ondevice "
                        "bench -fa off,auto` shows which decodes faster here, off at depth on some CPUs; a variant "
                        "from `ondevice fit --knobs` loads with the knobs its fit measured on this machine)")
    add_template_args(p)
    add_load_args(p)
    add_kernel_args(p)
    add_key_args(p)


def add_template_args(p: argparse.ArgumentParser) -> None:
    """llama.cpp's chat template flags (run, chat, serve)."""
    from .chat_templates import BUILTIN

    p.add_argument("--chat-template", metavar="NAME|JINJA", default=None,
                   help=f"the chat template instead of the model file's: {', '.join(BUILTIN)}, or Jinja text")
    p.add_argument("--chat-template-file", metavar="FILE", default=None, help="a Jinja chat template from a file")
    p.add_argument("--jinja", action="store_true", help="accepted (llama.cpp's): templates are always Jinja here")


class Scaled(argparse.Action):
    """``--lora-scaled PATH SCALE`` (llama-cli's and llama-server's) appends ``PATH:SCALE`` to its dest's list
    (``one=True``: sets it, for a verb that takes one adapter)."""

    def __init__(self, *a, one: bool = False, **kw):
        self.one = one
        super().__init__(*a, **kw)

    def __call__(self, parser, namespace, values, option_string=None):
        path, scale = values
        try:
            float(scale)
        except ValueError:
            parser.error(f"{option_string} {path} {scale}: SCALE must be a number, e.g. {option_string} {path} 0.5")
        value = f"{path}:{scale}"
        setattr(namespace, self.dest, value if self.one else [*(getattr(namespace, self.dest, None) or []), value])


def add_kernel_args(p: argparse.ArgumentParser) -> None:
    """``--amx`` and ``--repack``: the extra CPU kernels (see ``ondevice device``); flag > env var > auto."""
    g = p.add_argument_group("CPU kernels (auto: what the self-test proved safe on this machine)")
    g.add_argument("--amx", type=on_off_auto, metavar="{auto,on,off}", default=None,
                   help="Intel AMX matmul kernels (env ONDEVICE_AMX; default auto: off unless proven safe and "
                        "faster by `ondevice device --probe`)")
    g.add_argument("--repack", type=on_off_auto, metavar="{auto,on,off}", default=None,
                   help="CPU_REPACK interleaved-weight kernels (env ONDEVICE_REPACK; default auto: on unless "
                        "its self-test failed here; 1/0 as llama.cpp's tools take it)")
    add_no_repack(g)


def add_no_repack(p, default=None) -> None:
    """llama-cli's and llama-server's ``-nr``/``--no-repack``: ``--repack off`` (copied commands carry it on the
    Xeons whose AMX/repack kernels crash llama.cpp's own tools)."""
    p.add_argument("-nr", "--no-repack", dest="repack", action="store_const", const="off", default=default,
                   help="as --repack off (llama.cpp's spelling)")


FLASH_ATTN = {"auto": None, "on": True, "off": False}  # -fa's words -> EngineConfig.flash_attn


def switch(value) -> str:
    """on/off/auto from llama.cpp's spellings of them: 1/0/-1, true/false (``--repack 0``, ``-fa 1``); anything
    else comes back lowercased for the flag's choices to refuse."""
    word = str(value).strip().lower()
    return {"1": "on", "true": "on", "0": "off", "false": "off", "-1": "auto"}.get(word, word)


def on_off_auto(value: str) -> str:
    """argparse's type for -fa, --amx, --repack: :func:`switch`, and a word it does not know refused as given (a
    bare ``-fa`` takes the prompt after it as its value)."""
    word = switch(value)
    if word not in ("auto", "on", "off"):
        raise argparse.ArgumentTypeError(f"invalid value {value!r}: give on, off or auto (or 1, 0, -1) after the "
                                         f"flag; it takes a value, as llama.cpp's does")
    return word


@contextlib.contextmanager
def kernel_env(amx: str | None = None, repack: str | None = None) -> Iterator[None]:
    """``ONDEVICE_AMX``/``ONDEVICE_REPACK`` set to ``amx``/``repack`` (those given, checked) for the loads inside,
    as before after: the Python API's form of ``--amx``/``--repack`` for ``bench`` (its workers) and ``evaluate``
    (every load it makes, the reference's too)."""
    import os

    from ..device.kernels import requested

    given = {k: v for k, v in (("amx", amx), ("repack", repack)) if v is not None}
    chosen = dict(zip(("amx", "repack"), requested(amx, repack)))  # a bad word: the error names the choices
    before = {k: os.environ.get(f"ONDEVICE_{k.upper()}") for k in given}
    os.environ.update({f"ONDEVICE_{k.upper()}": chosen[k] for k in given})
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(f"ONDEVICE_{k.upper()}", None)
            else:
                os.environ[f"ONDEVICE_{k.upper()}"] = v


def apply_kernel_args(args: argparse.Namespace) -> None:
    """Make the flags the process's ``ONDEVICE_AMX``/``ONDEVICE_REPACK``, so every load in it (and in its
    workers) uses them, including loads deep inside eval."""
    import os

    for name in ("amx", "repack"):
        v = getattr(args, name, None)
        if v is not None:
            os.environ[f"ONDEVICE_{name.upper()}"] = v


def add_sampling_args(p: argparse.ArgumentParser, max_tokens: int = 256) -> None:
    d = Sampling()
    p.add_argument("--temp", "--temperature", type=float, default=d.temp, help="temperature; 0 = greedy")
    p.add_argument("--top-p", type=float, default=d.top_p,
                   help="nucleus sampling mass, in [0, 1] (0: the likeliest token only)")
    p.add_argument("--top-k", type=int, default=d.top_k, help="0 = off")
    p.add_argument("--min-p", type=float, default=d.min_p, help="drop tokens below this share of the top one")
    p.add_argument("--repeat-penalty", type=float, default=d.repeat_penalty, help="1 = off")
    p.add_argument("--presence-penalty", type=float, default=d.presence_penalty, help="0 = off")
    p.add_argument("--frequency-penalty", type=float, default=d.frequency_penalty, help="0 = off")
    p.add_argument("--seed", type=int, default=None, help="random seed; -1 or left out: a random one")
    p.add_argument("-n", "--max-tokens", "--n-predict", "--predict", type=int, default=max_tokens,
                   help="tokens to generate at most (-1: until the end of the text or of the context)")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="end the reply before this text, which is not printed (repeatable; \\n and \\t are a "
                        "newline and a tab, as in llama-cli's -r)")
    g = p.add_argument_group("constrained output (llama-cli's flags; one of them)").add_mutually_exclusive_group()
    g.add_argument("--grammar", default=None, metavar="GBNF", help="the reply follows this GBNF grammar (llama.cpp's)")
    g.add_argument("--grammar-file", default=None, metavar="PATH", help="--grammar read from a file")
    g.add_argument("-j", "--json-schema", default=None, metavar="SCHEMA",
                   help="the reply is JSON that this JSON schema admits ('{}': any JSON value)")
    g.add_argument("-jf", "--json-schema-file", default=None, metavar="PATH", help="--json-schema read from a file")
    g.add_argument("--format", choices=["json"], default=None,
                   help="ollama run's: the reply is a JSON object (as -j '{\"type\": \"object\"}')")
    g = p.add_argument_group("llama.cpp's other samplers (llama-cli's flag names work too; each is off by default)")
    for names, kind, help_ in _MORE:
        g.add_argument(*names, type=kind, default=getattr(d, names[0][2:].replace("-", "_")), help=help_)
    g.add_argument("--dry-sequence-breaker", "--dry-sequence-breakers", action="append", default=None, metavar="TEXT",
                   help="DRY: a repeat does not run across this text (repeatable; replaces the defaults "
                        f"{', '.join(map(repr, d.dry_sequence_breakers))}; 'none': no breakers)")
    g.add_argument("-l", "--logit-bias", action="append", default=[], metavar="TOKEN_ID(+/-)BIAS",
                   help="add BIAS to the token's logit, e.g. 15043+1, 15043-1, 2-inf (never the token); repeatable")
    g.add_argument("--samplers", default=None, metavar="NAMES",
                   help="llama.cpp's samplers to use, ';'-separated, a subset in its order (penalties;dry;top_n_sigma;"
                        "top_k;typ_p;top_p;min_p;xtc;temperature); those left out are off")
    g.add_argument("--sampling-seq", "--sampler-seq", default=None, metavar="LETTERS",
                   help="--samplers as llama.cpp's letters (edskypmxt)")


_MORE = ((("--repeat-last-n",), int, "tokens the penalties look back over (0 = none, -1 = the context)"),
         (("--typical-p", "--typical"), float, "locally typical sampling, in [0, 1] (1 = off)"),
         (("--top-n-sigma", "--top-nsigma"), float, ("keep logits within n standard deviations of the top one "
                                                      "(<= 0 = off)")),
         (("--xtc-probability",), float, "XTC: chance of removing the likeliest tokens (0 = off)"),
         (("--xtc-threshold",), float, "XTC: removes tokens above this probability but the least likely of them"),
         (("--mirostat",), int, ("1 or 2: Mirostat v1/v2, in place of the other samplers and the penalties, as "
                                 "in llama.cpp (0 = off)")),
         (("--mirostat-tau", "--mirostat-ent"), float, "Mirostat's target surprise"),
         (("--mirostat-eta", "--mirostat-lr"), float, "Mirostat's learning rate"),
         (("--dynatemp-range",), float, "dynamic temperature: temp +- this, by the entropy (0 = off)"),
         (("--dynatemp-exponent", "--dynatemp-exp"), float, "how the entropy maps to the temperature"),
         (("--dry-multiplier",), float, "DRY: penalise tokens that extend a repeated sequence (0 = off)"),
         (("--dry-base",), float, "DRY: multiplier * base ^ (repeat length - allowed length)"),
         (("--dry-allowed-length",), int, "DRY: repeats up to this long are free"),
         (("--dry-penalty-last-n",), int, "DRY: tokens it scans (0 = off)"))


def add_prompt_args(p, prompt_help: str, file_help: str) -> None:
    """llama-cli's ``-p TEXT`` / ``-f PATH`` (one of them) and ``-e/--no-escape`` for ``-p``'s escapes."""
    given = p.add_mutually_exclusive_group()
    given.add_argument("-p", "--prompt", default=None, metavar="TEXT", help=prompt_help)
    given.add_argument("-f", "--file", default=None, metavar="PATH", help=file_help)
    p.add_argument("-e", "--escape", action=argparse.BooleanOptionalAction, default=True,
                   help="process escapes in -p as llama-cli does (default: on; --no-escape: as typed)")


def add_system_arg(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("-s", "--system", "-sys", "--system-prompt", default=None,
                   help="system prompt (chat models; -sys and --system-prompt as in llama-cli)")
    g.add_argument("-sysf", "--system-prompt-file", default=None, metavar="PATH",
                   help="the system prompt read from a UTF-8 text file, as llama-cli's -sysf")


def system_from(args: argparse.Namespace) -> str | None:
    """The system prompt of ``-s`` or ``-sysf`` (llama-cli drops the file's last newline; so does this)."""
    if args.system_prompt_file is None:
        if args.system is not None and args.system.strip().lstrip("-").isdigit():  # llama.cpp's -s is its --seed
            from ..errors import InvalidArgument

            raise InvalidArgument(f"-s {args.system}: a system prompt of a number alone; -s/--system is the system "
                                  f"prompt here (llama.cpp's -s is --seed: give --seed {args.system.strip()})")
        return args.system if args.system is None else utf8_argument(args.system, "-s/--system", "-sysf")
    from .cli_run import read_file

    text = read_file(args.system_prompt_file, "-sysf/--system-prompt-file")
    return text.removesuffix("\n")



JSON_OBJECT = {"type": "object"}  # ollama's format json: the answer is a JSON object


def _grammar(args: argparse.Namespace) -> str | None:
    """The GBNF of --grammar, --grammar-file, --json-schema, --json-schema-file or --format json (checked: errors
    name the flag)."""
    import json

    from ..errors import InvalidArgument
    from .cli_run import read_file
    from .grammar import schema_grammar

    if args.grammar is not None or args.grammar_file is not None:
        gbnf = args.grammar if args.grammar is not None else read_file(args.grammar_file, "--grammar-file")
        if not gbnf.strip():
            raise InvalidArgument("the grammar is empty; give GBNF rules with a 'root', e.g. --grammar 'root ::= "
                                  "\"yes\" | \"no\"'")
        return gbnf
    if args.format == "json":  # ollama's: a JSON object, as chat's /set format json
        return schema_grammar(JSON_OBJECT, "--format json")
    flag, text = (("--json-schema", args.json_schema) if args.json_schema is not None else
                  ("--json-schema-file", None if args.json_schema_file is None
                   else read_file(args.json_schema_file, "--json-schema-file")))
    if text is None:
        return None
    try:
        schema = json.loads(text)
    except json.JSONDecodeError as e:
        raise InvalidArgument(f"{flag}: not JSON ({e.msg} at line {e.lineno} column {e.colno}); give a JSON schema, "
                              f"e.g. -j '{{\"type\": \"object\"}}'") from None
    if not isinstance(schema, dict):
        raise InvalidArgument(f"{flag}: a JSON schema is an object, not {type(schema).__name__}; e.g. -j '{{}}'")
    return schema_grammar(schema, flag)


def sampling_from(args: argparse.Namespace, **over) -> Sampling:
    kw = dict(temp=args.temp, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
              repeat_penalty=args.repeat_penalty, presence_penalty=args.presence_penalty,
              frequency_penalty=args.frequency_penalty, grammar=_grammar(args),
              max_tokens=args.max_tokens,  # -1 and -2 run to the end: Sampling takes them
              **{n[0][2:].replace("-", "_"): getattr(args, n[0][2:].replace("-", "_")) for n, _, _ in _MORE})
    if args.dry_sequence_breaker is not None:  # llama-cli's: given ones replace the defaults, "none" leaves none
        given = [b for b in args.dry_sequence_breaker if b != "none"]
        kw["dry_sequence_breakers"] = tuple(unescape(b, "--dry-sequence-breaker") for b in given)
    if args.seed is not None:
        kw["seed"] = args.seed
    kw["logit_bias"] = tuple(_logit_bias(x) for x in args.logit_bias)
    kw.update(_samplers(args.samplers, args.sampling_seq))
    stop = tuple(unescape(x, "--stop/-r") for x in args.stop)
    if "" in stop:  # "" is found at once: no reply at all
        from ..errors import InvalidArgument

        raise InvalidArgument("--stop '' would end every reply before it starts; give the text to stop at, "
                              "e.g. --stop 'User:'")
    kw["stop"] = stop
    kw.update(over)
    return Sampling(**kw)


_BIAS = re.compile(r"^\s*(\d+)\s*([+-])\s*(inf|\d+(?:\.\d*)?(?:e[+-]?\d+)?|\.\d+)\s*$", re.IGNORECASE)
# llama.cpp's other spellings of its sampler names (common_sampler_types_from_names' alternatives)
_SAMPLER_ALIASES = {"top-k": "top_k", "top-p": "top_p", "nucleus": "top_p", "min-p": "min_p", "typ-p": "typ_p",
                    "typ": "typ_p", "typical": "typ_p", "typical-p": "typ_p", "typical_p": "typ_p",
                    "top-n-sigma": "top_n_sigma", "temp": "temperature"}


def _logit_bias(text: str) -> tuple[int, float]:
    """llama.cpp's ``-l/--logit-bias TOKEN_ID(+/-)BIAS``: ``15043+1``, ``15043-1``, ``2-inf``."""
    from ..errors import InvalidArgument

    m = _BIAS.match(text)
    if not m:
        raise InvalidArgument(f"--logit-bias {text!r}: give a token id, + or -, and the bias, e.g. 15043+1 or "
                              f"15043-inf (never that token)")
    bias = float(m.group(3))
    return int(m.group(1)), -bias if m.group(2) == "-" else bias


def _samplers(names: str | None, letters: str | None) -> dict:
    """``--samplers a;b`` / ``--sampling-seq LETTERS``: the Sampling fields that turn off the samplers left out."""
    from ..errors import InvalidArgument
    from ..serve.sampling import sampler_subset

    if names is not None and letters is not None:
        raise InvalidArgument("--samplers and --sampling-seq both give the samplers; give one")
    if names is None and letters is None:
        return {}
    value = letters if names is None else [_SAMPLER_ALIASES.get(n.strip(), n.strip()) for n in names.split(";")
                                            if n.strip()]
    off, infill = sampler_subset(value, "--samplers" if names is not None else "--sampling-seq")
    return {**off, "infill": infill}


def utf8_argument(text: str, flag: str, file_flag: str | None = None) -> str:
    """``text`` given to ``flag`` on the command line, refused when it is not UTF-8 (a Latin-1 terminal or
    locale: Python keeps each byte it cannot decode as a lone surrogate, which no tokenizer takes); the error
    names ``file_flag``, the flag that reads the same text from a file, when there is one."""
    from ..errors import InvalidArgument

    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        byte = ord(text[e.start]) - 0xDC00 if 0xDC80 <= ord(text[e.start]) <= 0xDCFF else None
        what = f"byte {byte:#04x}" if byte is not None else f"{text[e.start]!r}"
        in_file = f", or give the text in a UTF-8 file with {file_flag}" if file_flag else ""
        raise InvalidArgument(f"{flag}: the text is not UTF-8 ({what} at character {e.start}); use a UTF-8 terminal "
                              f"and locale (e.g. LANG=C.UTF-8){in_file}") from None
    return text


def unescape(text: str, flag: str = "", file_flag: str | None = None) -> str:
    """The escapes typed in a flag as the characters, as llama.cpp's ``string_process_escapes``: ``\\n``,
    ``\\r``, ``\\t``, ``\\'``, ``\\"``, ``\\\\`` and ``\\xHH``; any other backslash stays as typed. ``\\xHH`` is a
    byte, as there, so ``\\xc3\\xa9`` is é (its two UTF-8 bytes); bytes that do not make UTF-8 text are an error
    (which names ``flag``; ``file_flag``: see :func:`utf8_argument`)."""
    import re

    from ..errors import InvalidArgument

    def one(m: re.Match) -> bytes:
        c = m.group(1)
        return bytes([int(c[1:], 16)]) if c[0] == "x" else {"n": "\n", "r": "\r", "t": "\t"}.get(c, c).encode()

    utf8_argument(text, flag or "the text", file_flag)
    data, end = bytearray(), 0
    for m in re.finditer(r"\\(x[0-9a-fA-F]{2}|[nrt'\"\\])", text):
        data += text[end:m.start()].encode() + one(m)
        end = m.end()
    data += text[end:].encode()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InvalidArgument(f"{flag + ' ' if flag else ''}'{text}': \\xHH escapes are bytes, as llama-cli reads "
                              f"them, and byte {e.start} ({data[e.start]:#04x}) does not make UTF-8 text; write a "
                              f"character as its UTF-8 bytes (é: \\xc3\\xa9) or type it as it is"
                              ) from None


def load_from(args: argparse.Namespace, **config):
    """Load the model named by the flags, validating them first (errors name the flag)."""
    from ..errors import InvalidArgument
    from .model import load

    if args.threads is not None and args.threads < -1:
        raise InvalidArgument(f"--threads {args.threads} must be >= 1 (0 or -1: the default, one per physical "
                              f"performance core)")
    if args.threads == -1:  # llama.cpp's "default", as 0 is
        args.threads = 0
    if args.ctx < 0:
        raise InvalidArgument(f"--ctx {args.ctx} must be >= 0 (0 = the model's own)")
    apply_kernel_args(args)
    apply_key_args(args)
    if getattr(args, "adapter", None):
        config["adapters"] = tuple(args.adapter)
    if getattr(args, "flash_attn", None) is not None:  # not given: auto, or a fitted variant's measured knob
        config.setdefault("flash_attn", FLASH_ATTN[args.flash_attn])
    config.update(load_config(args))
    if args.chat_template is not None or args.chat_template_file is not None:
        from .chat_templates import template_from

        config["chat_template"] = template_from(args.chat_template, args.chat_template_file)
    model = said_knobs(load(args.model, n_ctx=args.ctx, n_threads=args.threads, **config))
    from ..protect.container import is_container
    from ..protect.keys import key_source_from

    if key_source_from(args) is not None and not is_container(model.path):  # not an error: the model runs
        print(f"{model.name}: note: it is not encrypted, so the key given (--key-env/--key-file/--key-keyring) is not "
              f"used", file=sys.stderr, flush=True)
    return model


def said_knobs(model):
    """``model``, its fitted variant's knobs said on stderr where it loaded with them (or why it did not)."""
    if model.knobs_note:
        print(f"{model.name}: {model.knobs_note}", file=sys.stderr, flush=True)
    return model
