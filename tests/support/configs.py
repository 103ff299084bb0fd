"""Configs for unit tests: the smallest valid config file, plus what a test adds."""

from __future__ import annotations

import tomllib
from pathlib import Path

from proxy.config import ProxyConfig, parse_config


def base_config(upstream: str) -> str:
    """The smallest valid config file forwarding to ``upstream`` (http:// or tcp://)."""
    return f"""
upstream = "{upstream}"
[token]
module = "/m.so"
pin_env = "PIN"
[tls]
certificate = "c.pem"
key = "pkcs11:object=k;type=private"
"""


HTTP_BASE = base_config("http://127.0.0.1:8080")


def minimal_config(extra: str = "", base: str = HTTP_BASE) -> ProxyConfig:
    """``base`` and ``extra`` parsed as one config file of /etc/hsm-proxy (nothing is read)."""
    return parse_config(tomllib.loads(base + extra), Path("/etc/hsm-proxy"), "test")
