"""Configs for unit tests: the smallest valid config file, plus what a test adds."""

from __future__ import annotations

import tomllib
from pathlib import Path

from proxy.config import ProxyConfig, parse_config

HTTP_BASE = """
upstream = "http://127.0.0.1:8080"
[token]
module = "/m.so"
pin_env = "PIN"
[tls]
certificate = "c.pem"
key = "pkcs11:object=k;type=private"
"""


def minimal_config(extra: str = "", base: str = HTTP_BASE) -> ProxyConfig:
    """``base`` and ``extra`` parsed as one config file of /etc/hsm-proxy (nothing is read)."""
    return parse_config(tomllib.loads(base + extra), Path("/etc/hsm-proxy"), "test")
