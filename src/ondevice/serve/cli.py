"""``ondevice serve``: flags come from :class:`ServeSettings` (one declaration: flag, env var, help)."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .settings import add_settings_arguments

    parser.epilog = ("Every flag can also be set with its ONDEVICE_* environment variable; a flag wins over "
                     "the environment. Routes: /v1/chat/completions, /v1/completions, /v1/models, "
                     "/v1/embeddings, /v1/responses (OpenAI's Responses API), /v1/messages (Anthropic's Messages "
                     "API), /api/chat, /api/generate, /api/tags, /api/embed, ... (Ollama's API), /completion, "
                     "/infill, /embedding, /props, /apply-template, /lora-adapters, /slots (llama-server's own), "
                     "/health, /metrics, /tokenize, /detokenize, /tokenizer_info.")
    add_settings_arguments(parser)
    from ..engine.args import Scaled

    parser.add_argument("--lora-scaled", nargs=2, action=Scaled, dest="lora", metavar=("PATH", "SCALE"),
                        help="llama-server's form of --lora PATH:SCALE")
    from ..protect.keys import add_key_args

    add_key_args(parser)  # an encrypted -m: where its key is (ONDEVICE_KEY_SOURCE or ONDEVICE_MODEL_KEY also work)
    from ..models.hf_repo import add_hf_args

    add_hf_args(parser)
    parser.add_argument("--jinja", action="store_true", help="accepted (llama-server's): templates are always Jinja here")
    from ..engine.llama_flags import KV_TYPES, add_llama_flags

    add_llama_flags(parser, "serve")
    from ..engine.args import add_no_repack

    add_no_repack(parser, default=argparse.SUPPRESS)
    parser.add_argument("-ctk", "--cache-type-k", choices=KV_TYPES, default=None, help="llama-server's: as --kv-type")
    parser.add_argument("-ctv", "--cache-type-v", choices=KV_TYPES, default=None, help="llama-server's: as --kv-type")


def run(args: argparse.Namespace) -> int:
    from ..models.hf_repo import hf_address
    from ..protect.keys import apply_key_args
    from .server import serve
    from .settings import settings_from_args

    if address := hf_address(args, getattr(args, "model", None)):  # -hf OWNER/REPO[:QUANT] (-hff FILE), as llama-server
        args.model = address
    kv = {t for t in (args.cache_type_k, args.cache_type_v) if t}
    if len(kv) > 1 or kv and getattr(args, "kv_type", None) not in (None, *kv):
        from ..errors import InvalidArgument

        raise InvalidArgument("serve keeps K and V in one type: give -ctk and -ctv the same one (or --kv-type)")
    if kv:
        args.kv_type = kv.pop()
    apply_key_args(args)
    settings = settings_from_args(args)
    if settings.parallel > 1 and getattr(args, "typed", set()) & {"-c", "--ctx-size"}:  # llama-server's spelling
        import sys

        c, n = settings.ctx, settings.parallel
        print(f"ondevice serve: note: -c {c} is each slot's context here, so the KV cache holds {n} x {c} tokens; "
              f"llama-server splits -c over -np ({c} / {n} = {c // n} each): -c {c // n} gives its memory",
              file=sys.stderr)
    serve(settings)
    return 0
