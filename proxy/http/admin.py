"""The admin endpoint's HTTP/1.1 side: one request per connection, answered by ops/admin.py.

Theory of operation. The admin listener (net/server.py) hands each connection here; h11
reads one request within a short timeout, :class:`AdminEndpoint` answers it sans-IO
(/healthz, /readyz, /metrics), and the connection closes. A malformed request gets its 4xx.
Under ``--workers`` the supervisor's listener (net/fleet.py) serves the same way with its
own answer (:func:`serve_admin_request`), and asks each worker's endpoint with
:func:`ask_admin`, a one-request h11 client.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from contextlib import suppress

import h11
import trio

from proxy.errors import UpstreamError
from proxy.generation.holder import GenerationHolder
from proxy.http.rules import error_response, error_status_for
from proxy.ops.admin import Operations
from proxy.ops.logs import log

_ADMIN_TIMEOUT_SECONDS = 10.0
_ADMIN_RECEIVE_SIZE = 16384


# (method, target) -> (status, headers, body)
Answer = Callable[[str, str], Awaitable[tuple[int, list[tuple[str, str]], bytes]]]


async def handle_admin(
    holder: GenerationHolder, operations: Operations, stream: trio.abc.Stream
) -> None:
    """One admin request per connection (/healthz, /readyz, /metrics); never raises."""

    async def answer(method: str, target: str) -> tuple[int, list[tuple[str, str]], bytes]:
        generation = holder.current
        operations.serving(generation.number, generation.chains())
        return operations.endpoint.respond(method, target)

    await serve_admin_request(answer, stream)


async def serve_admin_request(answer: Answer, stream: trio.abc.Stream) -> None:
    """Read one request from ``stream``, send what ``answer`` says, close; never raises."""
    connection = h11.Connection(h11.SERVER)
    try:
        with trio.move_on_after(_ADMIN_TIMEOUT_SECONDS):
            while True:
                event = connection.next_event()
                if event is h11.NEED_DATA:
                    connection.receive_data(bytes(await stream.receive_some(_ADMIN_RECEIVE_SIZE)))
                    continue
                if not isinstance(event, h11.Request):
                    return
                method = event.method.decode("ascii", "replace")
                status, headers, body = await answer(
                    method, event.target.decode("ascii", "replace")
                )
                headers += [("content-length", str(len(body))), ("connection", "close")]
                data = connection.send(h11.Response(status_code=status, headers=headers)) or b""
                if method != "HEAD":
                    data += connection.send(h11.Data(data=body)) or b""
                data += connection.send(h11.EndOfMessage()) or b""
                await stream.send_all(data)
                return
    except h11.RemoteProtocolError as exc:
        with suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            response, body = error_response(error_status_for(exc))
            await stream.send_all(
                (connection.send(response) or b"")
                + (connection.send(h11.Data(data=body)) or b"")
                + (connection.send(h11.EndOfMessage()) or b"")
            )
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        pass
    except Exception:
        log.exception("admin request failed unexpectedly")
    finally:
        with suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            await stream.aclose()


async def ask_admin(stream: trio.abc.Stream, path: str, limit: int = 1 << 20) -> tuple[int, bytes]:
    """GET ``path`` from an admin endpoint on ``stream`` (a worker's): its status and body.
    Raises :class:`UpstreamError` for a malformed answer, trio's stream errors or OSError
    when the worker is gone; the caller bounds the time."""
    try:
        return await _ask(stream, path, limit)
    except h11.ProtocolError as exc:
        raise UpstreamError(f"malformed answer from the admin endpoint: {exc}") from None


async def _ask(stream: trio.abc.Stream, path: str, limit: int) -> tuple[int, bytes]:
    connection = h11.Connection(h11.CLIENT)
    request = h11.Request(
        method="GET", target=path, headers=[("host", "worker"), ("connection", "close")]
    )
    await stream.send_all(
        (connection.send(request) or b"") + (connection.send(h11.EndOfMessage()) or b"")
    )
    status = 0
    body = b""
    while True:
        event = connection.next_event()
        if event is h11.NEED_DATA:
            data = bytes(await stream.receive_some(_ADMIN_RECEIVE_SIZE))
            connection.receive_data(data)
            continue
        if isinstance(event, h11.Response):
            status = event.status_code
        elif isinstance(event, h11.Data):
            body += bytes(event.data)
            if len(body) > limit:
                raise h11.LocalProtocolError("the admin answer is too long")
        elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
            return status, body
