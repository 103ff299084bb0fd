"""Accepting (proxy/net/server.py): a connection that went away before it was taken is
skipped, as trio's SocketListener skips it; any other accept() error is raised. Linux
seldom reports these for loopback connections, so a socket whose accept() fails stands in
for the listener."""

from __future__ import annotations

import errno
import socket
from typing import cast

import pytest
import trio

from proxy.net.server import _accept_one


class _FailingListener:
    def __init__(self, number: int) -> None:
        self.number = number

    def accept(self) -> tuple[socket.socket, object]:
        raise OSError(self.number, "injected")


@pytest.mark.parametrize("number", [errno.ECONNABORTED, errno.EPERM, errno.ECONNRESET])
def test_a_connection_gone_before_accept_is_skipped(number: int) -> None:
    listener = cast(socket.socket, _FailingListener(number))
    assert trio.run(_accept_one, listener, False) is None


def test_other_accept_errors_are_raised() -> None:
    listener = cast(socket.socket, _FailingListener(errno.EBADF))
    with pytest.raises(OSError, match="injected"):
        trio.run(_accept_one, listener, False)


def test_a_waiting_connection_is_accepted_with_trios_socket_options() -> None:
    with socket.create_server(("127.0.0.1", 0)) as listening:
        listening.setblocking(False)
        with socket.create_connection(listening.getsockname()[:2]):
            accepted = trio.run(_accept_one, listening, True)
            assert accepted is not None
            with accepted:
                assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
                assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT) == 2**14
