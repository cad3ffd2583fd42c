"""A Hugging Face repository and a quant tag (Ollama's ``hf.co/OWNER/REPO:QUANT``, llama.cpp's ``-hf``) as the
``.gguf`` file of it that ``pull`` downloads (or the shards of a split one, as llama.cpp's ``-hf`` fetches them).

The repository's files come from the Hub API (``GET {HF_ENDPOINT}/api/models/OWNER/REPO``, its ``siblings``);
the file chosen is the ``.gguf`` whose name holds the tag as a separate token (``...-Q4_K_M.gguf``,
``...q4_k_m.gguf``, not ``IQ4_K_M``), ``mmproj`` files aside. No tag means ``Q4_K_M``, llama.cpp's default.
A quant stored only as split shards (``-00001-of-00003.gguf``) is all of them, when they are all there.
"""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.parse
from dataclasses import dataclass

from ..errors import InvalidArgument, OndeviceError
from .gguf_split import SHARD_SUFFIX

DEFAULT_TAG = "Q4_K_M"  # llama.cpp's -hf default, as Ollama's hf.co/ without a tag
HOSTS = ("hf.co/", "huggingface.co/", "www.huggingface.co/")  # addresses without https:// too
ADDRESS_RE = re.compile(r"((hf|https?)://|(www\.)?(hf\.co|huggingface\.co)/)\S+$", re.IGNORECASE)
_PART = r"[A-Za-z0-9][A-Za-z0-9._-]*"  # a Hub owner or repository name
_REPO_RE = re.compile(rf"^({_PART})/({_PART})(?:@([^/:\s]+))?(?::([A-Za-z0-9_.+-]+))?/?$")
_SHARD_RE = re.compile(SHARD_SUFFIX, re.IGNORECASE)  # a shard's name in a repository (.GGUF too)
# quant-like tokens in file names, for "the tags found": Q4_K_M, IQ4_XS, Q8_0, TQ1_0, F16, BF16, MXFP4...
_QUANT_RE = re.compile(r"(?<![A-Za-z0-9])((?:I?Q|TQ)\d+(?:_[A-Za-z0-9]+)*|B?F(?:16|32)|MXFP4(?:_MOE)?)(?![A-Za-z0-9])",
                       re.IGNORECASE)


@dataclass(frozen=True)
class RepoRef:
    owner: str
    repo: str
    tag: str | None  # None: DEFAULT_TAG
    revision: str | None = None

    @property
    def repo_id(self) -> str:
        return f"{self.owner}/{self.repo}"

    @property
    def quant(self) -> str:
        return self.tag or DEFAULT_TAG

    @property
    def written(self) -> str:
        """The Ollama form of it, for messages: hf.co/OWNER/REPO:QUANT."""
        return f"hf.co/{self.repo_id}{'@' + self.revision if self.revision else ''}:{self.quant}"


def is_address(word: object) -> bool:
    """Whether ``word`` is where a model downloads from (hf.co/O/R:QUANT, hf://..., http(s)://...), not a name."""
    return isinstance(word, str) and ADDRESS_RE.match(word) is not None


def parse_repo(word: str, *, bare: bool = False) -> RepoRef | None:
    """``word`` as a repository with an optional quant tag, or None when it names a file (or is no such form).

    ``hf.co/O/R[:Q]``, ``huggingface.co/O/R[:Q]`` (with or without https://) and ``hf://O/R[@rev][:Q]`` always;
    ``O/R[:Q]`` only with ``bare`` (llama.cpp's ``-hf`` value).
    """
    w = word.strip()
    low = w.lower()
    if low.startswith(("https://", "http://")) and low.split("://", 1)[1].startswith(HOSTS):
        w, low = w.split("://", 1)[1], low.split("://", 1)[1]
    if low.startswith(HOSTS):
        rest = w.split("/", 1)[1]
    elif low.startswith("hf://"):
        rest = w[len("hf://"):]
    elif bare:
        rest = w
    else:
        return None
    m = _REPO_RE.match(rest)
    if not m or m.group(2).lower().endswith(".gguf"):
        return None
    if m.group(1) in ("api", "datasets", "spaces", "models") and not low.startswith("hf://"):
        return None
    tag = None if (m.group(4) or "").lower() in ("", "latest") else m.group(4)  # Ollama's :latest: the default
    return RepoRef(m.group(1), m.group(2), tag, m.group(3))


def repo_argument(value: str) -> str:
    """llama.cpp's ``-hf OWNER/REPO[:QUANT]`` value as the address ``pull`` takes (``hf.co/OWNER/REPO:QUANT``,
    Ollama's form of a repository's quant)."""
    ref = parse_repo(value, bare=True)
    if ref is None:
        raise InvalidArgument(f"-hf {value}: give a Hugging Face repository, OWNER/REPO[:QUANT] (e.g. "
                              f"-hf bartowski/Qwen2.5-0.5B-Instruct-GGUF:Q4_K_M); a single file is pulled as "
                              f"`ondevice pull hf://OWNER/REPO/FILE.gguf`")
    rev = f"@{ref.revision}" if ref.revision else ""
    return f"hf.co/{ref.repo_id}{rev}" + (f":{ref.tag}" if ref.tag else "")


def bare_repo_hint(word: str) -> str:
    """'; a Hugging Face repository is hf.co/OWNER/REPO:QUANT (or -hf OWNER/REPO:QUANT)' for a word of that form
    without its host (llama.cpp's -hf value pasted as a model), else ''."""
    if is_address(word) or word.lower().endswith(".gguf") or parse_repo(word, bare=True) is None:
        return ""
    return f"; a Hugging Face repository is written hf.co/{word} (or -hf {word}, as llama.cpp's)"


def add_hf_args(p, *, pull: bool = False) -> None:
    """llama.cpp's ``-hf OWNER/REPO[:QUANT]`` and ``-hff FILE``: a model of the Hub, pulled into the store."""
    what = "download" if pull else "the model: pulled into the store when it is not there yet (as llama-cli's -hf)"
    p.add_argument("-hf", "-hfr", "--hf-repo", metavar="OWNER/REPO[:QUANT]",
                   help=f"a Hugging Face repository's file of that quant (default Q4_K_M) as {what}")
    p.add_argument("-hff", "--hf-file", metavar="FILE", help="with -hf: that file of the repository, not the quant's")


def hf_address(args, given: str | None = None) -> str | None:
    """The address ``-hf`` (and ``-hff``) give, as ``pull`` takes it; None without them. ``given`` is the model
    named otherwise (-m, a word), refused beside them: one model per command."""
    repo, file = getattr(args, "hf_repo", None), getattr(args, "hf_file", None)
    if repo is None and file is None:
        return None
    if repo is None:
        raise InvalidArgument(f"-hff {file} names a file of a Hugging Face repository: give the repository with -hf "
                              f"OWNER/REPO too (or the file's address, hf://OWNER/REPO/{file.strip('/')})")
    if given is not None:
        raise InvalidArgument(f"two models: {given} and -hf {repo}; give the model once")
    if file is None:
        return repo_argument(repo)
    ref = parse_repo(repo, bare=True)
    if ref is None:
        repo_argument(repo)  # its error: not a repository
    if ref.tag:
        raise InvalidArgument(f"-hf {repo} -hff {file}: the quant picks a file and -hff names one; give -hf "
                              f"{ref.repo_id} -hff {file}, or drop -hff")
    if not file.lower().endswith(".gguf"):
        raise InvalidArgument(f"-hff {file}: give the repository's .gguf file, as its file list names it")
    rev = f"@{ref.revision}" if ref.revision else ""
    return f"hf://{ref.repo_id}{rev}/{file.strip('/')}"


def _token_re(tag: str) -> re.Pattern[str]:
    # a separate token: no letter or digit before it, none (nor "_", which would extend Q4_K into Q4_K_M) after it
    return re.compile(rf"(?<![A-Za-z0-9]){re.escape(tag)}(?![A-Za-z0-9_])", re.IGNORECASE)


def quant_tags(files: list[str]) -> list[str]:
    """The quant tags the ``.gguf`` file names hold, upper-case, in the order found (for messages)."""
    seen: dict[str, None] = {}
    for f in files:
        for m in _QUANT_RE.finditer(_SHARD_RE.sub(".gguf", f.rsplit("/", 1)[-1])[:-5]):
            seen.setdefault(m.group(1).upper(), None)
    return list(seen)


def choose_files(ref: RepoRef, files: list[str]) -> list[str]:
    """The one ``.gguf`` of ``files`` (the repository's paths) that ``ref``'s quant names, or the shards of its
    one split model (first first); InvalidArgument else."""
    ggufs = [f for f in files if f.lower().endswith(".gguf") and "mmproj" not in f.rsplit("/", 1)[-1].lower()]
    where = ref.written.rsplit(":", 1)[0]
    if not ggufs:
        others = ", ".join(sorted({f.rsplit(".", 1)[-1] for f in files if "." in f} - {"md", "gitattributes"})[:6])
        raise InvalidArgument(f"{where} has no .gguf model files ({others + ' files' if others else 'no files'}); "
                              f"ondevice runs GGUF: look for a -GGUF repository of the model, or convert it with "
                              f"llama.cpp's convert_hf_to_gguf.py")
    tag_re = _token_re(ref.quant)
    hits = [f for f in ggufs if tag_re.search(f[:-5])]
    tags = quant_tags(ggufs)
    found = ", ".join(tags) if tags else "files " + ", ".join(g.rsplit("/", 1)[-1] for g in ggufs[:6])
    if not hits and ref.tag is None and (only := _only_model(where, ref, ggufs)):
        return only  # no Q4_K_M, but one model: nothing to choose (as Ollama's and llama.cpp's hf.co/OWNER/REPO)
    if not hits:
        default = " (the default when no :QUANT is given)" if ref.tag is None else ""
        first = f"hf.co/{ref.repo_id}:{tags[0]}" if tags else f"hf://{ref.repo_id}/{ggufs[0]}"
        raise InvalidArgument(f"{where} has no {ref.quant} file{default}; it has {found}: name one, e.g. "
                              f"`ondevice pull {first}`")
    single = [f for f in hits if not _SHARD_RE.search(f)]
    if len(single) == 1:
        return [single[0]]
    if len(single) > 1:
        names = ", ".join(f"hf://{ref.repo_id}/{f}" for f in single[:6])
        raise InvalidArgument(f"{where}:{ref.quant} matches {len(single)} files; pull one of them by name: {names}")
    return _one_split_set(where, ref, sorted(hits))


def _only_model(where: str, ref: RepoRef, ggufs: list[str]) -> list[str] | None:
    """The repository's one model (its one single .gguf, or the shards of its one split model), or None."""
    single = [f for f in ggufs if not _SHARD_RE.search(f)]
    if single:
        return single if len(single) == 1 and len(ggufs) == 1 else None
    try:
        return _one_split_set(where, ref, sorted(ggufs))
    except InvalidArgument:
        return None


def file_tag(ref: RepoRef, path: str) -> str | None:
    """The quant tag a file picked for ``ref`` is recorded with: ``ref``'s when the file holds it, else the file
    name's own (the repository's only model, picked with no tag given), or None."""
    if holds_quant(_SHARD_RE.sub(".gguf", path), ref.quant):
        return ref.quant
    return next(iter(quant_tags([path])), None)


def _one_split_set(where: str, ref: RepoRef, shards: list[str]) -> list[str]:
    """``shards`` (paths ending in -0000N-of-0000M.gguf) as the files of one split model, first shard first."""
    sets: dict[tuple[str, int], list[str]] = {}
    for f in shards:
        m = _SHARD_RE.search(f)
        sets.setdefault((f[:m.start()], int(m["count"])), []).append(f)  # (path before -0000N, shard count)
    if len(sets) > 1:
        firsts = ", ".join(f"hf://{ref.repo_id}/{v[0]}" for v in list(sets.values())[:4])
        raise InvalidArgument(f"{where}:{ref.quant} matches {len(sets)} split models; pull one by its first shard's "
                              f"address: {firsts}")
    (_, count), files = next(iter(sets.items()))
    if len(files) != count:
        raise InvalidArgument(f"{where}:{ref.quant} is split into {count} files but the repository holds "
                              f"{len(files)} of them ({', '.join(files[:4])}); the model is incomplete there")
    return files


def list_files(ref: RepoRef, timeout: float = 30.0) -> list[str]:
    """The repository's file paths, from the Hub API's ``siblings`` (the token sent to the Hub's host only)."""
    from .hub_http import _NETWORK_ERRORS, _auth_headers, _open
    from .sources import hf_endpoint

    base = hf_endpoint()
    api = f"{base}/api/models/{urllib.parse.quote(ref.owner)}/{urllib.parse.quote(ref.repo)}"
    if ref.revision:
        api += f"/revision/{urllib.parse.quote(ref.revision, safe='')}"
    headers = {**_auth_headers(api), "Accept": "application/json"}
    where = ref.written.rsplit(":", 1)[0]
    try:
        resp, _ = _open(api, headers, timeout)
        with resp:
            body = resp.read(64 << 20)
    except urllib.error.HTTPError as e:
        sent = "Authorization" in headers
        code = e.headers.get("X-Error-Code", "") if e.headers else ""
        if e.code == 404 or code == "RepoNotFound" and sent:
            what = "no such revision" if code == "RevisionNotFound" else "no such repository"
            fix = ("check the owner, the name and the revision after @" if ref.revision else
                   "check the owner and the name (as on its huggingface.co page)")
            raise OndeviceError(f"{where}: {what} on {base} (HTTP {e.code}); {fix}") from None
        if e.code in (401, 403):
            if sent:
                fix = ("the Hugging Face token sent (HF_TOKEN, or the one `huggingface-cli login` saved) was refused "
                       "or has no access to it: check the name, and that the token is valid (huggingface.co/settings/"
                       "tokens) and the repository's licence is accepted")
            else:
                fix = ("check the owner and the name; a private or gated repository needs a token with access "
                       "(huggingface.co/settings/tokens): set HF_TOKEN, or run `huggingface-cli login`")
            raise OndeviceError(f"{where}: not found or not accessible on {base} (HTTP {e.code}); {fix}") from None
        raise OndeviceError(f"{where}: listing its files failed (HTTP {e.code} {e.reason} from {api}); retry "
                            f"later") from None
    except (*_NETWORK_ERRORS, ValueError) as e:
        host = urllib.parse.urlsplit(base).netloc or base
        raise OndeviceError(f"{where}: cannot reach {host} to list its files ({e}); check the network (HF_ENDPOINT "
                            f"selects a Hugging Face mirror), or pull a file you have the address of") from None
    try:
        siblings = json.loads(body)["siblings"]
        return [s["rfilename"] for s in siblings if isinstance(s.get("rfilename"), str)]
    except (ValueError, KeyError, TypeError, AttributeError):
        raise OndeviceError(f"{where}: {api} did not answer with the Hub API's file list (JSON with \"siblings\"); "
                            f"check HF_ENDPOINT (unset: huggingface.co)") from None


def resolve_files(ref: RepoRef, timeout: float = 30.0) -> list[str]:
    """``hf://OWNER/REPO[@rev]/FILE.gguf`` for the file of ``ref``'s quant in the repository (each of its shards,
    the first first, for a split model)."""
    rev = f"@{ref.revision}" if ref.revision else ""
    return [f"hf://{ref.repo_id}{rev}/{path}" for path in choose_files(ref, list_files(ref, timeout))]


def hub_file(address: str) -> tuple[str, str, str] | None:
    """``(owner/repo lower-cased, revision, path in the repository)`` of any spelling of a Hub file's address:
    ``hf://O/R[@rev]/PATH``, ``[https://]hf.co|huggingface.co/O/R[/resolve|/blob/REV]/PATH`` (a query such as
    ``?download=true`` aside) or the resolve URL on HF_ENDPOINT; None for anything else."""
    from .sources import hf_endpoint

    w = address.strip()
    if w[:5].lower() == "hf://":
        owner, _, rest = w[5:].partition("/")
        repo, _, path = rest.partition("/")
        repo, _, rev = repo.partition("@")
        return (f"{owner}/{repo}".lower(), rev or "main", path.strip("/")) if owner and repo and path else None
    if "://" not in w:
        w = "https://" + w
    try:
        parts = urllib.parse.urlsplit(w)
    except ValueError:  # "Invalid IPv6 URL": not a Hub address
        return None
    hosts = {h.rstrip("/") for h in HOSTS} | {urllib.parse.urlsplit(hf_endpoint()).netloc.lower()}
    named = [urllib.parse.unquote(x) for x in parts.path.split("/") if x]
    if parts.netloc.lower() not in hosts or len(named) < 3 or named[0] in ("api", "datasets", "spaces"):
        return None
    if named[2] in ("resolve", "blob"):
        return (f"{named[0]}/{named[1]}".lower(), named[3], "/".join(named[4:])) if len(named) >= 5 else None
    return f"{named[0]}/{named[1]}".lower(), "main", "/".join(named[2:])


def holds_quant(path: str, quant: str) -> bool:
    """Whether a repository's file ``path`` is a model file of that quant tag (as ``choose_files`` picks one)."""
    name = path.rsplit("/", 1)[-1]
    return name.lower().endswith(".gguf") and "mmproj" not in name.lower() and quant.upper() in quant_tags([name])


def file_url(url: str, given: str) -> str:
    """A Hugging Face file's page (``/owner/repo/blob/rev/file``, what the browser shows) as its download link
    (``/resolve/``): the page is HTML, never the model."""
    from .sources import hf_endpoint

    parts = urllib.parse.urlsplit(url)
    hf_hosts = {h.rstrip("/") for h in HOSTS}  # the address forms below are Hugging Face's own
    hub_hosts = hf_hosts | {urllib.parse.urlsplit(hf_endpoint()).netloc.lower()}  # a mirror's /blob/ too
    segments = parts.path.split("/")  # ["", owner, repo, "blob", rev, *path]
    named = [x for x in segments if x]
    if parts.netloc.lower() in hf_hosts and len(named) <= 2 and not url.lower().endswith(".gguf"):
        repo, _, tag = "/".join(named).partition(":")
        if "/" not in repo:  # hf.co/OWNER: a user or organisation, not a repository
            raise InvalidArgument(f"{given} names no repository: give hf.co/OWNER/REPO:QUANT (e.g. hf.co/"
                                  f"bartowski/Qwen2.5-0.5B-Instruct-GGUF:Q4_K_M) or a file, hf://OWNER/REPO/FILE.gguf")
        if ":" in tag:  # hf.co/OWNER/REPO:Q4_K_M:latest: two tags
            raise InvalidArgument(f"{given}: give one tag after the repository, not {tag!r}: hf.co/{repo}:"
                                  f"{tag.split(':')[0]} (a quant) or hf.co/{repo}:latest (the repository's default)")
        raise InvalidArgument(f"{given} is a Hugging Face repository, not a file: `ondevice pull hf.co/"
                              f"{repo or 'OWNER/REPO'}:{tag or 'QUANT'}` picks its file (or name one: "
                              f"hf://{repo or 'OWNER/REPO'}/FILE.gguf)")
    if parts.netloc.lower() in hub_hosts and len(segments) > 5 and segments[3] == "blob":
        segments[3] = "resolve"
    elif (parts.netloc.lower() in hf_hosts and len(named) >= 3 and named[2] not in ("resolve", "raw", "tree")
            and named[0] not in ("api", "datasets", "spaces")):  # hf.co/OWNER/REPO/FILE: hf://'s form, main's file
        segments[3:3] = ["resolve", "main"]
    if parts.netloc.lower() in hf_hosts:  # Hugging Face's own spelling: fetched as hf:// is, from HF_ENDPOINT (a
        # mirror, when set) and with the token (hf.co's redirect to huggingface.co would drop it)
        return hf_endpoint() + urllib.parse.urlunsplit(("", "", "/".join(segments), parts.query, ""))
    return urllib.parse.urlunsplit(parts._replace(path="/".join(segments)))
