"""HTTP for pulls: a URL opened with the Hub's token (and a URL's own Basic auth), redirects that keep a HEAD a
HEAD, the CA bundles a TLS-inspecting proxy needs, which failures are worth trying again, and what a server says
about its file (ETag, X-Linked-Etag, a ``.sha256`` beside it). :mod:`ondevice.models.hub` downloads with it."""

from __future__ import annotations

import http.client
import os
import re
import socket
import ssl
import urllib.error
import urllib.parse
import urllib.request
from email.utils import parsedate_to_datetime
from pathlib import Path

from ..errors import OndeviceError
from .sources import hf_endpoint, hub_offline

_SHA_RE = re.compile(r"^[0-9a-f]{64}$")
_CHUNK = 1 << 20
_OVERLAP = 4096  # bytes a resumed range re-reads and compares with the end of the partial file
_NETWORK_ERRORS = (urllib.error.URLError, http.client.HTTPException, ConnectionError, socket.timeout, TimeoutError)


class DownloadInterrupted(OndeviceError):
    """The connection dropped or stalled, or the server is busy; the partial file is kept so a rerun resumes.
    ``wait``: the seconds the server asked for before the next try (Retry-After), if any."""

    wait: float | None = None
    busy = False  # the server answered, busy (429, 5xx): the URL and the network are fine


_BUSY = (429, 500, 502, 503, 504)  # rate limits and a CDN's passing errors: tried again, as huggingface_hub does
_MAX_WAIT = 60.0  # the longest Retry-After honoured within one pull


def _busy(e: urllib.error.HTTPError) -> DownloadInterrupted:
    """A busy server's answer as a retryable interruption that waits as long as it asked (capped)."""
    err = DownloadInterrupted(f"the server answered HTTP {e.code} {e.reason}")
    after = (e.headers.get("Retry-After") or "").strip() if e.headers else ""
    err.wait, err.busy = (min(float(after), _MAX_WAIT) if after.isdigit() else None), True
    return err


class _Redirects(urllib.request.HTTPRedirectHandler):
    """Follows redirects, remembering HF's X-Linked-* headers and dropping credentials on a change of host,
    scheme or port (:func:`_strip_auth`)."""

    def __init__(self) -> None:
        self.linked: dict[str, str] = {}

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        for k in ("X-Linked-Etag", "X-Linked-Size"):
            if headers.get(k):
                self.linked[k] = headers[k]
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None and req.get_method() == "HEAD":  # urllib's own would follow a HEAD with a GET
            new.method = "HEAD"
        if new is not None and _strip_auth(req.full_url, newurl):
            new.headers.pop("Authorization", None)
            new.unredirected_hdrs.pop("Authorization", None)
        return new


def _strip_auth(old_url: str, new_url: str) -> bool:
    """Whether a redirect from ``old_url`` to ``new_url`` must drop credentials, by requests' rule (what
    huggingface_hub uses): another host, scheme or port, except http to https on the default ports. An https to
    http redirect on the same host (a downgrade) would send the token in clear text."""
    old, new = urllib.parse.urlsplit(old_url), urllib.parse.urlsplit(new_url)
    if old.hostname != new.hostname:
        return True
    default = {"http": 80, "https": 443}
    try:
        old_port, new_port = old.port or default.get(old.scheme), new.port or default.get(new.scheme)
    except ValueError:  # a port out of range: not one to trust with the token
        return True
    if (old.scheme, new.scheme) == ("http", "https") and (old_port, new_port) == (80, 443):
        return False
    return old.scheme != new.scheme or old_port != new_port


def _sha_from_etag(value: str | None) -> str | None:
    if not value:
        return None
    v = value.strip()
    v = v.removeprefix("W/")
    v = v.strip('"').lower()
    return v if _SHA_RE.match(v) else None


def _strong_validator(headers) -> str | None:
    """What If-Range may carry (RFC 9110 13.1.5): a strong ETag, or else a Last-Modified date that is at least a
    second older than the response's Date (a file changed within that second could share the date)."""
    etag = headers.get("ETag")
    if etag:
        return None if etag.strip().startswith("W/") else etag.strip()
    modified, date = headers.get("Last-Modified"), headers.get("Date")
    try:
        if modified and date and (parsedate_to_datetime(date) - parsedate_to_datetime(modified)).total_seconds() >= 1:
            return modified
    except (TypeError, ValueError):
        pass
    return None


def _tls() -> list[urllib.request.BaseHandler]:
    """An HTTPS handler trusting the CA bundle that requests (huggingface-cli, pip) and curl are told of, as
    corporate TLS-inspecting proxies need (SSL_CERT_FILE is OpenSSL's own, read anyway); none when unset."""

    var = next((v for v in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE") if os.environ.get(v)), None)
    if var is None:
        return []
    try:
        return [urllib.request.HTTPSHandler(context=ssl.create_default_context(cafile=os.environ[var]))]
    except (OSError, ssl.SSLError) as e:
        raise OndeviceError(f"{var}={os.environ[var]}: cannot read it as a CA bundle ({e}); point it at a PEM "
                            f"file of certificates, or unset it") from None


def _open(url: str, headers: dict[str, str], timeout: float,
          method: str = "GET") -> tuple[http.client.HTTPResponse, dict[str, str]]:
    redirects = _Redirects()
    opener = urllib.request.build_opener(redirects, *_tls())
    req = urllib.request.Request(url, headers={"User-Agent": "ondevice", **headers}, method=method)
    resp = opener.open(req, timeout=timeout)
    return resp, redirects.linked


def hf_token() -> str | None:
    """The Hugging Face token where huggingface_hub finds it, so a `huggingface-cli login` (or `hf auth login`)
    serves gated pulls too: HF_TOKEN, the legacy HUGGING_FACE_HUB_TOKEN, then the file the login wrote,
    $HF_TOKEN_PATH, else $HF_HOME/token (HF_HOME: $XDG_CACHE_HOME/huggingface, ~/.cache/huggingface). Never shown."""
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        if token := os.environ.get(var, "").strip():
            return token
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    path = Path(os.environ.get("HF_TOKEN_PATH") or os.path.join(home, "token")).expanduser()
    try:
        return path.read_text(encoding="utf-8").strip() or None
    except (OSError, UnicodeDecodeError):
        return None


def _auth_headers(url: str, login: dict[str, str] | None = None) -> dict[str, str]:
    """The URL's own user:password (``login``, from ``split_userinfo``) if it had one, else the Hub token for the
    Hub's (HF_ENDPOINT's) host only: never sent to another server (redirects drop it on a host change)."""
    if login:
        return dict(login)
    if urllib.parse.urlsplit(url).netloc == urllib.parse.urlsplit(hf_endpoint()).netloc and (token := hf_token()):
        return {"Authorization": f"Bearer {token}"}
    return {}


def _refuse_definite(url: str, e: Exception) -> None:
    """Raise the network errors that a retry cannot mend, at once and with their fix: a host name that does not
    resolve (a typo), a certificate not trusted (a TLS-inspecting proxy's: its CA bundle is not given)."""

    reason = getattr(e, "reason", None)
    host = urllib.parse.urlsplit(url).netloc
    if isinstance(reason, socket.gaierror):
        raise OndeviceError(f"download of {url} failed: cannot resolve the host name {host!r} ({reason.strerror}); "
                            f"check the URL and the network") from None
    if isinstance(reason, ssl.SSLCertVerificationError):
        raise OndeviceError(f"download of {url} failed: the certificate of {host} is not trusted ({reason.reason}: "
                            f"{reason.verify_message}); behind a TLS-inspecting proxy point SSL_CERT_FILE (or "
                            f"REQUESTS_CA_BUNDLE) at its CA bundle") from None


def _changed_upstream(url: str, have: str, sha256: str | None, timeout: float, login: dict[str, str]) -> str | None:
    """The sha256 the server announces for ``url`` now (HF's X-Linked-Etag, a sha256 ETag: one HEAD) when it differs
    from the stored file's ``have``, so that pulling again updates a re-uploaded file (as ``ollama pull`` and
    huggingface_hub do); None when it is the same, unknown, pinned by ``sha256``, or cannot be asked (offline)."""
    if sha256 is not None or hub_offline():
        return None
    try:
        resp, linked = _open(url, _auth_headers(url, login), timeout, method="HEAD")
        with resp:
            now = _sha_from_etag(linked.get("X-Linked-Etag") or resp.headers.get("X-Linked-Etag")) or \
                _sha_from_etag(resp.headers.get("ETag"))
    except (*_NETWORK_ERRORS, ValueError, OndeviceError):
        return None
    return now if now not in (None, have) else None


def _fetch_sidecar_sha(url: str, timeout: float, login: dict[str, str]) -> str | None:
    """sha256 from ``<url>.sha256`` if the server has one (``sha256sum`` format or a bare hash)."""
    try:
        resp, _ = _open(url + ".sha256", _auth_headers(url, login), timeout)
        with resp:
            text = resp.read(4096).decode("ascii", errors="replace")
    except (*_NETWORK_ERRORS, ValueError):
        return None
    token = text.split()[0].lower() if text.split() else ""
    return token if _SHA_RE.match(token) else None
