"""Write buffers that gather a large ``SSL_write``'s records into few socket writes.

Why (bench/README.md, "Issue 13, round 3"). On a socket BIO, OpenSSL writes every TLS
record, at most 16 KiB of plaintext, with its own ``write``: a 1 MiB response took 64
system calls, each with the kernel's per-send TCP work. With a buffering BIO
(``BIO_f_buffer``) pushed in front of the socket, the records of one ``SSL_write`` pile up
and leave :data:`BUFFER_SIZE` at a time: eight writes for that response, about a tenth of
the proxy's CPU per byte in the benchmark's 1 MiB scenario.

Theory of operation. A buffer is lent only for the length of one large send
(:func:`lend` / :func:`give_back`), never kept by a connection: a buffering BIO holds its
buffers for life, and thousands of idle keep-alive connections must not (the idle memory
of bench scenario 5). While lent, it is the connection's write BIO with the socket BIO
behind it (the read BIO stays the socket BIO alone); everything OpenSSL writes meanwhile
goes through it, in order, and the lender's last step is :func:`flush` until nothing is
left, waiting for writability as the socket asks. OpenSSL flushes its own handshake and
alert messages (key updates, close_notify) through the same BIO. A buffer given back is
emptied (a send that was cancelled or broke mid-way leaves nothing for the next
connection) and kept in a small per-thread pool.

The reference counts, since the socket BIO is shared: ``SSL_set_fd`` gives it one count
for the read BIO and one for the write BIO; while lent, the buffer holds the write BIO's.
"""

from __future__ import annotations

import threading
from typing import Any

from proxy.tls.binding import (
    BIO_C_SET_BUFF_SIZE,
    BIO_CTRL_FLUSH,
    BIO_CTRL_RESET,
    BIO_FLAGS_SHOULD_RETRY,
    ffi,
    libcrypto,
    libssl,
)

BUFFER_SIZE = 131072  # eight records of 16 KiB: two writes for a 256 KiB send
LEND_OVER = 16384  # a send of one record or less gains nothing from a buffer
_POOL_LIMIT = 8  # idle buffers kept per thread (1 MiB at most)
_WRITE_BUFFER = ffi.new("int *", 1)  # BIO_set_write_buffer_size's "the write side"


class _Pool(threading.local):
    def __init__(self) -> None:
        self.idle: list[Any] = []


_pool = _Pool()


def _new_buffer() -> Any:
    bio = libcrypto.BIO_new(libcrypto.BIO_f_buffer())
    if bio == ffi.NULL:
        raise MemoryError("OpenSSL could not make a write buffer")
    if libcrypto.BIO_ctrl(bio, BIO_C_SET_BUFF_SIZE, BUFFER_SIZE, _WRITE_BUFFER) != 1:
        libcrypto.BIO_free(bio)
        raise MemoryError("OpenSSL could not size a write buffer")
    return ffi.gc(bio, libcrypto.BIO_free)


def lend(ssl: Any) -> Any:
    """Put a buffer in front of the socket as ``ssl``'s write BIO; returns it."""
    idle = _pool.idle
    buffer = idle.pop() if idle else _new_buffer()
    socket_bio = libssl.SSL_get_wbio(ssl)
    libcrypto.BIO_up_ref(socket_bio)  # the buffer's count; set0 drops the old write BIO's
    libcrypto.BIO_push(buffer, socket_bio)
    libcrypto.BIO_up_ref(buffer)  # the SSL's count (ours stays with the ffi.gc handle)
    libssl.SSL_set0_wbio(ssl, buffer)
    return buffer


def flush(buffer: Any) -> bool:
    """Write out what the buffer holds: True when all went, False when the socket is full
    (wait for writability and call again). Raises ``OSError`` for a broken socket."""
    if libcrypto.BIO_ctrl(buffer, BIO_CTRL_FLUSH, 0, ffi.NULL) > 0:
        return True
    if libcrypto.BIO_test_flags(buffer, BIO_FLAGS_SHOULD_RETRY):
        return False
    raise OSError(ffi.errno, "the write buffer could not be flushed")


def give_back(ssl: Any, buffer: Any) -> None:
    """Make the socket BIO ``ssl``'s write BIO again, and pool the emptied buffer."""
    socket_bio = libcrypto.BIO_next(buffer)
    libcrypto.BIO_up_ref(socket_bio)  # the write BIO's count again
    # set0 frees the SSL's count of the buffer; with ours left, it stops there.
    libssl.SSL_set0_wbio(ssl, socket_bio)
    libcrypto.BIO_pop(buffer)
    libcrypto.BIO_free(socket_bio)  # the buffer's count, now that it points nowhere
    libcrypto.BIO_ctrl(buffer, BIO_CTRL_RESET, 0, ffi.NULL)
    if len(_pool.idle) < _POOL_LIMIT:
        _pool.idle.append(buffer)
