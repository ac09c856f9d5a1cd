"""Header rules for forwarding: pure functions on ASGI header lists.

Header lists are ``[(name, value), ...]`` of bytes, in wire order, duplicates
kept. Names from hypercorn and httpcore are already lower-case; the rules
compare lower-cased names anyway so they hold for any caller.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

Headers = list[tuple[bytes, bytes]]

# RFC 9110 §7.6.1 plus the de-facto ones (Keep-Alive, Proxy-Connection via the proxy- prefix).
HOP_BY_HOP = frozenset({b"connection", b"keep-alive", b"te", b"trailer", b"transfer-encoding", b"upgrade"})

# Headers wsproto writes itself on the upstream handshake, or that belong to the client's handshake.
WEBSOCKET_OWN = frozenset(
    {
        b"sec-websocket-key",
        b"sec-websocket-version",
        b"sec-websocket-extensions",
        b"sec-websocket-protocol",
        b"sec-websocket-accept",
    }
)

XFF = b"x-forwarded-for"
# ``Expect: 100-continue`` is answered by the proxy's own server as soon as the body is read;
# forwarding it too would ask for a second interim response the client never waits for.
EXPECT = b"expect"


def connection_named(headers: Iterable[tuple[bytes, bytes]]) -> frozenset[bytes]:
    """Header names listed in any ``Connection`` header (hop-by-hop by declaration)."""
    named: set[bytes] = set()
    for name, value in headers:
        if name.lower() == b"connection":
            for token in value.split(b","):
                token = token.strip().lower()
                if token:
                    named.add(token)
    return frozenset(named)


def is_hop_by_hop(name: bytes, named: frozenset[bytes]) -> bool:
    """``name`` must be lower-case."""
    return name in HOP_BY_HOP or name.startswith(b"proxy-") or name in named


def outbound(
    headers: Iterable[tuple[bytes, bytes]],
    *,
    authority: bytes,
    bearer: bytes,
    client_ip: bytes | None,
    drop: bytes | None = None,
    websocket: bool = False,
) -> tuple[Headers, bool]:
    """Client request headers → upstream request headers.

    Hop-by-hop headers, ``Host``, ``Expect`` (answered here), any inbound
    ``Authorization`` and the routing header ``drop`` (lower-case) are removed;
    ``Host: authority`` goes first, ``Authorization: Bearer`` last.
    ``X-Forwarded-For`` keeps its place with the client IP appended to the
    existing list (several headers are merged into one). ``websocket=True``
    also drops what the websocket client writes itself (Host,
    Sec-WebSocket-*), so Host is not added.

    A ``Content-Length`` sent together with ``Transfer-Encoding`` is dropped
    (the body is framed by the chunked encoding, and httpx streams it that way).

    Returns the headers and whether an inbound Authorization was replaced.
    """
    headers = list(headers)
    named = connection_named(headers)
    out: Headers = [] if websocket else [(b"host", authority)]
    replaced = False
    xff: list[bytes] = []
    xff_at = -1
    chunked = False
    for name, value in headers:
        lower = name.lower()
        if lower == b"host" or lower == drop or lower == EXPECT or is_hop_by_hop(lower, named):
            chunked = chunked or lower == b"transfer-encoding"
            continue
        if lower == b"authorization":
            replaced = True
            continue
        if lower == XFF:
            if xff_at < 0:
                xff_at = len(out)
                out.append((XFF, b""))
            xff.append(value.strip())
            continue
        if websocket and lower in WEBSOCKET_OWN:
            continue
        out.append((name, value))
    if client_ip is not None:
        xff.append(client_ip)
        if xff_at < 0:
            xff_at = len(out)
            out.append((XFF, b""))
    if xff_at >= 0:
        out[xff_at] = (XFF, b", ".join(v for v in xff if v))
    if chunked:  # RFC 9112 6.1: Transfer-Encoding overrides Content-Length; never forward both
        out = [(n, v) for n, v in out if n.lower() != b"content-length"]
    out.append((b"authorization", b"Bearer " + bearer))
    return out, replaced


def inbound(headers: Sequence[tuple[bytes, bytes]]) -> Headers:
    """Upstream response headers → client response headers (hop-by-hop removed)."""
    named = connection_named(headers)
    return [(name, value) for name, value in headers if not is_hop_by_hop(name.lower(), named)]


def websocket_accept(headers: Sequence[tuple[bytes, bytes]]) -> Headers:
    """Upstream handshake response headers worth passing to the client's accept (e.g. Set-Cookie)."""
    named = connection_named(headers)
    out: Headers = []
    for name, value in headers:
        lower = name.lower()
        if is_hop_by_hop(lower, named) or lower in WEBSOCKET_OWN:
            continue
        if lower in (b"content-length", b"date", b"server"):
            continue
        out.append((name, value))
    return out


def value(headers: Iterable[tuple[bytes, bytes]], wanted: bytes) -> bytes | None:
    """First value of header ``wanted`` (lower-case), or None."""
    for name, val in headers:
        if name.lower() == wanted:
            return val
    return None
