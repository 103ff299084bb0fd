"""``hsm-proxy check``: validate everything a config names, like ``nginx -t``, serving nothing.

Theory of operation. :func:`run_checks` loads the config (the ``config`` row), then runs
every step of a generation build, the same step list a reload and ``run`` use
(generation/steps.py), going on past failures: a row per step, and a step whose inputs
failed is skipped with the reason, so one run shows every independent problem. Then two
rows of its own, about what a build does not touch: whether each upstream group has an
address that accepts a connection, and where the admin endpoint will listen. The caller
prints the table and exits non-zero when any row failed.

The upstream check is a plain blocking TCP connect with the configured connect timeout;
nothing here runs an event loop.
"""

from __future__ import annotations

from pathlib import Path

from proxy.config import DEFAULT_UPSTREAM, ProxyConfig, load_config
from proxy.errors import ProxyError
from proxy.generation.build import Row, check_generation
from proxy.generation.steps import FAIL, OK
from proxy.net.sockets import try_connect
from proxy.pkcs11.keys import SignatureObserver


def run_checks(config_path: Path, observer: SignatureObserver) -> list[Row]:
    try:
        config = load_config(config_path)
    except ProxyError as exc:
        return [Row(FAIL, "config", str(exc))]
    rows = [Row(OK, "config", str(config_path))]
    rows += check_generation(config, observer)
    rows += _check_upstreams(config)
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


def _check_upstreams(config: ProxyConfig) -> list[Row]:
    """One row per upstream group: the first of its addresses that accepts a connection,
    or why none does."""
    rows = []
    for group in config.upstream_groups():
        name = "upstream" if group.name == DEFAULT_UPSTREAM else f"upstream {group.name}"
        failures = []
        for server in group.servers:
            try:
                try_connect(server.host, server.port, config.http.connect_timeout)
            except TimeoutError:
                failures.append(
                    f"connecting to {server} timed out after {config.http.connect_timeout:g}s"
                )
            except OSError as exc:
                failures.append(f"cannot connect to {server}: {exc.strerror or exc}")
            else:
                rows.append(Row(OK, name, f"{server} accepts connections"))
                break
        else:
            rows.append(Row(FAIL, name, "; ".join(failures)))
    return rows


def format_rows(rows: list[Row]) -> str:
    width = max(len(row.name) for row in rows)
    return "\n".join(f"{row.status:<4}  {row.name:<{width}}  {row.detail}" for row in rows)
