"""Shared test fixtures: real SoftHSM2 tokens, trustme CAs, loopback upstreams, proxy processes.

Everything is real: the token is SoftHSM2 in a temporary directory (one per test session:
SoftHSM2 reads SOFTHSM2_CONF once per process, and proxy subprocesses inherit it), keys are
generated inside it and never leave it, certificates for them come from a trustme CA, the
upstream is an HTTP server on loopback, and the proxy runs as `hsm-proxy run` in a
subprocess that real clients (stdlib ssl, openssl s_client, curl, httpx) talk to.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest
import trustme

from tests.faulthsm import FaultControl
from tests.faulthsm import build as build_faulthsm
from tests.support import (
    HSM,
    ProxyFactory,
    ProxyProcess,
    RecordingUpstream,
    StartedProxies,
    StartOnFaulthsm,
    make_hsm,
    start_upstream,
)
from tests.support.http import ScriptedUpstream
from tests.support.tcp import (
    SITES,
    ProxyProtocolUpstream,
    TCPSetup,
    bytes_handler,
    closed_port,
    grpc_server,
    redis_server,
    silent_listener,
    tcp_config,
)

# SoftHSM2 reads its config when the module is first initialised in a process; set it
# before any test loads the module, for this process and every proxy it starts.
_SOFTHSM_DIR = Path(tempfile.mkdtemp(prefix="hsm-proxy-tests-"))
os.environ["SOFTHSM2_CONF"] = str(_SOFTHSM_DIR / "softhsm2.conf")
# Files the tests write (PIN files above all) are private, as an operator's must be: the
# proxy refuses secret files other users can read (security.allow_insecure_secret_files).
# A test about that refusal sets the loose mode explicitly.
os.umask(0o077)


@pytest.fixture(scope="session")
def hsm() -> HSM:
    """A SoftHSM2 token 'proxy' with EC P-256, EC P-384 and RSA-2048 keys, and a trap:
    two keys that share the label 'twin'."""
    return make_hsm(_SOFTHSM_DIR)


@pytest.fixture(scope="session")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="session")
def faulthsm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """libfaulthsm.so (tests/faulthsm/faulthsm.c), built with the system C compiler."""
    return build_faulthsm(tmp_path_factory.mktemp("faulthsm"))


@pytest.fixture
def fault(tmp_path: Path) -> Iterator[FaultControl]:
    control = FaultControl(tmp_path / "faulthsm.control")
    yield control
    control.clear()


@pytest.fixture
def on_faulthsm(
    proxy_factory: ProxyFactory, hsm: HSM, faulthsm: Path, fault: FaultControl
) -> StartOnFaulthsm:
    """Starts a proxy whose module is faulthsm over the test token: ``on_faulthsm(key,
    settings={...}, **proxy_factory options)``, FAULTHSM_* from ``settings``."""

    def start(key: str = "ec256", **options: object) -> ProxyProcess:
        settings = options.pop("settings", {})
        assert isinstance(settings, dict)
        env = {
            "FAULTHSM_CONTROL": str(fault.path),
            "FAULTHSM_MODULE": hsm.module,
            "FAULTHSM_STATS": str(fault.path.with_name("faulthsm.stats")),
        }
        env.update({f"FAULTHSM_{name.upper()}": str(value) for name, value in settings.items()})
        return proxy_factory(key, module=str(faulthsm), env=env, **options)

    return start


@pytest.fixture
def upstream() -> Iterator[RecordingUpstream]:
    server = start_upstream()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def proxy_factory(
    tmp_path: Path, hsm: HSM, ca: trustme.CA, upstream: RecordingUpstream
) -> Iterator[ProxyFactory]:
    proxies = StartedProxies(tmp_path, hsm, ca)
    yield partial(proxies.start, upstream.url)
    proxies.stop_all()


@pytest.fixture(scope="module")
def tcp_setup(
    tmp_path_factory: pytest.TempPathFactory, hsm: HSM, ca: trustme.CA
) -> Iterator[TCPSetup]:
    """One proxy for a test module: HTTP for localhost, and a tcp:// upstream per server
    name NAME.test: redis-server, a plaintext gRPC server, a scripted byte upstream, a
    PROXY-protocol reader, a closed port and a listener that never accepts."""
    directory = tmp_path_factory.mktemp("tcp")
    client_ca = trustme.CA()
    client_ca_file = directory / "client-ca.pem"
    client_ca.cert_pem.write_to_path(str(client_ca_file))
    with contextlib.ExitStack() as stack:
        redis_port = stack.enter_context(redis_server(directory))
        grpc_port = stack.enter_context(grpc_server())
        silent_port = stack.enter_context(silent_listener())
        byte_upstream = ScriptedUpstream(bytes_handler)
        stack.callback(byte_upstream.stop)
        pp_upstream = ProxyProtocolUpstream()
        stack.callback(pp_upstream.stop)
        http_upstream = start_upstream()
        stack.callback(http_upstream.stop)
        ports = {
            "redis": redis_port,
            "grpc": grpc_port,
            "bytes": byte_upstream.port,
            "pp": pp_upstream.port,
            "refused": closed_port(),
            "silent": silent_port,
        }
        assert tuple(ports) == SITES
        config = tcp_config(
            directory,
            hsm,
            ca,
            client_ca_file,
            http_upstream.url,
            {name: f"tcp://127.0.0.1:{port}" for name, port in ports.items()},
        )
        proxy = ProxyProcess.run_config(config, directory)
        stack.callback(proxy.stop)
        ca_file = directory / "ca.pem"
        ca.cert_pem.write_to_path(str(ca_file))
        yield TCPSetup(
            proxy,
            ca_file,
            client_ca,
            directory,
            redis_port,
            grpc_port,
            byte_upstream,
            pp_upstream,
            http_upstream,
        )


@pytest.fixture
def byte_upstream() -> Iterator[ScriptedUpstream]:
    """The scripted byte upstream of the TCP tests (support_tcp.bytes_handler)."""
    server = ScriptedUpstream(bytes_handler)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def tcp_proxy(
    tmp_path: Path, hsm: HSM, ca: trustme.CA, byte_upstream: ScriptedUpstream
) -> Iterator[ProxyFactory]:
    """Starts a proxy whose top-level upstream is tcp:// to ``byte_upstream``:
    ``tcp_proxy(extra="[http]\\nshutdown_grace = 3\\n")``."""
    proxies = StartedProxies(tmp_path, hsm, ca)
    yield partial(proxies.start, f"tcp://127.0.0.1:{byte_upstream.port}", "ec256")
    proxies.stop_all()
