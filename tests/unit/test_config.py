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


SITE: dict[str, object] = {
    "certificate": "api.pem",
    "key": "pkcs11:token=t;object=api",
    "upstream": "api",
}
LISTENER_AUTH: dict[str, object] = {"ca": "ca.pem", "allow_any": True}


def _with_site(site: dict[str, object], **tls: object) -> dict[str, object]:
    return _config(
        tls={"certificate": "chain.pem", "key": "pkcs11:token=t;object=k", "sni": [site], **tls},
        upstreams={"api": {"servers": ["http://127.0.0.1:9000"]}},
    )


def test_a_server_name_inherits_replaces_or_lifts_the_listeners_client_auth(
    tmp_path: Path,
) -> None:
    inherited = parse_config(_with_site(SITE, client_auth=LISTENER_AUTH), tmp_path, "t")
    assert inherited.tls.sni[0].client_auth == inherited.tls.client_auth is not None
    own = {"ca": "api-ca.pem", "allow_cn": ["billing"], "mode": "optional"}
    replaced = parse_config(
        _with_site({**SITE, "client_auth": own}, client_auth=LISTENER_AUTH), tmp_path, "t"
    )
    policy = replaced.tls.sni[0].client_auth
    assert policy is not None
    assert policy.mode == "optional"
    assert policy.ca.file == tmp_path / "api-ca.pem"
    assert policy.allow_cn == frozenset({"billing"})
    lifted = parse_config(
        _with_site({**SITE, "client_auth": False}, client_auth=LISTENER_AUTH), tmp_path, "t"
    )
    assert lifted.tls.sni[0].client_auth is None
    # Every CA bundle and staple is a watched secret.
    staple = parse_config(
        _with_site({**SITE, "ocsp_response": "api.der", "client_auth": own}), tmp_path, "t"
    )
    watched = {ref.file for ref in staple.secrets()}
    assert {tmp_path / "api.der", tmp_path / "api-ca.pem"} <= watched


@pytest.mark.parametrize(
    ("site", "message"),
    [
        ({**SITE, "client_auth": True}, "tls.sni[1].client_auth: true is not a setting"),
        (
            {**SITE, "client_auth": {"ca": "ca.pem"}},
            "tls.sni[1].client_auth: no client would be admitted",
        ),
        (
            {**SITE, "client_auth": {"ca": "ca.pem", "allow_any": True, "mode": "maybe"}},
            "tls.sni[1].client_auth.mode: 'maybe' is not one of require, optional",
        ),
        ({**SITE, "client_auth": {"allow_any": True}}, "tls.sni[1].client_auth: set ca"),
        ({**SITE, "ocsp": "api.der"}, "tls.sni[1].ocsp: unknown key"),
    ],
)
def test_per_name_settings_errors_name_the_entry(
    tmp_path: Path, site: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(_with_site(site), base=tmp_path, source="test")
    assert message in str(caught.value)


def test_a_server_name_may_name_a_token_of_its_own(tmp_path: Path) -> None:
    own = {"module": "/opt/cloudhsm/lib/libcloudhsm_pkcs11.so", "pin": "env:CLOUDHSM_PIN"}
    config = parse_config(_with_site({**SITE, "token": own}), tmp_path, "t")
    token = config.tls.sni[0].token
    assert token is not None
    assert token.module == "/opt/cloudhsm/lib/libcloudhsm_pkcs11.so"
    assert token.pin.reference == "env:CLOUDHSM_PIN"
    assert token.sessions == 4
    assert token.pin in config.secrets()  # watched like [token]'s
    assert parse_config(_with_site(SITE), tmp_path, "t").tls.sni[0].token is None


@pytest.mark.parametrize(
    ("token", "message"),
    [
        ({"module": "m"}, "tls.sni[1].token: set pin, where the PIN is"),
        ({"module": "m", "pin": "4821"}, "tls.sni[1].token.pin: needs a reference"),
        ({"module": "m", "pin": "env:P", "sessions": 0}, "tls.sni[1].token.sessions: must be"),
        ({"pin": "env:P"}, "tls.sni[1].token.module: required key is missing"),
        ({"module": "m", "pin": "env:P", "label": "x"}, "tls.sni[1].token.label: unknown key"),
    ],
)
def test_a_server_names_token_errors_name_the_entry(
    tmp_path: Path, token: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(_with_site({**SITE, "token": token}), base=tmp_path, source="test")
    assert message in str(caught.value)
    assert "4821" not in str(caught.value)
