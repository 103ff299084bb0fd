"""Readiness probes: what /readyz reports beyond the token's own state.

Theory of operation. Beside the admin listener, :func:`probe_readiness` runs every
``probe_interval`` seconds: a test signature by each served key (in a worker thread,
under the token's limiter) and a TCP connection to each upstream group (which a group
that reads PROXY protocol headers gets a LOCAL header on, as the specification has
health checks do); the admin endpoint (ops/admin.py) reports their outcomes.
"""

from __future__ import annotations

from contextlib import suppress

import trio

from proxy.config import ProxyConfig
from proxy.http.upstream import UpstreamFailure, connect_first
from proxy.net.pipeline import ServerState
from proxy.ops.admin import Operations, sign_probes
from proxy.tcp.proxyproto import LOCAL_HEADER


async def probe_readiness(state: ServerState, operations: Operations, interval: float) -> None:
    """Every ``interval`` seconds: token test signatures, a TCP connection upstream."""
    while True:
        generation = state.holder.acquire()  # a reload must not close it under the probe
        try:
            operations.serving(generation.number, generation.chains())
            keys = [generation.key, *(site.key for site in generation.sites)]
            outcome = await trio.to_thread.run_sync(sign_probes, keys, limiter=state.sign_limiter)
            operations.probe_signed(outcome)
        finally:
            state.holder.release(generation)
        await _probe_upstreams(generation.config, operations)
        await trio.sleep(interval)


async def _probe_upstreams(config: ProxyConfig, operations: Operations) -> None:
    """Ready when every upstream group has an address that accepts a TCP connection."""
    reached = []
    for group in config.upstream_groups():
        try:
            connection = await connect_first(group.servers, config.http)
        except UpstreamFailure as failure:
            operations.readiness.upstream_result(False, f"{group.name}: {failure}")
            return
        if group.proxy_protocol == "v2":
            # A backend that reads PROXY headers gets one: LOCAL, the health-check command.
            with suppress(UpstreamFailure):
                await connection.send_data(LOCAL_HEADER)
        await connection.aclose()
        reached.append(str(connection.config))
    operations.readiness.upstream_result(True, f"{', '.join(reached)} accepted a connection")
