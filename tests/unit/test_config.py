"""The configuration (proxy/config.py): relative paths, errors that name the key,
addresses and upstreams."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.config import parse_address, parse_config, parse_upstream
from proxy.errors import ConfigError


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
