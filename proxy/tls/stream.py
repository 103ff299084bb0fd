"""The TLS stream: a trio stream over a pyOpenSSL connection and its memory BIOs.

Theory of operation. :class:`TLSStream` wraps ``SSL.Connection(context, None)``: OpenSSL
reads from and writes to memory BIOs, and this class moves bytes between those BIOs and the
transport stream, in the manner of trio's own ``_ssl.py``:

* every pyOpenSSL call is synchronous; "want read" is the only reason to wait, and it
  turns into exactly one ``receive_some`` on the transport (``_feed_incoming``);
* whatever OpenSSL produced is sent by ``_flush`` under one lock, in the order it was
  produced, so a task sending data and a task receiving (which may answer a key update)
  never interleave records;
* a task that finds another already receiving waits for it, then retries its own call
  instead of reading again (the ``_incoming_count`` check), as trio does.

Handshake steps that may sign run in a worker thread (``trio.to_thread.run_sync``) bounded
by a ``CapacityLimiter`` sized to the token's session pool: a step may call back into the
token to sign (ARCHITECTURE.md, decision 3), and a slow token must not freeze the event
loop. While the token is measured fast (pace.py: its signatures on the event loop short,
none failed) such a step runs on the event loop instead, under the same limiter, and saves
the thread round trip, which costs more CPU than a fast token's signature. Once the token has
signed for a handshake (the key backend's ``pop_signed``, keys.py), or our Finished message
is out, nothing in the handshake can sign any more, and the remaining steps (the client's
flight, session tickets) run on the event loop. When ``max_waiting`` handshakes already
wait for the limiter, a new one is refused at once (a bounded queue instead of a pile-up
until the handshake timeout).

The pumping avoids work on the per-request path: the output BIO is asked how much it holds
(``BIO_ctrl_pending``, through binding.py on either pyOpenSSL) instead of being read until
OpenSSL says "want read", a receive with nothing buffered goes straight to the transport
instead of first letting ``recv`` fail, and a free lock is taken without a trip through the
scheduler (the transport call that follows is the checkpoint). A large ``send_all``
encrypts 64 KiB at a time and sends the ciphertext in batches of up to 256 KiB, holding the
send lock throughout so no other record can slip between its records.

The stream is the connection's app data, a :class:`~proxy.tls.verify.HandshakeObserver`:
the SNI callback (context.py) tells it the server name, and the client-certificate verify
callback (verify.py) why it refused a client.

Errors: a failed handshake raises :class:`TLSError` with OpenSSL's reason or the token's
(from the key backend). After the handshake, a broken peer raises
``trio.BrokenResourceError`` like any trio stream, and an end of stream, with or without
close_notify, reads as ``b""``: HTTP framing (h11) detects truncated messages on its own.
:meth:`TLSStream.close` ends a connection as a :class:`CloseMode` says.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any

import trio
from OpenSSL import SSL

from proxy.errors import TLSError
from proxy.tls.binding import (
    SSL_CTRL_GET_NEGOTIATED_GROUP,
    bio_pending,
    ffi,
    libssl,
    pending_handles,
    ssl_of,
    ssl_pending,
)
from proxy.tls.clientauth import ClientIdentity
from proxy.tls.keys import pop_signed, pop_signing_error
from proxy.tls.pace import PACE
from proxy.tls.verify import HandshakeObserver, admitted_client, apply_client_auth

_RECEIVE_SIZE = 65536
# Plaintext goes into OpenSSL at most 64 KiB at a time, so the output memory BIO (which keeps
# its largest size for the life of the connection) stays small; the ciphertext of up to
# _SEND_BATCH bytes then goes to the transport in one call: fewer sends and scheduler trips
# for large bodies.
_SEND_CHUNK = 65536
_SEND_BATCH = 262144


async def _acquire(lock: trio.Lock) -> None:
    """Take a free lock without a trip through the scheduler (``Lock.acquire`` makes one even
    when the lock is free); the transport call that follows is the checkpoint."""
    try:
        lock.acquire_nowait()
    except trio.WouldBlock:
        await lock.acquire()


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
    resumed: bool = False  # an abbreviated handshake: no token signature
    # Key-exchange group ("X25519", "X25519MLKEM768", ...), when OpenSSL tells.
    group: str | None = None
    # Whether the context asked for a client certificate, and the admitted client's identity.
    client_auth: bool = False
    client_identity: ClientIdentity | None = None
    # The context that served the handshake (the default one, or a server name's): what
    # the connection pipeline maps back to a site and its protocol handler.
    context: SSL.Context | None = field(default=None, compare=False, repr=False)


def _negotiated_group(ssl: Any) -> str | None:
    """The key-exchange group of the finished handshake of ``ssl`` (of binding.ffi)."""
    group_id = libssl.SSL_ctrl(ssl, SSL_CTRL_GET_NEGOTIATED_GROUP, 0, ffi.NULL)
    if group_id <= 0:
        return None
    name = libssl.SSL_group_to_name(ssl, group_id)
    return ffi.string(name).decode("ascii") if name != ffi.NULL else None


class CloseMode(enum.Enum):
    """How a connection ends; a protocol handler returns one and :meth:`TLSStream.close`
    carries it out."""

    # close_notify, then close the socket: the usual end of a connection.
    CLOSE_NOTIFY = "close_notify"
    # close_notify, a TCP half-close, then a short drain of what the client still sends and
    # only then the close, so that a client that is still sending reads our last answer (an
    # error response, an alert) instead of a reset.
    LINGER = "linger"
    # No close_notify: a response broke off, and even a response framed by the connection's
    # end must read as truncated, never as complete.
    ABORT = "abort"


LINGER_SECONDS = 2.0
# How long closing may take in all: close_notify out, and the linger.
CLOSE_SECONDS = LINGER_SECONDS + 2.0


class TLSStream(trio.abc.HalfCloseableStream, HandshakeObserver):
    """A server-side TLS stream over any trio stream, driven through memory BIOs."""

    def __init__(
        self,
        transport: trio.abc.Stream,
        context: SSL.Context,
        sign_limiter: trio.CapacityLimiter,
        on_server_name: Callable[[str], None] = lambda _name: None,
        max_waiting: int | None = None,
    ) -> None:
        self.transport = transport
        # Called during the handshake (in its worker thread) with the client's SNI name.
        self.on_server_name = on_server_name
        self._connection = SSL.Connection(context, None)
        self._connection.set_app_data(self)
        self._connection.set_accept_state()
        # The handles the pending-data queries take (binding.py), for the BIO and SSL
        # queries pyOpenSSL has no API for.
        self._ssl, self._into_ssl, self._from_ssl = pending_handles(self._connection)
        self._sign_limiter = sign_limiter
        # How many handshakes may wait for a token session; beyond it, refuse at once.
        self._max_waiting = max_waiting
        self._send_lock = trio.Lock()
        self._receive_lock = trio.Lock()
        self._incoming_count = 0
        self._handshake_done = False
        self._eof_sent = False
        self._signed = False  # the token has signed for this handshake
        self.info: TLSInfo | None = None
        # Why the client certificate was refused (set by the verify callback).
        self.client_rejection: str | None = None

    def switch_context(self, context: SSL.Context) -> None:
        """Serve this connection from ``context`` instead: call it from ``on_server_name``
        (per server name certificates and mutual TLS). The client-auth settings of
        ``context`` come along, which OpenSSL does not do by itself."""
        self._connection.set_context(context)
        apply_client_auth(self._connection, context)

    # -- moving bytes between the BIOs and the transport --------------------------------

    def _take_outgoing(self) -> bytes:
        # Ask the memory BIO how much it holds and read exactly that: no "want read"
        # exception for the usual case of an empty BIO.
        pending = bio_pending(self._from_ssl)
        if not pending:
            return b""
        return self._connection.bio_read(pending)  # type: ignore[no-any-return]

    def _must_feed(self) -> bool:
        """True when OpenSSL cannot make progress without more bytes from the peer: its
        input BIO is empty and it holds no decrypted data. (Without read-ahead OpenSSL takes
        one record at a time from the BIO, so it never sits on a whole undecrypted record.)"""
        return not bio_pending(self._into_ssl) and not ssl_pending(self._ssl)

    async def _flush(self) -> None:
        if not bio_pending(self._from_ssl):
            return  # nothing to send: no lock, no checkpoint
        await _acquire(self._send_lock)
        try:
            while data := self._take_outgoing():
                await self.transport.send_all(data)
        finally:
            self._send_lock.release()

    async def _feed_incoming(self, seen: int) -> bool:
        """Give OpenSSL more bytes from the peer; False at the end of the stream."""
        await _acquire(self._receive_lock)
        try:
            if self._incoming_count != seen:
                return True  # another task fed data while we waited: just retry
            data = await self.transport.receive_some(_RECEIVE_SIZE)
            self._incoming_count += 1
            if not data:
                self._connection.bio_shutdown()
                return False
            self._connection.bio_write(data)  # type: ignore[arg-type] # any buffer works
            return True
        finally:
            self._receive_lock.release()

    # -- handshake -----------------------------------------------------------------------

    def _handshake_step(self) -> str | None:
        """One ``do_handshake`` call (in a worker thread while it may sign): None when
        done, "want-read", or the reason it failed."""
        try:
            self._connection.do_handshake()
        except SSL.WantReadError:
            return "want-read"
        except SSL.WantWriteError:  # OpenSSL on the socket (socketstream.py): it is full
            return "want-write"
        except SSL.SysCallError as error:  # OpenSSL on the socket: the client is gone
            return "eof" if not error.args or error.args[0] in (-1, 0) else "gone"
        except SSL.Error as error:
            return pop_signing_error() or self.client_rejection or _describe_ssl_error(error)
        finally:
            self._signed = pop_signed() or self._signed
        return None

    async def _step(self) -> str | None:
        """One handshake step, where it belongs: in a worker thread while it may sign and
        the token is not measured fast (pace.py), on the event loop otherwise."""
        if not self._signed and self._connection.get_finished() is None:
            if PACE.inline_allowed():
                # The token is fast: sign here, under the same limiter (it sizes the
                # token's session pool), if a session is free at once.
                try:
                    self._sign_limiter.acquire_on_behalf_of_nowait(self)
                except trio.WouldBlock:
                    pass
                else:
                    PACE.inline_step(running=True)
                    try:
                        return self._handshake_step()
                    finally:
                        PACE.inline_step(running=False)
                        self._sign_limiter.release_on_behalf_of(self)
            return await trio.to_thread.run_sync(self._handshake_step, limiter=self._sign_limiter)
        # The token has signed for this handshake, or our Finished is out (TLS 1.3, or a
        # resumed 1.2 session): nothing left can sign, so no thread hop.
        return self._handshake_step()

    async def do_handshake(self) -> TLSInfo:
        """Complete the server handshake; the caller bounds it with a timeout."""
        if self.info is not None:
            return self.info
        if (
            self._max_waiting is not None
            and self._sign_limiter.statistics().tasks_waiting >= self._max_waiting
        ):
            raise TLSError(
                f"token busy: {self._max_waiting} handshakes already wait for a session; "
                "refused at once"
            )
        await self._run_handshake()
        self._handshake_done = True
        self.info = self._settled()
        return self.info

    async def _run_handshake(self) -> None:
        while True:
            seen = self._incoming_count
            outcome = await self._step()
            try:
                await self._flush()  # the server flight, or an alert explaining a failure
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise TLSError("the client went away during the handshake") from exc
            if outcome is None:
                return
            if outcome != "want-read":
                raise TLSError(f"TLS handshake failed: {outcome}")
            try:
                more = await self._feed_incoming(seen)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise TLSError("the client went away during the handshake") from exc
            if not more:
                raise TLSError("the client closed the connection during the handshake")

    def _settled(self) -> TLSInfo:
        """What the finished handshake settled."""
        alpn = self._connection.get_alpn_proto_negotiated()
        server_name = self._connection.get_servername()
        policy, identity = admitted_client(self._connection)
        ssl = ssl_of(self._connection)
        return TLSInfo(
            version=self._connection.get_protocol_version_name(),
            cipher=self._connection.get_cipher_name() or "",
            alpn=alpn.decode("ascii") if alpn else None,
            server_name=server_name.decode("idna") if server_name else None,
            resumed=bool(libssl.SSL_session_reused(ssl)),
            group=_negotiated_group(ssl),
            client_auth=policy is not None,
            client_identity=identity,
            context=self._connection.get_context(),
        )

    # -- trio.abc.Stream -----------------------------------------------------------------

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if not self._handshake_done:
            await self.do_handshake()
        while True:
            seen = self._incoming_count
            if self._must_feed():
                if not await self._feed_incoming(seen):
                    return b""
                continue
            try:
                data: bytes = self._connection.recv(max_bytes or _RECEIVE_SIZE)
            except SSL.WantReadError:
                data = b""
                wants_more = True
            except SSL.ZeroReturnError:
                await self._flush()
                return b""
            except SSL.Error as error:
                await self._send_alert()
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
        if len(view) <= _SEND_CHUNK:
            failure = self._encrypt(view)
            if failure is not None:
                await self._send_alert()
                raise trio.BrokenResourceError(f"TLS error: {failure}")
            await self._flush()
            return
        # Large data: hold the send lock across the whole write, so that nothing another
        # task produces (an alert, a key update) can slip between our records.
        await _acquire(self._send_lock)
        try:
            batch: list[bytes] = []
            size = 0
            for start in range(0, len(view), _SEND_CHUNK):
                failure = self._encrypt(view[start : start + _SEND_CHUNK])
                batch.append(self._take_outgoing())  # with the alert, after a failure
                size += len(batch[-1])
                if failure is not None:
                    with suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                        await self.transport.send_all(b"".join(batch))
                    raise trio.BrokenResourceError(f"TLS error: {failure}")
                if size >= _SEND_BATCH:
                    await self.transport.send_all(b"".join(batch))
                    batch, size = [], 0
            if size:
                await self.transport.send_all(b"".join(batch))
        finally:
            self._send_lock.release()

    def _encrypt(self, plaintext: memoryview) -> str | None:
        """Hand plaintext to OpenSSL; the reason it failed, or None."""
        try:
            self._connection.sendall(plaintext)  # type: ignore[arg-type]
        except SSL.Error as error:
            return _describe_ssl_error(error)
        return None

    async def _send_alert(self) -> None:
        """Best effort: send the alert OpenSSL queued for the error, so the peer learns why."""
        with suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await self._flush()

    async def wait_send_all_might_not_block(self) -> None:
        await self.transport.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        """Send close_notify and keep receiving: the write side is closed (a TLS 1.3 peer
        may go on sending, RFC 8446 section 6.1; a TLS 1.2 peer answers with its own)."""
        if not self._handshake_done:
            await self.do_handshake()
        if self._eof_sent:
            return
        self._eof_sent = True
        await self._send_close_notify()

    async def _send_close_notify(self) -> None:
        with suppress(SSL.Error):
            self._connection.shutdown()
        await self._flush()

    async def aclose(self) -> None:
        await self.close(CloseMode.CLOSE_NOTIFY)

    async def close(self, mode: CloseMode) -> None:
        """End the connection as ``mode`` says, within :data:`CLOSE_SECONDS`; never raises
        for a peer that is gone. The one place a connection is closed."""
        with trio.move_on_after(CLOSE_SECONDS) as scope:
            scope.shield = True
            try:
                if mode is not CloseMode.ABORT and self._handshake_done and not self._eof_sent:
                    self._eof_sent = True
                    with trio.move_on_after(1):
                        await self._send_close_notify()
                if mode is CloseMode.LINGER and isinstance(
                    self.transport, trio.abc.HalfCloseableStream
                ):
                    with trio.move_on_after(LINGER_SECONDS):
                        await self.transport.send_eof()
                        while await self.transport.receive_some(_RECEIVE_SIZE):
                            pass
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass
        with suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            await self.transport.aclose()
