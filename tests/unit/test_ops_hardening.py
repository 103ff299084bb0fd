"""Operator safety (proxy/ops/hardening.py): secrets scrubbed from output, credential
headers redacted."""

from __future__ import annotations

from proxy.ops.hardening import forget_secrets, redact_headers, remember_secret, scrub


def test_scrub_replaces_registered_secrets_and_their_repr_form() -> None:
    try:
        remember_secret("s3cr'et-pin")
        remember_secret("123")  # too short to scrub without destroying logs
        assert scrub("pin s3cr'et-pin and 's3cr\\'et-pin' and 123") == (
            "pin [redacted] and '[redacted]' and 123"
        )
    finally:
        forget_secrets()


def test_credential_headers_are_redacted() -> None:
    headers = [
        (b"Authorization", b"Bearer x"),
        (b"cookie", b"a=b"),
        (b"Set-Cookie", b"a=b"),
        (b"Proxy-Authorization", b"Basic x"),
        (b"X-Api-Key", b"k"),
        (b"Accept", b"*/*"),
    ]
    assert redact_headers(headers) == [
        ("Authorization", "[redacted]"),
        ("cookie", "[redacted]"),
        ("Set-Cookie", "[redacted]"),
        ("Proxy-Authorization", "[redacted]"),
        ("X-Api-Key", "[redacted]"),
        ("Accept", "*/*"),
    ]
