"""llama.cpp's common flags that copied llama-cli and llama-server commands carry.

Each is taken, ignored with a note, or refused by name; none is misread (argparse alone reads ``-ngl 99`` as
``-n gl`` and ``-tb 2`` as ``-t b``). Taken: the load settings ``-b``, ``-ub``, ``-tb``, ``-ctk``, ``-ctv``,
``--no-mmap``, ``--mlock``, ``--no-warmup``. Ignored, as a CPU build of llama.cpp ignores them: GPU offload and the
terminal's colours and logs. Refused: what would change the command's result here if it were dropped silently.
"""

from __future__ import annotations

import argparse
import sys

# what EngineConfig.type_k/type_v take: llama-cli's -ctk/-ctv types, with their ggml type ids
KV_TYPE_IDS = {"f16": 1, "f32": 0, "bf16": 30, "q8_0": 8, "q4_0": 2, "q4_1": 3, "iq4_nl": 20, "q5_0": 6, "q5_1": 7}
KV_TYPES = tuple(KV_TYPE_IDS)
LOG = "llama.cpp's log is off unless ONDEVICE_VERBOSE=1"
# the ignored flags whose value is optional here: the words llama.cpp takes as their value (anything else after
# the flag is the command's own, as in llama-cli's older `--color` that took none: `run --color "Hi"`)
OPTIONAL_VALUES = {
    ("-co", "--color"): {"on", "off", "auto", "1", "0", "true", "false", "yes", "no", "enabled", "disabled"},
    ("-fa", "--flash-attn"): {"on", "off", "auto", "1", "0", "-1", "true", "false", "enabled", "disabled"},
    ("-fit", "--fit"): {"on", "off"},
}
FIT = ("ondevice runs on the CPU: no device memory to fit the settings to (`ondevice fit` fits the model to this "
       "machine)")

# flag names -> (its value: True one, False none, "?" an optional one; why it changes nothing here)
IGNORED: dict[tuple[str, ...], tuple[bool | str, str]] = {
    ("-ngl", "--gpu-layers", "--n-gpu-layers"): (True, "ondevice runs on the CPU"),
    ("-dev", "--device"): (True, "ondevice runs on the CPU"),
    ("-sm", "--split-mode"): (True, "one CPU device here: nothing to split"),
    ("-mg", "--main-gpu"): (True, "ondevice runs on the CPU"),
    ("-ts", "--tensor-split"): (True, "one CPU device here: nothing to split"),
    ("-nkvo", "--no-kv-offload"): (False, "the KV cache is in CPU memory here"),
    ("-co", "--color"): ("?", "output is not coloured"),
    ("--log-disable",): (False, LOG),
    ("--log-file",): (True, LOG),
    ("--log-colors",): (True, LOG),
    ("-lv", "--verbosity", "--log-verbosity"): (True, LOG),
    ("--log-prefix", "--no-log-prefix", "--log-timestamps", "--no-log-timestamps", "--log-jsonl",
     "--no-log-jsonl"): (False, LOG),
    ("--simple-io",): (False, "input is read as plain lines"),
    ("--no-display-prompt", "--display-prompt"): (False, "the prompt is not echoed (--verbose-prompt: as read)"),
    ("--perf", "--no-perf"): (False, "ondevice always measures its timings"),
    ("--draft-min", "--draft-n-min", "--draft-p-min"): (True, "a step drafts what its costs pay for, to --draft-max"),
    ("--log-format",): (True, LOG),
    ("-fit", "--fit"): ("?", FIT),
    ("-fitt", "--fit-target", "-fitc", "--fit-ctx"): (True, FIT),
    ("--no-context-shift",): (False, "the context is never shifted here: a reply that would pass it ends with finish "
                                     "'length'"),
    ("--swa-full",): (False, "the sliding-window cache keeps llama.cpp's default size (results are the same)"),
}
# llama-server's, for what `ondevice serve` always does
SERVER_IGNORED: dict[tuple[str, ...], tuple[bool | str, str]] = {
    ("--metrics",): (False, "GET /metrics is always on"),
    ("--threads-http",): (True, "HTTP is served by one event loop; decoding has its own thread"),
    ("--no-webui",): (False, "there is no web UI"),
    ("-cb", "--cont-batching"): (False, "batching is always continuous"),
    ("--props",): (False, "GET /props is always on; POST /props is not taken"),
    ("--no-warmup",): (False, "serve warms up on its own thread as it starts"),
    ("-kvu", "--kv-unified"): (False, "each slot keeps its own -c cells here"),
    ("--cache-reuse",): (True, "a prompt's cached prefix is always reused (no chunks shifted in the cache)"),
}
# llama-perplexity's load settings: eval loads its models with its own (f16 KV cache, flash attention auto)
EVAL_IGNORED: dict[tuple[str, ...], tuple[bool | str, str]] = {
    **{names: (True, "eval loads its models with its own settings") for names in (
        ("-b", "--batch-size"), ("-ub", "--ubatch-size"), ("-tb", "--threads-batch"), ("-ctk", "--cache-type-k"),
        ("-ctv", "--cache-type-v"))},
    ("-fa", "--flash-attn"): ("?", "eval loads its models with its own settings"),
    ("--no-mmap",): (False, "eval maps its models"),
    ("--no-warmup",): (False, "eval loads its models with its own settings"),
    ("--mlock",): (False, "eval's models are not locked in RAM"),
}
# flag names -> why it cannot be taken
REFUSED: dict[tuple[str, ...], str] = {
    ("-ot", "--override-tensor"): "every tensor is on the CPU here",
    ("--numa",): "ondevice does not set NUMA modes",
    ("-C", "--cpu-mask", "--cpu-range", "--cpu-strict"): "pin CPUs with taskset (or bench's --profile cpus=0,1)",
    ("--mmproj", "-mm", "--mmproj-url", "-mmu", "--image", "--audio"): "ondevice runs text models only (no "
                                                                        "multimodal projector)",
    ("--rope-scaling", "--rope-scale", "--rope-freq-base", "--rope-freq-scale", "--yarn-orig-ctx",
     "--yarn-ext-factor", "--yarn-attn-factor", "--yarn-beta-slow", "--yarn-beta-fast"): "the model file's own "
                                                                                        "RoPE settings are used",
    ("-cd", "--ctx-size-draft", "-devd", "--device-draft", "-ngld", "--gpu-layers-draft"): "the draft model loads "
                                                                                           "with the model's settings",
}
# llama-cli's and llama-server's text handling (run, chat, serve)
TEXT_REFUSED: dict[tuple[str, ...], str] = {
    ("--keep", "--context-shift"): "the context here is not shifted: a reply that would pass it ends with finish "
                                   "'length'; raise -c",
    ("--in-prefix", "--in-prefix-bos", "--in-suffix"): "the chat template frames each turn; give one with "
                                                        "--chat-template or --chat-template-file",
    ("--reasoning-format", "--reasoning-budget", "-rea", "--reasoning"): "the reply is given as the model writes "
                                                                         "it, thinking included (no reasoning "
                                                                         "split)",
}
SERVER_REFUSED: dict[tuple[str, ...], str] = {
    ("--reranking", "--rerank"): "there is no /rerank route here",
    ("-n", "--n-predict", "--predict"): "each request gives its max_tokens",
    ("-s", "--seed"): "each request gives its seed",
    ("--temp", "--temperature", "--top-k", "--top-p", "--min-p", "--repeat-penalty", "--presence-penalty",
     "--frequency-penalty"): "each request gives its sampling (temperature, top_p, ...)",
    ("--ssl-key-file", "--ssl-cert-file"): "the server speaks plain HTTP; put a TLS proxy (caddy, nginx) in front "
                                           "for HTTPS",
    ("--path", "--api-prefix"): "the routes are served at / (no static files, no prefix); a reverse proxy can "
                                "add one",
}
EVAL_REFUSED: dict[tuple[str, ...], str] = {
    ("--kl-divergence-base", "--kl-divergence"): "give the reference model with --ref MODEL: KLD, top-1 agreement "
                                                 "and the PPL difference come with it",
    ("--hellaswag", "--winogrande", "--multiple-choice"): "task suites run with --suite NAME (or a JSONL file)",
    ("--ppl-stride",): "each chunk's second half is scored, as llama-perplexity's default",
}


def settle_optional(argv: list[str], parser: argparse.ArgumentParser) -> list[str]:
    """``argv`` with each ignored optional-value flag whose next word is not one of its values given as
    ``FLAG=`` (no value), so that argparse does not take the prompt or a positional as the flag's value. A verb
    that takes no positional (eval) keeps the word as the value, so that a bad one (``-fa maybe``) is said as one,
    not as a stray word."""
    out = list(argv)
    positional = any(not a.option_strings for a in parser._actions)
    for i, word in enumerate(out[:-1]):
        names = next((n for n in OPTIONAL_VALUES if word in n), None)
        action = parser._option_string_actions.get(word) if names else None  # argparse's own map
        after = out[i + 1]
        if isinstance(action, _Ignored) and after.lower() not in OPTIONAL_VALUES[names] and \
                (positional or after.startswith("-")):
            out[i] = f"{word}="
    return out


class _Ignored(argparse.Action):
    def __init__(self, *a, why: str, **kw):
        self.why = why
        super().__init__(*a, **kw)

    def __call__(self, parser, namespace, values, option_string=None):
        names = next((n for n in OPTIONAL_VALUES if option_string in n), None)
        if names and isinstance(values, str) and values and values.lower() not in OPTIONAL_VALUES[names]:
            flag = "/".join(self.option_strings)  # ignored, but a bad value is still said as one, as run says it
            if "-fa" in names:
                from .args import on_off_auto

                try:
                    on_off_auto(values)
                except argparse.ArgumentTypeError as e:
                    parser.error(f"argument {flag}: {e}")
            parser.error(f"argument {flag}: invalid value {values!r}: give {', '.join(sorted(OPTIONAL_VALUES[names]))}")
        shown = f"{option_string} {values}" if isinstance(values, str) and values else option_string
        print(f"{parser.prog}: note: {shown} is ignored: {self.why}", file=sys.stderr)


class Refused(argparse.Action):
    """A flag of another tool refused by name with the reason (``tool``: whose flag it is)."""

    def __init__(self, *a, why: str, tool: str = "llama.cpp", **kw):
        self.why, self.tool = why, tool
        super().__init__(*a, **kw)

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(f"{option_string} is {self.tool}'s and does not apply here: {self.why}; drop it")


class _Offline(argparse.Action):
    """llama-cli's and llama-server's --offline: nothing is downloaded (as HF_HUB_OFFLINE=1)."""

    def __call__(self, parser, namespace, values, option_string=None):
        from ..models import sources

        sources.OFFLINE_FLAG = option_string


def add_llama_flags(p: argparse.ArgumentParser, verb: str) -> None:
    """The ignored and refused flags (hidden from --help). llama-cli's ``-no-cnv`` is what ``run`` does anyway,
    and the opposite of ``chat``."""
    ignored, refused = dict(IGNORED), {**REFUSED, **({} if verb == "eval" else TEXT_REFUSED)}
    no_cnv = ("-no-cnv", "--no-conversation")
    if verb == "run":
        ignored[no_cnv] = (False, "run answers once; `ondevice chat` converses")
        ignored[("-st", "--single-turn")] = (False, "run answers once")
        refused[("-cnv", "--conversation", "-i", "--interactive", "-if", "--interactive-first")] = (
            "run answers once; `ondevice chat` converses")
    elif verb == "chat":
        refused[no_cnv] = "chat converses; for one answer, `ondevice run`"
    elif verb == "eval":
        ignored.update(EVAL_IGNORED)
        refused.update(EVAL_REFUSED)
    elif verb == "serve":
        ignored.update(SERVER_IGNORED)
        refused.update(SERVER_REFUSED)
    for names, (takes, why) in ignored.items():
        nargs = "?" if takes == "?" else None if takes else 0
        p.add_argument(*names, nargs=nargs, action=_Ignored, why=why, help=argparse.SUPPRESS)
    for names, why in refused.items():
        p.add_argument(*names, nargs="?", action=Refused, why=why, help=argparse.SUPPRESS)
    p.add_argument("--offline", nargs=0, action=_Offline, help="download nothing, not even a hub address given as "
                   "the model (as HF_HUB_OFFLINE=1)")


def add_load_args(p: argparse.ArgumentParser) -> None:
    """llama.cpp's load settings, as EngineConfig takes them (run, chat)."""
    g = p.add_argument_group("llama.cpp's load settings")
    g.add_argument("-b", "--batch-size", type=int, default=None, metavar="N",
                   help="most prompt tokens per llama_decode (default 2048)")
    g.add_argument("-ub", "--ubatch-size", type=int, default=None, metavar="N",
                   help="physical batch: tokens per compute step (default 512)")
    g.add_argument("-tb", "--threads-batch", type=int, default=None, metavar="N",
                   help="threads for the prompt (default, or -1: as many as --threads)")
    g.add_argument("-ctk", "--cache-type-k", choices=KV_TYPES, default=None, help="KV cache type of K (default f16)")
    g.add_argument("-ctv", "--cache-type-v", choices=KV_TYPES, default=None, help="KV cache type of V (default f16)")
    g.add_argument("--no-mmap", action="store_true", help="read the model into memory instead of mapping it")
    g.add_argument("--mlock", action="store_true", help="keep the model's weights in RAM (never paged out)")
    g.add_argument("--no-warmup", action="store_true", help="skip the tiny decode at load")


def load_config(args: argparse.Namespace) -> dict:
    """The EngineConfig fields those flags set (only those given)."""
    from ..errors import InvalidArgument

    out = {}
    for flag, field in (("-b", "n_batch"), ("-ub", "n_ubatch"), ("-tb", "n_threads_batch")):
        value = getattr(args, {"n_batch": "batch_size", "n_ubatch": "ubatch_size"}.get(field, "threads_batch"))
        if value == -1 and flag == "-tb":  # llama.cpp's default: as many as --threads
            continue
        if value is not None:
            if value < 1:
                raise InvalidArgument(f"{flag} {value} must be >= 1" + (", or -1 for the default (as many as "
                                                                         "--threads)" if flag == "-tb" else ""))
            out[field] = value
    if args.cache_type_k:
        out["type_k"] = args.cache_type_k
    if args.cache_type_v:
        out["type_v"] = args.cache_type_v
    if args.no_mmap:
        out["use_mmap"] = False
    if args.mlock:
        out["mlock"] = True
    if args.no_warmup:
        out["warmup"] = False
    return out


def draft_count(value: str | None) -> str | None:
    """Why ``--draft N`` (llama.cpp's count of tokens to draft) is refused, naming ``--draft-max``: here
    ``--draft`` names the drafter, ``lookup`` or a draft model; None for a drafter."""
    if value is None or not value.strip().isdigit():
        return None
    return (f"--draft names the drafter here, 'lookup' or a draft MODEL (llama.cpp's -md); llama.cpp's --draft N, "
            f"the most tokens per draft, is --draft-max {value.strip()} here")
