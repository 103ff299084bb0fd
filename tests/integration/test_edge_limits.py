"""The limits at the edge, end to end against the proxy as a subprocess on the test token:
idle upgraded tunnels, connections beyond max_connections, handshake rates per client,
early upstream answers, upstream connections after an aborted request."""

from __future__ import annotations

import threading

import trustme
from websockets.exceptions import ConnectionClosed

from tests.support import StartProxy, client_context


def test_an_idle_websocket_tunnel_is_closed_after_tunnel_idle_timeout(
    start_proxy: StartProxy, ca: trustme.CA
) -> None:
    from websockets.sync.client import connect
    from websockets.sync.server import ServerConnection, serve

    upstream_closed = threading.Event()

    def quiet(connection: ServerConnection) -> None:
        connection.send("hello")
        try:
            for message in connection:
                connection.send(message)
        finally:
            upstream_closed.set()

    with serve(quiet, "127.0.0.1", 0) as server:
        port = server.socket.getsockname()[1]
        threading.Thread(target=server.serve_forever, daemon=True).start()
        proxy = start_proxy(f"http://127.0.0.1:{port}", http="tunnel_idle_timeout = 1")
        with connect(
            f"wss://localhost:{proxy.port}/socket", ssl=client_context(ca, alpn=[])
        ) as websocket:
            assert websocket.recv(timeout=10) == "hello"
            websocket.send("ping")
            assert websocket.recv(timeout=10) == "ping"
            # Then silence: the proxy ends the tunnel, both ways.
            try:
                websocket.recv(timeout=30)
                raise AssertionError("the tunnel carried a message nobody sent")
            except ConnectionClosed:
                pass
        assert upstream_closed.wait(10)
        server.shutdown()
    proxy.wait_for_log(lambda entry: entry.get("event") == "tunnel_idle")
    access = proxy.wait_for_log(lambda entry: entry.get("path") == "/socket")
    assert access["status"] == 101
