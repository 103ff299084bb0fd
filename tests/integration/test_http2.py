"""HTTP/2 to clients, end to end: curl --http2, httpx with HTTP/2 and h2load through the
proxy, each stream one HTTP/1.1 request to a real upstream on loopback."""

from __future__ import annotations

import json
import shutil
import ssl
import subprocess
from pathlib import Path

import httpx
import pytest
import trustme

from tests.support import ProxyFactory, RecordingUpstream
from tests.support.http import write_ca


def _trusting(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


needs_curl = pytest.mark.skipif(
    shutil.which("curl") is None, reason="setup.sh --test installs curl"
)


@needs_curl
def test_curl_speaks_http2_through_the_proxy(
    proxy_factory: ProxyFactory, ca: trustme.CA, upstream: RecordingUpstream, tmp_path: Path
) -> None:
    proxy = proxy_factory("ec256")
    result = subprocess.run(
        [
            "curl",
            "-sS",
            "--http2",
            "--cacert",
            str(write_ca(ca, tmp_path)),
            "-H",
            "X-Forwarded-For: 203.0.113.9",
            "-w",
            "\n%{http_version} %{http_code}",
            f"{proxy.url}/h2/curl?x=1",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    body, _, last = result.stdout.rpartition("\n")
    assert last == "2 200"
    seen = json.loads(body)
    assert seen["path"] == "/h2/curl?x=1"
    headers = {name.lower(): value for name, value in seen["headers"].items()}
    assert headers["host"] == f"localhost:{proxy.port}"  # from :authority
    assert headers["x-forwarded-for"] == "203.0.113.9, 127.0.0.1"
    assert headers["x-forwarded-proto"] == "https"
    access = proxy.wait_for_log(lambda entry: entry.get("path") == "/h2/curl?x=1")
    assert access["protocol"] == "HTTP/2"
    assert access["stream_id"] == 1
    assert access["status"] == 200


def test_httpx_http2_posts_and_gets_on_one_connection(
    proxy_factory: ProxyFactory, ca: trustme.CA, upstream: RecordingUpstream, tmp_path: Path
) -> None:
    proxy = proxy_factory("ec256")
    with httpx.Client(http2=True, verify=_trusting(ca), http1=False) as client:
        posted = client.post(f"{proxy.url}/upload", content=b"x" * 100_000)
        assert posted.http_version == "HTTP/2"
        assert posted.status_code == 200
        assert posted.json()["body_length"] == 100_000
        for number in range(5):
            answer = client.get(f"{proxy.url}/get/{number}", headers={"Cookie": "a=1"})
            assert answer.json()["path"] == f"/get/{number}"
    assert proxy.signatures() == 1
    assert [request.path for request in upstream.requests] == [
        "/upload",
        *(f"/get/{number}" for number in range(5)),
    ]
