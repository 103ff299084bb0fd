"""``hsm-proxy check``: validate everything a config names, like ``nginx -t``, serving nothing.

Theory of operation. :func:`run_checks` loads the config (the ``config`` row), then runs
every step of a generation build, the same step list a reload and ``run`` use
(generation/steps.py), going on past failures: a row per step, and a step whose inputs
failed is skipped with the reason, so one run shows every independent problem. Then two
rows of its own, about what a build does not touch: whether the upstream accepts a
connection, and where the admin endpoint will listen. The caller prints the table and
exits non-zero when any row failed.

The upstream check is a plain blocking TCP connect with the configured connect timeout;
nothing here runs an event loop.
"""

from __future__ import annotations

import socket
from pathlib import Path

from proxy.config import ProxyConfig, load_config
from proxy.errors import ProxyError
from proxy.generation.build import Row, check_generation
from proxy.generation.steps import FAIL, OK
from proxy.pkcs11.token import SignatureObserver


def run_checks(config_path: Path, observer: SignatureObserver) -> list[Row]:
    try:
        config = load_config(config_path)
    except ProxyError as exc:
        return [Row(FAIL, "config", str(exc))]
    rows = [Row(OK, "config", str(config_path))]
    rows += check_generation(config, observer)
    rows.append(_check_upstream(config))
    if config.admin is not None:
        rows.append(
            Row(
                OK,
                "admin",
                f"http://{config.admin.listen}/ "
                f"({'public' if config.admin.allow_public else 'loopback'}), "
                f"probes every {config.admin.probe_interval:g}s",
            )
        )
    return rows


def _check_upstream(config: ProxyConfig) -> Row:
    upstream = config.upstream
    try:
        with socket.create_connection(
            (upstream.host, upstream.port), timeout=upstream.connect_timeout
        ):
            pass
    except TimeoutError:
        return Row(
            FAIL,
            "upstream",
            f"connecting to {upstream} timed out after {upstream.connect_timeout:g}s",
        )
    except OSError as exc:
        return Row(FAIL, "upstream", f"cannot connect to {upstream}: {exc.strerror or exc}")
    return Row(OK, "upstream", f"{upstream} accepts connections")


def format_rows(rows: list[Row]) -> str:
    width = max(len(row.name) for row in rows)
    return "\n".join(f"{row.status:<4}  {row.name:<{width}}  {row.detail}" for row in rows)
