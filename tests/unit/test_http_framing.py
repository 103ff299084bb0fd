"""Chunk sizes (rules.ChunkSizes) without a network: what RFC 9112 section 7.1 says a
recipient must not trust, checked on the raw bytes in any split."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.http.rules import ChunkSizes


def feed_all(body: bytes, max_body: int = 0, split: int = 0) -> int | None:
    sizes = ChunkSizes(max_body)
    pieces = [body] if not split else [body[i : i + split] for i in range(0, len(body), split)]
    for piece in pieces:
        status = sizes.feed(piece)
        if status is not None:
            return status
    return None


@pytest.mark.parametrize(
    ("body", "max_body", "status"),
    [
        (b"5\r\nhello\r\n0\r\n\r\n", 0, None),
        (b"5;ext=1\r\nhello\r\n0\r\n\r\nGET /next", 0, None),
        (b"ffffffffffffffff\r\n", 0, None),  # 16 digits: a size, if a large one
        (b"10000000000000005\r\n", 0, 400),
        (b"00000000000000001\r\n", 0, 400),
        (b"5\nhello", 0, 400),
        (b";x\r\n", 0, 400),
        (b"5;" + b"e" * 5000, 0, 400),
        (b"5\r\nhello\r\n6\r\nworld!\r\n", 10, 413),
        (b"5\r\nhello\r\n5\r\nworld\r\n0\r\n\r\n", 10, None),
    ],
)
def test_chunk_sizes(body: bytes, max_body: int, status: int | None) -> None:
    assert feed_all(body, max_body) == status
    assert feed_all(body, max_body, split=1) == status


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.binary(min_size=1, max_size=40), max_size=5),
    st.integers(min_value=1, max_value=17),
)
def test_chunk_sizes_see_the_same_in_any_split(chunks: list[bytes], split: int) -> None:
    body = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for chunk in chunks) + b"0\r\n\r\n"
    assert feed_all(body) is None
    assert feed_all(body, split=split) is None
    total = sum(map(len, chunks))
    if total > 1:  # max_body = 0 is no limit
        assert feed_all(body, max_body=total - 1, split=split) == 413
