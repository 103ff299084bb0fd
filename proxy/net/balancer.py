"""Which address of an upstream group to connect to next: round-robin, skipping the dead.

Theory of operation. A :class:`Balancer` belongs to one upstream group and is shared by
every connection to it (the HTTP keep-alive pool, http/upstream.py, and the TCP
passthrough handler, tcp/handler.py). :meth:`Balancer.candidates` gives the group's
addresses in the order to try them for one connection: a round-robin start, then the
others; an address that failed to connect is left out for ``down_time`` seconds
(:meth:`Balancer.mark_down`, which logs it once per failure), unless every address is
down, when all are tried rather than failing without trying. A successful connect clears
the mark (:meth:`Balancer.mark_up`).

No sockets and no waiting here: the callers connect, within their own timeouts.
"""

from __future__ import annotations

import time

from proxy.config import UpstreamConfig, UpstreamGroup
from proxy.ops.logs import log


class Balancer:
    """Round-robin over a group's addresses, each failed one skipped for ``down_time``."""

    def __init__(self, group: UpstreamGroup, down_time: float) -> None:
        self.group = group
        self.down_time = down_time
        self._next = 0
        self._down_until: dict[UpstreamConfig, float] = {}

    def candidates(self) -> list[UpstreamConfig]:
        """The group's addresses in round-robin order, those marked down left out (unless
        all are: then all are tried rather than failing without trying)."""
        servers = self.group.servers
        if len(servers) == 1:
            return [servers[0]]
        start = self._next % len(servers)
        self._next += 1
        ordered = list(servers[start:] + servers[:start])
        now = time.monotonic()
        up = [server for server in ordered if self._down_until.get(server, 0.0) <= now]
        return up or ordered

    def mark_down(self, server: UpstreamConfig, why: str) -> None:
        """``server`` failed to connect (``why`` says how): skip it for ``down_time``."""
        self._down_until[server] = time.monotonic() + self.down_time
        log.warning(
            f"{why}; skipping {server} for {self.down_time:g}s",
            extra={"fields": {"event": "upstream_down", "upstream": str(server)}},
        )

    def mark_up(self, server: UpstreamConfig) -> None:
        self._down_until.pop(server, None)
