"""Text corpora for perplexity and KL divergence: a file, or one of two built-in texts.

Every corpus says exactly what it is (name, sha256 of its UTF-8 bytes, number of characters), so a
perplexity figure can always be traced to the text it was measured on.

- ``lee``: gensim's ``test/test_data/lee_background.cor`` (the Lee news background corpus, 300 short
  Australian news stories, ~360 KB). It is found on disk through the import system *without importing
  gensim* (importing it pulls in scipy). gensim is not a light dependency (a 28 MB wheel plus scipy), so
  it is optional: without it ``lee`` is an error that says how to get the file.
- ``pydoc``: Python's own ``pydoc_data.topics.topics`` (the language reference topics that ``help()``
  shows), joined in sorted key order. Always available, but it changes with the Python version; the
  sha256 tells which text was used.
"""

from __future__ import annotations

import hashlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path

from ..errors import InvalidArgument, OndeviceError

BUILTIN = ("lee", "pydoc")
_LEE_RELPATH = ("test", "test_data", "lee_background.cor")


@dataclass(frozen=True, slots=True)
class Corpus:
    """A text and where it came from."""

    name: str
    text: str
    source: str  # a path or a description of where the text was read from

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()

    @property
    def chars(self) -> int:
        return len(self.text)

    def describe(self) -> dict:
        return {"name": self.name, "sha256": self.sha256, "chars": self.chars, "source": self.source}


def lee_path() -> Path | None:
    """Where gensim's lee_background.cor is, found without importing gensim; None when absent."""
    try:
        spec = importlib.util.find_spec("gensim")  # a top-level name: locating it runs no gensim code
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        path = Path(root).joinpath(*_LEE_RELPATH)
        if path.is_file():
            return path
    return None


def lee() -> Corpus:
    path = lee_path()
    if path is None:
        raise OndeviceError(
            "the 'lee' corpus is gensim's test/test_data/lee_background.cor and gensim is not installed; "
            "pip install gensim (large: pulls in scipy), or take that file from the gensim wheel and pass "
            "--text FILE, or use --corpus pydoc")
    return Corpus("lee", path.read_text(encoding="utf-8"), str(path))


def pydoc() -> Corpus:
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in sorted(topics))
    import sys

    return Corpus("pydoc", text, f"pydoc_data.topics (Python {sys.version.split()[0]}), sorted keys")


def from_file(path: str | Path) -> Corpus:
    p = Path(path).expanduser()
    if not p.is_file():
        raise InvalidArgument(f"--text {str(p)!r} is not a file; give the path of a UTF-8 text file")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise InvalidArgument(f"--text {str(p)!r} is not UTF-8 text ({e.reason} at byte {e.start}); "
                              f"convert it to UTF-8 first") from None
    if not text.strip():
        raise InvalidArgument(f"--text {str(p)!r} is empty; give a file with some text")
    return Corpus(p.stem, text, str(p.resolve()))


def load_corpus(corpus: str | None = None, text_file: str | Path | None = None) -> Corpus:
    """``text_file`` if given, else the built-in corpus by name (default ``pydoc``: always available)."""
    if text_file is not None:
        return from_file(text_file)
    name = corpus or "pydoc"
    if name == "lee":
        return lee()
    if name == "pydoc":
        return pydoc()
    if Path(name).expanduser().is_file():
        return from_file(name)
    raise InvalidArgument(f"--corpus {name!r} is not a corpus; use one of {', '.join(BUILTIN)} or --text FILE")
