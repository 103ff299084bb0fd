"""TCPStream (proxy/sockets.py) over real loopback TCP connections: bytes both ways, the
per-wait timeouts, close and reset as trio's errors."""

from __future__ import annotations

import socket
import struct

import pytest
import trio
import trio.testing

from proxy.net.sockets import TCPStream


def _connected_pair() -> tuple[socket.socket, socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as server:
        client = socket.create_connection(server.getsockname())
        accepted, _ = server.accept()
    return client, accepted


async def _receive_exactly(stream: TCPStream, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = await stream.receive_some(size - len(data))
        assert chunk, "the peer closed early"
        data += chunk
    return bytes(data)


def test_large_transfers_both_ways_and_end_of_stream() -> None:
    async def main() -> None:
        left_socket, right_socket = _connected_pair()
        left, right = TCPStream(left_socket), TCPStream(right_socket)
        payload = bytes(range(256)) * 40_000  # 10 MB: many waits for buffer space
        async with trio.open_nursery() as nursery:
            nursery.start_soon(left.send_all, payload)
            assert await _receive_exactly(right, len(payload)) == payload
        await right.send_all(b"answer")
        await right.send_eof()
        assert await _receive_exactly(left, 6) == b"answer"
        assert await left.receive_some() == b""
        await left.aclose()
        await right.aclose()

    trio.run(main)


def test_a_receive_timeout_bounds_a_stall_not_a_transfer() -> None:
    async def main() -> None:
        left_socket, right_socket = _connected_pair()
        left, right = TCPStream(left_socket), TCPStream(right_socket, receive_timeout=0.3)

        async def trickle() -> None:
            # Two seconds of bytes, each gap shorter than the receive timeout.
            for _ in range(20):
                await left.send_all(b"x")
                await trio.sleep(0.1)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(trickle)
            assert await _receive_exactly(right, 20) == b"x" * 20
        assert trio.current_time() >= 1.9  # the transfer outlasted the timeout many times
        with pytest.raises(trio.TooSlowError):
            await right.receive_some()  # nothing more comes
        await left.aclose()
        await right.aclose()

    # Virtual time: the gaps are exactly 0.1 s however busy the machine is; the clock jumps
    # to the next deadline only when every task waits (loopback delivers a send at once).
    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0.05))


def test_a_send_timeout_drops_a_peer_that_stops_reading() -> None:
    async def main() -> None:
        left_socket, right_socket = _connected_pair()
        left = TCPStream(left_socket, send_timeout=0.3)
        with pytest.raises(trio.TooSlowError):
            await left.send_all(b"y" * (64 << 20))  # far beyond the socket buffers
        await left.aclose()
        right_socket.close()

    trio.run(main)


def test_closing_wakes_a_waiting_receiver_and_later_calls_say_closed() -> None:
    async def main() -> None:
        left_socket, right_socket = _connected_pair()
        left = TCPStream(left_socket)
        caught: list[BaseException] = []

        async def wait_for_bytes() -> None:
            try:
                await left.receive_some()
            except trio.ClosedResourceError as exc:
                caught.append(exc)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(wait_for_bytes)
            await trio.sleep(0.05)
            await left.aclose()
        assert len(caught) == 1
        with pytest.raises(trio.ClosedResourceError):
            await left.send_all(b"late")
        with pytest.raises(trio.ClosedResourceError):
            await left.receive_some()
        right_socket.close()

    trio.run(main)


def test_a_reset_is_a_broken_resource() -> None:
    async def main() -> None:
        left_socket, right_socket = _connected_pair()
        left = TCPStream(left_socket)
        # SO_LINGER with a zero timeout: close() sends RST instead of FIN.
        right_socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        right_socket.close()
        await trio.sleep(0.05)
        with pytest.raises(trio.BrokenResourceError):
            await left.receive_some()
        await left.aclose()

    trio.run(main)


def test_calls_that_never_wait_still_let_other_tasks_run_and_can_be_cancelled() -> None:
    async def main() -> None:
        left_socket, right_socket = _connected_pair()
        left, right = TCPStream(left_socket), TCPStream(right_socket)
        turns = 0

        async def other_connection() -> None:
            nonlocal turns
            while True:
                await trio.sleep(0)
                turns += 1

        async with trio.open_nursery() as nursery:
            nursery.start_soon(other_connection)
            await trio.sleep(0)
            before = turns
            for _ in range(32):  # a bulk transfer on sockets that are always ready
                await left.send_all(b"z" * 1000)
                assert await right.receive_some(1000)
            assert turns > before
            nursery.cancel_scope.cancel()

        completed = 0
        with trio.CancelScope() as scope:
            scope.cancel()  # e.g. the shutdown grace period ran out
            for _ in range(32):
                await left.send_all(b"z")
                completed += 1
        assert completed < 32
        await left.aclose()
        await right.aclose()

    trio.run(main)
