"""The TCP passthrough handler: a connection's decrypted bytes, relayed to a TCP upstream.

Theory of operation. The pipeline (net/pipeline.py) picks :class:`TCPHandler` for a
connection whose site names a ``tcp://`` upstream group. It does what ghostunnel and
stunnel do in server mode, once per connection:

1. **connect**: the group's addresses in the order its :class:`Balancer` gives
   (round-robin; an address that failed is skipped for ``http.down_time`` seconds), each
   within ``tcp.connect_timeout``, the next one tried on failure. When none answers, the
   client connection is aborted (it never gets a clean end of stream for a tunnel that
   never opened), and each failed address is counted and logged;
2. **PROXY header**: with ``proxy_protocol = "v2"``, one PROXY protocol v2 header
   (proxyproto.py) goes to the upstream before any byte of the client's;
3. **relay**: net/relay.py moves the bytes both ways with one bounded buffer per
   direction and carries half-closes across (the client's close_notify or FIN becomes a
   TCP half-close upstream, the upstream's FIN a close_notify to the client), until both
   directions ended, a side broke, nothing moved for ``tcp.idle_timeout``, or
   ``tcp.max_lifetime`` passed. The server's drain gives an open tunnel
   ``http.shutdown_grace`` seconds, then cancels it;
4. **close**: the handler returns :attr:`CloseMode.CLOSE_NOTIFY` for a tunnel that ended
   in order, and :attr:`CloseMode.ABORT` when the upstream (or the client) broke the
   connection or a write to the client was cut off, so that the client sees a broken
   connection rather than a clean end.

Every connection gets one access line (``hsm_proxy.access``, message ``tunnel``) with the
bytes each way, the duration and what ended it (``closed_by``: client, upstream,
idle_timeout, max_lifetime, drain, error, and a ``reason``), and the metrics in
ops/admin.py count tunnels, bytes by direction and connect failures.

Timeouts on the client's TCP stream are lifted for the tunnel: a tunnel may stay quiet or
wait for a slow reader as long as ``tcp.idle_timeout`` allows, and no longer.
"""

from __future__ import annotations

import time

import trio

from proxy.config import ProxyConfig, UpstreamConfig, UpstreamGroup
from proxy.net.balancer import Balancer
from proxy.net.pipeline import Client
from proxy.net.relay import Relay, RelayEnd, Side
from proxy.net.sockets import TCPStream, connect_tcp
from proxy.ops.admin import Metrics
from proxy.ops.logs import access_log, info_line, log
from proxy.tcp.proxyproto import encode_v2
from proxy.tls.stream import CloseMode


class _Unreachable(Exception):
    """No address of the group accepted a connection."""


class TCPHandler:
    """TCP passthrough: one upstream TCP connection per client connection, bytes relayed."""

    def __init__(self) -> None:
        # One balancer per group (and down time), shared by every configuration naming it.
        self._balancers: dict[tuple[UpstreamGroup, float], Balancer] = {}

    def sweep(self) -> None:
        """Nothing expires: tunnels keep no upstream connection between clients."""

    def close(self) -> None:
        """Nothing to let go of: each tunnel closes its own upstream connection."""

    def _balancer(self, group: UpstreamGroup, down_time: float) -> Balancer:
        key = (group, down_time)
        balancer = self._balancers.get(key)
        if balancer is None:
            balancer = self._balancers[key] = Balancer(group, down_time)
        return balancer

    async def serve(self, client: Client) -> CloseMode:
        config = client.generation.config
        group = client.generation.upstream_serving(client.tls.context)
        metrics = client.server.metrics
        tunnel = _Tunnel(client)
        transport = client.stream.transport
        if isinstance(transport, TCPStream):
            transport.send_timeout = transport.receive_timeout = None
        try:
            try:
                server, upstream = await self._connect(group, config, metrics)
            except _Unreachable as exc:
                log.warning(
                    f"{exc}; closing the client connection",
                    extra={"fields": {"event": "upstream_error", "kind": "connect"}},
                )
                tunnel.end("error", str(exc))
                return CloseMode.ABORT
            tunnel.upstream = str(server)
            try:
                return await tunnel.run(upstream, group, config, metrics)
            finally:
                upstream.close()
        except BaseException as exc:
            if not _cancellation(exc):
                tunnel.end("error", f"unexpected error: {exc!r}")  # the pipeline logs it
            elif client.server.draining:
                tunnel.end("drain", "open when the shutdown grace (http.shutdown_grace) ran out")
            else:
                tunnel.end("error", "cancelled")
            raise
        finally:
            tunnel.log(metrics)

    async def _connect(
        self, group: UpstreamGroup, config: ProxyConfig, metrics: Metrics
    ) -> tuple[UpstreamConfig, TCPStream]:
        """A connection to the first address that accepts one (see the module docstring)."""
        balancer = self._balancer(group, config.http.down_time)
        timeout = config.tcp.connect_timeout
        failures = []
        for server in balancer.candidates():
            try:
                with trio.fail_after(timeout):
                    stream = await connect_tcp(server.host, server.port)
            except trio.TooSlowError:
                kind, why = (
                    "connect_timeout",
                    f"connecting to {server} timed out after {timeout:g}s",
                )
            except OSError as exc:
                kind, why = "connect", f"cannot connect to {server}: {exc.strerror or exc}"
            else:
                balancer.mark_up(server)
                return server, stream
            metrics.tcp_connect_failed(kind)
            balancer.mark_down(server, why)
            failures.append(why)
        raise _Unreachable(f"upstream {group.name}: {'; '.join(failures)}")


def _cancellation(exc: BaseException) -> bool:
    """Whether ``exc`` is trio's cancellation, alone or as the relay's tasks raised it (an
    exception group of nothing but ``Cancelled``)."""
    if isinstance(exc, BaseExceptionGroup):
        return exc.split(trio.Cancelled)[1] is None
    return isinstance(exc, trio.Cancelled)


class _Tunnel:
    """One client connection's tunnel: its counters and its access line."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.started = time.perf_counter()
        self.upstream = "-"
        self.relay: Relay | None = None
        self.closed_by = "error"
        self.reason = "not ended"  # every way out of serve() says how it ended

    def end(self, closed_by: str, reason: str) -> None:
        self.closed_by, self.reason = closed_by, reason

    async def run(
        self, upstream: TCPStream, group: UpstreamGroup, config: ProxyConfig, metrics: Metrics
    ) -> CloseMode:
        if group.proxy_protocol == "v2":
            addresses = self._client_addresses()
            if addresses is None:
                self.end("client", "the client left before its tunnel opened")
                return CloseMode.ABORT
            try:
                header = encode_v2(*addresses, self.client.tls)
            except ValueError as exc:  # a client certificate too large for the header
                self.end("error", f"PROXY protocol header: {exc}")
                return CloseMode.ABORT
            try:
                await upstream.send_all(header)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                self.end("upstream", f"upstream broke the connection: {exc}")
                return CloseMode.ABORT
        tcp = config.tcp
        self.relay = Relay(
            self.client.stream,
            upstream,
            tcp.idle_timeout,
            tcp.max_lifetime or None,
            on_moved=lambda side, size: metrics.tcp_moved(side is Side.CLIENT, size),
        )
        metrics.tunnel_opened()
        try:
            ended: RelayEnd = await self.relay.run()
        finally:
            metrics.tunnel_closed()
        self.end(ended.closed_by, ended.reason)
        if ended.broken is not None or not ended.clean:
            return CloseMode.ABORT
        return CloseMode.CLOSE_NOTIFY

    def _client_addresses(self) -> tuple[tuple[str, int], tuple[str, int]] | None:
        """The client's address and the one it connected to, for the PROXY header; None
        when the client is gone (its socket no longer has a peer)."""
        transport = self.client.stream.transport
        if not isinstance(transport, TCPStream):  # the pipeline always gives a TCP stream
            return None
        try:
            return transport.addresses()
        except OSError:
            return None

    def log(self, metrics: Metrics) -> None:
        metrics.tcp_connection_ended(self.closed_by)
        info = self.client.tls
        fields: dict[str, object] = {
            "connection_id": self.client.id,
            "client": self.client.address,
            "sni": info.server_name,
            "alpn": info.alpn,
            "tls_version": info.version,
            "upstream": self.upstream,
            "bytes_up": self.relay.bytes_up if self.relay else 0,
            "bytes_down": self.relay.bytes_down if self.relay else 0,
            "duration_ms": round((time.perf_counter() - self.started) * 1000, 3),
            "closed_by": self.closed_by,
            "reason": self.reason,
        }
        if info.client_auth:
            identity = info.client_identity
            fields["client_cert"] = identity.subject if identity is not None else None
        info_line(access_log, "tunnel", fields)
