"""models/hub_http: a redirect keeps the Hub token only where requests (huggingface_hub) keeps it."""

from __future__ import annotations

import io
import urllib.request
from email.message import Message

import pytest

from ondevice.models.hub_http import _Redirects, _strip_auth

HF = "https://huggingface.co/o/r/resolve/main/m.gguf"


@pytest.mark.parametrize("new, dropped", [
    ("http://huggingface.co/o/r/resolve/main/m.gguf", True),  # a downgrade: the token would go in clear text
    ("https://cdn-lfs.huggingface.co/m.gguf", True),  # another host
    ("https://huggingface.co:8443/m.gguf", True),  # another port
    ("https://huggingface.co/api/resolve-cache/m.gguf", False),  # the same origin
    ("https://huggingface.co:443/m.gguf", False),  # the default port written out
])
def test_redirect_drops_the_token_on_a_change_of_origin(new, dropped):
    req = urllib.request.Request(HF, headers={"Authorization": "Bearer hf_SECRET"})
    out = _Redirects().redirect_request(req, io.BytesIO(), 302, "Found", Message(), new)
    assert (out.get_header("Authorization") is None) == dropped


def test_http_to_https_on_the_default_ports_keeps_it():
    assert not _strip_auth("http://hub.example/m", "https://hub.example/m")
    assert _strip_auth("http://hub.example:8080/m", "https://hub.example/m")
    assert _strip_auth("https://hub.example/m", "http://hub.example/m")
    assert _strip_auth("https://hub.example/m", "https://hub.example:99999/m")  # no port at all: dropped, no error
