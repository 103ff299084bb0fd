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
