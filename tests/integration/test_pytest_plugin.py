"""The pytest plugin, used the way a user would: a separate pytest run of the README example."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from tests.support import REPO

EXAMPLE = REPO / "examples" / "test_behind_hsm_tls.py"


def _pytest(directory: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("PYTEST_")}
    env.pop("SOFTHSM2_CONF", None)  # a user's shell has none: the plugin needs none
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", *args],
        cwd=directory,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )


def test_the_fixture_serves_a_request_through_an_hsm_key(tmp_path: Path) -> None:
    shutil.copy(EXAMPLE, tmp_path / "test_example.py")
    result = _pytest(tmp_path, "test_example.py")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 passed" in result.stdout


def test_the_default_upstream_is_the_demo_and_fixtures_are_listed(tmp_path: Path) -> None:
    (tmp_path / "test_demo.py").write_text(
        "import urllib.request\n\n"
        "def test_demo(hsm_tls_endpoint):\n"
        "    context = hsm_tls_endpoint.ssl_context()\n"
        "    with urllib.request.urlopen(hsm_tls_endpoint.url + '/x', context=context) as r:\n"
        "        assert b'Hello from the hsm-proxy demo upstream.' in r.read()\n"
        "    assert hsm_tls_endpoint.ca_file.name == 'ca.pem'\n"
    )
    result = _pytest(tmp_path, "test_demo.py")
    assert result.returncode == 0, result.stdout + result.stderr
    listed = _pytest(tmp_path, "--fixtures", "test_demo.py")
    for name in ("hsm_tls_endpoint", "hsm_tls_endpoint_factory", "hsm_proxy_upstream"):
        assert name in listed.stdout


def test_an_endpoint_that_does_not_stop_cleanly_fails_its_test(tmp_path: Path) -> None:
    """Killed (a non-zero exit), or hung at shutdown (stopped, so SIGTERM does nothing):
    each test fails at teardown and says why, instead of a silent SIGKILL."""
    (tmp_path / "test_unclean.py").write_text(
        "import os, signal\n\n"
        "def test_killed(hsm_tls_endpoint):\n"
        "    os.kill(hsm_tls_endpoint.process.pid, signal.SIGKILL)\n"
        "    hsm_tls_endpoint.process.wait()\n\n"
        "def test_hung(hsm_tls_endpoint):\n"
        "    os.kill(hsm_tls_endpoint.process.pid, signal.SIGSTOP)\n\n"
        "def test_clean(hsm_tls_endpoint):\n"
        "    pass\n"
    )
    result = _pytest(tmp_path, "-o", "hsm_proxy_shutdown_timeout=2", "test_unclean.py")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "3 passed, 2 errors" in result.stdout, result.stdout
    assert "ERROR at teardown of test_killed" in result.stdout
    assert "it exited with status -9" in result.stdout
    assert "ERROR at teardown of test_hung" in result.stdout
    assert "it did not exit within 2 s of SIGTERM and was killed" in result.stdout
    assert "teardown of test_clean" not in result.stdout
