"""What the user gave ``ondevice pull``, as what to fetch: an ``hf://`` address, an http(s) URL (a Hugging Face
page address too), a catalog name; or why it is none of those (a local file, a stored model, a typo)."""

from __future__ import annotations

import os
import re
import urllib.parse
from pathlib import Path

from ..errors import InvalidArgument, ModelNotFound
from .catalog import _ALIASES, _NAME_RE, CATALOG, CatalogEntry, did_you_mean, read_provenance, store_variants
from .hf_repo import HOSTS, bare_repo_hint, file_url, holds_quant, hub_file, parse_repo
from .store import models_dir

PULL_ON_USE = False  # the command line sets it: a download address given as a model is pulled when missing
# Ollama's library names: NAME:TAG (qwen2.5:0.5b, a tag after a name with no "/"), or its registry's address
_OLLAMA_RE = re.compile(r"^((https?://)?registry\.ollama\.ai/|ollama\.com/library/|[a-z][\w.-]*:[\w.-]+$)",
                        re.IGNORECASE)


def _same_repo(a, b) -> bool:
    return ((a.repo_id.lower(), a.quant.upper(), a.revision or "main")
            == (b.repo_id.lower(), b.quant.upper(), b.revision or "main"))


def pulled(address: str) -> Path | None:
    """The stored model that ``ondevice pull ADDRESS`` put in the store (its recorded source), or None; no network.
    A repository's split quant is found by its first shard only: a later shard alone (its first still downloading,
    or interrupted) is not the model, and a pull of the address then resumes it."""
    from .gguf_split import SHARD_NAME

    repo = parse_repo(address) is not None
    for path in store_variants().values():
        if repo and (m := SHARD_NAME.match(path.name)) and int(m["no"]) > 1:
            continue
        prov = read_provenance(path) or {}
        if prov.get("source") == "pull" and same_source(address, prov.get("url"), prov.get("requested"),
                                                         prov.get("resolved_url")):
            return path
    return None


def same_source(address: str, url: object, requested: object = None, resolved: object = None) -> bool:
    """Whether a download recorded as ``url`` (pull's file address; ``requested``: what the user gave, ``resolved``:
    the URL fetched) is what ``address`` names. A repository and a quant (``hf.co/O/R:Q4_K_M``, ``hf://O/R``,
    ``-hf O/R``'s form) names a pull of the same repository, quant (any case; no tag is Q4_K_M) and revision (none
    is main), or a file of that repository whose name holds the quant; a Hub file's address names that file however
    either was spelled (hf://, hf.co, huggingface.co, /blob/ or /resolve/, a query); another URL the same URL."""
    url, requested = str(url or ""), str(requested or "")
    address = split_userinfo(address)[0]  # pull records the URL without its password
    got_file = hub_file(url)
    if (ref := parse_repo(address)) is not None:
        got = parse_repo(requested, bare=True)
        if got is not None:
            return _same_repo(got, ref)
        return (got_file is not None and got_file[:2] == (ref.repo_id.lower(), ref.revision or "main")
                and holds_quant(got_file[2], ref.quant))
    if (want := hub_file(address)) is not None:
        return want == got_file
    try:
        return address in (url, requested) or parse_source(address)[0] == resolved
    except InvalidArgument:
        return False


def address_path(address: str) -> Path:
    """The stored file of a download address given as a model: pulled before (found offline), or pulled now where
    the command line allows it (as ``ollama run hf.co/...`` and llama-cli's ``-hf`` do)."""
    if (path := pulled(address)) is not None:
        return path
    if not PULL_ON_USE:
        raise ModelNotFound(f"{address} is a download address, not a model here yet; fetch it first (`ondevice pull "
                            f"{address}`, or ondevice.pull() in Python), then give the address or the name it prints")
    import sys

    from .gguf_split import shard_urls
    from .hub import pull

    shards = shard_urls(address) if parse_repo(address) is None else None
    if shards is not None and shards[0] > 1:  # pulled alone it could not run: say which address runs it
        raise InvalidArgument(f"{address} is shard {shards[0]} of {len(shards[1])} of a split model, which runs from "
                              f"its first shard: give {shards[1][0]} (its other shards come with it)")
    refuse_offline(address)
    print(f"ondevice: {address} is not in the store yet: pulling it", file=sys.stderr)
    return pull(address)


def hf_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


OFFLINE_FLAG: str | None = None  # llama-cli's and llama-server's --offline as this command gave it (the CLI sets it)


def hub_offline() -> bool:
    """Whether HF_HUB_OFFLINE is set true (as huggingface_hub reads it: 1, ON, YES, TRUE), or the command was given
    --offline: a machine kept off the network (air-gapped CI, a metered link) downloads nothing, not even a
    multi-GB pull-on-use."""
    return OFFLINE_FLAG is not None or os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES",
                                                                                                "TRUE")


def refuse_offline(address: str, *, forced: bool = False) -> None:
    """Raise if :func:`hub_offline`: ``address`` may not be downloaded (``forced``: again, by --force)."""
    if hub_offline():
        cause, undo = ((OFFLINE_FLAG, f"drop {OFFLINE_FLAG}") if OFFLINE_FLAG is not None else
                       (f"HF_HUB_OFFLINE={os.environ['HF_HUB_OFFLINE']}", "unset HF_HUB_OFFLINE"))
        what = "downloading it again (--force)" if forced else "downloading it"
        raise ModelNotFound(f"{address} is {'in the store' if forced else 'not in the store'}, and {cause} "
                            f"forbids {what}; pull it where the network is allowed ({undo}), "
                            f"or give a model in the store (`ondevice models` lists them)")


def split_userinfo(url: str) -> tuple[str, dict[str, str]]:
    """``(url without user:password@, its HTTP Basic Authorization header)``, as curl and wget send a URL's
    userinfo (a private artifact server, a Nexus mirror); the URL kept, shown and recorded never holds the
    password. ``(url, {})`` for a URL without userinfo."""
    import base64

    try:
        parts = urllib.parse.urlsplit(url) if url.lower().startswith(("http://", "https://")) else None
    except ValueError:  # "Invalid IPv6 URL": parse_source says what is wrong with it
        return url, {}
    if parts is None or "@" not in parts.netloc:
        return url, {}
    userinfo, _, host = parts.netloc.rpartition("@")
    user, _, password = userinfo.partition(":")
    pair = f"{urllib.parse.unquote(user)}:{urllib.parse.unquote(password)}".encode()
    return (urllib.parse.urlunsplit(parts._replace(netloc=host)),
            {"Authorization": "Basic " + base64.b64encode(pair).decode("ascii")})


def shown_url(url: str) -> str:
    """A URL as listings show it: a password in it, or a presigned query's values (``X-Amz-Signature=...``,
    ``token=...``), as ``***``."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return url
    netloc = f"***@{parts.netloc.rpartition('@')[2]}" if "@" in parts.netloc else parts.netloc
    query = "&".join(f"{k.partition('=')[0]}=***" if "=" in k else k for k in parts.query.split("&")) \
        if parts.query else ""
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc, query=query))


def parse_source(url: str) -> tuple[str, str]:
    """``(http_url, default_name)`` for an ``hf://`` or http(s) URL (``huggingface.co/...`` without a scheme too)."""
    given = url
    if url.lower().startswith(HOSTS):  # copied from the browser's address bar, which hides https://
        url = "https://" + url
    if url[:5].lower() == "hf://":
        parts = url[len("hf://"):].strip("/").split("/")
        if len(parts) < 3 or not all(parts):
            raise InvalidArgument(f"{url!r} is not an hf:// model URL; use hf://owner/repo/path/file.gguf "
                                  f"(optionally hf://owner/repo@revision/file.gguf), or hf://owner/repo:QUANT")
        owner, repo, path = parts[0], parts[1], parts[2:]
        repo, _, revision = repo.partition("@")
        quoted = "/".join(urllib.parse.quote(p) for p in path)
        http_url = f"{hf_endpoint()}/{owner}/{repo}/resolve/{urllib.parse.quote(revision or 'main', safe='')}/{quoted}"
        filename = path[-1]
    elif url.startswith(("http://", "https://")):
        try:
            http_url = file_url(url, given)
            filename = urllib.parse.unquote(urllib.parse.urlsplit(url).path.rstrip("/").rsplit("/", 1)[-1])
        except ValueError as e:  # "Invalid IPv6 URL"
            raise InvalidArgument(f"cannot download {url!r}: {e}; check the URL") from None
    else:
        raise InvalidArgument(_not_a_source(url))
    stem = filename[:-5] if filename.lower().endswith(".gguf") else filename
    name = re.sub(r"[^A-Za-z0-9._+-]+", "-", stem).strip("-.") or "model"
    return http_url, name


def catalog_entry(word: str) -> CatalogEntry | None:
    """The catalog model ``word`` names (a name or an alias), or None."""
    return CATALOG.get(_ALIASES.get(word, word))


def _not_a_source(word: str) -> str:
    """Why ``word`` cannot be pulled, and what would work: a close catalog name, hf://, or the local file."""
    fix = ("use hf.co/OWNER/REPO:QUANT (a Hugging Face GGUF repository, as Ollama pulls one), hf://owner/repo/"
           "file.gguf, an http(s):// URL or a catalog name (`ondevice models` lists them)")
    if word.lower().startswith("file:"):  # a URL of a file here: no download, the file is used where it is
        from urllib.parse import unquote, urlsplit

        local = unquote(urlsplit(word).path)
        there = "" if Path(local).is_file() else f" (there is no file {local})"
        return (f"cannot download {word!r}: file: URLs are not downloaded; a .gguf on this machine is used where it "
                f"is, by its path{there}: ondevice run -m {local} ...")
    path = Path(word).expanduser()
    if path.is_file():
        return (f"{word} is a local file: there is nothing to download; use it as it is (ondevice run -m {word} "
                f"...), or check it with `ondevice models {word}`")
    if _OLLAMA_RE.match(word):  # qwen2.5:0.5b, llama3.2, registry.ollama.ai/library/...: Ollama's registry
        return (f"cannot download {word!r}: Ollama's library is not a source here (its blobs are not plain GGUF "
                f"files); the same model's GGUF on Hugging Face is pulled as Ollama pulls it from there, "
                f"hf.co/OWNER/REPO:QUANT (e.g. hf.co/bartowski/Qwen2.5-0.5B-Instruct-GGUF:Q4_K_M)")
    if re.match(r"[\w-]+(\.[\w-]+)+(:\d+)?/|localhost(:\d+)?/|[\d.]+:\d+/", word):  # a host: a URL without its scheme
        return f"cannot download {word!r}: no such local file; a web address is written https://{word}"
    if word.count("/") >= 2 and not word.startswith(("/", ".", "~")):
        return f"cannot download {word!r}: no such local file; a Hugging Face file is written hf://{word.strip('/')}"
    if _NAME_RE.match(word) and (stored := models_dir(create=False) / f"{word}.gguf").is_file():
        prov = read_provenance(stored) or {}
        again = f"`ondevice pull {prov['url']} --force`" if prov.get("url") else "its URL with --force"
        return f"{word} is already in the store ({stored}); use it as it is, or download it again with {again}"
    if repo := bare_repo_hint(word):
        return f"cannot download {word!r}: no such local file{repo}"
    close = did_you_mean(word)
    hint = f"did you mean '{close}'? " if close else ""
    return f"cannot download {word!r}: not a catalog model nor a URL; {hint}{fix}"
