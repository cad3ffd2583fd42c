"""``ondevice models [MODEL...] [--json] [--prepare]``: list embedded, stored and local models, or describe some."""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from ..errors import OndeviceError
from .catalog import _ALIASES, ModelListing, _looks_like_path, list_models, resolve
from .gguf_check import validate_gguf
from .licences import licence_display


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("paths", nargs="*", metavar="MODEL",
                   help="describe only these models: names (as `ollama show NAME`) or .gguf paths")
    p.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    p.add_argument("--prepare", action="store_true",
                   help="assemble installed catalog models that are assembled on first use (hundreds of MB)")
    show = p.add_mutually_exclusive_group()  # ollama show's flags
    show.add_argument("--template", action="store_true", help="print the models' chat templates (as `ollama show "
                                                              "--template`)")
    show.add_argument("--license", action="store_true", help="print the models' licences (as `ollama show --license`)")
    show.add_argument("-v", "--verbose", action="store_true",
                      help="the table, then each model's GGUF metadata (as `ollama show -v`)")
    from ..protect.keys import add_key_args

    add_key_args(p)  # an encrypted model described: where its key is


def _row(m: ModelListing) -> dict[str, Any]:
    row: dict[str, Any] = {
        "name": m.name, "source": m.source, "status": m.status, "path": str(m.path) if m.path else None,
        "description": m.description, "licence": licence_display(m.licence), "is_instruct": m.is_instruct,
        "install": m.install_hint if m.path is None else None,
    }
    if m.path is None:
        return row
    from ..protect.container import is_container

    try:
        if is_container(m.path):  # encrypted (ondevice protect): described when its key is at hand
            from ..protect.api import model_info
            from ..protect.keys import DEFAULT_ENV, SOURCE_ENV

            if not (os.environ.get(SOURCE_ENV) or os.environ.get(DEFAULT_ENV)):
                row["status"] = (f"encrypted (ondevice protect): give its key to describe it (--key-env NAME, "
                                 f"--key-file PATH, --key-keyring NAME, or set {DEFAULT_ENV}); `ondevice protect "
                                 f"info {m.path}` needs no key")
                return row
            try:
                info = model_info(m.path, None)
            except OndeviceError as e:  # another key's container is valid: not described, not "invalid"
                row["status"] = f"encrypted (ondevice protect), not described: {e}"
                return row
        else:
            info = validate_gguf(m.path)
    except OndeviceError as e:
        row["status"] = f"invalid: {e}"
        return row
    row.update(
        architecture=info.architecture, parameters=info.parameters, params=info.params_label,
        quant=info.quant_summary, quant_mix={k: round(v, 4) for k, v in info.quant_mix.items()},
        size_bytes=info.file_size, context_length=info.context_length,
        chat_template=info.chat_template is not None, licence=licence_display(m.licence or info.license),
        n_layers=info.n_layers, n_embd=info.n_embd, n_vocab=info.n_vocab, gguf_name=info.name,
    )
    return row


def rows(paths: list[str] | None = None, prepare: bool = False) -> list[dict[str, Any]]:
    """The listing as dicts (what ``--json`` prints)."""
    listing = list_models()
    if prepare:
        listing = [ModelListing(m.name, m.source, resolve(m.name).path, "ready", m.description, m.licence,
                                m.is_instruct, m.install_hint)
                   if m.path is None and m.status.startswith("installed") else m for m in listing]
    if not paths:
        return [_row(m) for m in listing]
    by_name = {m.name: m for m in listing}
    out = []
    for p in dict.fromkeys(paths):
        m = None if _looks_like_path(p) else by_name.get(_ALIASES.get(p, p))
        if m is None:  # a path, a file here; else an unknown name: resolve says so, with a "did you mean"
            ref = resolve(p)
            m = ModelListing(ref.name, "local", ref.path, "ready")
        out.append(_row(m))
    return out


def _table(data: list[dict[str, Any]], width: int | None = None) -> str:
    """The listing as aligned columns, cut to ``width`` characters when given (paths keep their end)."""
    cols = [("name", "NAME"), ("architecture", "ARCH"), ("params", "PARAMS"), ("quant", "QUANT MIX"),
            ("size", "SIZE"), ("context_length", "CTX"), ("chat", "CHAT"), ("licence", "LICENCE"),
            ("where", "PATH")]
    lines = []
    for r in data:
        ready = "architecture" in r
        lines.append({
            "name": r["name"], "architecture": r.get("architecture", "-"), "params": r.get("params", "-"),
            "quant": r.get("quant", "-"),
            "size": f"{r['size_bytes'] / 1e6:.1f} MB" if ready else "-",
            "context_length": str(r.get("context_length") or "-"),
            "chat": ("yes" if r.get("chat_template") else "no") if ready else "-",
            "licence": r.get("licence") or "-",
            "where": r["path"] if ready else r["status"],
        })
    widths = {k: max(len(h), *(display_width(str(x[k])) for x in lines)) if lines else len(h) for k, h in cols}
    if width:
        cols = _fit(cols, widths, width)
    out = ["  ".join(h.ljust(widths[k]) for k, h in cols).rstrip()]
    out += ["  ".join(_pad(_clip(str(x[k]), widths[k], k == "where"), widths[k]) for k, _ in cols).rstrip()
            for x in lines]
    return "\n".join(out)


def display_width(text: str) -> int:
    """Columns ``text`` takes on a terminal: East Asian wide characters take two, combining marks none."""
    import unicodedata

    return sum(0 if unicodedata.combining(c) else 2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)


def _pad(text: str, width: int) -> str:
    return text + " " * max(0, width - display_width(text))


# columns that give up width when the table is wider than the terminal, in this order, down to a floor;
# then, on a narrow terminal, columns that go (`ondevice models --json` has everything)
_SHRINK = (("where", 18), ("quant", 9), ("licence", 8), ("name", 14))
_DROP = ("licence", "chat", "context_length", "architecture")


def _fit(cols: list[tuple[str, str]], widths: dict[str, int], width: int) -> list[tuple[str, str]]:
    """The columns to show in ``width`` characters; ``widths`` is shrunk in place to fit them."""
    natural = dict(widths)
    for n_drop in range(len(_DROP) + 1):
        kept = [c for c in cols if c[0] not in _DROP[:n_drop]]
        widths.update(natural)
        for key, floor in _SHRINK:
            over = sum(widths[k] for k, _ in kept) + 2 * (len(kept) - 1) - width
            if over > 0 and key in dict(kept):
                widths[key] = max(floor, widths[key] - over)
        if sum(widths[k] for k, _ in kept) + 2 * (len(kept) - 1) <= width:
            break
    return kept


def _clip(text: str, width: int, keep_end: bool) -> str:
    """``text`` cut to ``width`` columns with an ellipsis (a path keeps its end: the file name)."""
    if display_width(text) <= width:
        return text
    while display_width(text) > width - 1:
        text = text[1:] if keep_end else text[:-1]
    return "…" + text if keep_end else text + "…"


def terminal_width() -> int | None:
    """The terminal's columns when stdout is one (or $COLUMNS is set); None: do not cut (a pipe)."""
    import os
    import shutil
    import sys

    if "COLUMNS" in os.environ or sys.stdout.isatty():
        return shutil.get_terminal_size().columns
    return None


def licence_of(ref) -> str | None:
    """A model's licence: the catalog's name for it, else its file's ``general.license`` (a known SPDX id in its
    SPDX spelling, models/licences.py)."""
    return licence_display((ref.entry.licence if ref.entry else None) or ref.info.license)


def _show(args: argparse.Namespace) -> int:
    """``--template`` / ``--license`` of the models named: the text alone for one, under a ``# NAME`` line each for
    several (a model with none says so on stderr); ``--json``: a list of ``{"name", "template"|"licence"}`` (the
    key of ``models --json``)."""
    import sys

    from ..errors import InvalidArgument

    what = "template" if args.template else "license"
    if not args.paths:
        raise InvalidArgument(f"--{what} describes the models named: ondevice models NAME --{what}")
    shown = []
    for name in dict.fromkeys(args.paths):
        ref = resolve(name)
        text = ref.info.chat_template if args.template else licence_of(ref)
        shown.append({"name": ref.name, "template" if args.template else "licence": text or None})
        if args.json:
            continue
        if len(args.paths) > 1:
            print(f"# {ref.name}")
        if text:
            print(text)
        else:
            print(f"{ref.name} has no chat template (a base model): chat gets a plain transcript; give one with "
                  f"--chat-template" if args.template else f"{ref.name} names no licence in its file", file=sys.stderr)
    if args.json:
        print(json.dumps(shown, indent=2))
    return 0


def _metadata(path: str, name: str) -> dict[str, str]:
    """``ollama show -v``'s metadata: each GGUF key and its value as text (a long array as its length, the template
    as its size)."""
    info = resolve(path).info
    out = {}
    for key in sorted({*info.metadata, *info.array_lengths}):
        if key in info.array_lengths:
            n = info.array_lengths[key]
            out[key] = str(list(info.metadata[key])) if n <= 8 and key in info.metadata else f"[{n} items]"
        elif key == "tokenizer.chat_template":
            out[key] = f"({len(info.metadata[key])} characters: `ondevice models {name} --template`)"
        else:
            out[key] = str(info.metadata[key])
    return out


def run(args: argparse.Namespace) -> int:
    from ..protect.keys import apply_key_args

    apply_key_args(args)
    if args.template or args.license:
        return _show(args)
    data = rows(args.paths, prepare=args.prepare)
    for r in data if args.verbose else ():
        if "architecture" in r:
            r["metadata"] = _metadata(r["path"], r["name"])
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    print(_table(data, terminal_width()))
    for r in data:
        if "metadata" in r:
            print(f"\n{r['name']} metadata:")
            print("\n".join(f"  {key:<44} {value[:120]}" for key, value in r["metadata"].items()))
    from .store import models_dir

    print(f"\nstore: {models_dir(create=False)}  (add models with `ondevice pull URL` or `ondevice quantize`; "
          f"any .gguf path also works with -m)")
    return 0
