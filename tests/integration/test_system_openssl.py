"""The key bridge needs pyOpenSSL on the system OpenSSL (ARCHITECTURE.md, decision 1): check that
the venv really uses Debian's packages, and that a shadowing PyPI wheel is caught clearly."""

from __future__ import annotations

import subprocess
from pathlib import Path

import cryptography
import OpenSSL
import pytest
import trustme

from proxy.tls.keys import verify_shared_libcrypto
from tests.support import HSM, REPO, RecordingUpstream, write_config

DEBIAN_SITE = "/usr/lib/python3/dist-packages/"


def test_pyopenssl_and_cryptography_come_from_the_distribution() -> None:
    assert OpenSSL.__file__.startswith(DEBIAN_SITE), OpenSSL.__file__
    assert cryptography.__file__.startswith(DEBIAN_SITE), cryptography.__file__


def test_pyopenssl_shares_the_bridge_libcrypto() -> None:
    assert verify_shared_libcrypto().startswith("OpenSSL 3.")


@pytest.mark.slow
def test_a_pypi_wheel_shadowing_pyopenssl_is_refused_with_the_fix(
    tmp_path: Path,
    hsm: HSM,
    ca: trustme.CA,
    upstream: RecordingUpstream,
) -> None:
    venv = tmp_path / "wheel-venv"
    subprocess.run(["/usr/bin/python3", "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "pyOpenSSL", "python-pkcs11", "trio", "h11"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    if install.returncode != 0:
        pytest.skip(f"PyPI not reachable to build the shadowing venv: {install.stderr[-300:]}")
    config = write_config(tmp_path, hsm, ca, upstream.url, "ec256")
    result = subprocess.run(
        [str(python), "-m", "proxy", "--log-format", "text", "check", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        check=False,
        env={
            "PATH": "/usr/bin:/bin",
            "PYTHONPATH": str(REPO),
            "SOFTHSM2_CONF": str(hsm.directory / "softhsm2.conf"),
        },
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "pyOpenSSL is not using the system OpenSSL" in result.stderr
    assert "pip uninstall pyOpenSSL cryptography" in result.stderr
    assert "cryptography" in result.stderr
