"""Whether the token is fast enough for a handshake step to sign on the event loop.

Theory of operation (docs/ARCHITECTURE.md, decision 6). A handshake step that may sign
runs in a worker thread, so that a slow token never freezes the event loop; but with a
fast token (SoftHSM2: about 60 µs a signature) the hand-off to the thread and back costs
more CPU than the signature. :class:`SigningPace` hears of every token signature the key
backend makes (its wall-clock duration, which thread made it, or that it failed) and says
whether the next step that may sign runs inline.

A signature timed in a worker thread is no measure of the token: the thread also waits for
the interpreter lock, which the busy event loop holds for up to a switch interval (5 ms).
A signature made on the event loop is: nothing else runs meanwhile. So:

* inline signing goes on after one *probe*, a step run on the event loop whose signature
  took at most :data:`INLINE_LIMIT`, and stays on while every inline signature does;
* one inline signature over the limit, or any failed signature (a token in recovery may
  block for its whole acquire timeout), turns it off at once, and doubles the number of
  signing steps before the next probe (from :data:`FIRST_PROBE_AFTER` up to
  :data:`MAX_PROBE_INTERVAL`);
* no probe is made while the last signature timed in a worker thread took more than
  :data:`PROBE_LIMIT` (lock waits included) or failed: a slow, hung or failing token never
  signs on the loop.

The bound: a token that turns slow while signing inline holds the event loop for the one
signature that shows it; a token between the two limits holds it for one probe signature
per :data:`MAX_PROBE_INTERVAL` signing steps at most; a token slower than that never.
Signatures are recorded from whichever thread made them; the fields are plain values, and
a lost update moves a switch by one signature at most.
"""

from __future__ import annotations

import threading

# A signature on the event loop must take at most this long for inline signing to go on.
INLINE_LIMIT = 0.001
# No probe while the last signature timed in a worker thread took longer than this.
PROBE_LIMIT = 0.020
FIRST_PROBE_AFTER = 8  # signing steps in worker threads before the first probe
MAX_PROBE_INTERVAL = 4096


class SigningPace:
    """The recent pace of the token's signatures, as the key backend reports them."""

    def __init__(
        self,
        inline_limit: float = INLINE_LIMIT,
        probe_limit: float = PROBE_LIMIT,
        first_probe_after: int = FIRST_PROBE_AFTER,
        max_probe_interval: int = MAX_PROBE_INTERVAL,
    ) -> None:
        self.inline_limit = inline_limit
        self.probe_limit = probe_limit
        self.max_probe_interval = max_probe_interval
        self._first_probe_after = first_probe_after
        self.enabled = True  # off: every step that may sign goes to a worker thread
        self._inline = False
        self._interval = first_probe_after
        self._until_probe = first_probe_after
        self._threads_fast = True  # the last signature timed in a worker thread
        self._loop_thread: int | None = None  # the thread running an inline step

    def inline_allowed(self) -> bool:
        """Whether the next step that may sign runs on the event loop (a probe, or inline
        signing that is on); call :meth:`inline_step` around it when it does."""
        if not self.enabled:
            return False
        if self._inline:
            return True
        self._until_probe -= 1
        return self._until_probe <= 0 and self._threads_fast

    def inline_step(self, running: bool) -> None:
        """An inline step starts (``running``) or ends in the calling thread."""
        self._loop_thread = threading.get_ident() if running else None

    def record(self, seconds: float) -> None:
        """A signature succeeded in ``seconds`` (wall clock) in the calling thread."""
        if threading.get_ident() != self._loop_thread:
            self._threads_fast = seconds <= self.probe_limit
            return
        if seconds <= self.inline_limit:
            self._inline = True
            self._interval = self._first_probe_after
        else:
            self._slow()

    def record_failure(self) -> None:
        """A signature failed: the token may be recovering, which can take long."""
        self._threads_fast = False
        self._slow()

    def _slow(self) -> None:
        self._inline = False
        self._interval = min(self._interval * 2, self.max_probe_interval)
        self._until_probe = self._interval

    @property
    def inline(self) -> bool:
        """Whether inline signing is on (for tests and the breakdown)."""
        return self._inline


PACE = SigningPace()
