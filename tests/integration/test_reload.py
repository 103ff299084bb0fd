"""Hot reload of certificates and PINs while traffic flows; bad secrets refused, old state kept.

Real SoftHSM2 tokens, real clients in threads (fresh stdlib ssl connections and httpx
keep-alive ones), the proxy as a subprocess. Zero failed requests is the bar.
"""

from __future__ import annotations

import secrets
from pathlib import Path

import pytest
import trustme

from proxy.pkcs11.provision import change_pin
from proxy.pkcs11.token import Token
from proxy.pkcs11.uri import parse_key_uri
from tests.support import (
    HSM,
    RecordingUpstream,
    client_context,
    https_request,
    issue_chain,
    run_cli,
)
from tests.support.reload import (
    RELOAD_SETTINGS,
    KubernetesSecretDir,
    Load,
    launch,
    replace_file,
    serial_of,
    wait_until,
)


def _config(
    directory: Path,
    hsm: HSM,
    upstream: RecordingUpstream,
    certificate: Path,
    key: str = "ec256",
    pin_file: Path | None = None,
    extra_tls: str = "",
    token_uri: str | None = None,
    module_pin: str | None = None,
) -> Path:
    config = directory / "proxy.toml"
    config.write_text(
        f'listen = "127.0.0.1:0"\n'
        f'upstream = "{upstream.url}"\n\n'
        f"[token]\n"
        f'module = "{hsm.module}"\n'
        f"{module_pin or f'pin_file = {str(pin_file or hsm.pin_file)!r}'}\n"
        f"sessions = 2\n\n"
        f"[tls]\n"
        f'certificate = "{certificate}"\n'
        f'key = "{token_uri or hsm.uri(key)}"\n'
        f"{extra_tls}"
        f"{RELOAD_SETTINGS}"
    )
    return config


def _reload_lines(proxy_lines: list[dict[str, object]], event: str) -> list[dict[str, object]]:
    return [entry for entry in proxy_lines if entry.get("event") == event]


def test_certificate_rotates_under_load_with_no_failed_request(
    tmp_path: Path, hsm: HSM, ca: trustme.CA, upstream: RecordingUpstream
) -> None:
    chain = tmp_path / "chain.pem"
    chain.write_bytes(issue_chain(ca, hsm.public_keys["ec256"]))
    proxy = launch(tmp_path, _config(tmp_path, hsm, upstream, chain))
    context = client_context(ca)
    first = serial_of(proxy.port, context)
    with Load(proxy.port, context) as load:
        for _ in range(2):
            before = serial_of(proxy.port, context)
            replace_file(chain, issue_chain(ca, hsm.public_keys["ec256"]))

            def rotated(old: int = before) -> bool:
                return serial_of(proxy.port, context) != old

            wait_until(rotated, what="the new serial")
            load.wait_for_more()
    assert load.failures == []
    assert serial_of(proxy.port, context) != first
    reloads = _reload_lines(proxy.lines(), "reloaded")
    assert len(reloads) == 2
    assert "certificate chain file" in str(reloads[0]["reason"])
    assert format(serial_of(proxy.port, context), "x") == reloads[-1]["serial"]


def test_file_events_trigger_a_reload_long_before_the_poll_would(
    tmp_path: Path, hsm: HSM, ca: trustme.CA, upstream: RecordingUpstream
) -> None:
    chain = tmp_path / "chain.pem"
    chain.write_bytes(issue_chain(ca, hsm.public_keys["ec256"]))
    config = _config(tmp_path, hsm, upstream, chain)
    config.write_text(config.read_text().replace("watch_interval = 0.2", "watch_interval = 3600"))
    proxy = launch(tmp_path, config)
    context = client_context(ca)
    before = serial_of(proxy.port, context)
    replace_file(chain, issue_chain(ca, hsm.public_keys["ec256"]))
    # The poll would come in an hour: only an inotify event can make this happen.
    wait_until(lambda: serial_of(proxy.port, context) != before, timeout=60, what="new serial")


def test_kubernetes_secret_symlink_swap_is_picked_up(
    tmp_path: Path, hsm: HSM, ca: trustme.CA, upstream: RecordingUpstream
) -> None:
    mount = KubernetesSecretDir(
        tmp_path / "secret",
        {
            "tls.crt": issue_chain(ca, hsm.public_keys["ec256"]),
            "pin": hsm.pin_file.read_bytes(),
        },
    )
    proxy = launch(
        tmp_path,
        _config(
            tmp_path,
            hsm,
            upstream,
            tmp_path / "secret" / "tls.crt",
            pin_file=tmp_path / "secret" / "pin",
        ),
    )
    context = client_context(ca)
    before = serial_of(proxy.port, context)
    with Load(proxy.port, context, fresh=1, keepalive=1) as load:
        mount.update(
            {
                "tls.crt": issue_chain(ca, hsm.public_keys["ec256"]),
                "pin": hsm.pin_file.read_bytes(),
            }
        )
        wait_until(lambda: serial_of(proxy.port, context) != before, what="the new serial")
        load.wait_for_more()
    assert load.failures == []


def test_pin_rotates_under_load_with_no_failed_request(
    tmp_path: Path,
    hsm: HSM,
    ca: trustme.CA,
    upstream: RecordingUpstream,
    rotating_token: tuple[str, str],
) -> None:
    label, old_pin = rotating_token
    uri = f"pkcs11:token={label};object=web;id=%01;type=private"
    pin_file = tmp_path / "pin"
    pin_file.write_text(old_pin + "\n")
    with Token(hsm.module, parse_key_uri(uri), old_pin, pool_size=1) as token:
        public = token.find_private_key(parse_key_uri(uri)).info.public_key_der
    assert public is not None
    chain = tmp_path / "chain.pem"
    chain.write_bytes(issue_chain(ca, public))
    proxy = launch(
        tmp_path, _config(tmp_path, hsm, upstream, chain, pin_file=pin_file, token_uri=uri)
    )
    context = client_context(ca)
    new_pin = f"pin-{secrets.token_hex(6)}"
    with Load(proxy.port, context) as load:
        change_pin(hsm.module, label, old_pin, new_pin)  # the operator changes the token's PIN
        load.wait_for_more()  # ... the proxy keeps serving on its login ...
        replace_file(pin_file, (new_pin + "\n").encode())  # ... then updates the secret
        wait_until(lambda: bool(_reload_lines(proxy.lines(), "reloaded")), what="the reload")
        load.wait_for_more(40)  # handshakes now sign on the new generation's sessions
    assert load.failures == []
    reloaded = _reload_lines(proxy.lines(), "reloaded")
    assert len(reloaded) == 1
    assert "PIN file" in str(reloaded[0]["reason"])
    assert _reload_lines(proxy.lines(), "reload_failed") == []
    text = proxy.log_path.read_text()
    assert old_pin not in text
    assert new_pin not in text
    # The old PIN no longer logs in, and a proxy started afresh with the new PIN serves.
    pin_file.write_text(old_pin + "\n")
    wait_until(lambda: bool(_reload_lines(proxy.lines(), "reload_failed")), what="refusal")
    assert https_request(proxy.port, context).status == 200


def _bad_pushes(
    tmp_path: Path, hsm: HSM, ca: trustme.CA
) -> dict[str, tuple[str, bytes, list[str]]]:
    """name -> (which secret file, bad content, words the log line must contain)."""
    broken = b"-----BEGIN CERTIFICATE-----\nMIIBnotbase64atall\n-----END CERTIFICATE-----\n"
    return {
        "broken certificate": ("chain", broken, ["certificate chain file", "parse failed"]),
        "certificate for another key": (
            "chain",
            issue_chain(ca, hsm.public_keys["other"]),
            ["certificate matches token key failed", "SHA-256"],
        ),
        "wrong PIN": ("pin", b"not-the-pin\n", ["PIN file", "login failed", "PIN is incorrect"]),
        "truncated ticket key": (
            "ticket",
            secrets.token_bytes(79),
            ["session-ticket key file", "79 bytes", "exactly 80 bytes"],
        ),
    }


@pytest.mark.parametrize(
    "bad",
    ["broken certificate", "certificate for another key", "wrong PIN", "truncated ticket key"],
)
def test_a_bad_secret_is_refused_and_the_old_state_keeps_serving(
    bad: str, tmp_path: Path, hsm: HSM, ca: trustme.CA, upstream: RecordingUpstream
) -> None:
    files = {
        "chain": tmp_path / "chain.pem",
        "pin": tmp_path / "pin",
        "ticket": tmp_path / "ticket.key",
    }
    files["chain"].write_bytes(issue_chain(ca, hsm.public_keys["ec256"]))
    files["pin"].write_bytes(hsm.pin_file.read_bytes())
    files["ticket"].write_bytes(secrets.token_bytes(80))
    config = _config(
        tmp_path,
        hsm,
        upstream,
        files["chain"],
        pin_file=files["pin"],
        extra_tls=f'session_ticket_keys = ["{files["ticket"]}"]\n',
    )
    proxy = launch(tmp_path, config)
    context = client_context(ca)
    serial = serial_of(proxy.port, context)
    which, content, words = _bad_pushes(tmp_path, hsm, ca)[bad]
    with Load(proxy.port, context, fresh=1, keepalive=1) as load:
        replace_file(files[which], content)
        line = proxy.wait_for_log(lambda entry: entry.get("event") == "reload_failed", timeout=30)
        load.wait_for_more()
    assert load.failures == []
    message = str(line["message"])
    assert message.startswith("reload failed, still serving generation 1: ")
    for word in words:
        assert word in message
    assert line["level"] == "error"
    assert serial_of(proxy.port, context) == serial  # the old certificate still serves
    assert https_request(proxy.port, context).status == 200
    assert "not-the-pin" not in proxy.log_path.read_text()
    assert _reload_lines(proxy.lines(), "reloaded") == []
    assert len(_reload_lines(proxy.lines(), "reload_failed")) == 1  # said once, not per poll


def test_reload_command_rereads_the_config_and_switches_key(
    tmp_path: Path, hsm: HSM, ca: trustme.CA, upstream: RecordingUpstream
) -> None:
    chain = tmp_path / "chain.pem"
    chain.write_bytes(issue_chain(ca, hsm.public_keys["ec256"]))
    config = _config(tmp_path, hsm, upstream, chain)
    pid_file = tmp_path / "proxy.pid"
    proxy = launch(tmp_path, config, "--pid-file", str(pid_file))
    context = client_context(ca)
    with Load(proxy.port, context, fresh=1, keepalive=1) as load:
        other_chain = tmp_path / "chain-rsa.pem"
        other_chain.write_bytes(issue_chain(ca, hsm.public_keys["rsa2048"]))
        _config(tmp_path, hsm, upstream, other_chain, key="rsa2048")
        result = run_cli("reload", "--pid-file", str(pid_file))
        assert result.returncode == 0, result.stderr
        assert result.stdout == "reloaded: serving generation 2\n"
        line = proxy.wait_for_log(lambda entry: entry.get("event") == "reloaded", timeout=30)
        load.wait_for_more()
        # A config that does not load is refused, and the script learns it from the status.
        config.write_text(config.read_text().replace("[tls]", "[tls]\ncolour = 1"))
        result = run_cli("reload", "--pid-file", str(pid_file))
        assert result.returncode == 1
        assert "reload failed: " in result.stderr
        assert "tls.colour: unknown key" in result.stderr
        load.wait_for_more()
    assert load.failures == []
    assert line["reason"] == "SIGHUP"
    before = proxy.signatures()
    https_request(proxy.port, context, path="/after-reload")
    proxy.wait_for_log(lambda entry: entry.get("path") == "/after-reload")
    audit = [e for e in proxy.lines() if e.get("event") == "token_signature"][before:]
    assert audit
    assert {entry["key_uri"] for entry in audit if "connection_id" in entry} == {
        str(hsm.uri("rsa2048"))
    }


def test_expiring_certificate_is_warned_about_at_every_reload(
    tmp_path: Path, hsm: HSM, ca: trustme.CA, upstream: RecordingUpstream
) -> None:
    from tests.support import dev_ca

    chain = tmp_path / "chain.pem"
    chain.write_bytes(dev_ca(ca).issue(hsm.public_keys["ec256"], ["localhost"], days=10))
    proxy = launch(tmp_path, _config(tmp_path, hsm, upstream, chain))
    proxy.wait_for_log(lambda entry: entry.get("event") == "certificate_expiring")
    replace_file(chain, dev_ca(ca).issue(hsm.public_keys["ec256"], ["localhost"], days=5))
    proxy.wait_for_log(lambda entry: entry.get("event") == "reloaded", timeout=30)
    wait_until(
        lambda: len(_reload_lines(proxy.lines(), "certificate_expiring")) == 2,
        what="the second warning",
    )
    warnings = _reload_lines(proxy.lines(), "certificate_expiring")
    assert "in 9 days" in str(warnings[0]["message"])
    assert "in 4 days" in str(warnings[1]["message"])
    assert "warning threshold: 30 days" in str(warnings[1]["message"])


def test_unknown_reload_target_is_a_clear_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.pid"
    result = run_cli("reload", "--pid-file", str(missing))
    assert result.returncode == 1
    assert f"cannot read pid file {missing}" in result.stderr


def test_pin_from_the_environment_is_read_again_on_sighup(
    tmp_path: Path,
    hsm: HSM,
    ca: trustme.CA,
    upstream: RecordingUpstream,
    rotating_token: tuple[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A running process's environment cannot change, so what SIGHUP must show is that it
    reads the PIN variable again (the token's PIN changed under it: the reload is refused
    and the old login keeps serving) and reads the variable the re-read config now names."""
    label, old_pin = rotating_token
    new_pin = f"pin-{secrets.token_hex(6)}"
    monkeypatch.setenv("HSM_PROXY_TEST_PIN", old_pin)
    monkeypatch.setenv("HSM_PROXY_TEST_PIN_NEXT", new_pin)
    uri = f"pkcs11:token={label};object=web;id=%01;type=private"
    with Token(hsm.module, parse_key_uri(uri), old_pin, pool_size=1) as token:
        public = token.find_private_key(parse_key_uri(uri)).info.public_key_der
    assert public is not None
    chain = tmp_path / "chain.pem"
    chain.write_bytes(issue_chain(ca, public))

    def config(variable: str) -> Path:
        pin = f'pin_env = "{variable}"'
        return _config(tmp_path, hsm, upstream, chain, token_uri=uri, module_pin=pin)

    pid_file = tmp_path / "proxy.pid"
    proxy = launch(tmp_path, config("HSM_PROXY_TEST_PIN"), "--pid-file", str(pid_file))
    context = client_context(ca)
    change_pin(hsm.module, label, old_pin, new_pin)  # the variable's value is now wrong
    result = run_cli("reload", "--pid-file", str(pid_file))
    assert result.returncode == 1, result.stderr
    assert "reload failed: PIN variable $HSM_PROXY_TEST_PIN: login failed" in result.stderr
    failed = proxy.wait_for_log(lambda entry: entry.get("event") == "reload_failed")
    assert "variable $HSM_PROXY_TEST_PIN" in str(failed["message"])
    assert "PIN is incorrect" in str(failed["message"])
    assert https_request(proxy.port, context).status == 200  # the old generation serves
    config("HSM_PROXY_TEST_PIN_NEXT")
    assert run_cli("reload", "--pid-file", str(pid_file)).returncode == 0
    line = proxy.wait_for_log(lambda entry: entry.get("event") == "reloaded")
    assert line["reason"] == "SIGHUP"
    assert https_request(proxy.port, context).status == 200
    text = proxy.log_path.read_text()
    assert old_pin not in text
    assert new_pin not in text
