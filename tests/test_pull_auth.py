"""A URL's user:password goes as HTTP Basic auth (as curl, wget and llama.cpp's -mu send it) and is never shown nor
recorded; a host name that does not resolve fails at once (no four tries with back-off); a presigned URL's
signature is not shown by `ondevice models`. A real HTTP server on 127.0.0.1 (test_pull's) and the real CLI."""

from __future__ import annotations

import base64
import time

import pytest
from test_pull import make_gguf


def test_userinfo_is_sent_as_basic_auth_and_never_shown(server, tmp_path, cli):
    server.files["/cdn/m.gguf"] = make_gguf(tmp_path / "m.gguf").read_bytes()
    port = server.base.rsplit(":", 1)[1]
    r = cli("pull", f"http://bob:SECRET%40PW@127.0.0.1:{port}/cdn/m.gguf", "--name", "ui")
    assert r.returncode == 0, r.stderr
    sent = {e["auth"] for e in server.gets("/cdn/m.gguf")}
    assert sent == {"Basic " + base64.b64encode(b"bob:SECRET@PW").decode()}
    listed = cli("models", "--json")
    home = tmp_path / "home" / "models"
    for text in (r.stdout + r.stderr, listed.stdout, *(p.read_text() for p in home.glob("*.json"))):
        assert "SECRET" not in text
    again = cli("pull", f"http://bob:SECRET%40PW@127.0.0.1:{port}/cdn/m.gguf", "--name", "ui")
    assert again.returncode == 0 and "already in the store" in again.stderr, again.stderr  # the same source
    server.files["/cdn/m.gguf.sha256"] = b""
    missing = cli("pull", f"http://bob:SECRET%40PW@127.0.0.1:{port}/cdn/nope.gguf", "--retries", "0")
    assert missing.returncode != 0 and "HTTP 404" in missing.stderr and "SECRET" not in missing.stderr


def test_a_host_that_does_not_resolve_is_not_retried(cli):
    t0 = time.monotonic()
    r = cli("pull", "http://bob:SECRETPW@no-such-host.invalid/m.gguf", "--retries", "3")
    assert r.returncode != 0 and "cannot resolve the host name 'no-such-host.invalid'" in r.stderr, r.stderr
    assert "retrying" not in r.stderr and "SECRET" not in r.stderr and time.monotonic() - t0 < 20


def test_a_presigned_urls_signature_is_not_listed(server, tmp_path, cli):
    server.files["/p/m.gguf?X-Amz-Signature=SIGSECRET&X-Amz-Expires=300"] = make_gguf(tmp_path / "m.gguf").read_bytes()
    r = cli("pull", f"{server.base}/p/m.gguf?X-Amz-Signature=SIGSECRET&X-Amz-Expires=300", "-q")
    assert r.returncode == 0, r.stderr
    listed = cli("models", "--json")
    assert listed.returncode == 0 and "SIGSECRET" not in listed.stdout
    assert f"{server.base}/p/m.gguf?X-Amz-Signature=***&X-Amz-Expires=***" in listed.stdout


def _self_signed(folder) -> tuple[str, str]:
    """A certificate for 127.0.0.1 signed by itself, as a TLS-inspecting proxy's CA would be: (cert, key) paths."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "corp-proxy-ca")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = folder / "ca.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return str(cert_path), str(key_path)


def test_behind_a_tls_inspecting_proxy_requests_ca_bundle_is_trusted(server, tmp_path, cli, monkeypatch):
    """huggingface-cli and pip trust REQUESTS_CA_BUNDLE; a certificate failure is not retried as "cannot reach"."""
    import ssl

    pytest.importorskip("cryptography")
    cert, key = _self_signed(tmp_path)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    server.httpd.socket = ctx.wrap_socket(server.httpd.socket, server_side=True)
    server.files["/m/t.gguf"] = make_gguf(tmp_path / "t.gguf").read_bytes()
    url = f"https://127.0.0.1:{server.port}/m/t.gguf"
    for var in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "SSL_CERT_FILE"):
        monkeypatch.delenv(var, raising=False)
    refused = cli("pull", url, "--retries", "3")
    assert refused.returncode != 0 and "retrying" not in refused.stderr, refused.stderr
    assert "the certificate of 127.0.0.1" in refused.stderr and "REQUESTS_CA_BUNDLE" in refused.stderr
    for var in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"):
        ok = cli("pull", url, "--name", f"t-{var.lower()}", "-q", env={var: cert})
        assert ok.returncode == 0, ok.stderr
    bad = cli("pull", url, "--name", "t3", env={"REQUESTS_CA_BUNDLE": str(tmp_path / "none.pem")})
    assert bad.returncode != 0 and "cannot read it as a CA bundle" in bad.stderr, bad.stderr


def test_a_busy_server_is_tried_again_after_the_wait_it_asks(server, tmp_path, monkeypatch):
    """HF's CDN answers 503 now and then and rate-limits with 429 + Retry-After; --retries covers them too."""
    from ondevice.models import DownloadInterrupted, pull

    monkeypatch.setenv("ONDEVICE_HOME", str(tmp_path / "home"))
    server.files["/m/b.gguf"] = body = make_gguf(tmp_path / "b.gguf").read_bytes()
    server.busy = [(503, {"Retry-After": "1"}), (502, {})]
    t0 = time.monotonic()
    assert pull(f"{server.base}/m/b.gguf", retries=3, progress=False).read_bytes() == body
    assert time.monotonic() - t0 >= 1 and [e["status"] for e in server.gets("/m/b.gguf")] == [503, 502, 200]
    server.busy = [(429, {"Retry-After": "0"})] * 2
    with pytest.raises(DownloadInterrupted, match=r"HTTP 429 Too Many Requests; retry later$"):
        pull(f"{server.base}/m/b.gguf", name="b2", retries=1, progress=False)
    assert server.busy == []  # asked twice: once and one retry
