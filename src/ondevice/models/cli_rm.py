"""``ondevice rm NAME...``: remove stored models (quantized, pulled or assembled), as ``ollama rm`` does."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("names", nargs="+", metavar="NAME",
                   help="stored models, as `ondevice models` names them (files under its store path)")


def run(args: argparse.Namespace) -> int:
    from .catalog import remove_variant, stored_path

    for name in args.names:  # every name checked before any file goes: a typo removes nothing
        stored_path(name)
    for name in dict.fromkeys(args.names):
        print(f"removed {name} ({remove_variant(name) / 1e6:.1f} MB)")
    return 0
