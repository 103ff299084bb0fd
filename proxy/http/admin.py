"""The admin endpoint's HTTP/1.1 side: one request per connection, answered by ops/admin.py.

Theory of operation. The admin listener (net/server.py) hands each connection here; h11
reads one request within a short timeout, :class:`AdminEndpoint` answers it sans-IO
(/healthz, /readyz, /metrics), and the connection closes. A malformed request gets its 4xx.
"""

from __future__ import annotations

from contextlib import suppress

import h11
import trio

from proxy.generation.holder import GenerationHolder
from proxy.http.rules import error_response, error_status_for
from proxy.ops.admin import Operations
from proxy.ops.logs import log

_ADMIN_TIMEOUT_SECONDS = 10.0
_ADMIN_RECEIVE_SIZE = 16384


async def handle_admin(
    holder: GenerationHolder, operations: Operations, stream: trio.abc.Stream
) -> None:
    """One admin request per connection (/healthz, /readyz, /metrics); never raises."""
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
                generation = holder.current
                operations.serving(generation.number, generation.chains())
                method = event.method.decode("ascii", "replace")
                status, headers, body = operations.endpoint.respond(
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
