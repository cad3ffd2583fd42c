"""``ondevice rm NAME...``: remove stored models (quantized, pulled or assembled), as ``ollama rm`` does."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("names", nargs="+", metavar="NAME",
                   help="stored models, as `ondevice models` names them (files under its store path), or the address "
                        "a model was pulled from (hf.co/OWNER/REPO:QUANT, as `ollama rm` takes it)")


def run(args: argparse.Namespace) -> int:
    from .catalog import remove_variant, stored_path

    names = [_stored_name(n) for n in args.names]
    for name in names:  # every name checked before any file goes: a typo removes nothing
        stored_path(name)
    for name in dict.fromkeys(names):
        print(f"removed {name} ({remove_variant(name) / 1e6:.1f} MB)")
    return 0


def _stored_name(word: str) -> str:
    """A stored model's name; for a download address, the name of the model pulled from it."""
    from ..errors import InvalidArgument
    from .hf_repo import is_address
    from .sources import pulled

    if not is_address(word):
        return word
    if (path := pulled(word)) is not None:
        return path.stem
    from .partial import partial_from

    if (name := partial_from(word)) is not None:  # an interrupted pull of it: its partial file
        return name
    raise InvalidArgument(f"nothing in the store was pulled from {word}; `ondevice models` lists what is there")
