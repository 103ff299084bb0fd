"""Token policy at start-up and under load: key custody, the bounded handshake queue,
`dev --module`, and the new configuration keys."""

from __future__ import annotations

import os
import ssl
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import trustme

from proxy.config import parse_config
from proxy.errors import ConfigError
from tests.faulthsm import read_stats
from tests.support import (
    HSM,
    REPO,
    ProxyFactory,
    ProxyProcess,
    RecordingUpstream,
    StartOnFaulthsm,
    client_context,
    free_port,
    https_request,
    proxy_command,
    run_cli,
    write_config,
)


def _config(**token: object) -> dict[str, Any]:
    return {
        "upstream": "http://127.0.0.1:8080",
        "token": {"module": "/m.so", "pin_env": "PIN", **token},
        "tls": {"certificate": "c.pem", "key": "pkcs11:object=k"},
    }


def test_new_token_keys_have_defaults_and_are_checked() -> None:
    config = parse_config(_config(), base=Path("/"), source="t")
    assert config.token.queue_limit == 256
    assert config.token.key_custody == "warn"
    config = parse_config(_config(queue_limit=0, key_custody="refuse"), Path("/"), "t")
    assert (config.token.queue_limit, config.token.key_custody) == (0, "refuse")
    with pytest.raises(ConfigError) as caught:
        parse_config(_config(key_custody="maybe"), Path("/"), "t")
    assert 'token.key_custody: must be "warn" or "refuse"' in str(caught.value)
    with pytest.raises(ConfigError) as caught:
        parse_config(_config(queue_limit=-1), Path("/"), "t")
    assert "token.queue_limit: must be from 0 to 100000" in str(caught.value)


def test_extractable_key_is_refused_by_policy_and_warned_about_otherwise(
    tmp_path: Path,
    hsm: HSM,
    ca: trustme.CA,
    upstream: RecordingUpstream,
    proxy_factory: ProxyFactory,
) -> None:
    hsm.add_key("loose", "loose-ec256", b"\x20", "P-256", extractable=True)
    config = write_config(
        tmp_path, hsm, ca, upstream.url, "loose", extra_token='key_custody = "refuse"'
    )
    result = run_cli("check", "--config", str(config))
    assert result.returncode == 1
    assert "is extractable: its value could leave the token" in result.stderr
    assert 'key_custody = "refuse"' in result.stderr
    # `run` refuses to start on it too: one clear line, a failure status, nothing served.
    refused = run_cli("run", "--config", str(config), timeout=60)
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert "is extractable: its value could leave the token" in refused.stderr
    assert 'key_custody = "refuse"' in refused.stderr
    assert "serving https://" not in refused.stdout + refused.stderr
    proxy = proxy_factory("loose")
    warning = proxy.wait_for_log(lambda entry: entry.get("event") == "key_custody")
    assert warning["level"] == "warning"
    assert https_request(proxy.port, client_context(ca)).status == 200


def test_full_handshake_queue_refuses_new_connections_at_once(
    on_faulthsm: StartOnFaulthsm, ca: trustme.CA, upstream: RecordingUpstream
) -> None:
    proxy = on_faulthsm(sessions=1, extra_token="queue_limit = 1", settings={"delay_ms": 1500})
    outcomes: list[str] = []

    def connect(number: int) -> None:
        try:
            https_request(proxy.port, client_context(ca), path=f"/q/{number}")
            outcomes.append("served")
        except (ssl.SSLError, OSError):
            outcomes.append("refused")

    # One handshake signs (1.5 s), one waits for the only session, the rest are refused.
    threads = [threading.Thread(target=connect, args=(n,)) for n in range(5)]
    for thread in threads:
        thread.start()
        time.sleep(0.1)
    for thread in threads:
        thread.join()
    assert outcomes.count("served") >= 2
    assert "refused" in outcomes
    busy = [e for e in proxy.lines() if "token busy" in e.get("message", "")]
    assert len(busy) == outcomes.count("refused")
    assert proxy.signatures() == outcomes.count("served")


def test_dev_mode_loads_another_module_that_forwards_to_the_dev_token(
    tmp_path: Path, faulthsm: Path
) -> None:
    stats = tmp_path / "stats"
    port = free_port()
    env = {
        **os.environ,
        "FAULTHSM_STATS": str(stats),
        "FAULTHSM_DELAY_MS": "1",
    }
    env.pop("FAULTHSM_MODULE", None)  # faulthsm's default: the system SoftHSM2
    log_path = tmp_path / "dev.log"
    with log_path.open("w") as log_file:
        process = subprocess.Popen(
            proxy_command(
                "dev",
                "--state-dir",
                str(tmp_path / "state"),
                "--listen",
                f"127.0.0.1:{port}",
                "--module",
                str(faulthsm),
            ),
            stdout=log_file,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            cwd=REPO,
        )
    try:
        deadline = time.monotonic() + 60
        while "serving https://" not in log_path.read_text():
            assert process.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.1)
        context = ssl.create_default_context(cafile=str(tmp_path / "state" / "ca.pem"))
        assert https_request(port, context, server_name="localhost").status == 200
        assert f"module:   {faulthsm}" in log_path.read_text()
        assert read_stats(stats)["signatures"] >= 1  # the handshake signed through faulthsm
    finally:
        ProxyProcess(process, log_path).stop()  # fails unless it stopped cleanly


def test_pool_is_sized_down_to_the_sessions_the_token_allows(
    on_faulthsm: StartOnFaulthsm, ca: trustme.CA, upstream: RecordingUpstream
) -> None:
    proxy = on_faulthsm(sessions=8, settings={"max_sessions": 3})
    limit = proxy.wait_for_log(lambda entry: entry.get("event") == "token_session_limit")
    assert "instead of the 8 configured" in limit["message"]
    started = proxy.wait_for_log(
        lambda entry: entry.get("message", "").startswith("token 'proxy': key")
    )
    assert started["message"].endswith("3 sessions")
    assert https_request(proxy.port, client_context(ca)).status == 200


def test_workers_that_cannot_start_stop_the_supervisor_with_the_reason(
    tmp_path: Path, hsm: HSM, ca: trustme.CA, upstream: RecordingUpstream
) -> None:
    wrong = tmp_path / "wrong-pin"
    wrong.write_text("not-the-pin-3131\n")
    config = write_config(tmp_path, hsm, ca, upstream.url, "ec256", pin_file=wrong)
    result = run_cli("run", "--config", str(config), "--workers", "2")
    output = result.stdout + result.stderr
    assert result.returncode == 1
    assert "the PIN is incorrect" in output
    assert "worker 1" in output
    assert "failed to start" in output
    assert "worker 2" not in output  # workers start one at a time: the second never did
    assert "not-the-pin-3131" not in output


def test_a_token_without_the_mechanism_a_key_needs_is_named_at_start_up(
    tmp_path: Path, hsm: HSM, ca: trustme.CA, upstream: RecordingUpstream, faulthsm: Path
) -> None:
    config = write_config(tmp_path, hsm, ca, upstream.url, "ec256", module=str(faulthsm))
    result = run_cli(
        "check",
        "--config",
        str(config),
        env={"FAULTHSM_MODULE": hsm.module, "FAULTHSM_HIDE": "CKM_ECDSA"},
    )
    assert result.returncode == 1
    assert "failed to sign with CKM_ECDSA: MechanismInvalid" in result.stderr
