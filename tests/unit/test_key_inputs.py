"""What `hsm-proxy key generate` and `hsm-proxy csr` accept, parsed exactly: key kinds and
IDs (proxy/pkcs11/keygen.py), RFC 4514 subjects and SANs (proxy/tls/x509names.py)."""

from __future__ import annotations

import ipaddress

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID, ObjectIdentifier

from proxy.errors import ConfigError
from proxy.pkcs11.keygen import KeyKind, ec_kind, parse_key_id, parse_key_kind, rsa_kind
from proxy.tls.x509names import parse_sans, parse_subject

# -- key kinds and IDs ---------------------------------------------------------------------


def test_key_kinds_are_the_supported_curves_and_sizes() -> None:
    assert ec_kind("P-384") == KeyKind("EC", "P-384")
    assert rsa_kind("3072") == KeyKind("RSA", "RSA-3072", 3072)
    assert parse_key_kind("RSA-4096") == KeyKind("RSA", "RSA-4096", 4096)
    assert parse_key_kind("P-256") == KeyKind("EC", "P-256")


@pytest.mark.parametrize(
    ("make", "text", "message"),
    [
        (ec_kind, "P-521", "must be one of P-256, P-384"),
        (ec_kind, "prime256v1", "must be one of P-256, P-384"),
        (ec_kind, "p-256", "must be one of P-256, P-384"),
        (rsa_kind, "1024", "2048, 3072, 4096 bits"),
        (rsa_kind, "2049", "2048, 3072, 4096 bits"),
        (rsa_kind, " 2048", "2048, 3072, 4096 bits"),
        (rsa_kind, "2_048", "2048, 3072, 4096 bits"),
        (rsa_kind, "0x800", "2048, 3072, 4096 bits"),
        (rsa_kind, "", "2048, 3072, 4096 bits"),
        (parse_key_kind, "RSA-1024", "2048, 3072, 4096 bits"),
        (parse_key_kind, "ed25519", "unsupported key kind"),
    ],
)
def test_key_kinds_outside_the_list_are_refused(make: object, text: str, message: str) -> None:
    assert callable(make)
    with pytest.raises(ConfigError, match=message):
        make(text)


def test_key_ids_are_hex_bytes_exactly() -> None:
    assert parse_key_id("01") == b"\x01"
    assert parse_key_id("00ff") == b"\x00\xff"
    assert parse_key_id("A1b2") == b"\xa1\xb2"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "is empty"),
        ("1", "odd number of hex digits; write every byte as two digits (--id 01"),
        ("abc", "odd number"),
        ("0x01", "without 0x"),
        ("01:02", "without 0x, colons or %"),
        ("%01", "without 0x, colons or %"),
        ("zz", "only hex digits"),
        ("01 02", "only hex digits"),
    ],
)
def test_bad_key_ids_are_refused_never_padded(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_key_id(text)
    assert message in str(caught.value)


# -- subjects -------------------------------------------------------------------------------


def test_subject_lists_the_most_specific_name_first() -> None:
    name = parse_subject("CN=web.example.com,O=Example,C=DE")
    assert [(attribute.oid, attribute.value) for attribute in name] == [
        (NameOID.COUNTRY_NAME, "DE"),
        (NameOID.ORGANIZATION_NAME, "Example"),
        (NameOID.COMMON_NAME, "web.example.com"),
    ]
    assert name.rfc4514_string() == "CN=web.example.com,O=Example,C=DE"


def test_subject_escapes_multi_valued_rdns_oids_and_case() -> None:
    name = parse_subject(r"cn=Doe\, John+OU=Ops,O=Caf\C3\A9 \#1\ ,2.5.4.5=42")
    rdns = list(name.rdns)
    assert rdns[0] == x509.RelativeDistinguishedName(
        [x509.NameAttribute(ObjectIdentifier("2.5.4.5"), "42")]
    )
    assert rdns[1] == x509.RelativeDistinguishedName(
        [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Café #1 ")]
    )
    assert rdns[2] == x509.RelativeDistinguishedName(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, "Doe, John"),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "Ops"),
        ]
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "--subject is empty"),
        ("CN", "'CN' at character 1 is not TYPE=value"),
        ("CN=web,O", "'O' at character 8 is not TYPE=value"),
        ("CN=web,,O=x", "empty attribute at character 8"),
        ("CN=web,", "ends with ','"),
        ("CN=web+", "ends with '+'"),
        ("CN=", "CN= has an empty value"),
        ("CN=web, O=x", "unknown attribute type ' O' (no spaces"),
        ("CN =web", "unknown attribute type 'CN ' (no spaces"),
        ("CN= web", "space at character 4, after '='"),
        ("CN=web ,O=x", "space before character 8"),
        ("CN=web;O=x", "';' at character 7 must be escaped as '\\;' (RDNs are separated by ',')"),
        ('CN="web"', "'\"' at character 4 must be escaped"),
        ("XX=1", "unknown attribute type 'XX'"),
        ("emailAddress=a@example.com", "unknown attribute type 'emailAddress'"),
        ("01.2=x", "unknown attribute type '01.2'"),
        ("CN=#0c03616263", "the #hex (BER) form"),
        ("CN=a\\q", "bad escape at character 5"),
        ("CN=a\\", "bad escape at character 5"),
        ("CN=a\\ff", "do not form UTF-8"),
        ("C=USA", "two-letter country code"),
        ("C=1A", "two-letter country code"),
        ("CN=" + "a" * 65, "CN= is 65 characters; X.509 allows at most 64"),
    ],
)
def test_bad_subjects_are_refused_with_the_reason(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_subject(text)
    assert message in str(caught.value)


# -- subjectAltNames ------------------------------------------------------------------------


def test_sans_of_each_type() -> None:
    entries = ["DNS:web.example.com", "DNS:*.web.example.com", "IP:192.0.2.1", "IP:2001:db8::1"]
    entries += ["URI:spiffe://example.org/ns/prod/sa/web", "DNS:xn--bcher-kva.example"]
    assert parse_sans(entries) == [
        x509.DNSName("web.example.com"),
        x509.DNSName("*.web.example.com"),
        x509.IPAddress(ipaddress.ip_address("192.0.2.1")),
        x509.IPAddress(ipaddress.ip_address("2001:db8::1")),
        x509.UniformResourceIdentifier("spiffe://example.org/ns/prod/sa/web"),
        x509.DNSName("xn--bcher-kva.example"),
    ]
    assert parse_sans([]) == []


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ("web.example.com", "write the type first: DNS:web.example.com"),
        ("dns:web.example.com", "unsupported type 'dns'; use DNS:, IP: or URI:"),
        ("email:ops@example.com", "unsupported type 'email'"),
        ("DNS:", "the DNS value is empty"),
        ("DNS:web.example.com.", "without the trailing dot"),
        ("DNS:web..example.com", "label '' is not a DNS label"),
        ("DNS:-web.example.com", "label '-web' is not a DNS label"),
        ("DNS:web_1.example.com", "label 'web_1' is not a DNS label"),
        ("DNS:web.*.example.com", "label '*' is not a DNS label"),
        ("DNS:*web.example.com", "label '*web' is not a DNS label"),
        ("DNS:*.com", "a wildcard needs at least two labels after it"),
        ("DNS:" + "a" * 64 + ".example", "is not a DNS label"),
        ("DNS:" + "a." * 127 + "aa", "at most 253 characters"),
        ("DNS:bücher.example", "give an internationalised name as its A-label"),
        ("IP:10.0.0.0/8", "not an IPv4 or IPv6 address"),
        ("IP:010.0.0.1", "not an IPv4 or IPv6 address"),
        ("IP:localhost", "not an IPv4 or IPv6 address"),
        ("IP:fe80::1%eth0", "a zone (%eth0) has no place in a SAN"),
        ("URI:/relative/path", "a URI must be absolute"),
        ("URI:https://exa mple.org/", "a URI must be absolute"),
        ("URI:https:///path", "has '//' but no host"),
    ],
)
def test_bad_sans_are_refused_with_the_reason(entry: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_sans([entry])
    assert message in str(caught.value)


def test_a_san_given_twice_is_refused() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_sans(["IP:192.0.2.1", "DNS:web.example.com", "IP:192.0.2.1"])
    assert "--san 'IP:192.0.2.1' is given twice" in str(caught.value)


# -- the command line never echoes a PIN typed on it ------------------------------------------


@pytest.mark.parametrize(
    ("argv", "shown"),
    [
        (["key", "generate", "--module", "m", "--token", "t", "--label", "l", "--ec", "P-256",
          "--pin=pin-4821"], "ambiguous option: --pin could match --pin-file, --pin-env"),
        (["csr", "--module", "m", "--key", "k", "--subject", "CN=x", "--pin-value", "pin-4821"],
         "unrecognized arguments: --pin-value and 1 value(s), not shown"),
        (["doctor", "--module", "m", "--pin=pin-4821"], "ambiguous option: --pin could match"),
        (["check", "--config", "c", "pin-4821"], "unrecognized arguments: 1 value(s), not shown"),
    ],
)  # fmt: skip
def test_a_pin_typed_on_the_command_line_is_not_echoed(
    argv: list[str], shown: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from proxy.commands.cli import _parser

    with pytest.raises(SystemExit) as exited:
        _parser().parse_args(argv)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert shown in err
    assert "pin-4821" not in err
