"""Fixtures of the integration tests (SoftHSM2 tokens, processes, loopback servers); the
session-wide ones (the token, the CA, the upstream, proxy factories) are tests/conftest.py's."""

from __future__ import annotations

import secrets
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trustme

from proxy.pkcs11.provision import generate_key, initialize_token
from proxy.pkcs11.token import Token
from proxy.secrets.store import SecretRef
from proxy.tls.certificates import check_key_matches, parse_chain
from proxy.tls.clientauth import ClientAuthPolicy, load_ca_bundle
from proxy.tls.context import build_server_context
from tests.support import (
    HSM,
    TOKEN_PIN,
    ProxyProcess,
    StartedProxies,
    StartProxy,
    free_port,
    issue_chain,
)
from tests.support.http import ScriptedUpstream
from tests.support.mtls import issue_client_cert
from tests.support.reload import MOTO_SERVER, stop_launched


@pytest.fixture(scope="session")
def exportable_key(hsm: HSM) -> str:
    """A key that CAN leave the token (CKA_EXTRACTABLE=true): what custody checks catch."""
    hsm.add_key("loose", "loose-ec256", b"\x20", "P-256", extractable=True)
    return "loose"


@pytest.fixture
def start_proxy(tmp_path: Path, hsm: HSM, ca: trustme.CA) -> Iterator[StartProxy]:
    proxies = StartedProxies(tmp_path, hsm, ca)

    def start(upstream_url: str, http: str = "", extra: str = "") -> ProxyProcess:
        return proxies.start(upstream_url, extra=f"\n[http]\n{http}\n{extra}" if http else extra)

    yield start
    proxies.stop_all()


@pytest.fixture
def scripted() -> Iterator[Callable[..., ScriptedUpstream]]:
    servers: list[ScriptedUpstream] = []

    def make(handler: Callable[[socket.socket, ScriptedUpstream], None]) -> ScriptedUpstream:
        server = ScriptedUpstream(handler)
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()


@pytest.fixture(scope="module")
def client_ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def client_ca_file(tmp_path: Path, client_ca: trustme.CA) -> Path:
    path = tmp_path / "client-ca.pem"
    path.write_bytes(client_ca.cert_pem.bytes())
    return path


@pytest.fixture
def contexts(hsm: HSM, ca: trustme.CA, tmp_path: Path) -> Iterator[tuple[object, object, Path]]:
    client_ca = trustme.CA()
    token = Token(hsm.module, hsm.uri("ec256"), TOKEN_PIN, pool_size=2)
    key = token.find_private_key(hsm.uri("ec256"))
    names = ("localhost", "secure.localhost")
    chain = parse_chain(issue_chain(ca, hsm.public_keys["ec256"], names), "test chain")
    policy = ClientAuthPolicy(
        mode="require",
        ca=SecretRef(file=Path("client-ca.pem"), what="client CA bundle"),
        allow_cn=frozenset({"web"}),
        ca_certificates=load_ca_bundle(client_ca.cert_pem.bytes(), "client-ca.pem"),
    )
    open_context = build_server_context(chain, key)
    mtls_context = build_server_context(chain, key, client_auth=policy)
    cert = issue_client_cert(tmp_path, client_ca, "web", common_name="web")
    yield open_context, mtls_context, cert.cert_path
    token.close()


@pytest.fixture(autouse=True)
def stop_proxies() -> Iterator[None]:
    yield
    stop_launched()


@pytest.fixture
def rotating_token(hsm: HSM) -> tuple[str, str]:
    """A token of its own (its PIN changes), with one P-256 key: (label, PIN)."""
    label = f"rot-{secrets.token_hex(4)}"
    pin = f"pin-{secrets.token_hex(6)}"
    initialize_token(hsm.module, label, "so-" + secrets.token_hex(6), pin)
    generate_key(hsm.module, label, pin, "web", b"\x01", "P-256")
    return label, pin


@pytest.fixture
def moto(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[str]:
    """A moto server on loopback (from its own virtualenv: deploy/setup.sh --test makes it)."""
    assert MOTO_SERVER.exists(), f"{MOTO_SERVER} is missing: run deploy/setup.sh --test"
    port = free_port()
    with (tmp_path / "moto.log").open("w") as log:
        process = subprocess.Popen(
            [str(MOTO_SERVER), "-H", "127.0.0.1", "-p", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    for variable in ("AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(variable, raising=False)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise AssertionError(
                        f"moto server did not start:\n{(tmp_path / 'moto.log').read_text()}"
                    ) from None
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(timeout=10)


@pytest.fixture
def ca_file(tmp_path: Path, ca: trustme.CA) -> Path:
    path = tmp_path / "ca.pem"
    path.write_bytes(ca.cert_pem.bytes())
    return path


@pytest.fixture
def server_context(hsm: HSM, ca: trustme.CA):  # type: ignore[no-untyped-def]
    token = Token(hsm.module, hsm.uri("ec256"), TOKEN_PIN, pool_size=2)
    key = token.find_private_key(hsm.uri("ec256"))
    chain = parse_chain(issue_chain(ca, hsm.public_keys["ec256"]), "test chain")
    check_key_matches(chain, key)
    yield build_server_context(chain, key), token
    token.close()
