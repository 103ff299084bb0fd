"""Example: test your service through HTTPS whose key lives in a SoftHSM2 token.

The hsm-proxy pytest plugin (installed with the package) provides the fixtures; run this
file with `pytest examples/test_behind_hsm_tls.py` from a venv where hsm-proxy is installed.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from proxy.pytest_plugin import HSMEndpoint


class Hello(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = json.dumps({"path": self.path, "proto": self.headers["X-Forwarded-Proto"]})
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body.encode())

    def log_message(self, format: str, *args: object) -> None:
        return


@pytest.fixture
def hsm_proxy_upstream() -> Iterator[str]:
    """The service under test; the plugin puts an HSM-backed TLS endpoint in front of it."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), Hello)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_service_over_hsm_tls(hsm_tls_endpoint: HSMEndpoint) -> None:
    response = httpx.get(f"{hsm_tls_endpoint.url}/hello", verify=hsm_tls_endpoint.ssl_context())
    assert response.status_code == 200
    assert response.json() == {"path": "/hello", "proto": "https"}
    # The key-usage audit trail: one token signature for this connection's handshake.
    audit = [
        line for line in hsm_tls_endpoint.log_lines() if line.get("event") == "token_signature"
    ]
    assert [line["result"] for line in audit if "connection_id" in line] == ["ok"]
