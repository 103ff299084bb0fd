"""TLS: server contexts on the system OpenSSL, and a trio stream over pyOpenSSL memory BIOs.

Theory of operation. :func:`build_server_context` makes one ``SSL.Context`` per served
chain: TLS 1.2 (ECDHE with AEAD ciphers only) and TLS 1.3, no compression, no
renegotiation, server cipher preference, ALPN ``http/1.1``, and a private key that is the
token key bridged by keybridge.py. Key-exchange groups are left at OpenSSL's defaults, so
that OpenSSL 3.5 keeps offering the post-quantum hybrid X25519MLKEM768.

:class:`TLSStream` wraps ``SSL.Connection(context, None)``: OpenSSL reads from and writes
to memory BIOs, and this class moves bytes between those BIOs and the transport stream, in
the manner of trio's own ``_ssl.py``:

* every pyOpenSSL call is synchronous; "want read" is the only reason to wait, and it
  turns into exactly one ``receive_some`` on the transport (``_feed_incoming``);
* whatever OpenSSL produced is sent by ``_flush`` under one lock, in the order it was
  produced, so a task sending data and a task receiving (which may answer a key update)
  never interleave records;
* a task that finds another already receiving waits for it, then retries its own call
  instead of reading again (the ``_incoming_count`` check), as trio does.

Handshake steps run in a worker thread (``trio.to_thread.run_sync``) bounded by a
``CapacityLimiter`` sized to the token's session pool: a step may call back into the token
to sign (DESIGN.md, decision 3), and a slow token must not freeze the event loop.

Errors: a failed handshake raises :class:`TLSError` with OpenSSL's reason or the token's
(from keybridge). After the handshake, a broken peer raises ``trio.BrokenResourceError``
like any trio stream, and an end of stream, with or without close_notify, reads as ``b""``:
HTTP framing (h11) detects truncated messages on its own.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from typing import Any

import trio
from OpenSSL import SSL
from OpenSSL._util import ffi as _pyopenssl_ffi

from proxy.certificates import Chain
from proxy.errors import TLSError
from proxy.keybridge import KeySigner, install_certificate_and_key, pop_signing_error

# TLS 1.2 suites: ECDHE key exchange and AEAD encryption only (TLS 1.3 suites are all AEAD).
TLS12_CIPHERS = b":".join(
    [
        b"ECDHE-ECDSA-AES128-GCM-SHA256",
        b"ECDHE-RSA-AES128-GCM-SHA256",
        b"ECDHE-ECDSA-AES256-GCM-SHA384",
        b"ECDHE-RSA-AES256-GCM-SHA384",
        b"ECDHE-ECDSA-CHACHA20-POLY1305",
        b"ECDHE-RSA-CHACHA20-POLY1305",
    ]
)
ALPN_HTTP11 = b"http/1.1"
_RECEIVE_SIZE = 65536
_SEND_CHUNK = 16384 * 4


def _choose_alpn(_connection: SSL.Connection, offered: list[bytes]) -> Any:
    return ALPN_HTTP11 if ALPN_HTTP11 in offered else SSL.NO_OVERLAPPING_PROTOCOLS


def _server_name_seen(connection: SSL.Connection) -> None:
    stream = connection.get_app_data()
    name = connection.get_servername()
    if isinstance(stream, TLSStream) and name:
        stream.on_server_name(name.decode("idna"))


def build_server_context(chain: Chain, key: KeySigner) -> SSL.Context:
    """A server context that serves ``chain`` with the token key behind ``key``."""
    context = SSL.Context(SSL.TLS_SERVER_METHOD)
    context.set_min_proto_version(SSL.TLS1_2_VERSION)
    context.set_options(
        SSL.OP_NO_COMPRESSION
        | SSL.OP_NO_RENEGOTIATION
        | SSL.OP_CIPHER_SERVER_PREFERENCE
        | SSL.OP_IGNORE_UNEXPECTED_EOF
    )
    context.set_cipher_list(TLS12_CIPHERS)
    context.set_alpn_select_callback(_choose_alpn)
    context.set_tlsext_servername_callback(_server_name_seen)
    context.set_session_id(b"hsm-proxy")
    pointer = int(_pyopenssl_ffi.cast("uintptr_t", context._context))
    install_certificate_and_key(pointer, chain.der(), key)
    return context


def _describe_ssl_error(error: SSL.Error) -> str:
    reasons = []
    for entry in error.args[0] if error.args and isinstance(error.args[0], list) else []:
        if isinstance(entry, tuple) and len(entry) == 3:
            reasons.append(str(entry[2]))
    return ", ".join(reasons) or str(error) or type(error).__name__


@dataclass(frozen=True)
class TLSInfo:
    """What the handshake settled, for routing and logs."""

    version: str
    cipher: str
    alpn: str | None
    server_name: str | None


class TLSStream(trio.abc.Stream):
    """A server-side TLS stream over any trio stream, driven through memory BIOs."""

    def __init__(
        self,
        transport: trio.abc.Stream,
        context: SSL.Context,
        sign_limiter: trio.CapacityLimiter,
        on_server_name: Callable[[str], None] = lambda _name: None,
    ) -> None:
        self.transport = transport
        # Called during the handshake (in its worker thread) with the client's SNI name.
        self.on_server_name = on_server_name
        self._connection = SSL.Connection(context, None)
        self._connection.set_app_data(self)
        self._connection.set_accept_state()
        self._sign_limiter = sign_limiter
        self._send_lock = trio.Lock()
        self._receive_lock = trio.Lock()
        self._incoming_count = 0
        self._handshake_done = False
        self.info: TLSInfo | None = None

    # -- moving bytes between the BIOs and the transport --------------------------------

    def _take_outgoing(self) -> bytes:
        chunks = []
        while True:
            try:
                chunk = self._connection.bio_read(_RECEIVE_SIZE)
            except SSL.WantReadError:
                break
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)

    async def _flush(self) -> None:
        async with self._send_lock:
            while data := self._take_outgoing():
                await self.transport.send_all(data)

    async def _feed_incoming(self, seen: int) -> bool:
        """Give OpenSSL more bytes from the peer; False at the end of the stream."""
        async with self._receive_lock:
            if self._incoming_count != seen:
                return True  # another task fed data while we waited: just retry
            data = await self.transport.receive_some(_RECEIVE_SIZE)
            self._incoming_count += 1
            if not data:
                self._connection.bio_shutdown()
                return False
            self._connection.bio_write(data)  # type: ignore[arg-type] # any buffer works
            return True

    # -- handshake -----------------------------------------------------------------------

    def _handshake_step(self) -> str | None:
        """One ``do_handshake`` call (in a worker thread): None when done, "want-read",
        or the reason it failed."""
        try:
            self._connection.do_handshake()
        except SSL.WantReadError:
            return "want-read"
        except SSL.Error as error:
            return pop_signing_error() or _describe_ssl_error(error)
        return None

    async def do_handshake(self) -> TLSInfo:
        """Complete the server handshake; the caller bounds it with a timeout."""
        if self.info is not None:
            return self.info
        while True:
            seen = self._incoming_count
            outcome = await trio.to_thread.run_sync(
                self._handshake_step, limiter=self._sign_limiter
            )
            try:
                await self._flush()  # the server flight, or an alert explaining a failure
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise TLSError("the client went away during the handshake") from exc
            if outcome is None:
                break
            if outcome != "want-read":
                raise TLSError(f"TLS handshake failed: {outcome}")
            try:
                more = await self._feed_incoming(seen)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise TLSError("the client went away during the handshake") from exc
            if not more:
                raise TLSError("the client closed the connection during the handshake")
        self._handshake_done = True
        alpn = self._connection.get_alpn_proto_negotiated()
        server_name = self._connection.get_servername()
        self.info = TLSInfo(
            version=self._connection.get_protocol_version_name(),
            cipher=self._connection.get_cipher_name() or "",
            alpn=alpn.decode("ascii") if alpn else None,
            server_name=server_name.decode("idna") if server_name else None,
        )
        return self.info

    # -- trio.abc.Stream -----------------------------------------------------------------

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if not self._handshake_done:
            await self.do_handshake()
        while True:
            seen = self._incoming_count
            try:
                data: bytes = self._connection.recv(max_bytes or _RECEIVE_SIZE)
            except SSL.WantReadError:
                data = b""
                wants_more = True
            except SSL.ZeroReturnError:
                await self._flush()
                return b""
            except SSL.Error as error:
                raise trio.BrokenResourceError(f"TLS error: {_describe_ssl_error(error)}") from None
            else:
                wants_more = False
            await self._flush()
            if not wants_more:
                return data
            if not await self._feed_incoming(seen):
                # End of stream: with OP_IGNORE_UNEXPECTED_EOF, OpenSSL reads it as a clean
                # close, and so do we (h11 notices a truncated message by its framing).
                return b""

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if not self._handshake_done:
            await self.do_handshake()
        view = memoryview(data)
        for start in range(0, len(view), _SEND_CHUNK):
            try:
                self._connection.sendall(view[start : start + _SEND_CHUNK])  # type: ignore[arg-type]
            except SSL.Error as error:
                raise trio.BrokenResourceError(f"TLS error: {_describe_ssl_error(error)}") from None
            await self._flush()

    async def wait_send_all_might_not_block(self) -> None:
        await self.transport.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        """Send close_notify when possible, then close the transport."""
        try:
            if self._handshake_done:
                with suppress(SSL.Error):
                    self._connection.shutdown()
                with trio.move_on_after(1):
                    await self._flush()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await self.transport.aclose()
