"""cascade/cloud: which credentials reach the cloud when its URL holds ``user:pass@`` (a real HTTP server on
loopback records each request's Authorization header)."""

from __future__ import annotations

import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

pytest.importorskip("openai")

from ondevice.cascade.cloud import CloudClient


@pytest.fixture()
def cloud():
    seen: list[str | None] = []

    class H(BaseHTTPRequestHandler):
        def do_GET(self):
            seen.append(self.headers.get("Authorization"))
            body = json.dumps({"object": "list", "data": [{"id": "m", "object": "model", "created": 0,
                                                             "owned_by": "x"}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"alice:s3cret@127.0.0.1:{httpd.server_address[1]}", seen
    httpd.shutdown()
    httpd.server_close()


def test_the_key_variable_wins_over_the_urls_credentials(cloud, monkeypatch):
    where, seen = cloud
    monkeypatch.setenv("TEST_CLOUD_KEY", "sk-KEY")
    assert CloudClient(f"http://{where}/v1", key_env="TEST_CLOUD_KEY").model_id() == "m"
    assert seen[-1] == "Bearer sk-KEY"
    monkeypatch.delenv("TEST_CLOUD_KEY")  # unset: the URL's user:pass, as HTTP Basic
    assert CloudClient(f"http://{where}/v1", key_env="TEST_CLOUD_KEY").model_id() == "m"
    assert seen[-1] == "Basic " + base64.b64encode(b"alice:s3cret").decode()
