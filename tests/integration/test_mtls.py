"""Mutual TLS: client certificates verified by a CA bundle, allow-lists, identity headers.

The matrix a user would try: no certificate, a certificate from another CA, an expired
one, allowed identities by CN, DNS SAN, URI SAN (SPIFFE) and SPKI pin, a valid certificate
whose identity is not allowed, and a client forging the identity headers.
"""

from __future__ import annotations

import socket
import ssl
from pathlib import Path
from typing import Any

import pytest
import trustme
from cryptography import x509

from tests.support import (
    HSM,
    ProxyFactory,
    RecordingUpstream,
    client_context,
    https_request,
    run_cli,
    write_config,
)
from tests.support.mtls import (
    client_auth_table,
    issue_client_cert,
    refused,
    with_client_cert,
)


def test_mtls_matrix(
    tmp_path: Path,
    proxy_factory: ProxyFactory,
    ca: trustme.CA,
    client_ca: trustme.CA,
    client_ca_file: Path,
    upstream: RecordingUpstream,
) -> None:
    pinned = issue_client_cert(tmp_path, client_ca, "pinned", common_name="batch-job")
    proxy = proxy_factory(
        "ec256",
        extra_tls=client_auth_table(
            client_ca_file,
            allow_cn=["billing"],
            allow_dns=["Orders.Internal"],
            allow_uri=["spiffe://example.org/ns/prod/sa/web"],
            allow_spki_sha256=[pinned.spki_pin],
        ),
    )

    # Refused: no certificate, another CA, expired, a valid certificate nobody allowed.
    stranger_ca = trustme.CA()
    refusals = {
        "no client certificate": None,
        "wrong CA": issue_client_cert(tmp_path, stranger_ca, "stranger", common_name="billing"),
        "expired": issue_client_cert(
            tmp_path, client_ca, "expired", common_name="billing", expired=True
        ),
        "server certificate, not a client one": issue_client_cert(
            tmp_path,
            client_ca,
            "server-eku",
            common_name="billing",
            usage=x509.oid.ExtendedKeyUsageOID.SERVER_AUTH,
        ),
        "identity not allowed": issue_client_cert(
            tmp_path,
            client_ca,
            "intruder",
            common_name="intruder",
            dns=("evil.internal",),
            uris=("spiffe://example.org/ns/prod/sa/intruder",),
        ),
    }
    # Each is refused with its own TLS alert and its own logged reason: a refusal for
    # another reason (a crash, a reset, a policy bug) does not pass for this one.
    expected = {
        "no client certificate": (
            "TLSV13_ALERT_CERTIFICATE_REQUIRED",
            "TLS handshake failed: peer did not return a certificate",
        ),
        "wrong CA": (
            "TLSV1_ALERT_UNKNOWN_CA",
            "client certificate 'CN=billing': unable to get local issuer certificate",
        ),
        "expired": (
            "SSLV3_ALERT_CERTIFICATE_EXPIRED",
            "client certificate 'CN=billing': certificate has expired",
        ),
        "server certificate, not a client one": (
            "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE",
            "client certificate 'CN=billing': unsuitable certificate purpose",
        ),
        # OpenSSL sends internal_error when a verify callback refuses a certificate it
        # found valid (pyOpenSSL sets no X509 error): the logged reason tells it apart.
        "identity not allowed": (
            "TLSV1_ALERT_INTERNAL_ERROR",
            "client certificate CN=intruder DNS:evil.internal "
            "URI:spiffe://example.org/ns/prod/sa/intruder SPKI sha256/",
        ),
    }
    seen: list[dict[str, Any]] = []
    for case, cert in refusals.items():
        alert, reason = expected[case]
        assert refused(proxy.port, with_client_cert(ca, cert)) == alert, case
        logged = proxy.wait_for_log(
            lambda entry: "TLS handshake failed" in entry.get("message", "") and entry not in seen
        )
        seen.append(logged)
        assert reason in logged["message"], case
    assert upstream.requests == []
    assert seen[-1]["message"].endswith("is not in the allow-lists")
    assert proxy.signatures() >= 1  # the refusals came after the server's own signature

    # Admitted: one identity per allow-list, each visible to the upstream.
    admitted = {
        "cn": issue_client_cert(tmp_path, client_ca, "cn", common_name="billing"),
        "dns": issue_client_cert(tmp_path, client_ca, "dns", dns=("orders.internal",)),
        "uri": issue_client_cert(
            tmp_path, client_ca, "uri", uris=("spiffe://example.org/ns/prod/sa/web",)
        ),
        "spki": pinned,
    }
    for case, cert in admitted.items():
        for version in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
            context = client_context(ca, version)
            context.load_cert_chain(cert.cert_path, cert.key_path)
            reply = https_request(proxy.port, context, path=f"/ok/{case}")
            assert reply.status == 200, case
            headers = upstream.requests[-1].headers
            assert headers["X-Client-Cert-Verified"] == "success"
            assert headers["X-Client-Cert-SPKI-SHA256"] == cert.spki_pin
            assert headers["X-Client-Cert-Issuer"] == client_ca_subject(client_ca)
    by_path = {seen.path: seen.headers for seen in upstream.requests}
    assert by_path["/ok/cn"]["X-Client-Cert-CN"] == "billing"
    assert by_path["/ok/cn"]["X-Client-Cert-Subject"] == "CN=billing"
    assert by_path["/ok/dns"]["X-Client-Cert-DNS"] == "orders.internal"
    assert "X-Client-Cert-CN" not in by_path["/ok/dns"]
    assert by_path["/ok/uri"]["X-Client-Cert-URI"] == "spiffe://example.org/ns/prod/sa/web"
    assert by_path["/ok/spki"]["X-Client-Cert-CN"] == "batch-job"
    access = proxy.wait_for_log(lambda entry: entry.get("path") == "/ok/cn")
    assert access["client_cert"] == "CN=billing"


def client_ca_subject(ca: trustme.CA) -> str:
    return x509.load_pem_x509_certificate(ca.cert_pem.bytes()).subject.rfc4514_string()


FORGED = {
    "X-Client-Cert-Verified": "success",
    "X-Client-Cert-CN": "admin",
    "x-client-cert-uri": "spiffe://example.org/ns/prod/sa/admin",
    "X-CLIENT-CERT-SPKI-SHA256": "AAAA",
    "X-Client-Cert-Extra": "anything",
    "X-Forwarded-Client-Cert": "By=spiffe://x;URI=spiffe://example.org/admin",
}


def test_forged_identity_headers_never_reach_the_upstream(
    tmp_path: Path,
    proxy_factory: ProxyFactory,
    ca: trustme.CA,
    client_ca: trustme.CA,
    client_ca_file: Path,
    upstream: RecordingUpstream,
) -> None:
    proxy = proxy_factory("ec256", extra_tls=client_auth_table(client_ca_file, allow_cn=["web"]))
    cert = issue_client_cert(tmp_path, client_ca, "web", common_name="web")
    reply = https_request(proxy.port, with_client_cert(ca, cert), path="/forge", headers=FORGED)
    assert reply.status == 200
    headers = {name.lower(): value for name, value in upstream.requests[-1].headers.items()}
    assert headers["x-client-cert-cn"] == "web"
    assert headers["x-client-cert-spki-sha256"] == cert.spki_pin
    assert "x-client-cert-uri" not in headers
    assert "x-client-cert-extra" not in headers
    assert "x-forwarded-client-cert" not in headers
    assert list(headers).count("x-client-cert-cn") == 1


def test_forged_identity_headers_are_stripped_without_mtls_too(
    proxy_factory: ProxyFactory, ca: trustme.CA, upstream: RecordingUpstream
) -> None:
    proxy = proxy_factory("ec256")
    reply = https_request(proxy.port, client_context(ca), path="/forge", headers=FORGED)
    assert reply.status == 200
    names = {name.lower() for name in upstream.requests[-1].headers}
    assert not any(name.startswith("x-client-cert-") for name in names)
    assert "x-forwarded-client-cert" not in names


def test_optional_mode_admits_anonymous_clients_and_says_so(
    tmp_path: Path,
    proxy_factory: ProxyFactory,
    ca: trustme.CA,
    client_ca: trustme.CA,
    client_ca_file: Path,
    upstream: RecordingUpstream,
) -> None:
    proxy = proxy_factory(
        "ec256", extra_tls=client_auth_table(client_ca_file, "optional", allow_cn=["web"])
    )
    anonymous = https_request(
        proxy.port, client_context(ca), path="/anon", headers={"X-Client-Cert-CN": "web"}
    )
    assert anonymous.status == 200
    headers = upstream.requests[-1].headers
    assert headers["X-Client-Cert-Verified"] == "none"
    assert "X-Client-Cert-CN" not in headers

    web = issue_client_cert(tmp_path, client_ca, "web", common_name="web")
    assert https_request(proxy.port, with_client_cert(ca, web), path="/known").status == 200
    assert upstream.requests[-1].headers["X-Client-Cert-CN"] == "web"

    # A certificate that is presented must still be valid and allowed.
    other = issue_client_cert(tmp_path, client_ca, "other", common_name="other")
    assert refused(proxy.port, with_client_cert(ca, other)) == "TLSV1_ALERT_INTERNAL_ERROR"
    proxy.wait_for_log(
        lambda entry: (
            "CN=other" in entry.get("message", "")
            and "is not in the allow-lists" in entry.get("message", "")
        )
    )


def test_allow_any_admits_every_certificate_of_the_ca(
    tmp_path: Path,
    proxy_factory: ProxyFactory,
    ca: trustme.CA,
    client_ca: trustme.CA,
    client_ca_file: Path,
    upstream: RecordingUpstream,
) -> None:
    table = client_auth_table(client_ca_file) + "allow_any = true\n"
    proxy = proxy_factory("ec256", extra_tls=table)
    anyone = issue_client_cert(tmp_path, client_ca, "anyone", common_name="anyone")
    assert https_request(proxy.port, with_client_cert(ca, anyone)).status == 200
    assert refused(proxy.port, with_client_cert(ca, None)) == "TLSV13_ALERT_CERTIFICATE_REQUIRED"


@pytest.mark.parametrize(
    ("table", "message"),
    [
        (
            '[tls.client_auth]\nca = "{ca}"\n',
            "tls.client_auth: no client would be admitted: list the identities to allow",
        ),
        (
            '[tls.client_auth]\nca = "{ca}"\nallow_any = true\nallow_cn = ["x"]\n',
            "allow_any = true admits every client of the CA; it cannot be combined",
        ),
        (
            '[tls.client_auth]\nmode = "maybe"\nca = "{ca}"\nallow_any = true\n',
            "tls.client_auth.mode: 'maybe' is not one of require, optional",
        ),
        (
            '[tls.client_auth]\nca = "{ca}"\nallow_spki_sha256 = ["abcd"]\n',
            "allow_spki_sha256[1]: 'abcd' is not a SHA-256 SPKI pin: expected base64 of 32",
        ),
        (
            '[tls.client_auth]\nca = "{ca}"\nallow_cn = [""]\n',
            "tls.client_auth.allow_cn: entry 1 must be a non-empty string",
        ),
        (
            '[tls.client_auth]\nca = "{leaf}"\nallow_cn = ["x"]\n',
            "certificate 1 (CN=billing) is not a CA certificate",
        ),
        (
            '[tls.client_auth]\nca = "{missing}"\nallow_cn = ["x"]\n',
            "does not exist",
        ),
    ],
)
def test_client_auth_config_errors_are_clear(
    tmp_path: Path,
    hsm: HSM,
    ca: trustme.CA,
    client_ca: trustme.CA,
    client_ca_file: Path,
    upstream: RecordingUpstream,
    table: str,
    message: str,
) -> None:
    leaf = issue_client_cert(tmp_path, client_ca, "leaf", common_name="billing")
    extra = "\n" + table.format(
        ca=client_ca_file, leaf=leaf.cert_path, missing=tmp_path / "missing.pem"
    )
    config = write_config(tmp_path, hsm, ca, upstream.url, "ec256", extra_tls=extra)
    result = run_cli("check", "--config", str(config))
    assert result.returncode == 1
    assert message in result.stderr


def test_check_shows_the_tls_policy_and_client_auth(
    tmp_path: Path, hsm: HSM, ca: trustme.CA, client_ca_file: Path, upstream: RecordingUpstream
) -> None:
    extra = client_auth_table(client_ca_file, allow_cn=["a", "b"], allow_uri=["spiffe://x/y"])
    config = write_config(tmp_path, hsm, ca, upstream.url, "ec256", extra_tls=extra)
    result = run_cli("check", "--config", str(config))
    assert result.returncode == 0, result.stderr
    assert "intermediate, groups X25519" in result.stdout
    assert f"require, CA client CA bundle file {client_ca_file}, allow 2 cn, 1 uri" in result.stdout


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_resumed_sessions_keep_the_verified_identity(
    tmp_path: Path,
    proxy_factory: ProxyFactory,
    ca: trustme.CA,
    client_ca: trustme.CA,
    client_ca_file: Path,
    upstream: RecordingUpstream,
    version: ssl.TLSVersion,
) -> None:
    proxy = proxy_factory("ec256", extra_tls=client_auth_table(client_ca_file, allow_cn=["web"]))
    cert = issue_client_cert(tmp_path, client_ca, "web", common_name="web")
    context = client_context(ca, version)
    context.load_cert_chain(cert.cert_path, cert.key_path)
    session = None
    reused = []
    for number in range(2):
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as raw:
            with context.wrap_socket(raw, server_hostname="localhost", session=session) as tls:
                tls.sendall(
                    f"GET /resume/{number} HTTP/1.1\r\nHost: localhost\r\n"
                    "Connection: close\r\n\r\n".encode()
                )
                while tls.recv(65536):
                    pass
                reused.append(tls.session_reused)
                session = tls.session
    assert reused == [False, True]
    for seen in upstream.requests:
        assert seen.headers["X-Client-Cert-CN"] == "web"
        assert seen.headers["X-Client-Cert-SPKI-SHA256"] == cert.spki_pin
    assert proxy.signatures() == 1  # the resumed handshake needed no token signature
