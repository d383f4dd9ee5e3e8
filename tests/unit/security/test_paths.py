"""The one reading of a request path (security/paths.py) and what the gateway builds from it: the node's
URL and a relayed redirect."""

from __future__ import annotations

from urllib.parse import quote, unquote

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edgegen.errors import InvalidInput
from edgegen.gateway.target import Target, relative_location
from edgegen.security.guard import looks_like_scanning
from edgegen.security.paths import canonical_path, raw_path_of, upstream_path


@pytest.mark.parametrize(
    ("raw", "path"),
    [
        (b"/", "/"),
        (b"/predict", "/predict"),
        (b"/models/digits/predict", "/models/digits/predict"),
        (b"/v2/models/digits%2Dv1/infer", "/v2/models/digits-v1/infer"),
        (b"/models/caf%C3%A9/predict", "/models/café/predict"),
        (b"/v1/models/", "/v1/models/"),  # a trailing slash: no route, a 404
        (b"/v1/.hidden/x..y/...", "/v1/.hidden/x..y/..."),  # dots that are not dot segments
    ],
)
def test_a_plain_path_reads_as_uvicorn_reads_it(raw: bytes, path: str) -> None:
    assert canonical_path(raw) == path == unquote(raw.decode())


@pytest.mark.parametrize(
    "raw",
    [
        b"/v1/../admin/models",
        b"/v1/./admin",
        b"/v1/.%2e/admin/models",
        b"/v1/%2e./admin/models",
        b"/v1/%2E%2E/admin/models",
        b"/v1/..",
        b"/v1/..%2fadmin/models",
        b"/v1/%2e%2e%2Fadmin",
        b"/v1/..%5cadmin/models",
        b"/v1/..\\admin/models",
        b"/v1/%252e%252e/admin",
        b"/v1/%25",
        b"/v1/%zz",
        b"/v1/%",
        b"/models/digits%00/predict",
        b"/models/digits%0a/predict",
        b"/models/%ff/predict",
        b"//127.0.0.1:8299/anything",
        b"//nohost/x",
        b"/v1//models",
        b"*",
        b"http://127.0.0.1/x",
        b"",
        "/models/café/predict".encode(),
    ],
)
def test_a_path_with_another_reading_is_refused(raw: bytes) -> None:
    with pytest.raises(InvalidInput):
        canonical_path(raw)


def test_a_scope_without_raw_path_keeps_its_escapes_counted() -> None:
    assert raw_path_of({"path": "/v1/models", "raw_path": b"/v1/%6dodels"}) == b"/v1/%6dodels"
    assert raw_path_of({"path": "/v1/a%2fb"}) == b"/v1/a%252fb"  # refused: an escaped %
    with pytest.raises(InvalidInput):
        canonical_path(raw_path_of({"path": "/v1/../admin"}))


# Segments as a client may send them: any visible ASCII as is, or any text percent-encoded.
SEGMENTS = st.one_of(
    st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=12),
    st.text(st.characters(blacklist_categories=("Cs",)), max_size=12).map(lambda s: quote(s, safe="")),
)


@given(st.lists(SEGMENTS, min_size=1, max_size=5))
def test_what_a_node_is_sent_reads_back_the_same(segments: list[str]) -> None:
    """Property: for any path the gate accepts, the path the gateway sends a node is read by the node
    as that same path — the node routes exactly what the role was decided on."""
    raw = ("/" + "/".join(segments)).encode("ascii")
    try:
        path = canonical_path(raw)
    except InvalidInput:
        return
    sent = upstream_path(path)
    assert canonical_path(sent.encode("ascii")) == path


def test_the_request_line_is_built_from_the_path_and_the_query_alone() -> None:
    assert Target("/v1/models", "a=1&b=%2F").request_target() == b"/v1/models?a=1&b=%2F"
    assert Target("/x", "").request_target() == b"/x"
    # whatever the query holds, it stays the query of the node's path (the Host is the node's own)
    target = Target("/v1/models", "next=//evil:1/x%23y@evil").request_target()
    assert target.startswith(b"/v1/models?")
    assert target.count(b"?") == 1


@pytest.mark.parametrize(
    ("location", "relative"),
    [
        (b"http://127.0.0.1:8001/v1/models", b"/v1/models"),
        (b"https://evil.example/v1/models?x=1", b"/v1/models?x=1"),
        (b"//evil.example/x", b"/x"),
        (b"http://node//evil.example/x", b"/evil.example/x"),
        (b"/\\evil.example/x", b"/evil.example/x"),
        (b"/v1/models", b"/v1/models"),
        (b"http://node", b"/"),
    ],
)
def test_a_relayed_redirect_is_relative_and_stays_on_the_gateway(location: bytes, relative: bytes) -> None:
    assert relative_location(location) == relative


@pytest.mark.parametrize(
    ("raw", "path", "query", "scanning"),
    [
        (b"/%2eenv", "/.env", b"", True),
        (b"/%2egit/config", "/.git/config", b"", True),
        (b"/wp-login.php", "/wp-login.php", b"", True),
        (b"/predict", "/predict", b"file=/etc/passwd", True),
        (b"/predict", "/predict", b"", False),
        (b"/v1/models", "/v1/models", b"limit=10", False),
    ],
)
def test_the_scan_check_reads_the_decoded_path(raw: bytes, path: str, query: bytes, scanning: bool) -> None:
    assert looks_like_scanning(raw, path, query) is scanning
