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

Beside the concurrency limits, a client address may start handshakes at most at
``rate_per_client`` per second on average, in bursts of up to ``burst_per_client`` (a token
bucket per address, :class:`TokenBuckets`): a client that opens and completes handshakes as
fast as it can holds few slots at a time but still costs one token signature each. Over
the rate, a connection is closed at once like one over the concurrency limits.
:attr:`HandshakeLimiter.refused_reason` says which limit refused the last one
(``handshake_limit`` or ``handshake_rate``), for the metric.

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
class Refusals:
    """Connections refused for one reason, told to the log at most once per interval."""

    report_interval: float = 10.0
    clock: Callable[[], float] = time.monotonic
    total: int = 0
    _since_report: int = 0
    _last_report: float = float("-inf")

    def refused(self) -> int | None:
        """Count one refusal; how many since the last report, when one is due."""
        self.total += 1
        self._since_report += 1
        now = self.clock()
        if now - self._last_report >= self.report_interval:
            count, self._since_report = self._since_report, 0
            self._last_report = now
            return count
        return None


class TokenBuckets:
    """One token bucket per key: ``rate`` tokens a second, at most ``burst`` saved up; a
    key with a full bucket is forgotten (it is as good as new), so memory follows the
    clients that are busy now, not every client ever seen."""

    _PRUNE_EVERY = 1024  # takes between sweeps of full buckets

    def __init__(self, rate: float, burst: float, clock: Callable[[], float]) -> None:
        self.rate = rate
        self.burst = burst
        self.clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # key: (tokens, as of when)
        self._takes = 0

    def _tokens(self, key: str, now: float) -> float:
        tokens, since = self._buckets.get(key, (self.burst, now))
        return min(self.burst, tokens + (now - since) * self.rate)

    def take(self, key: str) -> bool:
        """Take one token for ``key``: False when its bucket is empty."""
        now = self.clock()
        self._takes += 1
        if self._takes % self._PRUNE_EVERY == 0:
            self._prune(now)
        tokens = self._tokens(key, now)
        if tokens < 1.0:
            self._buckets[key] = (tokens, now)
            return False
        self._buckets[key] = (tokens - 1.0, now)
        return True

    def _prune(self, now: float) -> None:
        full = [key for key in self._buckets if self._tokens(key, now) >= self.burst]
        for key in full:
            del self._buckets[key]

    def __len__(self) -> int:
        return len(self._buckets)


@dataclass
class HandshakeLimiter:
    max_total: int
    max_per_client: int
    report_interval: float = 10.0
    clock: Callable[[], float] = time.monotonic
    rate_per_client: float = 0.0  # handshakes a second per address, on average; 0: no limit
    burst_per_client: int = 20
    in_progress: int = 0
    refused_total: int = 0
    refused_reason: str = ""  # of the last refusal: handshake_limit or handshake_rate
    _per_client: Counter[str] = field(default_factory=Counter)
    _last_report: float = float("-inf")
    _refused_since_report: int = 0
    _rates: TokenBuckets | None = None

    def __post_init__(self) -> None:
        if self.rate_per_client > 0:
            self._rates = TokenBuckets(self.rate_per_client, self.burst_per_client, self.clock)

    def admit(self, address: str) -> HandshakeSlot | None:
        """A slot for one handshake from ``address``, or None when a limit is reached."""
        if self.in_progress >= self.max_total or self._per_client[address] >= self.max_per_client:
            self._refuse("handshake_limit")
            return None
        if self._rates is not None and not self._rates.take(address):
            self._refuse("handshake_rate")
            return None
        self.in_progress += 1
        self._per_client[address] += 1
        return HandshakeSlot(self, address)

    def _refuse(self, reason: str) -> None:
        self.refused_total += 1
        self._refused_since_report += 1
        self.refused_reason = reason

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
