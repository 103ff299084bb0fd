"""Forwarding settings: ``[http]`` limits and timeouts, ``[tcp]``, ``[upstreams.NAME]``,
``[[routes]]`` and the addresses they name.

Theory of operation. :func:`parse_forwarding` reads the four parts together, since
they refer to each other: routes name groups, a group is all ``http://`` or all
``tcp://``, and ``[tcp]`` gives the defaults a TCP group may override. Every error names
the key.
"""

from __future__ import annotations

import ipaddress
from typing import Any
from urllib.parse import urlsplit

from proxy.config.model import (
    DEFAULT_UPSTREAM,
    HTTP_ALPN,
    PROXY_PROTOCOL_MODES,
    Address,
    HTTP2Config,
    HTTPConfig,
    Route,
    SiteConfig,
    TCPConfig,
    UpstreamConfig,
    UpstreamGroup,
)
from proxy.config.reader import Table, positive, string_list
from proxy.errors import ConfigError


def parse_address(text: str, where: str) -> Address:
    """``HOST:PORT`` or ``[IPv6]:PORT``; port 0 asks the system for a free one."""
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or not rest.startswith(":"):
            raise ConfigError(f"{where}: {text!r} is not [IPV6]:PORT")
        port_text = rest[1:]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ConfigError(f"{where}: {host!r} is not an IPv6 address") from None
    else:
        host, colon, port_text = text.rpartition(":")
        if not colon or not host:
            raise ConfigError(f"{where}: {text!r} is not HOST:PORT (for example 127.0.0.1:8443)")
        if ":" in host:
            raise ConfigError(f"{where}: write an IPv6 address in brackets, as [{host}]:PORT")
    if not port_text.isascii() or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ConfigError(f"{where}: port {port_text!r} is not a number from 0 to 65535")
    return Address(host, int(port_text))


def parse_upstream(text: str, where: str) -> UpstreamConfig:
    """``http://HOST[:PORT]`` (plaintext HTTP/1.1 to the backend) or ``tcp://HOST:PORT``
    (TCP passthrough: the decrypted bytes, untouched)."""
    parts = urlsplit(text)
    if parts.scheme not in ("http", "tcp"):
        raise ConfigError(
            f"{where}: {text!r} must be an http:// URL (the proxy sends plaintext HTTP/1.1 "
            "to upstreams) or a tcp://HOST:PORT address (TCP passthrough)"
        )
    shape = "http://HOST[:PORT]" if parts.scheme == "http" else "tcp://HOST:PORT"
    if not parts.hostname:
        raise ConfigError(f"{where}: {text!r} has no host")
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username:
        raise ConfigError(f"{where}: {text!r} must be just {shape}, without a path")
    try:
        port = parts.port or (80 if parts.scheme == "http" else None)
    except ValueError:
        raise ConfigError(f"{where}: {text!r} has an invalid port") from None
    if not port:
        raise ConfigError(f"{where}: {text!r} needs a port from 1 to 65535 ({shape})")
    return UpstreamConfig(parts.hostname, port, scheme=parts.scheme)


_HTTP_COUNTS = {
    "max_request_line": (64, 1 << 20),
    "max_header_bytes": (256, 16 << 20),
    "max_headers": (1, 10000),
    "max_body_bytes": (0, 1 << 62),
    "max_connections": (1, 1 << 20),
    "pool_size": (0, 100000),
}


_HTTP_SECONDS = (
    "header_timeout",
    "body_timeout",
    "idle_timeout",
    "connect_timeout",
    "read_timeout",
    "pool_idle_timeout",
    "down_time",
    "tunnel_idle_timeout",
)


def parse_forwarding(
    root: Table, upstream: UpstreamConfig, sites: tuple[SiteConfig, ...]
) -> tuple[HTTPConfig, TCPConfig, tuple[UpstreamGroup, ...], tuple[Route, ...]]:
    defaults = HTTPConfig()
    values: dict[str, Any] = {}
    table = root.optional_table("http")
    for key, (low, high) in _HTTP_COUNTS.items():
        value = table.take(key, int, getattr(defaults, key))
        if not low <= value <= high:
            raise ConfigError(f"http.{key}: must be from {low} to {high}, got {value}")
        values[key] = value
    for key in _HTTP_SECONDS:
        values[key] = positive(table.take(key, (int, float), getattr(defaults, key)), f"http.{key}")
    grace = table.take("shutdown_grace", (int, float), defaults.shutdown_grace)
    if grace < 0:
        raise ConfigError(f"http.shutdown_grace: must be 0 or more, got {grace}")
    values["shutdown_grace"] = float(grace)
    values["forwarded"] = table.take("forwarded", bool, defaults.forwarded)
    mode = table.take("max_connections_mode", str, defaults.max_connections_mode)
    if mode not in ("queue", "refuse"):
        raise ConfigError(
            'http.max_connections_mode: must be "queue" (wait in the listen backlog) or '
            f'"refuse" (close at once), got {mode!r}'
        )
    values["max_connections_mode"] = mode
    values["alpn"] = _http_alpn(table, defaults.alpn)
    values["allow_ambiguous_paths"] = table.take(
        "allow_ambiguous_paths", bool, defaults.allow_ambiguous_paths
    )
    table.finish()
    http = HTTPConfig(**values)
    tcp = _parse_tcp(root.optional_table("tcp"))

    groups: list[UpstreamGroup] = []
    upstreams = root.optional_table("upstreams", prefix="")
    for name in upstreams.remaining():
        if name == DEFAULT_UPSTREAM:
            raise ConfigError(
                f"upstreams.{name}: the name {name!r} is the top-level upstream; choose another"
            )
        groups.append(_parse_group(upstreams.table(name), name, tcp))
    upstreams.finish()

    default = UpstreamGroup(DEFAULT_UPSTREAM, (upstream,))
    by_name = {group.name: group for group in (default, *groups)}
    known = ", ".join(sorted(by_name))
    for number, site in enumerate(sites, start=1):
        if site.upstream not in by_name:
            raise ConfigError(
                f"tls.sni[{number}].upstream: no upstream named {site.upstream!r} (known: {known})"
            )
    routes: list[Route] = []
    for index, entry in enumerate(root.take("routes", list, [])):
        where = f"routes[{index}]"
        if not isinstance(entry, dict):
            raise ConfigError(f"{where}: expected a table ([[routes]])")
        route = Table(entry, f"{where}.")
        target = route.take("upstream", str)
        if target not in by_name:
            raise ConfigError(f"{where}.upstream: no upstream named {target!r} (known: {known})")
        if by_name[target].tcp:
            raise ConfigError(
                f"{where}.upstream: {target!r} is a tcp:// upstream; routes choose among "
                "http:// upstreams (a tcp:// upstream serves whole connections: name it in "
                "[[tls.sni]] upstream, or as the top-level upstream)"
            )
        hosts = route.take("hosts", list, [])
        for host in hosts:
            if not isinstance(host, str) or not host or "/" in host or ":" in host:
                raise ConfigError(f"{where}.hosts: {host!r} is not a host name (without a port)")
        prefix = route.take("path_prefix", str, "/")
        if not prefix.startswith("/"):
            raise ConfigError(f"{where}.path_prefix: {prefix!r} must start with /")
        route.finish()
        routes.append(Route(target, tuple(host.lower() for host in hosts), prefix))
    return http, tcp, tuple(groups), tuple(routes)


def _parse_group(group: Table, name: str, tcp: TCPConfig) -> UpstreamGroup:
    """``[upstreams.NAME]``: its servers, all of one scheme, and for tcp:// servers the
    ``alpn`` and ``proxy_protocol`` overrides of ``[tcp]``."""
    servers = group.take("servers", list)
    if not servers:
        raise ConfigError(
            f"upstreams.{name}.servers: needs at least one http://HOST:PORT or tcp://HOST:PORT"
        )
    parsed: list[UpstreamConfig] = []
    for index, server in enumerate(servers):
        where = f"upstreams.{name}.servers[{index}]"
        if not isinstance(server, str):
            raise ConfigError(f"{where}: expected a string, got {type(server).__name__}")
        parsed.append(parse_upstream(server, where))
        if parsed[-1].scheme != parsed[0].scheme:
            raise ConfigError(
                f"{where}: {server!r} mixes {parsed[-1].scheme}:// with the "
                f"{parsed[0].scheme}:// servers before it; a group is all http:// or all tcp://"
            )
    is_tcp = parsed[0].scheme == "tcp"
    for key in ("alpn", "proxy_protocol"):
        if group.has(key) and not is_tcp:
            raise ConfigError(
                f"upstreams.{name}.{key}: only tcp:// upstreams take {key} (http:// upstreams "
                "are served as HTTP/1.1)"
            )
    alpn = _alpn_list(group, "alpn", tcp.alpn)
    proxy_protocol = _proxy_protocol(group, tcp.proxy_protocol)
    group.finish()
    if not is_tcp:
        return UpstreamGroup(name, tuple(parsed))
    return UpstreamGroup(name, tuple(parsed), alpn, proxy_protocol)


def _parse_tcp(table: Table) -> TCPConfig:
    defaults = TCPConfig()
    connect_timeout = positive(
        table.take("connect_timeout", (int, float), defaults.connect_timeout),
        "tcp.connect_timeout",
    )
    idle_timeout = positive(
        table.take("idle_timeout", (int, float), defaults.idle_timeout), "tcp.idle_timeout"
    )
    max_lifetime = table.take("max_lifetime", (int, float), defaults.max_lifetime)
    if max_lifetime < 0:
        raise ConfigError(f"tcp.max_lifetime: must be 0 (no limit) or more, got {max_lifetime}")
    alpn = _alpn_list(table, "alpn", defaults.alpn)
    proxy_protocol = _proxy_protocol(table, defaults.proxy_protocol)
    table.finish()
    return TCPConfig(connect_timeout, idle_timeout, float(max_lifetime), alpn, proxy_protocol)


def _alpn_list(table: Table, key: str, default: tuple[str, ...]) -> tuple[str, ...]:
    """ALPN protocol IDs (RFC 7301): 1 to 255 printable ASCII characters each, no spaces,
    no repeats."""
    if not table.has(key):
        table._known.append(key)
        return default
    names = string_list(table, key)
    for name in names:
        if not name.isascii() or not name.isprintable() or " " in name or len(name) > 255:
            raise ConfigError(
                f"{table.key_name(key)}: {name!r} is not an ALPN protocol ID (1 to 255 printable "
                'ASCII characters without spaces, such as "h2" or "http/1.1")'
            )
    if len(set(names)) != len(names):
        raise ConfigError(f"{table.key_name(key)}: a protocol is listed twice in {names}")
    return tuple(names)


def _http_alpn(table: Table, default: tuple[str, ...]) -> tuple[str, ...]:
    """``[http] alpn``: what ALPN offers HTTP clients, in order of preference; "h2" and
    "http/1.1" only (the protocols the proxy serves HTTP in), at least one."""
    alpn = _alpn_list(table, "alpn", default)
    unknown = [name for name in alpn if name not in HTTP_ALPN]
    if unknown or not alpn:
        raise ConfigError(
            f'{table.key_name("alpn")}: lists the HTTP protocols to offer, from "h2" and '
            f'"http/1.1" (for example ["http/1.1"] turns HTTP/2 off), got {list(alpn)}'
        )
    return alpn


_HTTP2_COUNTS = {
    "max_concurrent_streams": (1, 1 << 16),
    "initial_window_size": (1024, (1 << 31) - 1),
    "connection_window_size": (65535, (1 << 31) - 1),
    "max_resets": (1, 1 << 20),
    "max_control_frames": (1, 1 << 20),
}


def parse_http2(table: Table) -> HTTP2Config:
    """``[http2]``: per-connection stream limits, flow-control windows and flood caps."""
    defaults = HTTP2Config()
    values: dict[str, Any] = {}
    for key, (low, high) in _HTTP2_COUNTS.items():
        value = table.take(key, int, getattr(defaults, key))
        if not low <= value <= high:
            raise ConfigError(f"http2.{key}: must be from {low} to {high}, got {value}")
        values[key] = value
    values["flood_window"] = float(
        positive(
            table.take("flood_window", (int, float), defaults.flood_window), "http2.flood_window"
        )
    )
    table.finish()
    return HTTP2Config(**values)


def _proxy_protocol(table: Table, default: str) -> str:
    mode: str = table.take("proxy_protocol", str, default)
    if mode not in PROXY_PROTOCOL_MODES:
        raise ConfigError(
            f'{table.key_name("proxy_protocol")}: must be "off" or "v2" (a PROXY protocol v2 '
            f"header before the client's bytes), got {mode!r}"
        )
    return mode
