"""Client identities (proxy/tls/clientauth.py): identity headers and allow-lists."""

from __future__ import annotations

import base64
from pathlib import Path

import h11
import pytest

from proxy.errors import ConfigError
from proxy.http.rules import ClientInfo, upstream_request
from proxy.secrets.store import SecretRef
from proxy.tls.clientauth import ClientAuthPolicy, ClientIdentity, identity_headers

IDENTITY = ClientIdentity(
    subject="CN=Zoë\\, the admin,O=Example",
    issuer="CN=Client CA",
    common_names=("Zoë, the admin",),
    dns_names=("a.internal", "b.internal"),
    uris=("spiffe://example.org/a,b", "spiffe://example.org/100%"),
    spki_sha256=bytes(range(32)),
)


CA_REF = SecretRef(file=Path("client-ca.pem"), what="client CA bundle")


def test_identity_headers_are_ascii_and_unambiguous() -> None:
    headers = dict(identity_headers(IDENTITY))
    assert headers[b"X-Client-Cert-Verified"] == b"success"
    # A distinguished name keeps its own (escaped) commas; non-ASCII is percent-encoded.
    assert headers[b"X-Client-Cert-Subject"] == b"CN=Zo%C3%AB\\, the admin,O=Example"
    # In list headers a comma inside an entry is encoded, so the list splits correctly.
    assert headers[b"X-Client-Cert-CN"] == b"Zo%C3%AB%2C the admin"
    assert headers[b"X-Client-Cert-DNS"] == b"a.internal,b.internal"
    assert headers[b"X-Client-Cert-URI"] == (
        b"spiffe://example.org/a%2Cb,spiffe://example.org/100%25"
    )
    assert base64.b64decode(headers[b"X-Client-Cert-SPKI-SHA256"]) == bytes(range(32))
    assert identity_headers(None) == ((b"X-Client-Cert-Verified", b"none"),)


def test_identity_headers_replace_whatever_the_client_sent() -> None:
    request = h11.Request(
        method="GET",
        target="/",
        headers=[
            ("Host", "a"),
            ("x-CLIENT-cert-cn", "root"),
            ("X-Forwarded-Client-Cert", "By=x"),
            ("X-Client-Certainly", "kept: not our prefix"),
        ],
    )
    client = ClientInfo("192.0.2.1", "a", identity=IDENTITY, client_auth=True)
    sent = [(name.lower(), value) for name, value in upstream_request(request, client).headers]
    assert (b"x-client-cert-cn", b"root") not in sent
    assert (b"x-client-cert-cn", b"Zo%C3%AB%2C the admin") in sent
    assert not any(name == b"x-forwarded-client-cert" for name, _ in sent)
    assert (b"x-client-certainly", b"kept: not our prefix") in sent


def test_allow_lists_match_exactly() -> None:
    policy = ClientAuthPolicy(
        mode="require",
        ca=CA_REF,
        allow_cn=frozenset({"Zoë, the admin"}),
        allow_dns=frozenset({"c.internal"}),
    )
    assert policy.admits(IDENTITY)
    assert not ClientAuthPolicy(
        mode="require", ca=CA_REF, allow_uri=frozenset({"spiffe://example.org/a"})
    ).admits(IDENTITY)  # a prefix of an allowed URI is not the URI
    assert ClientAuthPolicy(
        mode="require", ca=CA_REF, allow_spki_sha256=frozenset({bytes(range(32))})
    ).admits(IDENTITY)
    with pytest.raises(ConfigError, match="no client would be admitted"):
        ClientAuthPolicy(mode="require", ca=CA_REF)
