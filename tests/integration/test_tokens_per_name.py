"""A token per server name: a ``[[tls.sni]]`` entry with a ``[tls.sni.token]`` of its own
(module, PIN, sessions) serves its name with a key from that token, while ``[token]``'s
key serves the others; each token logs in, reloads and recovers on its own.

Two SoftHSM2 tokens stand for a CloudHSM and a SoftHSM2 token; faulthsm in front of a copy
of the SoftHSM2 library plays the one that fails (a copy, so that re-initialising that
module, as recovery may, cannot touch the other token's module in the same process)."""

from __future__ import annotations

import re
import secrets
import shutil
import socket
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from proxy.pkcs11.provision import change_pin, generate_key, initialize_token
from proxy.pkcs11.token import Token
from proxy.pkcs11.uri import parse_key_uri
from tests.faulthsm import FaultControl
from tests.support import (
    HSM,
    RecordingUpstream,
    client_context,
    https_request,
    issue_chain,
    run_cli,
)
from tests.support.operating import admin_section, admin_url, get
from tests.support.reload import RELOAD_SETTINGS, launch, replace_file, wait_until


@dataclass
class SecondToken:
    label: str
    pin: str
    uri: str
    public_key: bytes


@pytest.fixture
def second_token(hsm: HSM) -> SecondToken:
    """Another token in the same SoftHSM2 store, with its own PIN and one P-256 key."""
    label = f"second-{secrets.token_hex(4)}"
    pin = f"pin-{secrets.token_hex(6)}"
    initialize_token(hsm.module, label, "so-" + secrets.token_hex(6), pin)
    generate_key(hsm.module, label, pin, "api", b"\x07", "P-256")
    uri = f"pkcs11:token={label};object=api;id=%07;type=private"
    with Token(hsm.module, parse_key_uri(uri), pin, pool_size=1) as token:
        public = token.find_private_key(parse_key_uri(uri)).info.public_key_der
    assert public is not None
    return SecondToken(label, pin, uri, public)


@pytest.fixture(autouse=True)
def stop_proxies() -> Iterator[None]:
    from tests.support.reload import stop_launched

    yield
    stop_launched()


def _config(
    directory: Path,
    hsm: HSM,
    ca: trustme.CA,
    upstream: RecordingUpstream,
    second: SecondToken,
    module: str,
    extra: str = "",
) -> Path:
    default_chain = directory / "default.pem"
    default_chain.write_bytes(issue_chain(ca, hsm.public_keys["ec256"]))
    api_chain = directory / "api.pem"
    api_chain.write_bytes(issue_chain(ca, second.public_key, ("api.test",)))
    pin = directory / "second-pin"
    pin.write_text(second.pin + "\n")
    pin.chmod(0o600)
    config = directory / "proxy.toml"
    config.write_text(
        f'listen = "127.0.0.1:0"\nupstream = "{upstream.url}"\n\n'
        f'[token]\nmodule = "{hsm.module}"\npin_file = "{hsm.pin_file}"\nsessions = 2\n\n'
        f'[tls]\ncertificate = "{default_chain}"\nkey = "{hsm.uri("ec256")}"\n{extra}\n'
        f'[[tls.sni]]\ncertificate = "{api_chain}"\nkey = "{second.uri}"\n'
        f'[tls.sni.token]\nmodule = "{module}"\npin = "file:{pin}"\nsessions = 1\n'
        + RELOAD_SETTINGS
    )
    return config


def _spki(port: int, ca: trustme.CA, name: str) -> bytes:
    context = client_context(ca)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname=name) as tls:
            der = tls.getpeercert(binary_form=True)
    assert der is not None
    return (
        x509.load_der_x509_certificate(der)
        .public_key()
        .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    )


def test_each_name_signs_with_its_own_tokens_key_and_each_pin_reloads_alone(
    tmp_path: Path,
    hsm: HSM,
    ca: trustme.CA,
    upstream: RecordingUpstream,
    second_token: SecondToken,
) -> None:
    config = _config(tmp_path, hsm, ca, upstream, second_token, hsm.module)
    checked = run_cli("check", "--config", str(config))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    for row in ("sni[1] pin", "sni[1] token", "sni[1] mechanisms"):  # the entry's own
        assert re.search(rf"^ok\s+{re.escape(row)}\s", checked.stdout, re.MULTILINE), row
    assert f"'{second_token.label}' in {hsm.module}: logged in" in checked.stdout
    proxy = launch(tmp_path, config)
    assert _spki(proxy.port, ca, "api.test") == second_token.public_key
    assert _spki(proxy.port, ca, "localhost") == hsm.public_keys["ec256"]
    reply = https_request(proxy.port, client_context(ca), server_name="api.test", path="/api")
    assert reply.status == 200
    signed = proxy.wait_for_log(
        lambda entry: entry.get("event") == "token_signature" and entry.get("sni") == "api.test"
    )
    assert signed["key_uri"].startswith(f"pkcs11:token={second_token.label};")
    # A wrong PIN for the second token: the reload blames that token's PIN, both names
    # keep being served by the old generation.
    pin_file = tmp_path / "second-pin"
    replace_file(pin_file, b"not-the-pin\n")
    failed = proxy.wait_for_log(lambda entry: entry.get("event") == "reload_failed", timeout=30)
    assert f"PIN file {pin_file}: login failed" in failed["message"]
    assert "PIN is incorrect" in failed["message"]
    assert https_request(proxy.port, client_context(ca), server_name="api.test").status == 200
    assert https_request(proxy.port, client_context(ca)).status == 200
    # The operator rotates that token's PIN, then its secret: the reload takes it.
    new_pin = f"pin-{secrets.token_hex(6)}"
    change_pin(hsm.module, second_token.label, second_token.pin, new_pin)
    replace_file(pin_file, (new_pin + "\n").encode())
    proxy.wait_for_log(lambda entry: entry.get("event") == "reloaded", timeout=30)
    assert _spki(proxy.port, ca, "api.test") == second_token.public_key
    assert https_request(proxy.port, client_context(ca), server_name="api.test").status == 200
    text = proxy.log_path.read_text()
    assert second_token.pin not in text
    assert new_pin not in text


def test_a_failing_token_fails_only_its_names_and_recovers_on_its_own(
    tmp_path: Path,
    hsm: HSM,
    ca: trustme.CA,
    upstream: RecordingUpstream,
    second_token: SecondToken,
    faulthsm: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    softhsm_copy = tmp_path / "libsofthsm2-second.so"
    shutil.copyfile(hsm.module, softhsm_copy)
    fault = FaultControl(tmp_path / "faulthsm.control")
    monkeypatch.setenv("FAULTHSM_CONTROL", str(fault.path))
    monkeypatch.setenv("FAULTHSM_MODULE", str(softhsm_copy))
    config = _config(
        tmp_path,
        hsm,
        ca,
        upstream,
        second_token,
        str(faulthsm),
        extra=admin_section(probe_interval=0.2),
    )
    proxy = launch(tmp_path, config)
    admin = admin_url(proxy.lines())
    try:
        wait_until(lambda: get(f"{admin}/readyz")[0] == 200, what="ready")
        assert (
            f"ok token_state: token 'proxy', '{second_token.label}' usable"
            in get(f"{admin}/readyz")[2]
        )
        fault.set(error="CKR_DEVICE_ERROR")
        wait_until(lambda: get(f"{admin}/readyz")[0] == 503, what="not ready")
        body = get(f"{admin}/readyz")[2]
        assert f"FAIL token_state: token '{second_token.label}' unusable" in body
        assert "token 'proxy' unusable" not in body
        with pytest.raises((ssl.SSLError, ConnectionError)):
            https_request(proxy.port, client_context(ca), server_name="api.test")
        # The other token's names are served throughout.
        for _ in range(5):
            assert https_request(proxy.port, client_context(ca)).status == 200
        fault.clear()
        wait_until(lambda: get(f"{admin}/readyz")[0] == 200, timeout=60, what="recovered")
        assert https_request(proxy.port, client_context(ca), server_name="api.test").status == 200
    finally:
        fault.clear()


def test_csr_with_the_config_signs_a_names_key_in_that_names_own_token(
    tmp_path: Path,
    hsm: HSM,
    ca: trustme.CA,
    upstream: RecordingUpstream,
    second_token: SecondToken,
) -> None:
    """``csr --config`` finds a [[tls.sni]] key in the entry's own token, with its PIN."""
    config = _config(tmp_path, hsm, ca, upstream, second_token, hsm.module)
    result = run_cli(
        "csr", "--config", str(config), "--key", second_token.uri, "--subject", "CN=api.test",
        "--san", "DNS:api.test",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    request = x509.load_pem_x509_csr(result.stdout.encode())
    assert request.is_signature_valid
    assert (
        request.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        == second_token.public_key
    )
