"""TLS policy as a client sees it: versions, suites, groups, presets, OCSP stapling."""

from __future__ import annotations

import datetime
import ssl
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp

from proxy.tls.context import POST_QUANTUM_GROUP, key_exchange_groups, post_quantum_available
from tests.support import (
    HSM,
    ProxyFactory,
    ProxyProcess,
    RecordingUpstream,
    client_context,
    https_request,
    run_cli,
    write_config,
)
from tests.support.reload import RELOAD_SETTINGS, replace_file


def s_client(port: int, ca_file: Path, *options: str) -> subprocess.CompletedProcess[str]:
    """``openssl s_client`` with ``options``; exit status 0 means the handshake completed."""
    return subprocess.run(
        [
            "openssl",
            "s_client",
            "-connect",
            f"127.0.0.1:{port}",
            "-servername",
            "localhost",
            "-CAfile",
            str(ca_file),
            "-verify_return_error",
            *options,
        ],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


# How openssl s_client names each group (OpenSSL 3.0 and 3.5 differ).
GROUP_NAMES = {
    "X25519": {"X25519"},
    "P-256": {"prime256v1", "secp256r1", "P-256"},
    "P-384": {"secp384r1", "P-384"},
}


def negotiated_group(output: str) -> str | None:
    """The key-exchange group s_client reports: "Server Temp Key: ECDH, prime256v1, 256
    bits" (OpenSSL 3.0) or "Negotiated TLS1.3 group: X25519" (3.5)."""
    for line in output.splitlines():
        for label in ("Negotiated TLS1.3 group:", "Server Temp Key:", "Peer Temp Key:"):
            if line.startswith(label):
                parts = [part.strip() for part in line[len(label) :].split(",")]
                names = [
                    part for part in parts if part not in ("ECDH", "DH") and "bits" not in part
                ]
                return names[0] if names else None
    return None


def test_default_policy_is_tls12_and_tls13_with_ecdhe_aead_and_safe_groups(
    proxy_factory: ProxyFactory, ca: trustme.CA, ca_file: Path, upstream: RecordingUpstream
) -> None:
    proxy = proxy_factory("ec256")
    # (Old versions and suites without ECDHE or AEAD: test_end_to_end.py and test_sslyze.py.)
    tls12 = s_client(proxy.port, ca_file, "-tls1_2")
    assert tls12.returncode == 0, tls12.stderr
    assert "ECDHE-ECDSA-AES128-GCM-SHA256" in tls12.stdout  # server preference: first suite
    assert "Secure Renegotiation IS supported" in tls12.stdout
    assert "Compression: NONE" in tls12.stdout
    # Groups: X25519 first among the classical ones, P-256 and P-384 offered, P-521 not.
    assert s_client(proxy.port, ca_file, "-groups", "P-521").returncode != 0
    for group, aliases in GROUP_NAMES.items():
        result = s_client(proxy.port, ca_file, "-tls1_3", "-groups", group)
        assert result.returncode == 0, group
        assert negotiated_group(result.stdout) in aliases, group
    # In TLS 1.2 the server chooses among the client's groups (P-256 stays offered: the
    # ECDSA certificate's curve must be one of them).
    both = s_client(proxy.port, ca_file, "-tls1_2", "-groups", "P-384:P-256:X25519")
    assert both.returncode == 0, both.stderr
    assert negotiated_group(both.stdout) == "X25519"


def test_modern_policy_is_tls13_only(
    proxy_factory: ProxyFactory, ca: trustme.CA, upstream: RecordingUpstream
) -> None:
    proxy = proxy_factory("ec256", extra_tls='policy = "modern"\n')
    with pytest.raises(ssl.SSLError):
        https_request(proxy.port, client_context(ca, ssl.TLSVersion.TLSv1_2))
    reply = https_request(proxy.port, client_context(ca, ssl.TLSVersion.TLSv1_3))
    assert (reply.status, reply.tls_version) == (200, "TLSv1.3")


def test_unknown_policy_is_a_config_error(
    tmp_path: Path, hsm: HSM, ca: trustme.CA, upstream: RecordingUpstream
) -> None:
    config = write_config(tmp_path, hsm, ca, upstream.url, "ec256", extra_tls='policy = "old"\n')
    result = run_cli("check", "--config", str(config))
    assert result.returncode == 1
    assert "tls.policy: 'old' is not one of intermediate, modern" in result.stderr


def test_groups_prefer_post_quantum_hybrid_only_where_openssl_has_it() -> None:
    groups = key_exchange_groups()
    assert groups[-3:] == ("X25519", "P-256", "P-384")
    assert (groups[0] == POST_QUANTUM_GROUP) == post_quantum_available()


@pytest.mark.skipif(
    not post_quantum_available(),
    reason=f"the system {ssl.OPENSSL_VERSION} does not offer {POST_QUANTUM_GROUP} "
    "(OpenSSL 3.5 or later does, e.g. Debian 13)",
)
def test_post_quantum_hybrid_handshake_is_negotiated(
    proxy_factory: ProxyFactory, ca_file: Path, upstream: RecordingUpstream
) -> None:
    proxy = proxy_factory("ec256")
    result = s_client(proxy.port, ca_file, "-tls1_3", "-groups", f"{POST_QUANTUM_GROUP}:X25519")
    assert result.returncode == 0, result.stderr
    assert negotiated_group(result.stdout) == POST_QUANTUM_GROUP


# --- OCSP stapling -------------------------------------------------------------------------


def ocsp_response_for(
    chain_file: Path,
    ca: trustme.CA,
    status: ocsp.OCSPCertStatus = ocsp.OCSPCertStatus.GOOD,
    next_update_days: int = 3,
) -> bytes:
    leaf = x509.load_pem_x509_certificate(chain_file.read_bytes())
    issuer = x509.load_pem_x509_certificate(ca.cert_pem.bytes())
    issuer_key = serialization.load_pem_private_key(ca.private_key_pem.bytes(), password=None)
    now = datetime.datetime.now(datetime.UTC).replace(tzinfo=None)
    builder = ocsp.OCSPResponseBuilder().add_response(
        cert=leaf,
        issuer=issuer,
        algorithm=hashes.SHA256(),
        cert_status=status,
        this_update=now - datetime.timedelta(hours=1),
        next_update=now + datetime.timedelta(days=next_update_days),
        revocation_time=now - datetime.timedelta(hours=2)
        if status == ocsp.OCSPCertStatus.REVOKED
        else None,
        revocation_reason=None,
    )
    builder = builder.responder_id(ocsp.OCSPResponderEncoding.HASH, issuer)
    response = builder.sign(issuer_key, hashes.SHA256())  # type: ignore[arg-type]
    return response.public_bytes(serialization.Encoding.DER)


def test_ocsp_response_is_stapled_from_a_file(
    tmp_path: Path, hsm: HSM, ca: trustme.CA, ca_file: Path, upstream: RecordingUpstream
) -> None:
    staple = tmp_path / "ocsp.der"
    config = write_config(
        tmp_path, hsm, ca, upstream.url, "ec256", extra_tls=f'ocsp_response = "{staple}"\n'
    )
    staple.write_bytes(ocsp_response_for(tmp_path / "chain-ec256.pem", ca))
    proxy = ProxyProcess.run_config(config, tmp_path)
    try:
        stapled = s_client(proxy.port, ca_file, "-status")
        assert stapled.returncode == 0, stapled.stderr
        assert "OCSP Response Status: successful" in stapled.stdout
        assert "Cert Status: good" in stapled.stdout
        assert https_request(proxy.port, client_context(ca)).status == 200
    finally:
        proxy.stop()


def next_update_stapled(port: int, ca_file: Path) -> str:
    """The "Next Update" of the OCSP response a fresh handshake gets stapled."""
    result = s_client(port, ca_file, "-status")
    assert result.returncode == 0, result.stderr
    assert "OCSP Response Status: successful" in result.stdout, result.stdout
    return next(line for line in result.stdout.splitlines() if "Next Update:" in line).strip()


def test_a_new_ocsp_response_is_picked_up_by_a_reload_and_a_bad_one_is_not(
    tmp_path: Path, hsm: HSM, ca: trustme.CA, ca_file: Path, upstream: RecordingUpstream
) -> None:
    staple = tmp_path / "ocsp.der"
    config = write_config(
        tmp_path,
        hsm,
        ca,
        upstream.url,
        "ec256",
        extra_tls=f'ocsp_response = "{staple}"\n',
        extra=RELOAD_SETTINGS,
    )
    chain = tmp_path / "chain-ec256.pem"
    staple.write_bytes(ocsp_response_for(chain, ca, next_update_days=3))
    proxy = ProxyProcess.run_config(config, tmp_path)
    try:
        first = next_update_stapled(proxy.port, ca_file)
        replace_file(staple, ocsp_response_for(chain, ca, next_update_days=5))
        reloaded = proxy.wait_for_log(lambda e: e.get("event") == "reloaded", timeout=30)
        assert "OCSP response" in str(reloaded["reason"])
        second = next_update_stapled(proxy.port, ca_file)
        assert second != first  # the new response, two days later
        # A revoked status is refused by the reload; the last good staple stays.
        replace_file(staple, ocsp_response_for(chain, ca, ocsp.OCSPCertStatus.REVOKED))
        failed = proxy.wait_for_log(lambda e: e.get("event") == "reload_failed", timeout=30)
        assert "says the certificate is revoked" in str(failed["message"])
        assert next_update_stapled(proxy.port, ca_file) == second
    finally:
        proxy.stop()


def test_an_ocsp_response_from_an_aws_secret_is_stapled_and_rotated(
    moto: str, tmp_path: Path, hsm: HSM, ca: trustme.CA, ca_file: Path, upstream: RecordingUpstream
) -> None:
    import boto3

    client = boto3.client("secretsmanager", endpoint_url=moto, region_name="eu-west-1")
    config = write_config(
        tmp_path,
        hsm,
        ca,
        upstream.url,
        "ec256",
        extra_tls='ocsp_response = "aws-sm:proxy/ocsp"\n',
        extra=f'{RELOAD_SETTINGS}\n[aws]\nendpoint_url = "{moto}"\nregion = "eu-west-1"\n',
    )
    chain = tmp_path / "chain-ec256.pem"
    client.create_secret(
        Name="proxy/ocsp", SecretBinary=ocsp_response_for(chain, ca, next_update_days=3)
    )
    proxy = ProxyProcess.run_config(config, tmp_path)
    try:
        first = next_update_stapled(proxy.port, ca_file)
        client.put_secret_value(
            SecretId="proxy/ocsp", SecretBinary=ocsp_response_for(chain, ca, next_update_days=5)
        )
        reloaded = proxy.wait_for_log(lambda e: e.get("event") == "reloaded", timeout=30)
        assert "'proxy/ocsp' changed" in str(reloaded["reason"])
        assert next_update_stapled(proxy.port, ca_file) != first
    finally:
        proxy.stop()


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda chain, ca: b"not DER", "is not a DER OCSP response"),
        (
            lambda chain, ca: ocsp_response_for(chain, ca, ocsp.OCSPCertStatus.REVOKED),
            "says the certificate is revoked",
        ),
        (lambda chain, ca: ocsp_response_for(chain, ca, next_update_days=-1), "expired at"),
        (
            lambda chain, ca: ocsp.OCSPResponseBuilder.build_unsuccessful(
                ocsp.OCSPResponseStatus.TRY_LATER
            ).public_bytes(serialization.Encoding.DER),
            "has status try_later, not successful",
        ),
    ],
)
def test_bad_ocsp_responses_are_refused_with_the_reason(
    tmp_path: Path,
    hsm: HSM,
    ca: trustme.CA,
    upstream: RecordingUpstream,
    make: Callable[[Path, trustme.CA], bytes],
    message: str,
) -> None:
    staple = tmp_path / "ocsp.der"
    config = write_config(
        tmp_path, hsm, ca, upstream.url, "ec256", extra_tls=f'ocsp_response = "{staple}"\n'
    )
    staple.write_bytes(make(tmp_path / "chain-ec256.pem", ca))
    result = run_cli("check", "--config", str(config))
    assert result.returncode == 1
    assert message in result.stderr


def test_ocsp_response_for_another_certificate_is_refused(
    tmp_path: Path, hsm: HSM, ca: trustme.CA, upstream: RecordingUpstream
) -> None:
    staple = tmp_path / "ocsp.der"
    write_config(tmp_path, hsm, ca, upstream.url, "ec256")
    staple.write_bytes(ocsp_response_for(tmp_path / "chain-ec256.pem", ca))
    # A new config issues a new certificate (new serial): the response no longer fits.
    config = write_config(
        tmp_path, hsm, ca, upstream.url, "ec256", extra_tls=f'ocsp_response = "{staple}"\n'
    )
    result = run_cli("check", "--config", str(config))
    assert result.returncode == 1
    assert "is for another certificate" in result.stderr
