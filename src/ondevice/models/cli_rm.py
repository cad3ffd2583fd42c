"""``ondevice rm NAME...``: remove stored models (quantized, pulled or assembled), as ``ollama rm`` does."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


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
        users = _mapped_by(stored_path(name))
        print(f"removed {name} ({remove_variant(name) / 1e6:.1f} MB)")
        if users:
            print(f"ondevice rm: warning: {name} is loaded by running process{'es' if len(users) > 1 else ''} "
                  f"{', '.join(users)}; {'they keep' if len(users) > 1 else 'it keeps'} running it from memory until "
                  f"stopped", file=sys.stderr)
    return 0


def _store_file_name(word: str) -> str | None:
    """The store name of a stored model given as its file (``NAME.gguf``, not a file here) or its path in the store
    (as `ondevice models` prints it), or None."""
    from .store import models_dir

    path, store = Path(word).expanduser(), models_dir(create=False)
    if path.suffix != ".gguf":
        return None
    if path.parent == Path(".") and not path.exists() and (store / path.name).is_file():
        return path.stem
    return path.stem if path.is_file() and path.resolve().parent == store.resolve() else None


def _mapped_by(path: Path) -> list[str]:
    """The other processes that have ``path`` mapped (a server or a chat running the model), as ``pid N (command)``,
    read from /proc/*/maps; none where there is no /proc or a process cannot be read (a loaded file that is not
    mapped, --no-mmap, is not seen)."""
    target, found = f" {path.resolve()}\n", []
    for maps in Path("/proc").glob("[0-9]*/maps"):
        pid = maps.parent.name
        if pid == str(os.getpid()):
            continue
        try:
            if target not in maps.read_text(errors="replace"):
                continue
            found.append(f"pid {pid} ({_command(maps.parent)})")
        except OSError:  # gone meanwhile, or another user's
            continue
    return found


def _command(proc: Path) -> str:
    """A process's command in two words: ``ondevice serve`` for ondevice's verbs (``python -m ondevice.cli``),
    else its program's name."""
    words = [w.decode(errors="replace") for w in (proc / "cmdline").read_bytes().split(b"\0") if w]
    for i, w in enumerate(words[:-1]):
        if w == "ondevice.cli" or os.path.basename(w) == "ondevice":
            return f"ondevice {words[i + 1]}"
    return (proc / "comm").read_text().strip()


def _stored_name(word: str) -> str:
    """A stored model's name; for a download address, the name of the model pulled from it."""
    from ..errors import InvalidArgument
    from .hf_repo import is_address
    from .sources import pulled

    if not is_address(word):
        return _store_file_name(word) or word
    if (path := pulled(word)) is not None:
        return path.stem
    from .partial import partial_from

    if (name := partial_from(word)) is not None:  # an interrupted pull of it: its partial file
        return name
    raise InvalidArgument(f"nothing in the store was pulled from {word}; `ondevice models` lists what is there")
