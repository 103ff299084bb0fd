"""Settings of one server name in ``[[tls.sni]]``: its own OCSP staple and its own mutual-TLS
rules, through a running proxy, with openssl s_client and stdlib ssl clients."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from tests.integration.test_tls_policy import ocsp_response_for
from tests.support import (
    HSM,
    RecordingUpstream,
    client_context,
    https_request,
    issue_chain,
    run_cli,
    start_upstream,
)
from tests.support.mtls import issue_client_cert, refused, with_client_cert
from tests.support.reload import RELOAD_SETTINGS, launch, replace_file, wait_until


@pytest.fixture
def secure_upstream() -> Iterator[RecordingUpstream]:
    server = start_upstream()
    try:
        yield server
    finally:
        server.stop()


def stapled(port: int, ca_file: Path, server_name: str) -> str:
    """What openssl s_client -status prints about the staple for ``server_name``."""
    result = subprocess.run(
        [
            "openssl",
            "s_client",
            "-connect",
            f"127.0.0.1:{port}",
            "-servername",
            server_name,
            "-CAfile",
            str(ca_file),
            "-verify_return_error",
            "-status",
        ],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def serial_in(staple_text: str) -> int:
    """The certificate serial an OCSP response printed by s_client answers for."""
    for line in staple_text.splitlines():
        if line.strip().startswith("Serial Number:"):
            return int(line.split(":", 1)[1].strip(), 16)
    raise AssertionError(f"no OCSP response in:\n{staple_text}")


def _serial(chain: Path) -> int:
    from cryptography import x509

    return int(x509.load_pem_x509_certificate(chain.read_bytes()).serial_number)


def _config(
    tmp_path: Path,
    hsm: HSM,
    ca: trustme.CA,
    upstream: RecordingUpstream,
    sites: str,
    tls_extra: str = "",
    extra: str = "",
) -> Path:
    chain = tmp_path / "default.pem"
    chain.write_bytes(issue_chain(ca, hsm.public_keys["ec256"]))
    config = tmp_path / "proxy.toml"
    config.write_text(
        f'listen = "127.0.0.1:0"\nupstream = "{upstream.url}"\n\n'
        f'[token]\nmodule = "{hsm.module}"\npin_file = "{hsm.pin_file}"\nsessions = 2\n\n'
        f'[tls]\ncertificate = "{chain}"\nkey = "{hsm.uri("ec256")}"\n{tls_extra}\n'
        f"{sites}\n{extra}{RELOAD_SETTINGS}"
    )
    return config


def test_each_server_name_staples_its_own_ocsp_response(
    tmp_path: Path, hsm: HSM, ca: trustme.CA, ca_file: Path, upstream: RecordingUpstream
) -> None:
    api = tmp_path / "api.pem"
    api.write_bytes(issue_chain(ca, hsm.public_keys["rsa2048"], ("api.test",)))
    api_staple = tmp_path / "api.der"
    api_staple.write_bytes(ocsp_response_for(api, ca))
    plain = tmp_path / "plain.pem"
    plain.write_bytes(issue_chain(ca, hsm.public_keys["ec384"], ("plain.test",)))
    default_staple = tmp_path / "default.der"
    sites = (
        f'[[tls.sni]]\ncertificate = "{api}"\nkey = "{hsm.uri("rsa2048")}"\n'
        f'ocsp_response = "{api_staple}"\n\n'
        f'[[tls.sni]]\ncertificate = "{plain}"\nkey = "{hsm.uri("ec384")}"\n'
    )
    config = _config(
        tmp_path, hsm, ca, upstream, sites, tls_extra=f'ocsp_response = "{default_staple}"\n'
    )
    default_staple.write_bytes(ocsp_response_for(tmp_path / "default.pem", ca))
    proxy = launch(tmp_path, config)
    assert serial_in(stapled(proxy.port, ca_file, "api.test")) == _serial(api)
    assert serial_in(stapled(proxy.port, ca_file, "localhost")) == _serial(tmp_path / "default.pem")
    assert "OCSP response: no response sent" in stapled(proxy.port, ca_file, "plain.test")
    # The site's staple is a watched secret: a response for another certificate is refused
    # by the reload (the old staple stays), a new good one is served.
    other = tmp_path / "other.pem"
    other.write_bytes(issue_chain(ca, hsm.public_keys["rsa2048"], ("api.test",)))
    replace_file(api_staple, ocsp_response_for(other, ca))
    failed = proxy.wait_for_log(lambda entry: entry.get("event") == "reload_failed", timeout=30)
    assert f"OCSP response file {api_staple} is for another certificate" in failed["message"]
    assert serial_in(stapled(proxy.port, ca_file, "api.test")) == _serial(api)
    replace_file(api, other.read_bytes())
    wait_until(
        lambda: serial_in(stapled(proxy.port, ca_file, "api.test")) == _serial(other),
        what="the new certificate with its new staple",
    )


def test_check_names_a_bad_staple_of_one_server_name(
    tmp_path: Path, hsm: HSM, ca: trustme.CA, upstream: RecordingUpstream
) -> None:
    api = tmp_path / "api.pem"
    api.write_bytes(issue_chain(ca, hsm.public_keys["rsa2048"], ("api.test",)))
    staple = tmp_path / "api.der"
    staple.write_bytes(b"not DER")
    sites = (
        f'[[tls.sni]]\ncertificate = "{api}"\nkey = "{hsm.uri("rsa2048")}"\n'
        f'ocsp_response = "{staple}"\n'
    )
    result = run_cli("check", "--config", str(_config(tmp_path, hsm, ca, upstream, sites)))
    assert result.returncode == 1
    assert "sni[1] ocsp" in result.stdout
    assert f"OCSP response file {staple} is not a DER OCSP response" in result.stdout


def test_client_certificates_per_server_name_from_the_config(
    tmp_path: Path,
    hsm: HSM,
    ca: trustme.CA,
    upstream: RecordingUpstream,
    secure_upstream: RecordingUpstream,
) -> None:
    # A second CA issues the clients of the secure name only.
    client_ca = trustme.CA()
    client_ca_file = tmp_path / "client-ca.pem"
    client_ca_file.write_bytes(client_ca.cert_pem.bytes())
    billing = issue_client_cert(tmp_path, client_ca, "billing", common_name="billing")
    stranger = issue_client_cert(tmp_path, client_ca, "stranger", common_name="stranger")
    secure = tmp_path / "secure.pem"
    secure.write_bytes(issue_chain(ca, hsm.public_keys["ec384"], ("secure.test",)))
    sites = (
        f'[[tls.sni]]\ncertificate = "{secure}"\nkey = "{hsm.uri("ec384")}"\n'
        f'upstream = "secure"\n'
        f'[tls.sni.client_auth]\nca = "{client_ca_file}"\nallow_cn = ["billing"]\n'
    )
    extra = f'[upstreams.secure]\nservers = ["{secure_upstream.url}"]\n'
    proxy = launch(tmp_path, _config(tmp_path, hsm, ca, upstream, sites, extra=extra))
    # The default name asks for no certificate.
    assert https_request(proxy.port, client_context(ca)).status == 200
    # The secure name requires one from its CA, and of its allow-list.
    no_certificate = refused(proxy.port, client_context(ca), server_name="secure.test")
    assert no_certificate == "TLSV13_ALERT_CERTIFICATE_REQUIRED"
    stranger_alert = refused(proxy.port, with_client_cert(ca, stranger), server_name="secure.test")
    assert stranger_alert == "TLSV1_ALERT_INTERNAL_ERROR"  # OpenSSL's, for a callback's no
    proxy.wait_for_log(
        lambda e: "CN=stranger" in e.get("message", "") and "allow-lists" in e.get("message", "")
    )
    reply = https_request(
        proxy.port, with_client_cert(ca, billing), server_name="secure.test", path="/billing"
    )
    assert reply.status == 200
    seen = secure_upstream.requests[-1]
    assert seen.path == "/billing"
    assert {name.lower(): value for name, value in seen.headers.items()}[
        "x-client-cert-subject"
    ] == "CN=billing"
    assert [request.path for request in upstream.requests] == ["/"]


def test_a_listener_rule_can_be_lifted_for_one_name(
    tmp_path: Path,
    hsm: HSM,
    ca: trustme.CA,
    upstream: RecordingUpstream,
    secure_upstream: RecordingUpstream,
) -> None:
    client_ca = trustme.CA()
    client_ca_file = tmp_path / "client-ca.pem"
    client_ca_file.write_bytes(client_ca.cert_pem.bytes())
    public = tmp_path / "public.pem"
    public.write_bytes(issue_chain(ca, hsm.public_keys["ec384"], ("public.test",)))
    sites = (
        f'[[tls.sni]]\ncertificate = "{public}"\nkey = "{hsm.uri("ec384")}"\n'
        'upstream = "public"\nclient_auth = false\n'
    )
    extra = f'[upstreams.public]\nservers = ["{secure_upstream.url}"]\n'
    tls_extra = f'\n[tls.client_auth]\nca = "{client_ca_file}"\nallow_any = true\n'
    config = _config(tmp_path, hsm, ca, upstream, sites, tls_extra=tls_extra, extra=extra)
    proxy = launch(tmp_path, config)
    assert refused(proxy.port, client_context(ca)) == "TLSV13_ALERT_CERTIFICATE_REQUIRED"
    assert https_request(proxy.port, client_context(ca), server_name="public.test").status == 200


@pytest.mark.parametrize(
    ("sites_extra", "extra", "message"),
    [
        (
            "",
            "",
            "tls.sni[1].upstream: 'default' also serves the default certificate ([tls]), whose "
            "client-certificate rules (client_auth) differ from this name's",
        ),
        (
            'upstream = "secure"\n',
            '[upstreams.secure]\nservers = ["http://127.0.0.1:9"]\n'
            '[[routes]]\nhosts = ["secure.test"]\nupstream = "secure"\n',
            "[[routes]] choose upstreams by the Host header, but [[tls.sni]] entries have "
            "client-certificate rules (client_auth) of their own",
        ),
    ],
)
def test_names_with_different_client_rules_never_share_an_upstream(
    tmp_path: Path,
    hsm: HSM,
    ca: trustme.CA,
    upstream: RecordingUpstream,
    sites_extra: str,
    extra: str,
    message: str,
) -> None:
    client_ca_file = tmp_path / "client-ca.pem"
    client_ca_file.write_bytes(trustme.CA().cert_pem.bytes())
    secure = tmp_path / "secure.pem"
    secure.write_bytes(issue_chain(ca, hsm.public_keys["ec384"], ("secure.test",)))
    sites = (
        f'[[tls.sni]]\ncertificate = "{secure}"\nkey = "{hsm.uri("ec384")}"\n{sites_extra}'
        f'[tls.sni.client_auth]\nca = "{client_ca_file}"\nallow_any = true\n'
    )
    config = _config(tmp_path, hsm, ca, upstream, sites, extra=extra)
    result = run_cli("check", "--config", str(config))
    assert result.returncode == 1, result.stdout + result.stderr
    assert message in result.stderr
