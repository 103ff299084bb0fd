"""Session-ticket keys shared by a fleet, several certificates by SNI, AWS Secrets Manager
through a moto server on loopback, and `hsm-proxy dev` watching its state directory."""

from __future__ import annotations

import os
import secrets
import signal
import socket
import ssl
import subprocess
import time
from pathlib import Path

import boto3
import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tests.support import (
    HSM,
    REPO,
    ProxyProcess,
    RecordingUpstream,
    client_context,
    dev_ca,
    https_request,
    issue_chain,
)
from tests.support.reload import (
    RELOAD_SETTINGS,
    Load,
    launch,
    launch_command,
    replace_file,
    resume,
    serial_of,
    wait_until,
)

VERSIONS = {"TLSv1.2": ssl.TLSVersion.TLSv1_2, "TLSv1.3": ssl.TLSVersion.TLSv1_3}


def _write_config(directory: Path, text: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    config = directory / "proxy.toml"
    config.write_text(text + RELOAD_SETTINGS)
    return config


def _basic(
    directory: Path, hsm: HSM, ca: trustme.CA, upstream: RecordingUpstream, tls_extra: str = ""
) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    chain = directory / "chain.pem"
    chain.write_bytes(issue_chain(ca, hsm.public_keys["ec256"]))
    return _write_config(
        directory,
        f'listen = "127.0.0.1:0"\nupstream = "{upstream.url}"\n\n'
        f'[token]\nmodule = "{hsm.module}"\npin_file = "{hsm.pin_file}"\nsessions = 2\n\n'
        f'[tls]\ncertificate = "{chain}"\nkey = "{hsm.uri("ec256")}"\n{tls_extra}',
    )


# --- session tickets ---------------------------------------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
def test_two_proxies_sharing_ticket_keys_resume_each_others_sessions(
    version: str, tmp_path: Path, hsm: HSM, ca: trustme.CA, upstream: RecordingUpstream
) -> None:
    shared = tmp_path / "ticket.key"
    shared.write_bytes(secrets.token_bytes(80))
    alone = tmp_path / "other-ticket.key"
    alone.write_bytes(secrets.token_bytes(80))
    a = launch(
        tmp_path / "a",
        _basic(tmp_path / "a", hsm, ca, upstream, f"session_ticket_keys = ['{shared}']\n"),
    )
    b = launch(
        tmp_path / "b",
        _basic(tmp_path / "b", hsm, ca, upstream, f"session_ticket_keys = ['{shared}']\n"),
    )
    c = launch(
        tmp_path / "c",
        _basic(tmp_path / "c", hsm, ca, upstream, f"session_ticket_keys = ['{alone}']\n"),
    )
    context = client_context(ca, VERSIONS[version])
    reused, session = resume(a.port, context)
    assert not reused
    assert a.signatures() == 1
    reused, _ = resume(b.port, context, session)
    assert reused  # B decrypted A's ticket ...
    assert b.signatures() == 0  # ... and the token made no signature for it
    reused, _ = resume(c.port, context, session)
    assert not reused  # a proxy with another key cannot: a full handshake, one signature
    wait_until(lambda: c.signatures() == 1, what="C's signature")


def _with_ticket_key_file(
    tmp_path: Path, hsm: HSM, ca: trustme.CA, upstream: RecordingUpstream
) -> tuple[ProxyProcess, Path]:
    """A proxy whose session-ticket key comes from a file (returned, for rotations)."""
    key_file = tmp_path / "ticket.key"
    key_file.write_bytes(secrets.token_bytes(80))
    config = _basic(tmp_path, hsm, ca, upstream, f"session_ticket_keys = ['{key_file}']\n")
    return launch(tmp_path, config), key_file


def test_a_tls13_resumption_gets_a_fresh_ticket_so_single_use_clients_keep_resuming(
    tmp_path: Path, hsm: HSM, ca: trustme.CA, upstream: RecordingUpstream
) -> None:
    """RFC 8446 (C.4) asks clients to use a TLS 1.3 ticket once; browsers and wrk do. So a
    resumed connection must bring a new ticket, or every other connection of such a client
    is a full handshake and a token signature (as it was with configured ticket keys)."""
    proxy, _ = _with_ticket_key_file(tmp_path, hsm, ca, upstream)
    context = client_context(ca, ssl.TLSVersion.TLSv1_3)
    _, session = resume(proxy.port, context)
    assert session is not None
    signatures = proxy.signatures()
    for _ in range(4):
        reused, newer = resume(proxy.port, context, session)
        assert reused
        assert newer is not None
        # OpenSSL names a TLS 1.3 session by a hash of its ticket: a new id, a new ticket.
        assert newer.id != session.id
        session = newer  # each ticket used once
    assert proxy.signatures() == signatures


def test_ticket_key_rotation_keeps_the_previous_key_for_decryption(
    tmp_path: Path, hsm: HSM, ca: trustme.CA, upstream: RecordingUpstream
) -> None:
    proxy, key_file = _with_ticket_key_file(tmp_path, hsm, ca, upstream)
    context = client_context(ca, ssl.TLSVersion.TLSv1_2)
    _, old_session = resume(proxy.port, context)
    replace_file(key_file, secrets.token_bytes(80))
    proxy.wait_for_log(lambda entry: entry.get("event") == "reloaded", timeout=30)
    signatures = proxy.signatures()
    reused, new_session = resume(proxy.port, context, old_session)
    assert reused  # issued under the old key, still accepted after the rotation
    assert proxy.signatures() == signatures
    reused, _ = resume(proxy.port, context, new_session)
    assert reused  # the renewed ticket, under the new key


def test_a_fleet_rotates_its_ticket_key_in_two_steps_without_losing_a_resumption(
    tmp_path: Path, hsm: HSM, ca: trustme.CA, upstream: RecordingUpstream
) -> None:
    """The rotation the README describes for several proxies sharing tickets: first every
    proxy gets the new key second (decrypts only), then one by one it moves first
    (encrypts). At every point in between, a ticket either proxy issued resumes on the
    other, with no token signature."""
    old_key, new_key = tmp_path / "old.key", tmp_path / "new.key"
    old_key.write_bytes(secrets.token_bytes(80))
    new_key.write_bytes(secrets.token_bytes(80))

    def keys(*files: Path) -> str:
        return f"session_ticket_keys = {[str(file) for file in files]!r}\n"

    fleet: dict[str, tuple[ProxyProcess, Path]] = {}
    for name in ("a", "b"):
        config = _basic(tmp_path / name, hsm, ca, upstream, keys(old_key))
        fleet[name] = (launch(tmp_path / name, config), config)
    context = client_context(ca, ssl.TLSVersion.TLSv1_2)

    def rotate(name: str, *files: Path) -> None:
        proxy, config = fleet[name]
        before = len([e for e in proxy.lines() if e.get("event") == "reloaded"])
        lines = config.read_text().splitlines(keepends=True)
        config.write_text(
            "".join(
                keys(*files) if line.startswith("session_ticket_keys") else line for line in lines
            )
        )
        os.kill(proxy.process.pid, signal.SIGHUP)
        wait_until(
            lambda: len([e for e in proxy.lines() if e.get("event") == "reloaded"]) > before,
            what=f"{name}'s reload",
        )

    def resumes_across() -> None:
        for issuer, other in (("a", "b"), ("b", "a")):
            _, session = resume(fleet[issuer][0].port, context)
            signatures = fleet[other][0].signatures()
            reused, _ = resume(fleet[other][0].port, context, session)
            assert reused, f"a ticket from {issuer} did not resume on {other}"
            assert fleet[other][0].signatures() == signatures

    resumes_across()
    rotate("a", old_key, new_key)  # step 1: the new key second, everywhere
    resumes_across()
    rotate("b", old_key, new_key)
    resumes_across()
    rotate("a", new_key, old_key)  # step 2: the new key first, one proxy at a time
    resumes_across()  # a's tickets (new key) resume on b, which has it second
    rotate("b", new_key, old_key)
    resumes_across()


# --- several certificates by SNI -----------------------------------------------------------


def _peer(port: int, server_name: str, ca: trustme.CA) -> x509.Certificate:
    context = client_context(ca)
    context.check_hostname = False
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname=server_name) as tls:
            der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


def _spki(certificate: x509.Certificate) -> bytes:
    return certificate.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def test_each_server_name_gets_its_own_certificate_and_token_key(
    tmp_path: Path, hsm: HSM, ca: trustme.CA, upstream: RecordingUpstream
) -> None:
    api = tmp_path / "api.pem"
    api.write_bytes(issue_chain(ca, hsm.public_keys["rsa2048"], ("api.test",)))
    wild = tmp_path / "wild.pem"
    wild.write_bytes(issue_chain(ca, hsm.public_keys["ec384"], ("*.wild.test",)))
    sites = (
        f'[[tls.sni]]\ncertificate = "{api}"\nkey = "{hsm.uri("rsa2048")}"\n\n'
        f'[[tls.sni]]\ncertificate = "{wild}"\nkey = "{hsm.uri("ec384")}"\n'
    )
    proxy = launch(tmp_path, _basic(tmp_path, hsm, ca, upstream, sites))
    assert _spki(_peer(proxy.port, "api.test", ca)) == hsm.public_keys["rsa2048"]
    assert _spki(_peer(proxy.port, "x.wild.test", ca)) == hsm.public_keys["ec384"]
    assert _spki(_peer(proxy.port, "localhost", ca)) == hsm.public_keys["ec256"]
    assert _spki(_peer(proxy.port, "unknown.test", ca)) == hsm.public_keys["ec256"]  # default
    assert _spki(_peer(proxy.port, "a.b.wild.test", ca)) == hsm.public_keys["ec256"]
    # Full verification against the right name, through to the upstream.
    reply = https_request(proxy.port, client_context(ca), server_name="api.test", path="/api")
    assert reply.status == 200
    audit = proxy.wait_for_log(
        lambda entry: entry.get("event") == "token_signature" and entry.get("sni") == "api.test"
    )
    assert audit["key_uri"] == str(hsm.uri("rsa2048"))
    # Rotating one site's certificate leaves the others alone.
    before = _peer(proxy.port, "api.test", ca).serial_number
    localhost_serial = _peer(proxy.port, "localhost", ca).serial_number
    replace_file(api, issue_chain(ca, hsm.public_keys["rsa2048"], ("api.test",)))
    wait_until(
        lambda: _peer(proxy.port, "api.test", ca).serial_number != before, what="api rotation"
    )
    assert _peer(proxy.port, "localhost", ca).serial_number == localhost_serial


# --- the reference form ------------------------------------------------------------------


def test_reference_form_serves_and_reloads(
    tmp_path: Path,
    hsm: HSM,
    ca: trustme.CA,
    upstream: RecordingUpstream,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`pin = "env:..."`, `certificate = "file:..."` and `session_ticket_keys = ["file:..."]`
    (both relative to the config file): the proxy serves, rotates the certificate under load
    when the file is replaced, and refuses a broken ticket key naming its file."""
    pin = hsm.pin_file.read_text().strip()
    monkeypatch.setenv("HSM_PROXY_TEST_PIN", pin)
    chain = tmp_path / "chain.pem"
    chain.write_bytes(issue_chain(ca, hsm.public_keys["ec256"]))
    ticket = tmp_path / "ticket.key"
    ticket.write_bytes(secrets.token_bytes(80))
    config = _write_config(
        tmp_path,
        f'listen = "127.0.0.1:0"\nupstream = "{upstream.url}"\n\n'
        f'[token]\nmodule = "{hsm.module}"\npin = "env:HSM_PROXY_TEST_PIN"\nsessions = 2\n\n'
        f'[tls]\ncertificate = "file:chain.pem"\nkey = "{hsm.uri("ec256")}"\n'
        'session_ticket_keys = ["file:ticket.key"]\n',
    )
    proxy = launch(tmp_path, config)
    context = client_context(ca)
    before = serial_of(proxy.port, context)
    with Load(proxy.port, context, fresh=1, keepalive=1) as load:
        replace_file(chain, issue_chain(ca, hsm.public_keys["ec256"]))
        wait_until(lambda: serial_of(proxy.port, context) != before, what="the new serial")
        load.wait_for_more()
    assert load.failures == []
    reloads = [entry for entry in proxy.lines() if entry.get("event") == "reloaded"]
    assert [entry["reason"] for entry in reloads] == [f"certificate chain file {chain} changed"]
    replace_file(ticket, secrets.token_bytes(48))
    failed = proxy.wait_for_log(lambda entry: entry.get("event") == "reload_failed", timeout=30)
    assert f"session-ticket key file {ticket}: size failed" in str(failed["message"])
    assert https_request(proxy.port, context).status == 200
    assert pin not in proxy.log_path.read_text()


# --- AWS Secrets Manager through moto -----------------------------------------------------


# The same secrets named by the older per-source keys and by the reference form.
AWS_KEYS = {
    "older keys": (
        'pin_aws_secret = "proxy/pin"',
        'certificate_aws_secret = "proxy/chain"',
        'session_ticket_keys_aws_secrets = ["proxy/ticket"]',
    ),
    "references": (
        'pin = "aws-sm:proxy/pin"',
        'certificate = "aws-sm:proxy/chain"',
        'session_ticket_keys = ["aws-sm:proxy/ticket"]',
    ),
}


@pytest.mark.parametrize("keys", AWS_KEYS)
def test_aws_secrets_manager_rotation_reaches_new_handshakes(
    keys: str, moto: str, tmp_path: Path, hsm: HSM, ca: trustme.CA, upstream: RecordingUpstream
) -> None:
    pin_key, certificate_key, tickets_key = AWS_KEYS[keys]
    client = boto3.client("secretsmanager", endpoint_url=moto, region_name="eu-west-1")
    client.create_secret(Name="proxy/pin", SecretString=hsm.pin_file.read_text().strip())
    client.create_secret(
        Name="proxy/chain", SecretString=issue_chain(ca, hsm.public_keys["ec256"]).decode()
    )
    client.create_secret(Name="proxy/ticket", SecretBinary=secrets.token_bytes(80))
    config = _write_config(
        tmp_path,
        f'listen = "127.0.0.1:0"\nupstream = "{upstream.url}"\n\n'
        f'[token]\nmodule = "{hsm.module}"\n{pin_key}\nsessions = 2\n\n'
        f'[tls]\n{certificate_key}\nkey = "{hsm.uri("ec256")}"\n{tickets_key}\n\n'
        f'[aws]\nendpoint_url = "{moto}"\nregion = "eu-west-1"\n',
    )
    proxy = launch(tmp_path, config)
    context = client_context(ca)
    before = serial_of(proxy.port, context)
    with Load(proxy.port, context, fresh=1, keepalive=1) as load:
        client.put_secret_value(
            SecretId="proxy/chain",
            SecretString=issue_chain(ca, hsm.public_keys["ec256"]).decode(),
        )
        wait_until(lambda: serial_of(proxy.port, context) != before, what="the new serial")
        load.wait_for_more()
    assert load.failures == []
    reloads = [entry for entry in proxy.lines() if entry.get("event") == "reloaded"]
    assert len(reloads) == 1
    assert "AWS Secrets Manager secret 'proxy/chain' changed" in str(reloads[0]["reason"])
    # Polled several times since, but the version did not change: no further rebuild.
    time.sleep(2)
    assert len([entry for entry in proxy.lines() if entry.get("event") == "reloaded"]) == 1
    # A wrong-sized ticket key pushed to AWS is refused; the old generation serves on.
    client.put_secret_value(SecretId="proxy/ticket", SecretBinary=secrets.token_bytes(48))
    failed = proxy.wait_for_log(lambda entry: entry.get("event") == "reload_failed", timeout=30)
    assert "'proxy/ticket'" in str(failed["message"])
    assert "48 bytes" in str(failed["message"])
    assert https_request(proxy.port, context).status == 200


def test_fields_of_one_json_aws_secret_serve_and_a_bad_field_keeps_the_old_generation(
    moto: str, tmp_path: Path, hsm: HSM, ca: trustme.CA, upstream: RecordingUpstream
) -> None:
    import json

    pin = hsm.pin_file.read_text().strip()
    client = boto3.client("secretsmanager", endpoint_url=moto, region_name="eu-west-1")

    def push(**fields: object) -> None:
        client.put_secret_value(SecretId="proxy/hsm", SecretString=json.dumps(fields))

    first_chain = issue_chain(ca, hsm.public_keys["ec256"]).decode()
    client.create_secret(
        Name="proxy/hsm", SecretString=json.dumps({"pin": pin, "chain": first_chain})
    )
    config = _write_config(
        tmp_path,
        f'listen = "127.0.0.1:0"\nupstream = "{upstream.url}"\n\n'
        f'[token]\nmodule = "{hsm.module}"\npin = "aws-sm:proxy/hsm#pin"\nsessions = 2\n\n'
        f'[tls]\ncertificate = "aws-sm:proxy/hsm#chain"\nkey = "{hsm.uri("ec256")}"\n\n'
        f'[aws]\nendpoint_url = "{moto}"\nregion = "eu-west-1"\n',
    )
    proxy = launch(tmp_path, config)
    context = client_context(ca)
    first = serial_of(proxy.port, context)
    # A new chain in the same secret reaches new handshakes.
    push(pin=pin, chain=issue_chain(ca, hsm.public_keys["ec256"]).decode())
    wait_until(lambda: serial_of(proxy.port, context) != first, what="the new serial")
    second = serial_of(proxy.port, context)
    # A secret without the field, then with a number in it: refused, the old one serves on.
    push(PIN=pin, chain=first_chain)
    failed = proxy.wait_for_log(lambda entry: entry.get("event") == "reload_failed", timeout=30)
    assert (
        "still serving generation 2: PIN in AWS Secrets Manager secret 'proxy/hsm', field "
        "'pin': read failed: the secret has no field 'pin' (its fields: 'PIN', 'chain')"
    ) in str(failed["message"])
    assert serial_of(proxy.port, context) == second
    push(pin=4821, chain=first_chain)
    failed = proxy.wait_for_log(
        lambda entry: entry.get("event") == "reload_failed" and "number" in entry["message"],
        timeout=30,
    )
    assert "field 'pin': read failed: the field's value is a number, not a string" in str(
        failed["message"]
    )
    assert serial_of(proxy.port, context) == second
    assert https_request(proxy.port, context).status == 200
    assert pin not in proxy.log_path.read_text()


def test_aws_secret_that_does_not_exist_is_a_clear_start_up_error(
    moto: str, tmp_path: Path, hsm: HSM, ca: trustme.CA, upstream: RecordingUpstream
) -> None:
    config = _write_config(
        tmp_path,
        f'listen = "127.0.0.1:0"\nupstream = "{upstream.url}"\n\n'
        f'[token]\nmodule = "{hsm.module}"\npin_aws_secret = "no/such/secret"\n\n'
        f'[tls]\ncertificate = "{tmp_path / "none.pem"}"\nkey = "{hsm.uri("ec256")}"\n\n'
        f'[aws]\nendpoint_url = "{moto}"\n',
    )
    (tmp_path / "none.pem").write_bytes(issue_chain(ca, hsm.public_keys["ec256"]))
    result = subprocess.run(
        [str(REPO / ".venv" / "bin" / "hsm-proxy"), "check", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=os.environ.copy(),
    )
    assert result.returncode == 1
    assert (
        "PIN in AWS Secrets Manager secret 'no/such/secret': read failed: "
        "describe_secret failed: ResourceNotFoundException"
    ) in result.stderr


# --- dev mode -----------------------------------------------------------------------------


def test_dev_mode_watches_its_certificate_and_pin(
    tmp_path: Path, ca: trustme.CA, upstream: RecordingUpstream
) -> None:
    state = tmp_path / "dev"
    proxy = launch_command(
        tmp_path,
        "dev",
        "--state-dir",
        str(state),
        "--listen",
        "127.0.0.1:0",
        "--upstream",
        upstream.url,
    )
    dev_context = client_context(ca)
    dev_context.load_verify_locations(cafile=str(state / "ca.pem"))
    first = serial_of(proxy.port, dev_context)
    public = _spki(x509.load_pem_x509_certificate((state / "cert.pem").read_bytes()))
    with Load(proxy.port, dev_context, fresh=1, keepalive=1) as load:
        replace_file(state / "cert.pem", dev_ca(ca).issue(public, ["localhost", "127.0.0.1"]))
        wait_until(lambda: serial_of(proxy.port, dev_context) != first, what="the new serial")
        load.wait_for_more()
    assert load.failures == []
    (state / "pin").write_text("wrong-pin\n")
    failed = proxy.wait_for_log(lambda entry: entry.get("event") == "reload_failed", timeout=30)
    assert f"PIN file {state / 'pin'}: login failed" in str(failed["message"])
    assert https_request(proxy.port, dev_context).status == 200
