"""Pure parts, no token needed: key URIs, config, PIN files."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.config import parse_address, parse_config, parse_upstream
from proxy.errors import ConfigError, KeyURIError, SecretError
from proxy.pkcs11.uri import KeyURI, parse_key_uri
from proxy.secrets.store import PinSource, read_pin


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


def test_pin_file_keeps_everything_but_one_final_line_break(tmp_path: Path) -> None:
    pin = tmp_path / "pin"
    for content, expected in [
        (b"1234\n", "1234"),
        (b"1234\r\n", "1234"),
        (b"1234", "1234"),
        (b" 12 34 \n", " 12 34 "),
    ]:
        pin.write_bytes(content)
        assert read_pin(PinSource(file=pin)) == expected


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"\n", "is empty"),
        (b"12\n\n", "control character (code 10)"),
        (b"\xff\xfe\n", "not valid UTF-8"),
    ],
)
def test_bad_pin_files_are_refused(tmp_path: Path, content: bytes, message: str) -> None:
    pin = tmp_path / "pin"
    pin.write_bytes(content)
    with pytest.raises(SecretError) as caught:
        read_pin(PinSource(file=pin))
    assert message in str(caught.value)


def test_pin_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_HSM_PIN", "9876")
    assert read_pin(PinSource(env="TEST_HSM_PIN")) == "9876"
    monkeypatch.delenv("TEST_HSM_PIN")
    with pytest.raises(SecretError, match=r"\$TEST_HSM_PIN is not set"):
        read_pin(PinSource(env="TEST_HSM_PIN"))


def _config(**overrides: object) -> dict[str, object]:
    data: dict[str, object] = {
        "upstream": "http://127.0.0.1:8080",
        "token": {"module": "/usr/lib/softhsm/libsofthsm2.so", "pin_file": "pin"},
        "tls": {"certificate": "chain.pem", "key": "pkcs11:token=t;object=k"},
    }
    data.update(overrides)
    return data


def test_config_resolves_relative_paths_against_the_file(tmp_path: Path) -> None:
    config = parse_config(_config(), base=tmp_path, source="test")
    assert config.tls.certificate.file == tmp_path / "chain.pem"
    assert config.token.pin.file == tmp_path / "pin"
    assert str(config.listen) == "127.0.0.1:8443"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"token": {"module": "m", "pin_file": "p", "pin_env": "E"}},
            "token: set exactly one of pin, pin_file, pin_env or pin_aws_secret: pin_file and "
            "pin_env both give the PIN",
        ),
        (
            {"token": {"module": "m", "pin_file": "p", "sessions": True}},
            "token.sessions: expected an integer, got a boolean",
        ),
        (
            {"token": {"module": "m", "pin_file": "p", "pin": "1234"}},
            "pin and pin_file both give the PIN",
        ),
        ({"token": {"module": "m", "pin": "1234"}}, "token.pin: needs a reference"),
        ({"upstream": "https://backend"}, "must be an http:// URL"),
        ({"listen": "8443"}, "is not HOST:PORT"),
        (
            {"tls": {"certificate": "c", "key": "pkcs11:object=k;id=1"}},
            "tls.key: id='1' must be written",
        ),
    ],
)
def test_config_errors_name_the_key(
    tmp_path: Path, overrides: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(_config(**overrides), base=tmp_path, source="test")
    assert message in str(caught.value)
    assert "1234" not in str(caught.value)


def test_addresses_and_upstreams() -> None:
    assert parse_address("[::1]:8443", "x").host == "::1"
    assert parse_upstream("http://backend:9000", "x").authority == "backend:9000"
    with pytest.raises(ConfigError, match="without a path"):
        parse_upstream("http://backend/app", "x")
