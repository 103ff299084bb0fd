"""The built-in demo upstream that ``hsm-proxy dev`` serves when no --upstream is given.

A plain HTTP/1.1 server on a loopback port (the stdlib's, in a daemon thread) that answers
every request with a short text saying what arrived, including the X-Forwarded-* headers
the proxy added, and echoes a request body back. It exists so that one command shows the
whole path working; it is not a web framework. ``python -m proxy.commands.demo HOST:PORT``
serves it on its own, as the sample app of deploy/compose.yaml.
"""

from __future__ import annotations

import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class _DemoHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "hsm-proxy-demo"

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        lines = [
            "Hello from the hsm-proxy demo upstream.",
            f"{self.command} {self.path}",
            f"X-Forwarded-For: {self.headers.get('X-Forwarded-For')}",
            f"X-Forwarded-Proto: {self.headers.get('X-Forwarded-Proto')}",
            f"X-Forwarded-Host: {self.headers.get('X-Forwarded-Host')}",
        ]
        payload = ("\n".join(lines) + "\n").encode() + body
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = _answer

    def log_message(self, format: str, *args: object) -> None:
        return  # the proxy's access log already records every request


def start_demo_upstream() -> str:
    """Start the demo upstream on 127.0.0.1 and return its URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _DemoHandler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="demo-upstream", daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}"


def main(argv: list[str]) -> int:
    host, _, port = argv[0].rpartition(":") if len(argv) == 1 else ("", "", "")
    if not host or not port.isdigit():
        print("usage: python -m proxy.commands.demo HOST:PORT", file=sys.stderr)
        return 2
    server = ThreadingHTTPServer((host.strip("[]"), int(port)), _DemoHandler)
    server.daemon_threads = True
    print(f"demo upstream on http://{argv[0]}/", flush=True)
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
