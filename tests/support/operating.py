"""Helpers for the operating tests: the admin endpoint of a proxy process, scraped for real."""

from __future__ import annotations

import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from tests.support import REPO, ProxyProcess, proxy_command

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def admin_section(probe_interval: float = 0.2, listen: str = "127.0.0.1:0") -> str:
    """A config fragment (appended after [tls]) that turns the admin listener on."""
    return f'\n[admin]\nlisten = "{listen}"\nprobe_interval = {probe_interval}\n'


def admin_url(lines: list[dict[str, Any]]) -> str:
    for entry in lines:
        message = str(entry.get("message", ""))
        if message.startswith("admin endpoint http://"):
            return message.split()[2].rstrip("/")
    raise AssertionError("the proxy logged no admin endpoint")


def get(url: str) -> tuple[int, str, str]:
    """(status, content type, body) of a GET, errors included."""
    try:
        with urllib.request.urlopen(url, timeout=10) as response:  # noqa: S310 - http:// only
            return response.status, response.headers["content-type"], response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.headers["content-type"], error.read().decode()


def scrape(base: str) -> Samples:
    status, content_type, body = get(f"{base}/metrics")
    assert status == 200
    assert content_type.startswith("text/plain; version=")
    samples: Samples = {}
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def wait_until(condition: Callable[[], bool], timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError("condition not reached")


def start_dev(state_dir: Path, upstream_url: str, log_path: Path, *extra: str) -> ProxyProcess:
    """`hsm-proxy dev` with its own SoftHSM2 token in ``state_dir``, and an admin listener."""
    log_file = log_path.open("w")
    process = subprocess.Popen(
        proxy_command(
            "dev",
            "--state-dir",
            str(state_dir),
            "--listen",
            "127.0.0.1:0",
            "--upstream",
            upstream_url,
            "--admin",
            "127.0.0.1:0",
            *extra,
        ),
        stdout=log_file,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=REPO,
    )
    log_file.close()
    proxy = ProxyProcess(process, log_path)
    proxy.wait_until_serving()
    return proxy
