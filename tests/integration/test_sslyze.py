"""An independent scanner's view of the TLS policy: sslyze against a running proxy.

sslyze needs a newer cryptography than Debian's, so it lives in its own virtualenv
(``.venv-sslyze``, made by ``deploy/setup.sh --test``) and runs as a subprocess; the
project's ``.venv`` keeps the distribution's pyOpenSSL and cryptography
(tests/test_system_openssl.py asserts it).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import trustme

from tests.support import REPO, ProxyFactory, RecordingUpstream

SSLYZE = REPO / ".venv-sslyze" / "bin" / "python"
SCANS = [
    "--sslv2",
    "--sslv3",
    "--tlsv1",
    "--tlsv1_1",
    "--tlsv1_2",
    "--tlsv1_3",
    "--compression",
    "--reneg",
    "--elliptic_curves",
    "--fallback",
]


def sslyze(port: int, ca_file: Path, output: Path, *options: str) -> dict[str, Any]:
    if not SSLYZE.exists():
        pytest.fail(f"{SSLYZE} is missing: run deploy/setup.sh --test (it installs sslyze there)")
    result = subprocess.run(
        [
            str(SSLYZE),
            "-m",
            "sslyze",
            "--quiet",
            "--json_out",
            str(output),
            "--certinfo_ca_file",
            str(ca_file),
            *options,
            f"localhost:{port}{{127.0.0.1}}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert output.exists(), result.stdout + result.stderr
    report: dict[str, Any] = json.loads(output.read_text())
    scans: list[dict[str, Any]] = report["server_scan_results"]
    assert len(scans) == 1
    assert scans[0]["scan_status"] == "COMPLETED", scans[0]
    return scans[0]


def accepted(scan: dict[str, Any], command: str) -> list[dict[str, Any]]:
    attempt = scan["scan_result"][command]
    assert attempt["status"] == "COMPLETED", attempt
    suites: list[dict[str, Any]] = attempt["result"]["accepted_cipher_suites"]
    return suites


# An RSA key can serve the RSA-authenticated suites (and the static-RSA key exchange the
# policy refuses); an EC key cannot serve them whatever the policy says: scan both.
@pytest.mark.parametrize("key", ["ec256", "rsa2048"])
def test_sslyze_finds_only_tls12_and_tls13_with_forward_secret_aead_suites(
    key: str,
    tmp_path: Path,
    proxy_factory: ProxyFactory,
    ca: trustme.CA,
    upstream: RecordingUpstream,
) -> None:
    proxy = proxy_factory(key)
    ca_file = tmp_path / "ca.pem"
    ca_file.write_bytes(ca.cert_pem.bytes())
    scan = sslyze(proxy.port, ca_file, tmp_path / "scan.json", *SCANS)

    for old in ("ssl_2_0_cipher_suites", "ssl_3_0_cipher_suites", "tls_1_0_cipher_suites"):
        assert accepted(scan, old) == [], old
    assert accepted(scan, "tls_1_1_cipher_suites") == []

    tls12 = accepted(scan, "tls_1_2_cipher_suites")
    tls13 = accepted(scan, "tls_1_3_cipher_suites")
    assert tls12
    assert tls13
    for suite in tls12:
        name = suite["cipher_suite"]["name"]
        assert name.startswith("TLS_ECDHE_"), f"{name}: not forward secret"
        signed_by = "_ECDSA_" if key.startswith("ec") else "_RSA_"
        assert signed_by in name, f"{name}: not what a {key} key signs"
        assert name.endswith(("_GCM_SHA256", "_GCM_SHA384", "_CHACHA20_POLY1305_SHA256")), name
        assert suite["ephemeral_key"] is not None, name
    for suite in tls13:
        assert suite["cipher_suite"]["name"] in {
            "TLS_AES_128_GCM_SHA256",
            "TLS_AES_256_GCM_SHA384",
            "TLS_CHACHA20_POLY1305_SHA256",
        }

    compression = scan["scan_result"]["tls_compression"]["result"]
    assert compression["supports_compression"] is False
    renegotiation = scan["scan_result"]["session_renegotiation"]["result"]
    assert renegotiation["is_vulnerable_to_client_renegotiation_dos"] is False
    assert renegotiation["supports_secure_renegotiation"] is True  # RFC 5746, never legacy
    curves = scan["scan_result"]["elliptic_curves"]["result"]
    supported = {curve["name"] for curve in curves["supported_curves"]}
    # sslyze names P-256 "secp256r1"; nothing else (no P-521, no X448, no FFDHE) is offered.
    assert supported <= {"X25519", "secp256r1", "secp384r1", "X25519MLKEM768"}
    assert {"X25519", "secp256r1", "secp384r1"} <= supported
    fallback = scan["scan_result"]["tls_fallback_scsv"]["result"]
    assert fallback["supports_fallback_scsv"] is True


@pytest.mark.parametrize("policy", ["intermediate", "modern"])
def test_sslyze_finds_each_preset_compliant_with_mozilla(
    tmp_path: Path,
    proxy_factory: ProxyFactory,
    ca: trustme.CA,
    upstream: RecordingUpstream,
    policy: str,
) -> None:
    proxy = proxy_factory("ec256", extra_tls=f'policy = "{policy}"\n')
    ca_file = tmp_path / "ca.pem"
    ca_file.write_bytes(ca.cert_pem.bytes())
    output = tmp_path / "scan.json"
    result = subprocess.run(
        [
            str(SSLYZE),
            "-m",
            "sslyze",
            "--json_out",
            str(output),
            "--certinfo_ca_file",
            str(ca_file),
            "--mozilla_config",
            policy,
            f"localhost:{proxy.port}{{127.0.0.1}}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    header = f'Checking results against Mozilla\'s "{policy}" configuration'
    assert header in result.stdout, result.stdout[-3000:]
    verdict = result.stdout.split(header, 1)[1]
    problems = [
        line.strip()[2:].split(":", 1)[0]
        for line in verdict.splitlines()
        if line.strip().startswith("* ")
    ]
    if policy == "modern":
        # "modern" also wants certificates that live under 90 days; the test CA's live
        # a year. That is the certificate's business, not the TLS policy's.
        assert set(problems) <= {"maximum_certificate_lifespan"}, verdict
    else:
        assert f"localhost:{proxy.port}: OK - Compliant." in verdict, verdict
        assert problems == []
