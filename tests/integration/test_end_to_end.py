"""HTTPS through token keys, end to end: real clients, a real token, a real upstream."""

from __future__ import annotations

import json
import shutil
import ssl
import subprocess
from pathlib import Path

import httpx
import pytest
import trustme

from tests.support import HSM, ProxyFactory, RecordingUpstream, client_context, https_request

KEYS = ["ec256", "ec384", "rsa2048"]
VERSIONS = {"TLSv1.2": ssl.TLSVersion.TLSv1_2, "TLSv1.3": ssl.TLSVersion.TLSv1_3}


def _s_client(port: int, *args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    """`openssl s_client` against the proxy on loopback, with ``stdin`` as what it sends."""
    return subprocess.run(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", *args],
        input=stdin,
        capture_output=True,
        timeout=30,
        check=False,
    )


@pytest.mark.parametrize("key", KEYS)
def test_stdlib_client_gets_the_upstream_answer_over_tls12_and_tls13(
    key: str, proxy_factory: ProxyFactory, ca: trustme.CA, upstream: RecordingUpstream
) -> None:
    proxy = proxy_factory(key)
    for name, version in VERSIONS.items():
        before = proxy.signatures()
        reply = https_request(proxy.port, client_context(ca, version), path=f"/hello/{key}")
        assert reply.status == 200
        assert reply.tls_version == name
        assert reply.alpn == "http/1.1"
        seen = json.loads(reply.body)
        assert seen["path"] == f"/hello/{key}"
        assert seen["headers"]["X-Forwarded-Proto"] == "https"
        assert seen["headers"]["X-Forwarded-For"] == "127.0.0.1"
        # Exactly one token signature per full handshake (fresh context: no resumption).
        proxy.wait_for_log(
            lambda entry: entry.get("event") is None and entry.get("path") == f"/hello/{key}"
        )
        assert proxy.signatures() == before + 1
    mechanisms = {
        entry["mechanism"] for entry in proxy.lines() if entry.get("event") == "token_signature"
    }
    assert mechanisms <= ({"ECDSA"} if key.startswith("ec") else {"RSA_PKCS", "RSA_X_509"})


def test_request_body_reaches_the_upstream(
    proxy_factory: ProxyFactory, ca: trustme.CA, upstream: RecordingUpstream
) -> None:
    proxy = proxy_factory("ec256")
    reply = https_request(
        proxy.port, client_context(ca), method="POST", path="/upload", body=b"x" * 100_000
    )
    assert reply.status == 200
    assert json.loads(reply.body)["body_length"] == 100_000
    assert upstream.requests[-1].body == b"x" * 100_000


def test_httpx_keeps_the_connection_alive_for_several_requests(
    proxy_factory: ProxyFactory, ca: trustme.CA, upstream: RecordingUpstream
) -> None:
    proxy = proxy_factory("ec256")
    with httpx.Client(verify=client_context(ca)) as client:
        for number in range(5):
            response = client.get(f"{proxy.url}/keepalive/{number}")
            assert response.status_code == 200
            assert response.json()["path"] == f"/keepalive/{number}"
    assert proxy.signatures() == 1  # one connection, one handshake, one signature


def test_sni_is_visible_to_the_server(
    proxy_factory: ProxyFactory, ca: trustme.CA, upstream: RecordingUpstream
) -> None:
    proxy = proxy_factory("ec256")
    https_request(proxy.port, client_context(ca), path="/sni")
    access = proxy.wait_for_log(lambda entry: entry.get("path") == "/sni")
    assert access["sni"] == "localhost"
    audit = [entry for entry in proxy.lines() if entry.get("event") == "token_signature"]
    assert audit[-1]["sni"] == "localhost"
    assert "pin" not in json.dumps(audit).lower()


@pytest.mark.parametrize("version", ["-tls1_2", "-tls1_3"])
@pytest.mark.parametrize("key", ["ec256", "rsa2048"])
def test_openssl_s_client_verifies_the_chain(
    key: str,
    version: str,
    proxy_factory: ProxyFactory,
    ca: trustme.CA,
    upstream: RecordingUpstream,
    tmp_path: Path,
) -> None:
    proxy = proxy_factory(key)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    result = _s_client(
        proxy.port,
        version,
        "-CAfile",
        str(ca_file),
        "-servername",
        "localhost",
        "-verify_return_error",
        "-alpn",
        "http/1.1",
        "-ign_eof",
        stdin=b"GET /s_client HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    )
    output = result.stdout.decode(errors="replace")
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    assert "Verify return code: 0 (ok)" in output
    assert "ALPN protocol: http/1.1" in output
    assert '"path": "/s_client"' in output


def test_openssl_client_forcing_pkcs1_signatures_uses_ckm_rsa_pkcs(
    proxy_factory: ProxyFactory, ca: trustme.CA, upstream: RecordingUpstream, tmp_path: Path
) -> None:
    proxy = proxy_factory("rsa2048")
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    result = _s_client(
        proxy.port,
        "-tls1_2",
        "-sigalgs",
        "RSA+SHA256",
        "-CAfile",
        str(ca_file),
        "-verify_return_error",
        stdin=b"Q\n",
    )
    assert result.returncode == 0, result.stdout.decode(errors="replace")
    audit = [entry for entry in proxy.lines() if entry.get("event") == "token_signature"]
    assert audit[-1]["mechanism"] == "RSA_PKCS"


@pytest.mark.skipif(
    shutil.which("curl") is None, reason="curl is installed by deploy/setup.sh --test"
)
@pytest.mark.parametrize("version", ["--tlsv1.2", "--tlsv1.3"])
def test_curl_gets_the_upstream_answer(
    version: str,
    proxy_factory: ProxyFactory,
    ca: trustme.CA,
    upstream: RecordingUpstream,
    tmp_path: Path,
) -> None:
    proxy = proxy_factory("ec256")
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    maximum = version.replace("--tlsv", "--tls-max ")
    result = subprocess.run(
        [
            "curl",
            "-sS",
            "--cacert",
            str(ca_file),
            version,
            *maximum.split(),
            "-w",
            "\n%{http_code}",
            f"{proxy.url}/curl",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    body, _, code = result.stdout.rpartition("\n")
    assert code == "200"
    assert json.loads(body)["path"] == "/curl"


def test_a_client_offering_only_tls11_is_refused(
    proxy_factory: ProxyFactory, ca: trustme.CA, upstream: RecordingUpstream
) -> None:
    proxy = proxy_factory("ec256")
    result = _s_client(proxy.port, "-tls1_1", "-cipher", "DEFAULT@SECLEVEL=0")
    assert result.returncode != 0
    assert "protocol version" in result.stderr.decode(errors="replace") + result.stdout.decode(
        errors="replace"
    )
    assert upstream.requests == []
    assert proxy.signatures() == 0


def test_unreachable_upstream_gives_502(
    tmp_path: Path, hsm: HSM, ca: trustme.CA, upstream: RecordingUpstream
) -> None:
    from tests.support import ProxyProcess, free_port

    proxy = ProxyProcess.start(tmp_path, hsm, ca, f"http://127.0.0.1:{free_port()}", "ec256")
    try:
        reply = https_request(proxy.port, client_context(ca), path="/down")
        assert reply.status == 502
        assert reply.body == b"502 Bad Gateway\n"
    finally:
        proxy.stop()


def test_malformed_request_gets_400_and_is_not_forwarded(
    proxy_factory: ProxyFactory, ca: trustme.CA, upstream: RecordingUpstream
) -> None:
    import socket

    proxy = proxy_factory("ec256")
    with socket.create_connection(("127.0.0.1", proxy.port)) as raw:
        with client_context(ca).wrap_socket(raw, server_hostname="localhost") as tls:
            tls.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\nBad Header\r\n\r\n")
            data = b""
            while chunk := tls.recv(4096):
                data += chunk
    assert data.startswith(b"HTTP/1.1 400 ")
    assert upstream.requests == []


@pytest.mark.slow
@pytest.mark.parametrize("bits", [3072, 4096])
def test_large_rsa_keys_serve_tls12_and_tls13(
    bits: int, proxy_factory: ProxyFactory, hsm: HSM, ca: trustme.CA, upstream: RecordingUpstream
) -> None:
    name = f"rsa{bits}"
    hsm.add_key(name, f"web-rsa{bits}", bytes([0x20 + bits // 1024]), f"RSA-{bits}")
    proxy = proxy_factory(name)
    for version in VERSIONS.values():
        reply = https_request(proxy.port, client_context(ca, version), path=f"/{name}")
        assert reply.status == 200
    assert proxy.signatures() == 2


def test_a_silent_client_is_dropped_after_the_handshake_timeout(
    proxy_factory: ProxyFactory, upstream: RecordingUpstream
) -> None:
    import socket

    proxy = proxy_factory("ec256", extra_tls="handshake_timeout = 0.5\n")
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=30) as silent:
        assert silent.recv(1) == b""  # the proxy closed it; no bytes were ever sent
    proxy.wait_for_log(lambda entry: entry.get("message") == "TLS handshake timed out")


# Each refused suite is tried against a key that could serve it (an RSA-authenticated
# suite needs an RSA certificate, else it is refused whatever the policy), beside an
# allowed suite on the same key that connects: only the policy tells them apart.
@pytest.mark.parametrize(
    ("cipher", "key", "allowed"),
    [
        ("AES128-GCM-SHA256", "rsa2048", "ECDHE-RSA-AES128-GCM-SHA256"),
        ("DHE-RSA-AES128-GCM-SHA256", "rsa2048", "ECDHE-RSA-AES128-GCM-SHA256"),
        ("ECDHE-RSA-AES128-SHA256", "rsa2048", "ECDHE-RSA-AES128-GCM-SHA256"),
        ("ECDHE-ECDSA-AES128-SHA256", "ec256", "ECDHE-ECDSA-AES128-GCM-SHA256"),
        ("ECDHE-ECDSA-AES256-SHA", "ec256", "ECDHE-ECDSA-AES128-GCM-SHA256"),
    ],
)
def test_tls12_refuses_suites_without_ecdhe_or_aead(
    cipher: str, key: str, allowed: str, proxy_factory: ProxyFactory, upstream: RecordingUpstream
) -> None:
    proxy = proxy_factory(key)
    served = _s_client(proxy.port, "-tls1_2", "-cipher", allowed, stdin=b"Q\n")
    assert served.returncode == 0, served.stderr
    assert f"Cipher is {allowed}".encode() in served.stdout
    signed = proxy.signatures()
    assert signed == 1
    result = _s_client(proxy.port, "-tls1_2", "-cipher", cipher)
    assert result.returncode != 0
    # The server's alert, not the client's own refusal to offer the suite.
    assert b"alert handshake failure" in result.stderr + result.stdout
    assert proxy.signatures() == signed
