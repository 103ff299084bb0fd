"""pace.py: when a handshake step may sign on the event loop, and when it must not."""

import threading

from proxy.tls.pace import SigningPace


def _inline(pace: SigningPace, seconds: float) -> None:
    """One step on the 'event loop' (this thread) whose signature took ``seconds``."""
    pace.inline_step(running=True)
    pace.record(seconds)
    pace.inline_step(running=False)


def _in_a_worker(pace: SigningPace, seconds: float) -> None:
    worker = threading.Thread(target=pace.record, args=(seconds,))
    worker.start()
    worker.join()


def _steps_until_probe(pace: SigningPace, limit: int = 10_000) -> int:
    for step in range(1, limit + 1):
        if pace.inline_allowed():
            return step
    raise AssertionError("no probe")


def test_a_fast_probe_turns_inline_signing_on_and_it_stays_on() -> None:
    pace = SigningPace(first_probe_after=4)
    assert _steps_until_probe(pace) == 4  # the first steps sign in worker threads
    _inline(pace, 0.0001)
    assert pace.inline
    for _ in range(100):
        assert pace.inline_allowed()
        _inline(pace, 0.0001)


def test_one_slow_inline_signature_ends_it_and_probes_back_off() -> None:
    pace = SigningPace(inline_limit=0.001, first_probe_after=4, max_probe_interval=16)
    _steps_until_probe(pace)
    _inline(pace, 0.0001)
    _inline(pace, 0.5)  # the token turned slow: this one held the loop, the next must not
    assert not pace.inline
    assert _steps_until_probe(pace) == 8
    _inline(pace, 0.5)
    assert _steps_until_probe(pace) == 16
    _inline(pace, 0.5)
    assert _steps_until_probe(pace) == 16  # at most one probe per max_probe_interval


def test_a_token_slow_in_worker_threads_is_never_probed() -> None:
    pace = SigningPace(probe_limit=0.02, first_probe_after=2)
    _in_a_worker(pace, 0.5)
    assert not any(pace.inline_allowed() for _ in range(1000))
    _in_a_worker(pace, 0.005)  # lock waits included, under the probe limit: probe again
    assert pace.inline_allowed()


def test_worker_thread_timings_never_turn_inline_signing_on() -> None:
    pace = SigningPace(first_probe_after=1000)
    for _ in range(50):
        _in_a_worker(pace, 0.00001)
    assert not pace.inline


def test_a_failed_signature_ends_inline_signing_and_stops_probes() -> None:
    pace = SigningPace(first_probe_after=1)
    assert pace.inline_allowed()
    _inline(pace, 0.0001)
    assert pace.inline
    pace.record_failure()  # a token in recovery may block for its whole acquire timeout
    assert not pace.inline
    assert not any(pace.inline_allowed() for _ in range(100))


def test_a_signature_exactly_at_the_limit_counts_as_fast() -> None:
    pace = SigningPace(inline_limit=0.001, first_probe_after=1)
    pace.inline_allowed()
    _inline(pace, 0.001)
    assert pace.inline


def test_disabled_pace_never_signs_inline() -> None:
    pace = SigningPace(first_probe_after=1)
    pace.enabled = False
    assert not any(pace.inline_allowed() for _ in range(10))
