"""The HTTP edge held to the RFCs: raw bytes over TLS to the proxy (a subprocess on the test
token), a strict upstream behind it that parses exactly what arrives and flags anything
beyond whole requests (tests/support/strict.py). README, "Hostile input", lists the rules.

Timeouts in the proxy's config are set far beyond the clients' socket timeouts, so a
request the proxy does not answer at once fails the test instead of ending in a 408."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trustme

from tests.support import ProxyProcess, StartProxy
from tests.support.http import exchange_raw, read_all, status_of, tls_connect, write_ca
from tests.support.strict import StrictUpstream

PATIENT = "header_timeout = 300\nbody_timeout = 300\nidle_timeout = 300"


@pytest.fixture
def strict() -> Iterator[Callable[..., StrictUpstream]]:
    servers: list[StrictUpstream] = []

    def make(*args: object) -> StrictUpstream:
        server = StrictUpstream(*args)  # type: ignore[arg-type]
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()


def refused(port: int, ca: trustme.CA, payload: bytes) -> int:
    """The status of the one answer to ``payload``, after which the proxy closed."""
    data = exchange_raw(port, ca, payload)
    assert data.count(b"HTTP/1.1 ") == 1, data[:200]
    assert b"connection: close" in data.lower()
    return status_of(data)


# --- request line and framing ---------------------------------------------------------------


def test_an_http09_request_line_gets_400_at_once(
    start_proxy: StartProxy, strict: Callable[..., StrictUpstream], ca: trustme.CA
) -> None:
    backend = strict()
    proxy = start_proxy(backend.url, http=PATIENT)
    assert refused(proxy.port, ca, b"GET /x\r\n") == 400
    assert refused(proxy.port, ca, b"GET\r\n") == 400
    assert backend.connections == 0


def test_transfer_encoding_in_http10_gets_400_and_nothing_is_forwarded(
    start_proxy: StartProxy, strict: Callable[..., StrictUpstream], ca: trustme.CA
) -> None:
    backend = strict()
    proxy = start_proxy(backend.url, http=PATIENT)
    payload = (
        b"POST /x HTTP/1.0\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n0\r\n\r\n"
    )
    assert refused(proxy.port, ca, payload) == 400
    assert backend.connections == 0


@pytest.mark.parametrize(
    ("size_line", "status"),
    [
        (b"10000000000000005", 400),  # 17 hex digits: beyond 64 bits
        (b"00000000000000001", 400),  # 17 digits all the same
        (b"401", 413),  # more than max_body_bytes
        (b"5\n", 400),  # a bare LF: h11 would wait for a CRLF
    ],
)
def test_an_absurd_chunk_size_is_refused_at_once_and_nothing_is_forwarded(
    start_proxy: StartProxy,
    strict: Callable[..., StrictUpstream],
    ca: trustme.CA,
    size_line: bytes,
    status: int,
) -> None:
    backend = strict()
    proxy = start_proxy(backend.url, http=PATIENT + "\nmax_body_bytes = 1024")
    head = b"POST /upload HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n"
    ending = b"" if size_line.endswith(b"\n") else b"\r\n"
    assert refused(proxy.port, ca, head + size_line + ending + b"abc") == status
    assert backend.connections == 0


def test_an_absurd_chunk_after_good_ones_closes_the_upstream_connection_unreused(
    start_proxy: StartProxy, strict: Callable[..., StrictUpstream], ca: trustme.CA
) -> None:
    """The head and a first chunk went upstream before the absurd size arrived: that
    upstream connection carries part of an aborted request, so it is closed, never pooled."""
    backend = strict()
    proxy = start_proxy(backend.url, http=PATIENT)
    with tls_connect(proxy.port, ca) as tls:
        tls.sendall(
            b"POST /upload HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"3\r\nabc\r\n"
        )
        wait_for(lambda: backend.connections == 1)
        tls.sendall(b"10000000000000005\r\nxyz")
        data = read_all(tls)
    assert status_of(data) == 400
    backend.wait_ended(1)
    assert backend.arrived == []
    assert backend.leftovers
    assert backend.leftovers[0][1].startswith(b"POST /upload HTTP/1.1")
    after = exchange_raw(
        proxy.port, ca, b"GET /next HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    assert status_of(after) == 200
    assert backend.connections == 2
    assert [request.target for request in backend.arrived] == [b"/next"]


# --- request targets ------------------------------------------------------------------------


def test_an_absolute_form_target_replaces_host_routes_by_it_and_goes_out_in_origin_form(
    start_proxy: StartProxy, strict: Callable[..., StrictUpstream], ca: trustme.CA
) -> None:
    default, other = strict(), strict()
    proxy = start_proxy(
        default.url,
        http=PATIENT,
        extra=(
            f'\n[upstreams.other]\nservers = ["{other.url}"]\n'
            '\n[[routes]]\nhosts = ["other.example"]\nupstream = "other"\n'
        ),
    )
    data = exchange_raw(
        proxy.port,
        ca,
        b"GET http://other.example/x?q=1 HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    )
    assert status_of(data) == 200
    assert default.arrived == []
    (seen,) = other.arrived
    assert seen.target == b"/x?q=1"
    assert seen.header(b"host") == b"other.example"
    assert seen.header(b"x-forwarded-host") == b"other.example"
    assert refused(proxy.port, ca, b"GET ftp://other.example/x HTTP/1.1\r\nHost: a\r\n\r\n") == 400
    assert refused(proxy.port, ca, b"GET http://u:p@a/x HTTP/1.1\r\nHost: a\r\n\r\n") == 400


def _routed(
    start_proxy: StartProxy, strict: Callable[..., StrictUpstream]
) -> tuple[ProxyProcess, StrictUpstream, StrictUpstream]:
    """A proxy routing ``/public`` to one strict upstream and the rest to another."""
    default, public = strict(), strict()
    proxy = start_proxy(
        default.url,
        http=PATIENT,
        extra=(
            f'\n[upstreams.public]\nservers = ["{public.url}"]\n'
            '\n[[routes]]\npath_prefix = "/public"\nupstream = "public"\n'
        ),
    )
    return proxy, default, public


def test_routes_match_the_normalised_path_which_is_what_the_upstream_receives(
    start_proxy: StartProxy, strict: Callable[..., StrictUpstream], ca: trustme.CA
) -> None:
    proxy, default, public = _routed(start_proxy, strict)

    def get(target: bytes) -> bytes:
        return b"GET " + target + b" HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"

    assert status_of(exchange_raw(proxy.port, ca, get(b"/public/../admin"))) == 200
    assert status_of(exchange_raw(proxy.port, ca, get(b"//public//%7Euser/./a?x=/../y"))) == 200
    assert [request.target for request in default.arrived] == [b"/admin"]
    assert [request.target for request in public.arrived] == [b"/public/~user/a?x=/../y"]
    for ambiguous in (b"/public%2F..%2Fadmin", b"/public/%2E%2E/admin", b"/a%zz"):
        assert refused(proxy.port, ca, get(ambiguous)) == 400, ambiguous
    assert len(default.arrived) + len(public.arrived) == 2


def test_allow_ambiguous_paths_forwards_them_in_one_normalised_form(
    start_proxy: StartProxy, strict: Callable[..., StrictUpstream], ca: trustme.CA
) -> None:
    backend = strict()
    proxy = start_proxy(backend.url, http=PATIENT + "\nallow_ambiguous_paths = true")
    for target in (b"/a%2f..%2fb", b"/public/%2E%2E/admin"):
        payload = b"GET " + target + b" HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
        assert status_of(exchange_raw(proxy.port, ca, payload)) == 200
    assert [request.target for request in backend.arrived] == [b"/a%2F..%2Fb", b"/admin"]


@pytest.mark.skipif(shutil.which("curl") is None, reason="setup.sh --test installs curl")
def test_http2_routes_and_forwards_the_same_normalised_path(
    start_proxy: StartProxy, strict: Callable[..., StrictUpstream], ca: trustme.CA, tmp_path: Path
) -> None:
    proxy, default, public = _routed(start_proxy, strict)

    def curl(path: str) -> str:
        result = subprocess.run(
            [
                "curl",
                "-sS",
                "--http2",
                "--path-as-is",
                "--cacert",
                str(write_ca(ca, tmp_path)),
                "-o",
                "/dev/null",
                "-w",
                "%{http_version} %{http_code}",
                f"{proxy.url}{path}",
            ],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        return result.stdout

    assert curl("/public/../admin") == "2 200"
    assert curl("/public%2F..%2Fadmin") == "2 400"
    assert [request.target for request in default.arrived] == [b"/admin"]
    assert public.arrived == []


def wait_for(predicate: Callable[[], bool]) -> None:
    from tests.support.http import wait_until

    wait_until(predicate)


@pytest.mark.parametrize("ending", ["client leaves", "body stalls"])
def test_an_upstream_connection_that_carried_part_of_an_aborted_request_is_not_reused(
    start_proxy: StartProxy, strict: Callable[..., StrictUpstream], ca: trustme.CA, ending: str
) -> None:
    backend = strict()
    timeouts = PATIENT if ending == "client leaves" else "body_timeout = 1"
    proxy = start_proxy(backend.url, http=timeouts)
    tls = tls_connect(proxy.port, ca)
    tls.sendall(b"POST /upload HTTP/1.1\r\nHost: localhost\r\nContent-Length: 100\r\n\r\nabc")
    wait_for(lambda: backend.connections == 1)
    if ending == "client leaves":
        tls.close()
    else:
        assert status_of(read_all(tls)) == 408
        tls.close()
    backend.wait_ended(1)  # closed by the proxy, with the head and 3 bytes on it
    assert backend.arrived == []
    assert backend.leftovers[0][1].endswith(b"\r\n\r\nabc")
    after = exchange_raw(
        proxy.port, ca, b"GET /next HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    assert status_of(after) == 200
    assert backend.connections == 2
    assert [request.target for request in backend.arrived] == [b"/next"]
