"""Open N TLS keep-alive connections, make one request on each, and hold them open.

Used by the bench for scenario 5 (resident memory with idle connections). Prints
``open N`` on stdout once every connection has had its response, then keeps them open
until stdin closes. Stdlib only (asyncio + ssl), so it runs in any Python 3.11+.

Usage: python idle_client.py HOST PORT COUNT PATH
"""

from __future__ import annotations

import asyncio
import ssl
import sys


async def _open_one(
    host: str, port: int, path: str, context: ssl.SSLContext, gate: asyncio.Semaphore
) -> asyncio.StreamWriter:
    async with gate:
        reader, writer = await asyncio.open_connection(host, port, ssl=context)
        writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n"):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        await reader.readexactly(length)
        return writer


async def main(host: str, port: int, count: int, path: str) -> int:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # the bench measures the server, not verification
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    gate = asyncio.Semaphore(64)
    results = await asyncio.gather(
        *(_open_one(host, port, path, context, gate) for _ in range(count)),
        return_exceptions=True,
    )
    writers = [result for result in results if isinstance(result, asyncio.StreamWriter)]
    failures = [result for result in results if not isinstance(result, asyncio.StreamWriter)]
    if failures:
        print(f"failed {len(failures)}: {failures[0]!r}", file=sys.stderr, flush=True)
    print(f"open {len(writers)}", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    for writer in writers:
        writer.transport.abort()
    return 0 if not failures else 1


if __name__ == "__main__":
    host, port, count, path = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    sys.exit(asyncio.run(main(host, port, count, path)))
