"""logs.info_line writes the access and audit lines byte for byte as the logging path does."""

import io
import json
import logging
import re
from collections.abc import Iterator

import pytest

from proxy.ops.hardening import forget_secrets, remember_secret
from proxy.ops.logs import access_log, info_line, setup_logging

_TIME = re.compile(r'^\{"time": "[^"]+", ')


@pytest.fixture
def stderr(monkeypatch: pytest.MonkeyPatch) -> Iterator[io.StringIO]:
    captured = io.StringIO()
    monkeypatch.setattr("sys.stderr", captured)
    setup_logging("info", json_lines=True)
    yield captured
    forget_secrets()
    logging.getLogger("hsm_proxy").handlers.clear()


def _not_called(*_args: object, **_kwargs: object) -> None:
    raise AssertionError("info_line went the ordinary way")


def _only_ours() -> None:
    """pytest's log capture adds its handlers to the logger once the test runs; with them
    info_line (rightly) goes the ordinary way, so leave only setup_logging's handler."""
    root = logging.getLogger("hsm_proxy")
    root.handlers[:] = root.handlers[:1]


def _both(stderr: io.StringIO, fields: dict[str, object], *, fast: bool = True) -> list[str]:
    """The line of the logging path, then info_line's (made without it when ``fast``)."""
    _only_ours()
    access_log.info("request", extra={"fields": fields})
    if fast:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(access_log, "info", _not_called)
            info_line(access_log, "request", fields)
    else:
        info_line(access_log, "request", fields)
    lines = stderr.getvalue().splitlines()
    assert len(lines) == 2
    return lines


def test_the_same_line_as_the_logging_path_but_for_the_time(stderr: io.StringIO) -> None:
    fields = {
        "connection_id": 7,
        "client": "127.0.0.1",
        "sni": None,
        "method": "GET",
        "path": '/a?b=\u00e9"c',
        "status": 200,
        "duration_ms": 0.125,
        "client_cert": {"subject": "CN=x"},
    }
    ordinary, fast = _both(stderr, fields)
    assert _TIME.match(ordinary)
    assert _TIME.match(fast)
    assert _TIME.sub("", ordinary) == _TIME.sub("", fast)
    assert list(json.loads(fast)) == list(json.loads(ordinary))


def test_secrets_are_scrubbed_from_fields_as_the_filter_does(stderr: io.StringIO) -> None:
    remember_secret("s3cr3t-value")
    ordinary, fast = _both(
        stderr, {"path": "/x?pin=s3cr3t-value", "headers": [("authorization", "t")]}
    )
    assert "s3cr3t-value" not in fast
    assert _TIME.sub("", ordinary) == _TIME.sub("", fast)


def test_a_field_named_like_a_leading_key_goes_the_ordinary_way(stderr: io.StringIO) -> None:
    ordinary, fast = _both(stderr, {"message": "overridden", "status": 200}, fast=False)
    assert _TIME.sub("", ordinary) == _TIME.sub("", fast)


def test_below_the_log_level_nothing_is_written(stderr: io.StringIO) -> None:
    _only_ours()
    logging.getLogger("hsm_proxy").setLevel("WARNING")
    info_line(access_log, "request", {"status": 200})
    assert stderr.getvalue() == ""
