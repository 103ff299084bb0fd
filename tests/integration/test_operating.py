"""Operating the proxy: the admin endpoint, its metrics and readiness, and the log lines."""

from __future__ import annotations

import json
import shutil
import socket
import ssl
from pathlib import Path

import pytest
import trustme

from proxy import __version__
from proxy.config import parse_config
from proxy.errors import ConfigError
from proxy.tls.certificates import load_chain
from tests.support import (
    HSM,
    TOKEN_PIN,
    ProxyFactory,
    RecordingUpstream,
    client_context,
    free_port,
    https_request,
)
from tests.support.operating import (
    admin_section,
    admin_url,
    get,
    scrape,
    start_dev,
    value,
    wait_until,
)


def test_metrics_move_with_connections_handshakes_signatures_and_requests(
    proxy_factory: ProxyFactory, ca: trustme.CA, upstream: RecordingUpstream, tmp_path: Path
) -> None:
    proxy = proxy_factory("ec256", extra_tls=admin_section(probe_interval=60))
    admin = admin_url(proxy.lines())
    wait_until(lambda: get(f"{admin}/readyz")[0] == 200)  # the first probe has signed
    before = scrape(admin)
    https_request(proxy.port, client_context(ca, ssl.TLSVersion.TLSv1_2), path="/a")
    https_request(proxy.port, client_context(ca, ssl.TLSVersion.TLSv1_3), path="/status/404")
    with socket.create_connection(("127.0.0.1", proxy.port)) as raw:
        raw.sendall(b"this is not TLS\r\n\r\n")
        raw.recv(100)
    proxy.wait_for_log(lambda entry: entry.get("path") == "/status/404")
    proxy.wait_for_log(lambda entry: "TLS handshake failed" in entry.get("message", ""))
    after = scrape(admin)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("hsm_proxy_connections_total") == 3
    assert value(after, "hsm_proxy_connections_open") == 0
    assert delta("hsm_proxy_handshakes_total", version="TLSv1.2", result="ok") == 1
    assert delta("hsm_proxy_handshakes_total", version="TLSv1.3", result="ok") == 1
    assert delta("hsm_proxy_handshakes_total", version="none", result="failed") == 1
    assert delta("hsm_proxy_handshake_duration_seconds_count") == 2
    assert delta("hsm_proxy_tls_sessions_total", kind="full") == 2
    # One signature per full handshake, each with an audit line (the probe adds its own).
    signatures = delta("hsm_proxy_token_signatures_total", mechanism="ECDSA", result="ok")
    assert signatures == 2
    assert delta("hsm_proxy_token_signature_duration_seconds_count", mechanism="ECDSA") == 2
    assert delta("hsm_proxy_requests_total", status_class="2xx") == 1
    assert delta("hsm_proxy_requests_total", status_class="4xx") == 1
    assert value(after, "hsm_proxy_token_queue_depth") == 0
    assert value(after, "hsm_proxy_generation") == 1
    # Reloads are counted from zero (reload.py reports each attempt).
    assert ("hsm_proxy_reloads_total", frozenset({("result", "failed")})) in after
    expiry = load_chain(tmp_path / "chain-ec256.pem").not_after().timestamp()
    assert (
        value(after, "hsm_proxy_certificate_expiry_timestamp_seconds", server_name="localhost")
        == expiry
    )
    assert (
        value(after, "hsm_proxy_certificate_expiry_timestamp_seconds", server_name="127.0.0.1")
        == expiry
    )


def test_resumed_handshakes_are_counted_and_make_no_signature(
    proxy_factory: ProxyFactory, ca: trustme.CA, upstream: RecordingUpstream
) -> None:
    proxy = proxy_factory("ec256", extra_tls=admin_section(probe_interval=60))
    admin = admin_url(proxy.lines())
    wait_until(lambda: get(f"{admin}/readyz")[0] == 200)  # the first probe has signed
    context = client_context(ca, ssl.TLSVersion.TLSv1_2)
    with socket.create_connection(("127.0.0.1", proxy.port)) as raw:
        with context.wrap_socket(raw, server_hostname="localhost") as tls:
            tls.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            while tls.recv(65536):
                pass
            session = tls.session
    before = scrape(admin)
    with socket.create_connection(("127.0.0.1", proxy.port)) as raw:
        with context.wrap_socket(raw, server_hostname="localhost", session=session) as tls:
            assert tls.session_reused
    wait_until(lambda: value(scrape(admin), "hsm_proxy_connections_open") == 0)
    after = scrape(admin)
    assert value(after, "hsm_proxy_tls_sessions_total", kind="resumed") == 1
    assert value(after, "hsm_proxy_tls_sessions_total", kind="full") == value(
        before, "hsm_proxy_tls_sessions_total", kind="full"
    )
    assert value(after, "hsm_proxy_token_signatures_total", mechanism="ECDSA", result="ok") == (
        value(before, "hsm_proxy_token_signatures_total", mechanism="ECDSA", result="ok")
    )


def test_upstream_errors_are_counted_by_kind_and_readiness_follows_the_upstream(
    proxy_factory: ProxyFactory, ca: trustme.CA, upstream: RecordingUpstream
) -> None:
    proxy = proxy_factory("ec256", extra_tls=admin_section(probe_interval=0.1))
    admin = admin_url(proxy.lines())
    wait_until(lambda: get(f"{admin}/readyz")[0] == 200)
    _, _, body = get(f"{admin}/readyz")
    assert body.splitlines()[0] == "ready"
    assert "ok token: " in body
    assert "ok certificate: localhost, 127.0.0.1 valid until" in body
    upstream.stop()
    reply = https_request(proxy.port, client_context(ca), path="/gone")
    assert reply.status == 502
    wait_until(lambda: get(f"{admin}/readyz")[0] == 503)
    _, _, body = get(f"{admin}/readyz")
    assert body.splitlines()[0] == "not ready"
    assert f"FAIL upstream: default: cannot connect to upstream {upstream.url}" in body
    samples = scrape(admin)
    assert value(samples, "hsm_proxy_upstream_errors_total", kind="connect") == 1
    assert value(samples, "hsm_proxy_requests_total", status_class="5xx") == 1
    assert value(samples, "hsm_proxy_ready") == 0
    assert get(f"{admin}/healthz")[:3] == (200, "text/plain; charset=utf-8", "ok\n")


def test_readiness_fails_when_the_token_fails(tmp_path: Path, upstream: RecordingUpstream) -> None:
    proxy = start_dev(tmp_path / "state", upstream.url, tmp_path / "dev.log")
    try:
        admin = admin_url(proxy.lines())
        wait_until(lambda: get(f"{admin}/readyz")[0] == 200)
        # Take the token away from under the running proxy: SoftHSM2 loses its objects.
        shutil.move(tmp_path / "state" / "tokens", tmp_path / "tokens.gone")
        context = ssl.create_default_context(cafile=tmp_path / "state" / "ca.pem")
        with pytest.raises(ssl.SSLError):
            https_request(proxy.port, context)
        status, _, body = get(f"{admin}/readyz")
        assert status == 503
        assert "FAIL token: signature by pkcs11:token=hsm-proxy-dev" in body
        samples = scrape(admin)
        # The handshake's signature failed (a probe in between may have failed too).
        assert (
            value(samples, "hsm_proxy_token_signatures_total", mechanism="ECDSA", result="error")
            >= 1
        )
        # The client reads the alert before the proxy has closed and counted the connection.
        wait_until(
            lambda: (
                value(scrape(admin), "hsm_proxy_handshakes_total", version="none", result="failed")
                == 1
            )
        )
        audit = proxy.wait_for_log(
            lambda entry: entry.get("result") == "error" and "connection_id" in entry
        )
        assert audit["event"] == "token_signature"
        assert audit["connection_id"] == 1
    finally:
        proxy.stop()


def test_admin_answers_only_its_paths_and_methods(
    proxy_factory: ProxyFactory, upstream: RecordingUpstream
) -> None:
    proxy = proxy_factory("ec256", extra_tls=admin_section(probe_interval=60))
    admin = admin_url(proxy.lines())
    assert get(f"{admin}/nope")[0] == 404
    host, port = admin.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port))) as raw:
        raw.sendall(b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
        assert raw.recv(1000).startswith(b"HTTP/1.1 405 ")
    with socket.create_connection((host, int(port))) as raw:
        raw.sendall(b"GARBAGE\r\n\r\n")
        assert raw.recv(1000).startswith(b"HTTP/1.1 400 ")


def _config(admin: str) -> dict[str, object]:
    return {
        "upstream": "http://127.0.0.1:8080",
        "token": {"module": "/m.so", "pin_env": "PIN"},
        "tls": {"certificate": "c.pem", "key": "pkcs11:object=k"},
        "admin": json.loads(admin),
    }


def test_admin_listens_on_loopback_unless_allowed_explicitly() -> None:
    base = Path("/etc")
    config = parse_config(_config('{"listen": "127.0.0.1:9090"}'), base, "t")
    assert config.admin is not None
    assert config.admin.probe_interval == 10.0
    assert parse_config(_config('{"listen": "[::1]:9090"}'), base, "t").admin is not None
    with pytest.raises(ConfigError, match=r"admin.listen: 0.0.0.0:9090 is not a loopback address"):
        parse_config(_config('{"listen": "0.0.0.0:9090"}'), base, "t")
    allowed = parse_config(_config('{"listen": "0.0.0.0:9090", "allow_public": true}'), base, "t")
    assert allowed.admin is not None
    assert allowed.admin.allow_public
    with pytest.raises(ConfigError, match=r"admin.probe_interval: must be greater than 0"):
        parse_config(_config('{"listen": "127.0.0.1:1", "probe_interval": 0}'), base, "t")
    with pytest.raises(ConfigError, match=r"admin.port: unknown key"):
        parse_config(_config('{"listen": "127.0.0.1:1", "port": 1}'), base, "t")
    assert (
        parse_config({k: v for k, v in _config("{}").items() if k != "admin"}, base, "t").admin
        is None
    )


def test_dev_refuses_a_public_admin_address(tmp_path: Path) -> None:
    from tests.support import run_cli

    result = run_cli(
        "dev",
        "--state-dir",
        str(tmp_path),
        "--upstream",
        "http://127.0.0.1:1",
        "--admin",
        f"0.0.0.0:{free_port()}",
    )
    assert result.returncode == 1
    assert "--admin: 0.0.0.0:" in result.stderr
    assert "is not a loopback address" in result.stderr


def test_every_access_and_audit_line_is_json_with_its_fields_and_no_secret(
    proxy_factory: ProxyFactory, ca: trustme.CA, upstream: RecordingUpstream, hsm: HSM
) -> None:
    proxy = proxy_factory("rsa2048", extra_tls=admin_section(probe_interval=60))
    admin = admin_url(proxy.lines())
    wait_until(lambda: get(f"{admin}/readyz")[0] == 200)  # the first probe has signed
    for version in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
        https_request(
            proxy.port, client_context(ca, version), method="POST", path="/p", body=b"abc"
        )
    proxy.wait_for_log(lambda entry: entry.get("logger") == "hsm_proxy.access")
    proxy.stop()
    raw_lines = proxy.log_path.read_text().splitlines()
    assert TOKEN_PIN not in proxy.log_path.read_text()
    entries = [json.loads(line) for line in raw_lines if line.startswith("{")]
    access = [entry for entry in entries if entry["logger"] == "hsm_proxy.access"]
    audit = [entry for entry in entries if entry["logger"] == "hsm_proxy.audit"]
    assert len(access) == 2
    for entry in access:
        assert set(entry) >= {
            "time",
            "connection_id",
            "client",
            "sni",
            "tls_version",
            "method",
            "path",
            "status",
            "bytes_sent",
            "duration_ms",
            "upstream",
        }
        assert (entry["client"], entry["sni"], entry["method"], entry["path"], entry["status"]) == (
            "127.0.0.1",
            "localhost",
            "POST",
            "/p",
            200,
        )
    assert {entry["tls_version"] for entry in access} == {"TLSv1.2", "TLSv1.3"}
    for entry in audit:
        assert set(entry) >= {"time", "key_uri", "mechanism", "result", "latency_ms"}
        assert entry["key_uri"] == str(hsm.uri("rsa2048"))
        assert entry["mechanism"] in ("RSA_PKCS", "RSA_X_509")
        assert "pin" not in entry["key_uri"]
    by_connection = [entry for entry in audit if "connection_id" in entry]
    assert {entry["connection_id"] for entry in by_connection} == {
        entry["connection_id"] for entry in access
    }
    for entry in by_connection:
        assert (entry["client"], entry["sni"], entry["result"]) == ("127.0.0.1", "localhost", "ok")
    # Signatures made for no client say why they were made.
    assert {entry["purpose"] for entry in audit if "connection_id" not in entry} == {
        "startup_check",
        "readiness_probe",
    }


def test_reload_results_and_new_generations_reach_the_metrics(
    tmp_path: Path, hsm: HSM, ca: trustme.CA
) -> None:
    """The hooks reload.py calls: counted per result, the new certificate's expiry exported."""
    from prometheus_client.parser import text_string_to_metric_families

    from proxy.ops.admin import Operations
    from tests.support import issue_chain

    operations = Operations()
    path = tmp_path / "chain.pem"
    path.write_bytes(issue_chain(ca, hsm.public_keys["ec256"], names=("a.example", "b.example")))
    operations.serving(1, [load_chain(path)])
    operations.metrics.reload_finished(ok=False)
    path.write_bytes(issue_chain(ca, hsm.public_keys["ec256"], names=("c.example",)))
    operations.metrics.reload_finished(ok=True)
    operations.serving(2, [load_chain(path)])
    status, _headers, body = operations.endpoint.respond("GET", "/metrics")
    assert status == 200
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
    }
    assert samples[("hsm_proxy_reloads_total", (("result", "ok"),))] == 1
    assert samples[("hsm_proxy_reloads_total", (("result", "failed"),))] == 1
    assert samples[("hsm_proxy_generation", ())] == 2
    expiry = [
        name for name, _ in samples if name == "hsm_proxy_certificate_expiry_timestamp_seconds"
    ]
    assert len(expiry) == 1  # the old names are gone with the old certificate
    assert (
        "hsm_proxy_certificate_expiry_timestamp_seconds",
        (("server_name", "c.example"),),
    ) in samples


def test_reloads_are_counted_and_the_new_certificate_is_exported(
    proxy_factory: ProxyFactory,
    ca: trustme.CA,
    upstream: RecordingUpstream,
    hsm: HSM,
    tmp_path: Path,
) -> None:
    from tests.support import issue_chain
    from tests.support.reload import RELOAD_SETTINGS, replace_file

    proxy = proxy_factory("ec256", extra_tls=admin_section(probe_interval=60) + RELOAD_SETTINGS)
    admin = admin_url(proxy.lines())
    chain = tmp_path / "chain-ec256.pem"
    first = scrape(admin)
    assert value(first, "hsm_proxy_reloads_total", result="ok") == 0
    assert value(first, "hsm_proxy_generation") == 1
    names = ("localhost", "127.0.0.1", "renewed.example")
    replace_file(chain, issue_chain(ca, hsm.public_keys["ec256"], names=names))
    wait_until(lambda: value(scrape(admin), "hsm_proxy_reloads_total", result="ok") == 1, 30)
    renewed = scrape(admin)
    assert value(renewed, "hsm_proxy_generation") == 2
    assert (
        value(
            renewed,
            "hsm_proxy_certificate_expiry_timestamp_seconds",
            server_name="renewed.example",
        )
        == load_chain(chain).not_after().timestamp()
    )
    replace_file(chain, b"not a certificate\n")
    wait_until(lambda: value(scrape(admin), "hsm_proxy_reloads_total", result="failed") == 1, 30)
    after = scrape(admin)
    assert value(after, "hsm_proxy_generation") == 2  # the old generation keeps serving
    assert value(after, "hsm_proxy_reloads_total", result="ok") == 1
    reload_audit = [
        entry
        for entry in proxy.lines()
        if entry.get("event") == "token_signature" and entry.get("purpose") == "reload"
    ]
    assert len(reload_audit) == 1  # the test signature of the one generation that was built


def test_readiness_follows_the_token_layer_through_a_device_error_and_recovery(
    proxy_factory: ProxyFactory,
    hsm: HSM,
    faulthsm: Path,
    tmp_path: Path,
    ca: trustme.CA,
    upstream: RecordingUpstream,
) -> None:
    from tests.faulthsm import FaultControl

    fault = FaultControl(tmp_path / "faulthsm.control")
    env = {"FAULTHSM_CONTROL": str(fault.path), "FAULTHSM_MODULE": hsm.module}
    proxy = proxy_factory(
        "ec256", module=str(faulthsm), env=env, extra_tls=admin_section(probe_interval=0.2)
    )
    try:
        admin = admin_url(proxy.lines())
        wait_until(lambda: get(f"{admin}/readyz")[0] == 200)
        assert "ok token_state: token 'proxy' usable" in get(f"{admin}/readyz")[2]
        fault.set(error="CKR_DEVICE_ERROR", error_calls="all")
        wait_until(lambda: get(f"{admin}/readyz")[0] == 503)
        body = get(f"{admin}/readyz")[2]
        assert "FAIL token: " in body
        samples = scrape(admin)
        assert value(samples, "hsm_proxy_token_signatures_total", mechanism="ECDSA", result="error")
        fault.clear()
        wait_until(lambda: get(f"{admin}/readyz")[0] == 200, timeout=60)
        assert https_request(proxy.port, client_context(ca)).status == 200
    finally:
        fault.clear()


def test_one_admin_endpoint_adds_up_every_workers_metrics_and_readiness(
    proxy_factory: ProxyFactory, ca: trustme.CA, upstream: RecordingUpstream
) -> None:
    import os
    import signal

    proxy = proxy_factory(
        "ec256", extra_tls=admin_section(probe_interval=60), run_args=("--workers", "2")
    )
    proxy.wait_for_log(lambda entry: entry.get("event") == "workers_ready", timeout=60)
    admin = admin_url(proxy.lines())
    wait_until(lambda: get(f"{admin}/readyz")[0] == 200, timeout=60)  # both probes signed
    status, _, body = get(f"{admin}/readyz")
    workers = {
        int(entry["worker_pid"]): entry["worker"]
        for entry in proxy.lines()
        if entry.get("event") == "worker_started"
    }
    assert body.splitlines() == [
        "ready",
        *(
            f"ok worker {number} (pid {pid}): ready"
            for pid, number in sorted(workers.items(), key=lambda item: item[1])
        ),
    ]
    before = scrape(admin)
    for number in range(16):  # fresh connections: the kernel spreads them over the workers
        reply = https_request(proxy.port, client_context(ca), path=f"/spread/{number}")
        assert reply.status == 200
    served_by = {
        entry["pid"] for entry in proxy.lines() if str(entry.get("path", "")).startswith("/spread/")
    }
    assert served_by == set(workers), "both workers must have served for this test to mean much"
    after = scrape(admin)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    # One token signature per full handshake, across all workers.
    assert delta("hsm_proxy_tls_sessions_total", kind="full") == 16
    assert delta("hsm_proxy_token_signatures_total", mechanism="ECDSA", result="ok") == 16
    assert delta("hsm_proxy_token_signature_duration_seconds_count", mechanism="ECDSA") == 16
    assert delta("hsm_proxy_handshake_duration_seconds_count") == 16
    assert delta("hsm_proxy_requests_total", status_class="2xx") == 16
    assert delta("hsm_proxy_connections_total") == 16
    wait_until(lambda: value(scrape(admin), "hsm_proxy_connections_open") == 0)
    assert value(after, "hsm_proxy_ready") == 1
    assert value(after, "hsm_proxy_token_queue_depth") == 0
    assert value(after, "hsm_proxy_info", version=__version__) == 1
    assert {dict(labels)["pid"] for name, labels in after if name == "hsm_proxy_generation"} == {
        str(pid) for pid in workers
    }
    assert value(after, "hsm_proxy_certificate_expiry_timestamp_seconds", server_name="localhost")
    # A worker that does not answer makes the whole fleet not ready, and says which.
    stopped, number = next(iter(workers.items()))
    os.kill(stopped, signal.SIGSTOP)
    try:
        status, _, body = get(f"{admin}/readyz")
    finally:
        os.kill(stopped, signal.SIGCONT)
    assert status == 503
    assert body.splitlines()[0] == "not ready"
    assert f"FAIL worker {number} (pid {stopped}): its admin endpoint did not answer" in body
    assert value(scrape(admin), "hsm_proxy_ready") == 0
    wait_until(lambda: get(f"{admin}/readyz")[0] == 200)
    # A worker that dies is replaced; what it counted stays counted.
    os.kill(stopped, signal.SIGKILL)
    proxy.wait_for_log(
        lambda entry: (
            entry.get("event") == "worker_started"
            and entry["worker_pid"] != stopped
            and int(entry["worker_pid"]) not in workers
        ),
        timeout=30,
    )
    wait_until(lambda: get(f"{admin}/readyz")[0] == 200, timeout=60)
    later = scrape(admin)
    assert value(later, "hsm_proxy_tls_sessions_total", kind="full") >= value(
        after, "hsm_proxy_tls_sessions_total", kind="full"
    )
    assert value(later, "hsm_proxy_worker_restarts_total") == 1
    assert str(stopped) not in {
        dict(labels).get("pid") for name, labels in later if name == "hsm_proxy_generation"
    }


def test_a_proxy_that_did_not_stop_cleanly_fails_the_test_that_started_it(
    proxy_factory: ProxyFactory, upstream: RecordingUpstream
) -> None:
    """Every proxy the fixtures start is checked when it stops (tests/support ProxyProcess):
    a killed one fails unless the test said it kills it on purpose."""
    proxy = proxy_factory("ec256")
    proxy.process.kill()
    proxy.process.wait()
    with pytest.raises(AssertionError, match="it exited with status -9"):
        proxy.stop()
    killed = proxy_factory("ec256")
    killed.expect_exit(-9)
    killed.process.kill()
    killed.stop()  # said so first: no failure, here or at the fixture's teardown
