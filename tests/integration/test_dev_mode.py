"""`hsm-proxy dev`: one command from nothing to HTTPS through a key inside a SoftHSM2 token."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import time
from pathlib import Path

import pytest

from tests.support import REPO, ProxyProcess, https_request, proxy_command


def _start_dev(
    state: Path, log: Path, listen: str = "127.0.0.1:0"
) -> tuple[subprocess.Popen[str], int]:
    """`hsm-proxy dev` serving; :func:`_stop` stops it and checks that it stopped cleanly."""
    env = {key: value for key, value in os.environ.items() if key != "SOFTHSM2_CONF"}
    with log.open("w") as sink:
        process = subprocess.Popen(
            proxy_command("dev", "--state-dir", str(state), "--listen", listen),
            stdout=sink,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=REPO,
            env=env,
        )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        match = re.search(r"curl --cacert \S+ https://localhost:(\d+)/", log.read_text())
        if match:
            _logs[process.pid] = log
            return process, int(match.group(1))
        if process.poll() is not None:
            break
        time.sleep(0.05)
    process.kill()
    raise AssertionError(f"dev did not start:\n{log.read_text()}")


_logs: dict[int, Path] = {}


def _stop(process: subprocess.Popen[str]) -> None:
    """Stop it; fail if it hung at shutdown, exited non-zero or logged a traceback."""
    ProxyProcess(process, _logs.pop(process.pid)).stop()


def test_dev_serves_the_demo_upstream_end_to_end(tmp_path: Path) -> None:
    state = tmp_path / "state"
    process, port = _start_dev(state, tmp_path / "dev.log")
    try:
        context = ssl.create_default_context(cafile=str(state / "ca.pem"))
        reply = https_request(port, context, path="/from-dev")
        assert reply.status == 200
        assert b"Hello from the hsm-proxy demo upstream." in reply.body
        assert b"GET /from-dev" in reply.body
        assert b"X-Forwarded-Proto: https" in reply.body
    finally:
        _stop(process)
    assert process.returncode == 0
    for name in ("softhsm2.conf", "ca.pem", "cert.pem", "pin"):
        assert (state / name).is_file(), name
    assert (state / "pin").stat().st_mode & 0o777 == 0o600
    pin = (state / "pin").read_text().strip()
    everything = b"".join(path.read_bytes() for path in state.glob("*.pem"))
    assert b"PRIVATE KEY" not in everything
    assert pin not in (tmp_path / "dev.log").read_text()


def test_dev_reuses_its_state_directory(tmp_path: Path) -> None:
    state = tmp_path / "state"
    process, _ = _start_dev(state, tmp_path / "first.log")
    _stop(process)
    first = {name: (state / name).read_bytes() for name in ("ca.pem", "cert.pem", "pin")}
    process, port = _start_dev(state, tmp_path / "second.log")
    try:
        context = ssl.create_default_context(cafile=str(state / "ca.pem"))
        assert https_request(port, context).status == 200
    finally:
        _stop(process)
    assert {name: (state / name).read_bytes() for name in first} == first


@pytest.mark.skipif(shutil.which("pkcs11-tool") is None, reason="OpenSC is installed by setup.sh")
def test_dev_key_is_sensitive_and_never_extractable(tmp_path: Path) -> None:
    state = tmp_path / "state"
    process, _ = _start_dev(state, tmp_path / "dev.log")
    _stop(process)
    from proxy.commands.devstate import find_softhsm_module

    listing = subprocess.run(
        [
            "pkcs11-tool",
            "--module",
            find_softhsm_module(),
            "--token-label",
            "hsm-proxy-dev",
            "--login",
            "--pin",
            (state / "pin").read_text().strip(),
            "-O",
        ],
        env={**os.environ, "SOFTHSM2_CONF": str(state / "softhsm2.conf")},
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    private = listing[listing.index("Private Key Object; EC") :]
    assert "Usage:      sign\n" in private
    assert "Access:     sensitive, always sensitive, never extractable, local" in private


def test_a_reload_with_the_token_gone_keeps_the_proxy_up(tmp_path: Path) -> None:
    """The token store vanishing under a running proxy makes the reload fail, not the proxy."""
    state = tmp_path / "state"
    log = tmp_path / "dev.log"
    process, port = _start_dev(state, log)
    try:
        context = ssl.create_default_context(cafile=str(state / "ca.pem"))
        assert https_request(port, context).status == 200
        (state / "tokens").rename(tmp_path / "tokens-away")
        process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 30
        while '"reload_failed"' not in log.read_text():
            assert process.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        assert process.poll() is None
        (tmp_path / "tokens-away").rename(state / "tokens")
        assert (
            https_request(port, ssl.create_default_context(cafile=str(state / "ca.pem"))).status
            == 200
        )
    finally:
        _stop(process)


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _has_ipv6_loopback(), reason="this host has no ::1")
def test_dev_on_localhost_listens_on_both_loopbacks_on_one_port(tmp_path: Path) -> None:
    """The dev certificate names 127.0.0.1 and ::1, and clients that resolve localhost
    themselves may try ::1 first, whatever /etc/hosts says."""
    state = tmp_path / "state"
    process, port = _start_dev(state, tmp_path / "dev.log", listen="localhost:0")
    try:
        context = ssl.create_default_context(cafile=str(state / "ca.pem"))
        for address in ("127.0.0.1", "::1"):
            with socket.create_connection((address, port), timeout=10) as raw:
                with context.wrap_socket(raw, server_hostname="localhost") as tls:
                    tls.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                    assert tls.recv(100).startswith(b"HTTP/1.1 200"), address
    finally:
        _stop(process)
