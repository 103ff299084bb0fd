"""Request targets (proxy/http/target.py) without a network: the forms of RFC 9112
section 3.2, RFC 3986 normalisation, ambiguous encodings."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.config import Route
from proxy.http.rules import route
from proxy.http.target import Target, TargetError, normalise_path, parse_target


@pytest.mark.parametrize(
    ("raw", "normal"),
    [
        ("/", "/"),
        ("/a/b", "/a/b"),
        ("/public/../admin", "/admin"),
        ("/a/./b/../c/", "/a/c/"),
        ("/a/b/..", "/a/"),
        ("/..", "/"),
        ("/../../x", "/x"),
        ("//a///b//", "/a/b/"),
        ("/%7euser/%41%62", "/~user/Ab"),
        ("/a%20b/%c3%a9", "/a%20b/%C3%A9"),
        ("/.well-known/x", "/.well-known/x"),
        ("/a/.../b", "/a/.../b"),
    ],
)
def test_paths_are_normalised_as_rfc_3986_says(raw: str, normal: str) -> None:
    assert normalise_path(raw) == normal


@pytest.mark.parametrize("raw", ["/a%2Fb", "/a%2f..%2fadmin", "/%2E%2E/admin", "/a%2eb"])
def test_encoded_slash_or_dot_is_refused_unless_allowed(raw: str) -> None:
    with pytest.raises(TargetError):
        normalise_path(raw)
    normalise_path(raw, allow_ambiguous=True)


def test_allowed_ambiguous_forms_have_one_normal_form() -> None:
    assert normalise_path("/a%2f..%2fb", allow_ambiguous=True) == "/a%2F..%2Fb"
    assert normalise_path("/public/%2E%2E/admin", allow_ambiguous=True) == "/admin"


@pytest.mark.parametrize("raw", ["/a%zz", "/a%4", "/a%"])
def test_malformed_percent_encoding_is_always_refused(raw: str) -> None:
    with pytest.raises(TargetError):
        normalise_path(raw, allow_ambiguous=True)


def test_target_forms() -> None:
    assert parse_target(b"/x?q=/../a", b"GET") == Target("/x", "?q=/../a")
    assert parse_target(b"http://Other.example:8080/x/../y?z", b"GET") == Target(
        "/y", "?z", b"Other.example:8080"
    )
    assert parse_target(b"HTTPS://h", b"GET") == Target("/", "", b"h")
    assert parse_target(b"http://h?q", b"GET") == Target("/", "?q", b"h")
    assert parse_target(b"http://[::1]:80/", b"GET").authority == b"[::1]:80"
    assert parse_target(b"*", b"OPTIONS").origin_form() == b"*"
    assert parse_target(b"/a/../b?c", b"GET").origin_form() == b"/b?c"
    for bad, method in [
        (b"*", b"GET"),
        (b"x", b"GET"),
        (b"ftp://h/x", b"GET"),
        (b"http://u:p@h/x", b"GET"),
        (b"http:///x", b"GET"),
        (b"/x#frag", b"GET"),
        (b"other.example:443", b"GET"),
    ]:
        with pytest.raises(TargetError):
            parse_target(bad, method)


def test_routes_take_the_normalised_path() -> None:
    routes = (Route("public", (), "/public"),)
    assert route(routes, b"a", None, parse_target(b"/public/../admin", b"GET").path) == "default"
    assert route(routes, b"a", None, parse_target(b"//public/x", b"GET").path) == "public"


_SEGMENTS = st.lists(
    st.sampled_from(["", ".", "..", "a", "b", "%41", "%7e", "%20", "...", ".x"]), max_size=8
)


@settings(max_examples=150, deadline=None)
@given(_SEGMENTS)
def test_normalising_is_idempotent_and_leaves_no_dot_segment_or_empty_one(
    segments: list[str],
) -> None:
    normal = normalise_path("/" + "/".join(segments))
    assert normalise_path(normal) == normal
    inner = normal.split("/")[1:-1]
    assert "." not in inner
    assert ".." not in inner
    assert "" not in inner
    assert normal.split("/")[-1] not in (".", "..")
