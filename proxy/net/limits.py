"""Handshake admission: bounded handshakes in progress, in total and per client address.

Theory of operation. Every full handshake costs a token signature, and the token is the
scarcest resource the proxy has. A connection is admitted to its handshake only while
fewer than ``max_total`` handshakes are in progress and fewer than ``max_per_client`` come
from the same client address; otherwise it is closed at once, before any TLS byte is read
or any signature queued. A slot is held from accept to the end of the handshake (bounded
by ``tls.handshake_timeout``), so a client that opens connections and stays silent uses up
its own slots, not everyone's, and a flood from many addresses cannot queue more than
``max_total`` handshakes behind the token. Refusals are counted; the log is told at most
once per interval, so a flood cannot flood the log either.

Sans-IO and synchronous: the server calls :meth:`HandshakeLimiter.admit` and releases the
slot it gets back; trio's single thread makes the counters safe without locks.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field


@dataclass
class HandshakeSlot(AbstractContextManager[None]):
    limiter: HandshakeLimiter
    address: str
    released: bool = False

    def __exit__(self, *_exc: object) -> None:
        self.release()

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.limiter._release(self.address)


@dataclass
class HandshakeLimiter:
    max_total: int
    max_per_client: int
    report_interval: float = 10.0
    clock: Callable[[], float] = time.monotonic
    in_progress: int = 0
    refused_total: int = 0
    _per_client: Counter[str] = field(default_factory=Counter)
    _last_report: float = float("-inf")
    _refused_since_report: int = 0

    def admit(self, address: str) -> HandshakeSlot | None:
        """A slot for one handshake from ``address``, or None when a limit is reached."""
        if self.in_progress >= self.max_total or self._per_client[address] >= self.max_per_client:
            self.refused_total += 1
            self._refused_since_report += 1
            return None
        self.in_progress += 1
        self._per_client[address] += 1
        return HandshakeSlot(self, address)

    def _release(self, address: str) -> None:
        self.in_progress -= 1
        self._per_client[address] -= 1
        if self._per_client[address] <= 0:
            del self._per_client[address]

    def clients(self) -> int:
        return len(self._per_client)

    def refusal_report(self) -> int | None:
        """How many handshakes were refused since the last report, when one is due."""
        now = self.clock()
        if self._refused_since_report and now - self._last_report >= self.report_interval:
            count, self._refused_since_report = self._refused_since_report, 0
            self._last_report = now
            return count
        return None
