"""Unit tests: one module of the package at a time, with no token and no process.

They may use files, environment variables, trustme CAs and loopback sockets, never the
SoftHSM2 token or a proxy process (those are tests/integration/'s). The guard below fails
a unit test that asks for one, so the split stays true as the suite grows."""

from __future__ import annotations

import pytest

TOKEN_OR_PROCESS_FIXTURES = frozenset(
    {"hsm", "faulthsm", "fault", "on_faulthsm", "proxy_factory", "start_proxy"}
)


def pytest_runtest_setup(item: pytest.Item) -> None:
    used = TOKEN_OR_PROCESS_FIXTURES & set(getattr(item, "fixturenames", ()))
    if used:
        pytest.fail(
            f"{item.nodeid} is a unit test but uses {', '.join(sorted(used))}: "
            "move it to tests/integration/",
            pytrace=False,
        )
