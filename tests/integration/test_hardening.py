"""Operator safety and hostile clients: secret-file permissions, no secret in any output,
credential headers redacted, dropping root, and handshake limits."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from tests.support import (
    HSM,
    REPO,
    TOKEN_PIN,
    ProxyFactory,
    ProxyProcess,
    RecordingUpstream,
    client_context,
    https_request,
    run_cli,
    write_config,
)

# --- secret files ------------------------------------------------------------------------


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o620])
def test_pin_file_other_users_can_access_is_refused(
    tmp_path: Path, hsm: HSM, ca: trustme.CA, upstream: RecordingUpstream, mode: int
) -> None:
    pin = tmp_path / "shared-pin"
    pin.write_text(TOKEN_PIN + "\n")
    pin.chmod(mode)
    config = write_config(tmp_path, hsm, ca, upstream.url, "ec256", pin_file=pin)
    result = run_cli("check", "--config", str(config))
    assert result.returncode == 1
    assert (
        f"PIN file {pin} is readable or writable by other users (mode {mode:04o}): "
        f"run chmod 600 {pin}, or set security.allow_insecure_secret_files = true"
    ) in result.stderr
    assert TOKEN_PIN not in result.stdout + result.stderr


def test_operator_can_accept_a_shared_pin_file_explicitly(
    tmp_path: Path, hsm: HSM, ca: trustme.CA, upstream: RecordingUpstream
) -> None:
    pin = tmp_path / "shared-pin"
    pin.write_text(TOKEN_PIN + "\n")
    pin.chmod(0o644)
    config = write_config(tmp_path, hsm, ca, upstream.url, "ec256", pin_file=pin)
    config.write_text(config.read_text() + "\n[security]\nallow_insecure_secret_files = true\n")
    result = run_cli("check", "--config", str(config))
    assert result.returncode == 0, result.stderr
    assert TOKEN_PIN not in result.stdout + result.stderr


# --- no secret in any output ---------------------------------------------------------------


def test_planted_pin_appears_in_no_log_line_error_or_check_output(
    tmp_path: Path,
    hsm: HSM,
    proxy_factory: ProxyFactory,
    ca: trustme.CA,
    upstream: RecordingUpstream,
) -> None:
    proxy = proxy_factory("ec256")
    https_request(proxy.port, client_context(ca), path=f"/{TOKEN_PIN}-in-a-path-is-not-ours")
    # Garbage, a plaintext request and an aborted handshake: every error path logs.
    for junk in (b"\x16\x03\x01\x00\x05hello", b"GET / HTTP/1.1\r\n\r\n", b""):
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as raw:
            raw.sendall(junk)
            with contextlib.suppress(OSError):
                raw.recv(100)
    check = run_cli("check", "--config", str(tmp_path / "proxy.toml"))
    assert check.returncode == 0
    proxy.stop()
    lines = proxy.log_path.read_text().splitlines()
    assert len(lines) > 5
    for line in [*lines, *check.stdout.splitlines(), *check.stderr.splitlines()]:
        assert TOKEN_PIN not in line
    # Even where a client sent it (the request's path), the access line shows it scrubbed.
    access = [entry for entry in proxy.lines() if "-in-a-path" in str(entry.get("path", ""))]
    assert [entry["path"] for entry in access] == ["/[redacted]-in-a-path-is-not-ours"]


CRASH = """
import logging, sys, threading
from pathlib import Path
from proxy.ops.hardening import install_excepthooks
from proxy.ops.logs import log, setup_logging
from proxy.secrets.store import PinSource, read_pin

install_excepthooks()
setup_logging("info", json_lines=True)
pin = read_pin(PinSource(file=Path(sys.argv[1])))

def leak():
    try:
        {}[pin]
    except KeyError as missing:
        raise RuntimeError("login with " + pin + " failed") from missing

try:
    leak()
except RuntimeError:
    log.exception("logged with its chain")
thread = threading.Thread(target=leak, name="worker")
thread.start()
thread.join()
print("main thread goes on", file=sys.stderr)
leak()
"""


def test_tracebacks_and_exception_chains_are_scrubbed(hsm: HSM) -> None:
    result = subprocess.run(
        [sys.executable, "-c", CRASH, str(hsm.pin_file)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    output = result.stdout + result.stderr
    assert TOKEN_PIN not in output
    # Three tracebacks (logged, worker thread, main thread), each with the whole chain.
    assert output.count("RuntimeError: login with [redacted] failed") == 3
    assert output.count("KeyError: '[redacted]'") == 3
    assert "Exception in thread worker" in output
    assert "main thread goes on" in output


def test_credential_headers_are_redacted_from_debug_logs_but_reach_the_upstream(
    tmp_path: Path, hsm: HSM, ca: trustme.CA, upstream: RecordingUpstream
) -> None:
    config = write_config(tmp_path, hsm, ca, upstream.url, "ec256")
    with running(config, tmp_path, "--log-level", "debug") as proxy:
        secret_headers = {
            "Authorization": "Bearer sekrit-token-1234",
            "Cookie": "session=sekrit-cookie-5678",
            "X-Trace": "visible-9",
        }
        reply = https_request(proxy.port, client_context(ca), headers=secret_headers)
        assert reply.status == 200
        logged = proxy.wait_for_log(lambda entry: entry.get("message") == "request headers")
    headers = dict(logged["headers"])
    assert headers["Authorization"] == "[redacted]"
    assert headers["Cookie"] == "[redacted]"
    assert headers["X-Trace"] == "visible-9"
    assert "sekrit" not in proxy.log_path.read_text()
    seen = upstream.requests[-1].headers
    assert seen["Authorization"] == "Bearer sekrit-token-1234"
    assert seen["Cookie"] == "session=sekrit-cookie-5678"


@contextlib.contextmanager
def running(config: Path, directory: Path, *global_options: str) -> Iterator[ProxyProcess]:
    proxy = ProxyProcess.run_config(config, directory, *global_options)
    try:
        yield proxy
    finally:
        proxy.stop()


# --- dropping root -------------------------------------------------------------------------


@pytest.mark.skipif(os.geteuid() != 0, reason="dropping root needs a test run as root")
def test_root_is_dropped_after_binding(
    tmp_path: Path, hsm: HSM, ca: trustme.CA, upstream: RecordingUpstream
) -> None:
    config = write_config(tmp_path, hsm, ca, upstream.url, "ec256")
    config.write_text(config.read_text() + '\n[security]\nuser = "nobody"\n')
    # The token's files belong to root (mode 0600): the unprivileged user could not sign,
    # and the proxy says so at start-up rather than failing every handshake.
    result = run_cli("run", "--config", str(config))
    assert result.returncode == 1
    assert "after switching to user 'nobody' the token can no longer sign" in result.stderr
    assert "give 'nobody' access to the token" in result.stderr
    assert "Traceback" not in result.stderr  # one clear line, not a trio exception group

    # Give the user the token, as the README says; root stays able to use it too.
    nobody = int(subprocess.check_output(["id", "-u", "nobody"]).decode())
    for path in [hsm.directory, *hsm.directory.rglob("*"), tmp_path, *tmp_path.iterdir()]:
        os.chown(path, nobody, -1)
    with running(config, tmp_path) as proxy:
        proxy.wait_for_log(lambda entry: "dropped root: now user 'nobody'" in entry["message"])
        status = Path(f"/proc/{proxy.process.pid}/status").read_text()
        uid_line = next(line for line in status.splitlines() if line.startswith("Uid:"))
        assert uid_line.split()[1:] == [str(nobody)] * 4  # real, effective, saved, fs
        assert https_request(proxy.port, client_context(ca)).status == 200
        assert proxy.signatures() == 1


def _free_privileged_port() -> int:
    for port in range(1023, 900, -1):
        with contextlib.suppress(OSError), socket.socket() as probe:
            probe.bind(("127.0.0.1", port))
            return port
    pytest.skip("no free port below 1024 on 127.0.0.1")


def _uids(pid: int) -> list[str]:
    status = Path(f"/proc/{pid}/status").read_text()
    return next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1:]


@pytest.mark.skipif(os.geteuid() != 0, reason="dropping root needs a test run as root")
def test_the_supervisor_binds_then_drops_root_before_starting_any_worker(
    tmp_path: Path,
    hsm: HSM,
    ca: trustme.CA,
    upstream: RecordingUpstream,
    request: pytest.FixtureRequest,
) -> None:
    from tests.support.operating import admin_section, admin_url, get, wait_until

    # Workers are started as the user: it must be able to run this interpreter and import
    # this checkout (not so where the checkout sits in a private directory, as /root is in
    # deploy/test-in-debian-chroot.sh).
    reach = subprocess.run(
        ["runuser", "-u", "nobody", "--", sys.executable, "-c", "import proxy"],
        cwd="/",
        capture_output=True,
        text=True,
    )
    if reach.returncode != 0:
        pytest.skip(
            f"user nobody cannot run {sys.executable} with this checkout: {reach.stderr[-200:]}"
        )
    port = _free_privileged_port()
    # What workers read must be where the user can go (pytest's own temporary directories
    # are private to root).
    work = Path(tempfile.mkdtemp(prefix="hsm-proxy-drop-"))
    request.addfinalizer(lambda: shutil.rmtree(work, ignore_errors=True))
    config = write_config(work, hsm, ca, upstream.url, "ec256", extra_tls=admin_section(60))
    config.write_text(
        config.read_text().replace('listen = "127.0.0.1:0"', f'listen = "127.0.0.1:{port}"', 1)
        + '\n[security]\nuser = "nobody"\n'
    )
    nobody = subprocess.check_output(["id", "-u", "nobody"]).decode().strip()
    for path in [hsm.directory, *hsm.directory.rglob("*"), work, *work.iterdir()]:
        os.chown(path, int(nobody), -1)
    proxy = ProxyProcess.run_config(config, tmp_path, run_args=("--workers", "2"))
    try:
        proxy.wait_for_log(lambda entry: entry.get("event") == "workers_ready", timeout=60)
        workers = [
            int(entry["worker_pid"])
            for entry in proxy.lines()
            if entry.get("event") == "worker_started"
        ]
        # The supervisor and every worker: real, effective, saved and filesystem uid.
        for pid in (proxy.process.pid, *workers):
            assert _uids(pid) == [nobody] * 4, pid
        dropped = [line for line in proxy.lines() if "dropped root" in line["message"]]
        assert [line["pid"] for line in dropped] == [proxy.process.pid]  # no worker was root
        assert https_request(port, client_context(ca)).status == 200
        admin = admin_url(proxy.lines())
        wait_until(lambda: get(f"{admin}/readyz")[0] == 200, timeout=60)
        # A replacement, started by the unprivileged supervisor, serves on the same port.
        os.kill(workers[0], 9)
        proxy.wait_for_log(
            lambda entry: (
                entry.get("event") == "worker_started" and int(entry["worker_pid"]) not in workers
            ),
            timeout=30,
        )
        wait_until(lambda: get(f"{admin}/readyz")[0] == 200, timeout=60)
        replacement = next(
            int(entry["worker_pid"])
            for entry in proxy.lines()
            if entry.get("event") == "worker_started" and int(entry["worker_pid"]) not in workers
        )
        assert _uids(replacement) == [nobody] * 4
        for number in range(64):  # fresh connections until the kernel hashes one to it
            https_request(port, client_context(ca), path=f"/after/{number}")
            if any(
                entry.get("pid") == replacement and entry.get("path", "").startswith("/after/")
                for entry in proxy.lines()
            ):
                break
        else:
            raise AssertionError("the replacement worker served none of 64 connections")
    finally:
        proxy.stop()


@pytest.mark.skipif(os.geteuid() != 0, reason="the warning is about running as root")
def test_running_as_root_without_a_user_warns(
    proxy_factory: ProxyFactory, upstream: RecordingUpstream
) -> None:
    proxy = proxy_factory("ec256")
    warning = proxy.wait_for_log(lambda entry: "running as root" in entry["message"])
    assert warning["level"] == "warning"


def test_unknown_user_is_a_clear_error(
    tmp_path: Path, hsm: HSM, ca: trustme.CA, upstream: RecordingUpstream
) -> None:
    config = write_config(tmp_path, hsm, ca, upstream.url, "ec256")
    config.write_text(config.read_text() + '\n[security]\nuser = "no-such-user-hsm"\n')
    result = run_cli("run", "--config", str(config))
    assert result.returncode == 1
    expected = (
        "no user named 'no-such-user-hsm' on this system"
        if os.geteuid() == 0
        else "cannot switch to user 'no-such-user-hsm': the proxy is not running as root"
    )
    assert expected in result.stderr


# --- handshake limits ----------------------------------------------------------------------


def silent_connection(port: int, source: str) -> socket.socket:
    """A TCP connection that never sends a ClientHello: a handshake slot held open."""
    sock = socket.socket()
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", port))
    return sock


def handshake_refused(port: int, ca: trustme.CA, source: str) -> bool:
    """True when the proxy closed the connection before the handshake, as admission does
    over the handshake limits; False when the request was answered. Anything else (an
    alert, a handshake that fails another way, a request that gets no answer) fails."""
    sock = socket.socket()
    sock.settimeout(10)
    sock.bind((source, 0))
    try:
        sock.connect(("127.0.0.1", port))
        try:
            tls = client_context(ca).wrap_socket(sock, server_hostname="localhost")
        except (ssl.SSLEOFError, ssl.SSLZeroReturnError, ConnectionResetError, BrokenPipeError):
            return True  # closed before a byte was read: no ClientHello was looked at
        with tls:
            tls.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            answer = tls.recv(100)
        assert answer.startswith(b"HTTP/1.1 200 "), answer
        return False
    finally:
        sock.close()


def eventually(condition: object, attempts: int = 100) -> bool:
    for _ in range(attempts):
        if condition():  # type: ignore[operator]
            return True
        time.sleep(0.05)
    return False


def test_handshake_limits_per_client_and_in_total(
    proxy_factory: ProxyFactory, ca: trustme.CA, upstream: RecordingUpstream
) -> None:
    proxy = proxy_factory(
        "ec256",
        extra_tls="\n[security]\nmax_handshakes = 3\nmax_handshakes_per_client = 2\n",
    )
    held = [silent_connection(proxy.port, "127.0.0.1") for _ in range(2)]
    try:
        # 127.0.0.1 has used its two slots; another address still gets in.
        assert eventually(lambda: handshake_refused(proxy.port, ca, "127.0.0.1"))
        refusal = proxy.wait_for_log(lambda entry: entry.get("event") == "handshake_limit")
        assert "over the handshake limits" in refusal["message"]
        assert not handshake_refused(proxy.port, ca, "127.0.0.2")
        # The third slot, and with it the total, goes to a silent 127.0.0.2.
        held.append(silent_connection(proxy.port, "127.0.0.2"))
        assert eventually(lambda: handshake_refused(proxy.port, ca, "127.0.0.3"))
    finally:
        for sock in held:
            sock.close()
    # Slots are released when those connections end.
    assert eventually(lambda: not handshake_refused(proxy.port, ca, "127.0.0.1"))
    assert upstream.requests  # the admitted clients were served


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ("max_handshakes = 0\n", "security.max_handshakes: must be from 1 to 100000, got 0"),
        (
            "max_handshakes = 4\nmax_handshakes_per_client = 5\n",
            "security.max_handshakes_per_client: must be from 1 to max_handshakes (4), got 5",
        ),
        ('user = ""\n', "security.user: must name a user"),
        ("allow_insecure_secret_files = 1\n", "expected true/false, got int"),
    ],
)
def test_security_config_errors_are_clear(
    tmp_path: Path, hsm: HSM, ca: trustme.CA, upstream: RecordingUpstream, table: str, message: str
) -> None:
    config = write_config(tmp_path, hsm, ca, upstream.url, "ec256")
    config.write_text(config.read_text() + "\n[security]\n" + table)
    result = run_cli("check", "--config", str(config))
    assert result.returncode == 1
    assert message in result.stderr
