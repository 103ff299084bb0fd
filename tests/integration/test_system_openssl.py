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
# What pip says when it cannot reach a package index at all (urllib3 and socket errors).
NETWORK_ERRORS = (
    "NewConnectionError",
    "Failed to establish a new connection",
    "Temporary failure in name resolution",
    "Name or service not known",
    "Network is unreachable",
    "Connection refused",
    "Read timed out",
    "ConnectTimeoutError",
    "ProxyError",
)


def _network_error(stderr: str) -> bool:
    return any(marker in stderr for marker in NETWORK_ERRORS)


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
        # Only a package index out of reach is a reason to skip; any other install error
        # (a build failure, a resolver conflict) is a failure to see.
        assert _network_error(install.stderr), install.stdout + install.stderr
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


def test_only_an_unreachable_index_lets_the_shadowing_wheel_test_skip() -> None:
    unreachable = (
        "WARNING: Retrying (Retry(total=4, connect=None, read=None, redirect=None, status=None))"
        " after connection broken by 'NewConnectionError('<pip._vendor.urllib3.connection."
        "HTTPSConnection object>: Failed to establish a new connection: [Errno -3] Temporary "
        "failure in name resolution')': /simple/pyopenssl/\n"
        "ERROR: Could not find a version that satisfies the requirement pyOpenSSL"
    )
    assert _network_error(unreachable)
    build_failure = (
        "error: subprocess-exited-with-error\nBuilding wheel for python-pkcs11 (pyproject.toml)"
        " did not run successfully.\nERROR: Failed building wheel for python-pkcs11"
    )
    assert not _network_error(build_failure)
    conflict = "ERROR: ResolutionImpossible: for help visit https://pip.pypa.io/..."
    assert not _network_error(conflict)
