"""A 1 GiB body each way through the proxy, with its resident memory staying under 100 MiB.

The proxy streams: at most one 64 KiB buffer per direction is in flight, so memory does not
grow with the body. This test measures the proxy process's peak resident set (VmHWM in
/proc) after curl downloads 1 GiB (Content-Length framed) and uploads 1 GiB (chunked, from
a pipe) through it. 1 GiB is the size the issue names; on loopback the proxy moves it in
a few seconds each way (TLS in OpenSSL, framing in h11), so the whole test stays short.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import trustme

from tests.support import HSM, ProxyProcess, peak_rss_kib
from tests.support.http import ScriptedUpstream, streaming_handler, write_ca

GIB = 1 << 30
RSS_LIMIT_KIB = 100 * 1024


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("curl") is None, reason="curl comes with setup.sh --test")
def test_one_gib_each_way_with_bounded_memory(tmp_path: Path, hsm: HSM, ca: trustme.CA) -> None:
    backend = ScriptedUpstream(streaming_handler)
    proxy = ProxyProcess.start(tmp_path, hsm, ca, backend.url, "ec256")
    ca_file = write_ca(ca, tmp_path)
    try:
        download = subprocess.run(
            [
                "curl",
                "-sS",
                "--cacert",
                str(ca_file),
                "-o",
                "/dev/null",
                "-w",
                "%{http_code} %{size_download}",
                f"{proxy.url}/bytes/{GIB}",
            ],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert download.returncode == 0, download.stderr
        assert download.stdout == f"200 {GIB}"
        with subprocess.Popen(["head", "-c", str(GIB), "/dev/zero"], stdout=subprocess.PIPE) as src:
            upload = subprocess.run(
                ["curl", "-sS", "--cacert", str(ca_file), "-T", "-", f"{proxy.url}/sink"],
                stdin=src.stdout,
                capture_output=True,
                text=True,
                timeout=300,
                check=False,
            )
        assert upload.returncode == 0, upload.stderr
        assert upload.stdout == str(GIB)  # the upstream counted every byte
        assert peak_rss_kib(proxy.process.pid) < RSS_LIMIT_KIB
    finally:
        proxy.stop()
        backend.stop()
