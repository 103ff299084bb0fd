"""Handshake admission (proxy/net/limits.py): in total and per client address."""

from __future__ import annotations

from proxy.net.limits import HandshakeLimiter, Refusals, TokenBuckets


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


def test_a_token_bucket_per_client_bounds_the_handshake_rate() -> None:
    now = [0.0]
    limiter = HandshakeLimiter(
        max_total=100,
        max_per_client=100,
        clock=lambda: now[0],
        rate_per_client=2.0,
        burst_per_client=3,
    )
    for _ in range(3):  # the burst
        slot = limiter.admit("a")
        assert slot is not None
        slot.release()  # a finished handshake still used its token
    assert limiter.admit("a") is None
    assert limiter.refused_reason == "handshake_rate"
    assert limiter.admit("b") is not None  # another client has its own bucket
    now[0] = 0.5  # one token back at 2 a second
    assert limiter.admit("a") is not None
    assert limiter.admit("a") is None
    now[0] = 100.0  # refilled, but never beyond the burst
    assert [limiter.admit("a") is not None for _ in range(4)] == [True, True, True, False]


def test_full_buckets_are_forgotten() -> None:
    now = [0.0]
    buckets = TokenBuckets(rate=1.0, burst=2, clock=lambda: now[0])
    for number in range(TokenBuckets._PRUNE_EVERY - 1):
        assert buckets.take(f"client-{number}")
    assert len(buckets) == TokenBuckets._PRUNE_EVERY - 1
    now[0] = 10.0  # every bucket is full again
    assert buckets.take("late")
    assert len(buckets) == 1


def test_refusals_are_reported_at_most_once_per_interval() -> None:
    now = [0.0]
    refusals = Refusals(report_interval=10.0, clock=lambda: now[0])
    assert refusals.refused() == 1
    assert refusals.refused() is None
    assert refusals.refused() is None
    now[0] = 10.0
    assert refusals.refused() == 3
    assert refusals.total == 4
