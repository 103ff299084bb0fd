"""A slow, busy or failing token, through faulthsm (tests/faulthsm/faulthsm.c): a real
PKCS#11 module in C that forwards to the SoftHSM2 test token and adds delays, errors or
hidden mechanisms on command. Real proxy processes, real TLS clients."""

from __future__ import annotations

import os
import signal
import socket
import ssl
import threading
import time
from pathlib import Path

import pytest
import trustme

from tests.faulthsm import FaultControl, read_stats
from tests.support import (
    TOKEN_PIN,
    KeepAlive,
    ProxyFactory,
    RecordingUpstream,
    StartOnFaulthsm,
    client_context,
    https_request,
)
from tests.support.reload import wait_until


def test_rsa_key_without_raw_rsa_still_does_tls13_through_pkcs_pss(
    on_faulthsm: StartOnFaulthsm,
    fault: FaultControl,
    ca: trustme.CA,
    upstream: RecordingUpstream,
) -> None:
    proxy = on_faulthsm("rsa2048", settings={"hide": "CKM_RSA_X_509"})
    reply = https_request(proxy.port, client_context(ca, ssl.TLSVersion.TLSv1_3), path="/pss")
    assert reply.status == 200
    assert reply.tls_version == "TLSv1.3"
    proxy.wait_for_log(lambda entry: entry.get("path") == "/pss")
    audit = [e for e in proxy.lines() if e.get("event") == "token_signature"]
    assert audit[-1]["mechanism"] == "RSA_PKCS_PSS"
    assert audit[-1]["result"] == "ok"
    assert any("CKM_RSA_PKCS_PSS" in e.get("message", "") for e in proxy.lines())


def test_rsa_key_without_any_pss_mechanism_falls_back_to_tls12_and_says_so(
    on_faulthsm: StartOnFaulthsm,
    fault: FaultControl,
    ca: trustme.CA,
    upstream: RecordingUpstream,
) -> None:
    proxy = on_faulthsm(
        "rsa2048",
        settings={"hide": "CKM_RSA_X_509,CKM_RSA_PKCS_PSS"},
    )
    notes = [e for e in proxy.lines() if e.get("event") == "token_key_limits"]
    assert len(notes) == 1
    assert "TLS 1.3 is off" in notes[0]["message"]
    # A client that allows both versions gets TLS 1.2 with PKCS#1 v1.5, not a failure.
    reply = https_request(proxy.port, client_context(ca), path="/fallback")
    assert reply.status == 200
    assert reply.tls_version == "TLSv1.2"
    proxy.wait_for_log(lambda entry: entry.get("path") == "/fallback")
    audit = [e for e in proxy.lines() if e.get("event") == "token_signature"]
    assert audit[-1]["mechanism"] == "RSA_PKCS"
    with pytest.raises(ssl.SSLError):
        https_request(proxy.port, client_context(ca, ssl.TLSVersion.TLSv1_3))


@pytest.mark.slow
def test_two_workers_each_serve_handshakes_and_a_dead_worker_is_replaced(
    proxy_factory: ProxyFactory, ca: trustme.CA, upstream: RecordingUpstream
) -> None:
    proxy = proxy_factory("ec256", run_args=("--workers", "2"))
    proxy.wait_for_log(lambda entry: entry.get("event") == "workers_ready", timeout=30)
    started = [e["worker_pid"] for e in proxy.lines() if e.get("event") == "worker_started"]
    assert len(started) == 2

    def serving_pids(count: int) -> set[int]:
        context = client_context(ca)
        for number in range(count):
            assert https_request(proxy.port, context, path=f"/w/{number}").status == 200
        signatures = [e for e in proxy.lines() if e.get("event") == "token_signature"]
        return {e["pid"] for e in signatures if "connection_id" in e}

    # SO_REUSEPORT spreads connections by a hash of their addresses: with 30 fresh
    # connections, both workers take some (all on one has a chance of 2 in 2**30).
    assert serving_pids(30) == set(started)

    os.kill(started[0], signal.SIGKILL)
    replaced = proxy.wait_for_log(
        lambda entry: entry.get("event") == "worker_started" and entry["worker_pid"] not in started,
        timeout=30,
    )
    proxy.wait_for_log(
        lambda entry: (
            entry.get("pid") == replaced["worker_pid"]
            and entry.get("message", "").startswith("serving https://")
        ),
        timeout=30,
    )
    assert replaced["worker_pid"] in serving_pids(30)


def _handshake_all(port: int, context: ssl.SSLContext, count: int) -> list[int]:
    """``count`` clients connect at once, each with one request on a fresh handshake."""
    statuses: list[int] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(count)

    def client(number: int) -> None:
        barrier.wait()
        try:
            statuses.append(https_request(port, context, path=f"/c/{number}").status)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    return statuses


def test_concurrent_handshakes_overlap_their_token_signatures(
    on_faulthsm: StartOnFaulthsm,
    fault: FaultControl,
    ca: trustme.CA,
    upstream: RecordingUpstream,
) -> None:
    proxy = on_faulthsm(sessions=8, settings={"delay_ms": 5})
    assert _handshake_all(proxy.port, client_context(ca), 50) == [200] * 50
    assert proxy.signatures() == 50
    # The token saw several signatures under way at once: 50 handshakes never queue behind
    # one another's 5 ms signature (nor behind the event loop). How many per second that
    # makes is measured in bench/, not asserted on this shared machine.
    stats = read_stats(fault.path.with_name("faulthsm.stats"))
    assert stats["signatures"] >= 50
    assert stats["max_in_flight"] >= 2


def test_keepalive_requests_do_not_wait_behind_handshakes_stuck_on_a_slow_token(
    on_faulthsm: StartOnFaulthsm,
    fault: FaultControl,
    ca: trustme.CA,
    upstream: RecordingUpstream,
) -> None:
    proxy = on_faulthsm(sessions=2, extra_tls="handshake_timeout = 300\n")
    context = client_context(ca)
    stats = fault.path.with_name("faulthsm.stats")
    kept = KeepAlive(proxy.port, context)
    waiting: list[threading.Thread] = []
    try:
        assert kept.get("/before") == 200
        fault.set(hold=1)  # every new signature now waits inside the token until released
        finished: list[int] = []

        def handshake(number: int) -> None:
            finished.append(https_request(proxy.port, context, path=f"/slow/{number}").status)

        waiting = [threading.Thread(target=handshake, args=(n,)) for n in range(6)]
        for thread in waiting:
            thread.start()
        # Both token sessions are taken by held signatures; four more handshakes queue.
        wait_until(lambda: read_stats(stats)["in_flight"] == 2, what="two held signatures")
        for number in range(20):
            assert kept.get(f"/during/{number}") == 200
        # Answered while no handshake could finish: none of them queued behind a signature.
        assert finished == []
        assert read_stats(stats)["in_flight"] == 2
    finally:
        fault.clear()
        for thread in waiting:
            thread.join(timeout=60)
    try:
        assert finished == [200] * 6
        assert kept.get("/after") == 200
    finally:
        kept.close()


def test_device_error_fails_new_handshakes_fast_then_recovers_without_dropping_connections(
    on_faulthsm: StartOnFaulthsm,
    fault: FaultControl,
    ca: trustme.CA,
    upstream: RecordingUpstream,
) -> None:
    proxy = on_faulthsm(extra_tls="handshake_timeout = 60\n")
    context = client_context(ca)
    kept = KeepAlive(proxy.port, context)
    try:
        assert kept.get("/before") == 200
        fault.set(error="CKR_DEVICE_ERROR", error_calls="all")
        with pytest.raises(ssl.SSLError):
            https_request(proxy.port, context, path="/first")
        proxy.wait_for_log(lambda entry: entry.get("event") == "token_down")
        # While the token is down, a handshake is refused without waiting for the token
        # (and long before the 60 s handshake timeout).
        with pytest.raises(ssl.SSLError):
            https_request(proxy.port, context, path="/second")
        refused = proxy.wait_for_log(
            lambda entry: (
                entry.get("event") == "token_signature"
                and "refusing at once" in entry.get("error", "")
            )
        )
        assert refused["result"] == "error"
        # Established connections keep flowing during the fault.
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:
            assert kept.get("/during") == 200
            time.sleep(0.1)
        fault.clear()
        deadline = time.monotonic() + 30
        while True:
            try:
                reply = https_request(proxy.port, context, path="/after")
                break
            except ssl.SSLError:
                assert time.monotonic() < deadline, "the proxy did not recover"
                time.sleep(0.2)
        assert reply.status == 200
        proxy.wait_for_log(lambda entry: entry.get("event") == "token_recovered")
        assert kept.get("/still-the-same-connection") == 200
        assert proxy.process.poll() is None
    finally:
        kept.close()


@pytest.mark.parametrize("error", ["CKR_SESSION_HANDLE_INVALID", "CKR_USER_NOT_LOGGED_IN"])
def test_lost_session_or_login_is_reopened_without_the_client_noticing(
    error: str,
    on_faulthsm: StartOnFaulthsm,
    fault: FaultControl,
    ca: trustme.CA,
    upstream: RecordingUpstream,
) -> None:
    proxy = on_faulthsm()
    fault.set(error=error, error_count=1)  # the next signature fails once, as after failover
    reply = https_request(proxy.port, client_context(ca), path="/reopened")
    assert reply.status == 200
    proxy.wait_for_log(lambda entry: entry.get("event") == "token_sessions_reopened")
    assert not [e for e in proxy.lines() if e.get("event") == "token_down"]
    assert https_request(proxy.port, client_context(ca), path="/again").status == 200


def test_a_refused_pin_during_recovery_is_not_retried(
    tmp_path: Path,
    on_faulthsm: StartOnFaulthsm,
    fault: FaultControl,
    ca: trustme.CA,
    upstream: RecordingUpstream,
) -> None:
    pin_file = tmp_path / "pin"
    pin_file.write_text(TOKEN_PIN)
    proxy = on_faulthsm(pin_file=pin_file)
    pin_file.write_text("a-wrong-pin-7781")  # someone broke the PIN file meanwhile
    # The device fails long enough for the proxy to re-initialise the module, which ends
    # the process's login: when the device is back, it must log in again, with the PIN
    # that is now wrong.
    fault.set(error="CKR_DEVICE_ERROR", error_calls="all")
    with pytest.raises(ssl.SSLError):
        https_request(proxy.port, client_context(ca))
    proxy.wait_for_log(lambda e: e.get("event") == "token_recovery_failed")
    fault.clear()
    abandoned = proxy.wait_for_log(lambda e: e.get("event") == "token_recovery_abandoned")
    assert "the PIN is incorrect" in abandoned["message"]
    with pytest.raises(ssl.SSLError):
        https_request(proxy.port, client_context(ca))
    events = [e.get("event") for e in proxy.lines()]
    assert events.count("token_recovery_abandoned") == 1
    assert "token_recovered" not in events
    attempts = events.count("token_recovery_failed")
    time.sleep(1)  # no attempt, hence no login with the refused PIN, after giving up
    assert [e.get("event") for e in proxy.lines()].count("token_recovery_failed") == attempts
    assert "a-wrong-pin-7781" not in proxy.log_path.read_text()
    assert TOKEN_PIN not in proxy.log_path.read_text()


def test_workers_share_one_ticket_key_so_either_resumes_a_session(
    proxy_factory: ProxyFactory, ca: trustme.CA, upstream: RecordingUpstream
) -> None:
    """With no ticket keys configured, the supervisor hands one to every worker: a session
    issued by one worker resumes on the other, with no token signature."""
    proxy = proxy_factory("ec256", run_args=("--workers", "2"))
    proxy.wait_for_log(lambda entry: entry.get("event") == "workers_ready", timeout=30)
    context = client_context(ca, ssl.TLSVersion.TLSv1_2)

    def connect(session: ssl.SSLSession | None) -> tuple[ssl.SSLSession | None, bool]:
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as raw:
            with context.wrap_socket(raw, server_hostname="localhost", session=session) as tls:
                tls.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                while tls.recv(65536):
                    pass
                return tls.session, bool(tls.session_reused)

    session, _ = connect(None)
    before = proxy.signatures()
    # SO_REUSEPORT spreads new connections over both workers by a hash of their addresses.
    reused = [connect(session)[1] for _ in range(12)]
    assert reused == [True] * 12
    assert proxy.signatures() == before
    pids = {e["pid"] for e in proxy.lines() if e.get("message") == "request" and "pid" in e}
    assert len(pids) == 2, "both workers should have answered some of the 13 connections"
