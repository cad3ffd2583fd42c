"""Model names -> GGUF files: the embedded catalog (:mod:`.embedded`), variants in the store, local paths and
download addresses pulled before."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..errors import NOT_THERE, InvalidArgument, ModelNotFound, path_problem
from ..store.record import created_now
from .embedded import (
    _ALIASES,
    CATALOG,
    DEFAULT_MODEL,
    CatalogEntry,
    entry_path,
    is_installed,
)
from .gguf_check import GGUFInfo, validate_gguf
from .gguf_split import SHARD_NAME, first_of, sibling_shards
from .hf_repo import bare_repo_hint, is_address, parse_repo
from .store import (  # noqa: F401 (read_provenance and _stamp re-exported)
    _sidecar,
    _stamp,
    atomic_path,
    atomic_write,
    models_dir,
    read_provenance,
    sha256_file,
    write_json,
)

Source = Literal["embedded", "store", "local"]
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}$")


@dataclass(frozen=True)
class ModelRef:
    """A resolved model: a name and a GGUF path. ``info`` parses and validates the file (cached)."""

    name: str
    path: Path
    source: Source
    entry: CatalogEntry | None = field(default=None, repr=False, compare=False)
    made: dict[str, Any] | None = field(default=None, repr=False, compare=False)  # provenance of a file written

    @property
    def info(self) -> GGUFInfo:
        from ..protect.container import is_container

        if is_container(self.path):  # encrypted (ondevice protect): its metadata chunks, decrypted in memory
            from ..protect.api import model_info

            return model_info(self.path, None)
        return validate_gguf(self.path)

    @property
    def provenance(self) -> dict[str, Any] | None:
        if self.made is not None:  # a file ondevice wrote outside the store (quantize --output): no sidecar there
            return {"provenance": self.made}
        return read_provenance(self.path) if self.source == "store" or self.entry else None

    def __fspath__(self) -> str:
        return str(self.path)


def known_names() -> list[str]:
    """Catalog names, then store variants (a split model by its first shard only: a later one does not run)."""
    return list(CATALOG) + [n for n, p in store_variants().items()
                            if n not in CATALOG and not ((m := SHARD_NAME.match(p.name)) and int(m["no"]) > 1)]


def store_variants() -> dict[str, Path]:
    """``name -> path`` of the .gguf files in the store (assembled catalog files included)."""
    d = models_dir(create=False)
    return {p.stem: p for p in sorted(d.glob("*.gguf")) if not p.name.startswith(".")}


def _looks_like_path(name: str) -> bool:
    return "/" in name or os.sep in name or name.endswith(".gguf") or name.startswith(("~", "."))


def resolve(name: str | os.PathLike[str] | None = None) -> ModelRef:
    """Resolve a model name to a GGUF file.

    Accepts None (the default model), a catalog name (or alias), the name of a variant in the store
    (``models_dir()/<name>.gguf``, made by ``ondevice quantize`` or ``pull``), or a path to a .gguf file.

    Raises:
        ModelNotFound: unknown name, missing file, or catalog package not installed (says what to install).
    """
    if isinstance(name, ModelRef):
        return name
    if name is None:
        name = DEFAULT_MODEL
    if is_address(name):
        from .sources import address_path  # what `pull` stored; the command line pulls it when missing

        path = address_path(name)
        return ModelRef(path.stem, path, "store")
    if isinstance(name, os.PathLike) or _looks_like_path(str(name)):
        return _local(Path(name))
    name = str(name)
    canonical = _ALIASES.get(name, name)
    if canonical in CATALOG:
        entry = CATALOG[canonical]
        return ModelRef(canonical, entry_path(entry), "embedded", entry)
    if _NAME_RE.match(name):
        stored = models_dir(create=False) / f"{name}.gguf"
        if stored.is_file():
            return ModelRef(name, stored, "store")
    if Path(name).is_file():
        return _local(Path(name))
    from .partial import partial_download, partial_status

    if (part := partial_download(name)) is not None:  # listed by `ondevice models`: said as it is, with the way on
        raise ModelNotFound(f"{name} is not a model yet: its {partial_status(name, part)}")
    close = did_you_mean(name)
    hint = f"did you mean '{close}'? " if close else ""
    raise ModelNotFound(f"unknown model '{name}'; {hint}known: {', '.join(known_names())}. A path to a local "
                        f".gguf file also works (e.g. ./model.gguf), and `ondevice models` lists them all")


def is_model_name(word: str) -> bool:
    """Whether ``word`` names a model (catalog name or alias, store variant, existing .gguf path, a Hugging Face
    repository or .gguf file address); nothing loads."""
    if word in CATALOG or word in _ALIASES or is_address(word) and (word.lower().endswith(".gguf") or parse_repo(word)):
        return True
    if _looks_like_path(word):
        return word.endswith(".gguf") and Path(word).expanduser().is_file()
    from .partial import partial_download

    return bool(_NAME_RE.match(word)) and ((models_dir(create=False) / f"{word}.gguf").is_file()
                                           or partial_download(word) is not None)  # resolve says what it is


def did_you_mean(name: str) -> str | None:
    """The known model name closest to a mistyped one (aliases and name prefixes count), or None."""
    import difflib

    cands = {n: n for n in known_names()} | dict(_ALIASES)  # spelling -> canonical name
    best, score = None, 0.0
    for spelled, canonical in cands.items():
        # a prefix the length of the typed name catches short forms ("smolm2" for "smollm2-135m-instruct")
        for target in (spelled, spelled[:len(name) + 1]):
            r = difflib.SequenceMatcher(None, name.lower(), target.lower()).ratio()
            if r > score:
                best, score = canonical, r
    return best if score >= 0.75 else None


def _local(path: Path) -> ModelRef:
    p = path.expanduser()
    problem = path_problem(p)
    if problem in NOT_THERE:
        stored = models_dir(create=False) / p.name
        if p.parent == Path(".") and p.suffix == ".gguf" and _NAME_RE.match(p.stem) and stored.is_file():
            # `-m tiny.gguf` for the pulled `tiny`: a file name is a path here, as in llama.cpp; the store's is a name
            raise ModelNotFound(f"{p}: {problem} here; the store has it as a model name: give {p.stem} (no .gguf), "
                                f"or its path {stored}")
        raise ModelNotFound(f"{p}: {problem}; check the path, or list models with `ondevice models`"
                            f"{bare_repo_hint(str(path))}")
    if p.is_dir():
        found = sorted(p.glob("*.gguf"))
        hint = f" (it contains {', '.join(f.name for f in found[:3])})" if found else ""
        raise ModelNotFound(f"{p} is a directory; pass the .gguf file itself{hint}")
    p = p.resolve()
    return ModelRef(p.stem, p, "local")


def check_variant_name(name: str, flag: str = "variant name") -> None:
    """Refuse a name the store cannot hold: a path (``/``, a leading ``.``), odd characters, a catalog name."""
    if len(name) > 128 and _NAME_RE.match(name[:128]):
        raise InvalidArgument(f"{flag} {name[:40]}... has {len(name)} characters; a store name has at most 128")
    if not _NAME_RE.match(name):
        raise InvalidArgument(f"{flag} {name!r} is not allowed; use letters, digits and . _ + - (no '/', not "
                              f"starting with '.'), e.g. smollm2-q4_0")
    if name in CATALOG or name in _ALIASES:
        raise InvalidArgument(f"{flag} '{name}' is a catalog model's name; choose another, e.g. {name}-custom")
    if name.lower().endswith(".gguf"):  # stored as NAME.gguf.gguf, and a name ending .gguf is read as a path
        raise InvalidArgument(f"{flag} {name}: a store name is given without .gguf (the store adds it); use "
                              f"{name[:-5]}")


def register_variant(name: str, path: str | os.PathLike[str], provenance: dict[str, Any]) -> ModelRef:
    """Put a GGUF file into the store as ``name`` and record where it came from in ``<name>.json``.

    A file already at ``models_dir()/<name>.gguf`` (or elsewhere in the store directory, e.g. a temp file
    a quantizer wrote there) is renamed into place; a file elsewhere is copied. The file must be valid.
    """
    check_variant_name(name)
    src = Path(path).expanduser().resolve()
    info = validate_gguf(src)
    dest = models_dir() / f"{name}.gguf"
    if src != dest.resolve():
        if src.parent == dest.parent.resolve():
            os.replace(src, dest)
        else:
            with atomic_write(dest) as out, open(src, "rb") as f:
                shutil.copyfileobj(f, out, 1 << 20)
    record = {
        "name": name, "source": "store", "sha256": sha256_file(dest), "stamp": _stamp(dest),
        "created": created_now(),
        "architecture": info.architecture, "parameters": info.parameters, "quant": info.quant_summary,
        "provenance": provenance,
    }
    write_json(_sidecar(dest), record)
    return ModelRef(name, dest, "store")


def stored_path(name: str) -> Path:
    """The file of the stored model ``name`` that ``remove_variant`` may delete, or an error naming what it is."""
    canonical = _ALIASES.get(name, name)
    if canonical in CATALOG and CATALOG[canonical].kind == "in_place":
        entry = CATALOG[canonical]
        pkgs = " ".join(entry.dists)
        raise InvalidArgument(f"{name} is in its pip package ({pkgs}), not in the store: " + (
            f"`pip uninstall {pkgs}` removes it" if entry.extra else "ondevice depends on it, so it stays"))
    path = CATALOG[canonical].store_path if canonical in CATALOG else models_dir(create=False) / f"{name}.gguf"
    if _NAME_RE.match(canonical) and path.is_file():
        return path
    from .partial import partial_download

    if canonical not in CATALOG and (part := partial_download(name)) is not None:
        return part  # an interrupted pull: hundreds of MB no listing would otherwise let go
    if canonical in CATALOG:
        raise InvalidArgument(f"{name} is not assembled in the store ({path}): there is nothing to remove")
    if _looks_like_path(name) or Path(name).is_file():
        raise InvalidArgument(f"{name} is not in ondevice's store ({models_dir(create=False)}); ondevice removes "
                              "only what it stored: delete your own files yourself")
    close = did_you_mean(name)
    hint = f"did you mean '{close}'? " if close else ""
    raise InvalidArgument(f"no stored model named '{name}'; {hint}`ondevice models` lists them (stored ones are "
                          f"in {models_dir(create=False)})")


def remove_variant(name: str) -> int:
    """Delete the stored model ``name`` (a quantized, pulled or assembled file) and its record; the bytes freed.

    An assembled catalog model is assembled again from its pip packages on next use."""
    from .partial import partial_download, pull_running

    path = stored_path(name)
    part = partial_download(name) if name not in CATALOG and name not in _ALIASES else None
    if part is not None and pull_running(name):
        raise InvalidArgument(f"{name} is being downloaded right now by an `ondevice pull`; stop that pull "
                              f"(Ctrl-C) first, then remove it")
    if (first := first_of(path)) is not None:
        raise InvalidArgument(f"{name} is one shard of a split model, which `ondevice rm` removes whole by its first "
                              f"shard: ondevice rm {first.stem}")
    shards = sibling_shards(path)  # a split model's other files go with it
    size = 0
    for p in dict.fromkeys(x for x in (path, *shards, part) if x is not None):
        size += p.stat().st_size
        p.unlink()
    if path != part:
        from .runtime_knobs import forget_knobs

        for p in (path, *shards):
            with contextlib.suppress(FileNotFoundError):
                _sidecar(p).unlink()
        forget_knobs(path)
    if part is not None:
        with contextlib.suppress(FileNotFoundError):
            part.with_name(part.name + ".json").unlink()
    lock = models_dir(create=False) / f"{name}.gguf.lock"  # a killed pull's (SIGTERM, kill -9): held by no one now
    if name not in CATALOG and not pull_running(name):
        lock.unlink(missing_ok=True)
    return size


@dataclass(frozen=True)
class ModelListing:
    """One row of :func:`list_models`. ``path`` is None while the file is not available yet."""

    name: str
    source: Source
    path: Path | None
    status: str  # "ready", "assembled on first use", "not installed (pip install ...)"
    description: str = ""
    licence: str | None = None
    is_instruct: bool | None = None
    install_hint: str | None = None

    @property
    def available(self) -> bool:
        return self.path is not None

    def info(self) -> GGUFInfo | None:
        return validate_gguf(self.path) if self.path is not None else None


def list_models() -> list[ModelListing]:
    """Catalog entries (installed or not) then store variants. Never assembles or downloads anything."""
    rows: list[ModelListing] = []
    for e in CATALOG.values():
        common = {"description": e.description, "licence": e.licence, "is_instruct": e.is_instruct,
                      "install_hint": e.install_hint}
        if not is_installed(e):
            rows.append(ModelListing(e.name, "embedded", None, f"not installed ({e.install_hint})", **common))
        elif e.kind == "in_place":
            try:
                rows.append(ModelListing(e.name, "embedded", entry_path(e), "ready", **common))
            except ModelNotFound as err:
                rows.append(ModelListing(e.name, "embedded", None, f"broken: {err}", **common))
        elif e.store_path.is_file() and read_provenance(e.store_path):
            rows.append(ModelListing(e.name, "embedded", e.store_path, "ready", **common))
        else:
            rows.append(ModelListing(e.name, "embedded", None, "installed; assembled on first use", **common))
    from .sources import shown_url  # a presigned URL's signature is not for listings

    for name, path in store_variants().items():
        if name in CATALOG or first_of(path) is not None:  # a split model's row is its first shard's
            continue
        prov = read_provenance(path) or {}
        desc = (prov.get("provenance") or {}).get("description") or shown_url(str(prov.get("url") or ""))
        rows.append(ModelListing(name, "store", path, "ready", description=str(desc)))
    from .partial import partial_status

    d = models_dir(create=False)
    for part in sorted(d.glob("*.gguf.part")):
        name = part.name[:-len(".gguf.part")]
        if _NAME_RE.match(name) and not (d / f"{name}.gguf").is_file():  # a --force re-pull: the row above
            rows.append(ModelListing(name, "store", None, partial_status(name, part)))
    return rows
