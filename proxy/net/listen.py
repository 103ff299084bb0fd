"""Listening addresses: every address a listen host names, bound on one port.

Theory of operation. ``listen = "HOST:PORT"`` means every address HOST resolves to
(``getaddrinfo`` with ``AI_PASSIVE``), one listening socket each, all on the same port: with
port 0 the first socket's port, chosen by the kernel, is taken by the others too, so the
proxy is reachable at one port whatever address a client picks.

``localhost`` is the loopback, both of them (RFC 6761, 6.3): 127.0.0.1 and ::1 are added to
whatever the resolver says, because many systems' ``/etc/hosts`` name only one of them
while clients (curl, browsers) resolve ``localhost`` themselves and may try ::1 first, and
the dev certificate names both. An added loopback the host does not have (IPv6 off) is
skipped; an address the resolver gave that cannot be bound is an error.

Used by the single-process server (:func:`open_listeners`) and by the ``--workers``
supervisor (:func:`listen_addresses`, workers.py), so both listen on the same addresses.
"""

from __future__ import annotations

import errno
import socket

import trio

_LOOPBACKS = ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1"))
# An added loopback address the host does not have: skipped, not an error.
_ABSENT = {errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT}


def is_localhost(host: str) -> bool:
    return host.lower().rstrip(".") == "localhost"


def listen_addresses(host: str, port: int) -> list[tuple[int, str, bool]]:
    """(family, address, required) for each address ``host`` names, in the resolver's
    order, without repeats; ``required`` is False for a loopback added for ``localhost``.
    Raises ``socket.gaierror`` when the name does not resolve."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror:
        if not is_localhost(host):
            raise
        infos = []
    found: list[tuple[int, str, bool]] = []
    for family, _type, _proto, _name, sockaddr in infos:
        entry = (int(family), str(sockaddr[0]), True)
        if all(entry[:2] != seen[:2] for seen in found):
            found.append(entry)
    if is_localhost(host):
        for loopback_family, address in _LOOPBACKS:
            if all((loopback_family, address) != seen[:2] for seen in found):
                found.append((int(loopback_family), address, False))
    return found


async def open_listeners(host: str, port: int, backlog: int) -> list[trio.SocketListener]:
    """A listening socket on each of :func:`listen_addresses`, all on one port. Raises
    ``OSError`` (or ``socket.gaierror``) when a required address cannot be bound."""
    listeners: list[trio.SocketListener] = []
    try:
        for family, address, required in listen_addresses(host, port):
            try:
                sock = trio.socket.socket(family, socket.SOCK_STREAM)
            except OSError as exc:
                if required or exc.errno not in _ABSENT:
                    raise
                continue
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                await sock.bind((address, port))
                sock.listen(backlog)
            except OSError as exc:
                sock.close()
                if required or exc.errno not in _ABSENT:
                    raise
                continue
            port = sock.getsockname()[1]  # port 0: every address shares the first choice
            listeners.append(trio.SocketListener(sock))
    except BaseException:
        for listener in listeners:
            listener.socket.close()
        raise
    return listeners
