"""Handshake admission (proxy/net/limits.py): in total and per client address."""

from __future__ import annotations

from proxy.net.limits import HandshakeLimiter


def test_handshake_limiter_counts_per_client_and_in_total() -> None:
    now = [0.0]
    limiter = HandshakeLimiter(max_total=3, max_per_client=2, clock=lambda: now[0])
    first = limiter.admit("a")
    second = limiter.admit("a")
    assert first is not None
    assert second is not None
    assert limiter.admit("a") is None
    third = limiter.admit("b")
    assert third is not None
    assert limiter.admit("c") is None  # the total is reached
    assert limiter.refusal_report() == 2
    assert limiter.admit("c") is None
    assert limiter.refusal_report() is None  # not again within the interval
    now[0] = 11.0
    assert limiter.refusal_report() == 1
    first.release()
    first.release()  # releasing twice frees one slot only
    assert limiter.in_progress == 2
    with third:
        pass
    assert limiter.admit("c") is not None
    assert limiter.clients() == 2
    assert limiter.refused_total == 3
