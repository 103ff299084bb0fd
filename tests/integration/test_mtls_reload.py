"""Mutual TLS with the rest of the proxy: every SNI certificate enforces it, and a new
client CA bundle is picked up by a reload like a certificate (a new OCSP response too:
test_tls_policy.py)."""

from __future__ import annotations

from pathlib import Path

import trustme

from tests.support import HSM, ProxyFactory, RecordingUpstream, https_request, issue_chain
from tests.support.mtls import (
    client_auth_table,
    issue_client_cert,
    refused,
    with_client_cert,
)
from tests.support.reload import RELOAD_SETTINGS, replace_file, wait_until


def test_a_server_name_with_its_own_certificate_cannot_bypass_client_auth(
    tmp_path: Path,
    hsm: HSM,
    proxy_factory: ProxyFactory,
    ca: trustme.CA,
    upstream: RecordingUpstream,
) -> None:
    client_ca = trustme.CA()
    client_ca_file = tmp_path / "client-ca.pem"
    client_ca_file.write_bytes(client_ca.cert_pem.bytes())
    other_chain = tmp_path / "other.pem"
    other_chain.write_bytes(issue_chain(ca, hsm.public_keys["ec384"], ("other.localhost",)))
    site = f'\n[[tls.sni]]\ncertificate = "{other_chain}"\nkey = "{hsm.uri("ec384")}"\n'
    proxy = proxy_factory(
        "ec256", extra_tls=site + client_auth_table(client_ca_file, allow_cn=["web"])
    )
    web = issue_client_cert(tmp_path, client_ca, "web", common_name="web")
    for name in ("localhost", "other.localhost"):
        alert = refused(proxy.port, with_client_cert(ca, None), name)
        assert alert == "TLSV13_ALERT_CERTIFICATE_REQUIRED", name
        reply = https_request(
            proxy.port, with_client_cert(ca, web), path=f"/{name}", server_name=name
        )
        assert reply.status == 200
        assert upstream.requests[-1].headers["X-Client-Cert-CN"] == "web"


def test_a_new_client_ca_bundle_is_picked_up_by_a_reload(
    tmp_path: Path, proxy_factory: ProxyFactory, ca: trustme.CA, upstream: RecordingUpstream
) -> None:
    old_ca, new_ca = trustme.CA(), trustme.CA()
    client_ca_file = tmp_path / "client-ca.pem"
    client_ca_file.write_bytes(old_ca.cert_pem.bytes())
    proxy = proxy_factory(
        "ec256",
        extra_tls=client_auth_table(client_ca_file, allow_cn=["web"]) + RELOAD_SETTINGS,
    )
    old_client = issue_client_cert(tmp_path, old_ca, "old", common_name="web")
    new_client = issue_client_cert(tmp_path, new_ca, "new", common_name="web")
    assert refused(proxy.port, with_client_cert(ca, new_client)) == "TLSV1_ALERT_UNKNOWN_CA"

    replace_file(client_ca_file, new_ca.cert_pem.bytes())
    wait_until(
        lambda: any(entry.get("event") == "reloaded" for entry in proxy.lines()),
        what="a reload after the client CA bundle changed",
    )
    assert https_request(proxy.port, with_client_cert(ca, new_client)).status == 200
    assert refused(proxy.port, with_client_cert(ca, old_client)) == "TLSV1_ALERT_UNKNOWN_CA"
    refusal = proxy.wait_for_log(
        lambda e: "CN=web': unable to get local issuer" in e.get("message", "")
    )
    assert refusal["message"].startswith("TLS handshake failed")

    # A broken bundle is refused by the reload; the proxy keeps the last good one.
    replace_file(client_ca_file, b"not a certificate\n")
    wait_until(
        lambda: any("client CA bundle" in entry.get("message", "") for entry in proxy.lines()),
        what="the failed reload's reason",
    )
    assert https_request(proxy.port, with_client_cert(ca, new_client)).status == 200
