"""PKCS#11 key URIs (proxy/pkcs11/uri.py): RFC 7512, parsed strictly."""

from __future__ import annotations

import pytest

from proxy.errors import KeyURIError
from proxy.pkcs11.uri import KeyURI, parse_key_uri


def test_key_uri_round_trip() -> None:
    uri = parse_key_uri("pkcs11:token=my%20token;object=web-key;id=%01%ab;type=private")
    assert uri == KeyURI(token="my token", object="web-key", id=b"\x01\xab")
    assert str(uri) == "pkcs11:token=my%20token;object=web-key;id=%01%ab;type=private"
    assert parse_key_uri(str(uri)) == uri


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("pkcs11:object=k?pin-value=1234", "must not carry a PIN"),
        ("pkcs11:object=k;id=01", "must be written byte by byte as %XX"),
        ("pkcs11:object=k;id=%1", "must be written byte by byte as %XX"),
        ("pkcs11:object=k%2", "bad %-escape"),
        ("pkcs11:object=k;object=j", "appears twice"),
        ("pkcs11:object=k;type=public", "needs type=private"),
        ("pkcs11:object=k;colour=red", "unknown attribute 'colour'"),
        ("pkcs11:token=t", "must name the key by object=LABEL, id=%XX"),
        ("file:///key.pem", "must start with 'pkcs11:'"),
        ("pkcs11:object=a b", "must be %-escaped"),
    ],
)
def test_key_uri_errors_say_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(KeyURIError) as caught:
        parse_key_uri(text)
    assert message in str(caught.value)
    assert "1234" not in str(caught.value)
