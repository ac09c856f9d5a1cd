"""Property tests (hypothesis) for the pure parsers and rules on the request path.

Each property states what must hold for *any* input: parsers raise ValueError
(or the configuration's ConfigError / argparse's exit 2) and nothing else, what
they accept round-trips, and the header, audience, allow-list, NO_PROXY and SSRF
rules hold on generated inputs. Examples are bounded (``FUZZ``) so the file
runs in seconds; under CI the search is derandomized so a run is repeatable.
Inputs that once broke a rule (a NO_PROXY port like ``²``, a malformed
HTTP(S)_PROXY URL, non-ASCII or int64-overflowing durations) are pinned with
``@example`` or ``parametrize``, so they are checked on every run.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
import string
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from aws_outbound_jwt_proxy.config import settings as config
from aws_outbound_jwt_proxy.config import values
from aws_outbound_jwt_proxy.config.durations import parse_duration
from aws_outbound_jwt_proxy.config.flags import ConfigError
from aws_outbound_jwt_proxy.proxy import headers as hdr
from aws_outbound_jwt_proxy.routing import audience
from aws_outbound_jwt_proxy.routing.egress import EgressConfigError, EgressProxies
from aws_outbound_jwt_proxy.routing.guard import DEFAULT_DENIED_CIDRS, Guard, literal_address, parse_cidrs
from aws_outbound_jwt_proxy.routing.router import host_allowed
from aws_outbound_jwt_proxy.routing.target import Target, parse_authority

FUZZ = settings(
    max_examples=200,
    deadline=None,
    database=None,
    derandomize=bool(os.environ.get("CI")),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
FEW = settings(
    FUZZ, max_examples=int(os.environ.get("FUZZ_FEW", "60"))
)  # properties that parse the whole command line per example

# ---- strategies -----------------------------------------------------------------------------

_LOWER = string.ascii_lowercase + string.digits + "_"
LABEL = st.builds(
    lambda a, mid, b: a + mid + b if b else a,  # never ends with "-"
    st.sampled_from(_LOWER),
    st.text(alphabet=_LOWER + "-", max_size=8),
    st.sampled_from(["", *_LOWER]),
)
NAME = st.lists(LABEL, min_size=1, max_size=4).map(".".join)
IPV4 = st.ip_addresses(v=4)
IPV6 = st.ip_addresses(v=6)
IPV6_TEXT = st.one_of(IPV6.map(str), IPV6.map(lambda a: a.exploded), IPV6.map(lambda a: str(a).upper())).map(
    lambda text: f"[{text}]"
)
HOST = st.one_of(
    NAME,
    NAME.map(str.upper),
    NAME.map(lambda n: n + "."),
    IPV4.map(str),
    IPV6_TEXT,
)
PORT = st.integers(1, 65535)
SCHEME = st.sampled_from(["http", "https"])


def _authority(host: str, port: int | None) -> str:
    return host if port is None else f"{host}:{port}"


AUTHORITY = st.builds(_authority, HOST, st.none() | PORT)
# Near misses: a valid authority with one character inserted or replaced, plus plain noise.
NASTY = st.sampled_from([*" \t\r\n\x00\x7f\x85\xa0\u2028\u3000[]:@/?#\\%.*-_\xb2\u0663\uff18", "::", "0x"])


@st.composite
def mutated(draw: st.DrawFn, base: st.SearchStrategy[str]) -> str:
    text = draw(base)
    at = draw(st.integers(0, len(text)))
    replace = draw(st.booleans())
    char = draw(NASTY | st.characters())
    return text[:at] + char + text[at + (1 if replace else 0) :]


ANY_AUTHORITY = st.one_of(AUTHORITY, mutated(AUTHORITY), st.text(max_size=40))


def _bad_char(c: str) -> bool:
    return ord(c) < 0x21 or ord(c) == 0x7F or 0x80 <= ord(c) < 0xA0 or c.isspace()


# ---- routing.target.parse_authority ----------------------------------------------------------


@FUZZ
@given(SCHEME, ANY_AUTHORITY)
@example("http", "[::1]:")
@example("https", "a.example:0")
@example("http", "[fe80::1%eth0]")
def test_parse_authority_raises_only_value_error_and_accepts_only_clean_targets(
    scheme: str, value: str
) -> None:
    try:
        target = parse_authority(scheme, value)
    except ValueError:
        return
    assert not any(_bad_char(c) for c in value), value
    assert target.scheme == scheme
    assert target.host == target.host.lower()
    if ":" in target.host:
        assert target.host.startswith("[") and target.host.endswith("]"), target
        ipaddress.IPv6Address(target.host[1:-1])
    assert target.port is None or 1 <= target.port <= 65535
    assert target.authority == _authority(target.host, target.port)
    # Round trip: what goes out as the Host header parses back to the same target.
    assert parse_authority(scheme, target.authority) == target


@FUZZ
@given(SCHEME, HOST, st.none() | PORT)
def test_parse_authority_accepts_every_well_formed_authority(
    scheme: str, host: str, port: int | None
) -> None:
    target = parse_authority(scheme, _authority(host, port))
    assert target.port == port
    if host.startswith("["):
        assert ipaddress.IPv6Address(target.host[1:-1]) == ipaddress.IPv6Address(host[1:-1])
        assert target.host == f"[{host[1:-1].lower()}]"
    else:
        assert target.host == host.lower()
    assert target.effective_port == (port or {"http": 80, "https": 443}[scheme])


@FUZZ
@given(SCHEME, IPV6.map(str), st.none() | PORT)
def test_parse_authority_refuses_unbracketed_ipv6(scheme: str, literal: str, port: int | None) -> None:
    with pytest.raises(ValueError):
        parse_authority(scheme, _authority(literal, port))


# ---- routing.router.host_allowed -------------------------------------------------------------


def _target(host: str, port: int | None = None, scheme: str = "https") -> Target:
    return parse_authority(scheme, _authority(host, port))


def _label_match(host: str, port: int, pattern: str) -> bool:
    """The allow-list rule restated on labels: ``*.s`` = one or more labels before s; else the same host."""
    pat_host, pat_port = pattern, None
    head, sep, tail = pattern.rpartition(":")
    if sep and tail.isdigit() and not head.endswith(":"):
        pat_host, pat_port = head, int(tail)
    if pat_port is not None and pat_port != port:
        return False
    labels = host.rstrip(".").split(".")
    if pat_host.startswith("*."):
        suffix = pat_host[2:].split(".")
        return len(labels) > len(suffix) and labels[-len(suffix) :] == suffix
    return labels == pat_host.split(".")


@st.composite
def host_and_patterns(draw: st.DrawFn) -> tuple[str, int | None, list[str]]:
    labels = draw(st.lists(LABEL, min_size=1, max_size=4))
    host = ".".join(labels) + draw(st.sampled_from(["", "."]))
    port = draw(st.none() | PORT)
    patterns = []
    for _ in range(draw(st.integers(1, 4))):
        cut = draw(st.integers(0, len(labels)))
        suffix = labels[cut:] or draw(st.lists(LABEL, min_size=1, max_size=2))
        kind = draw(st.sampled_from(["exact", "wild", "other", "glued"]))
        if kind == "exact":
            pattern = ".".join(labels)
        elif kind == "wild":
            pattern = "*." + ".".join(suffix)
        elif kind == "glued":  # *.example.com must not match xexample.com
            pattern = "*." + ".".join(suffix)
            host = "x" + host
        else:
            pattern = draw(NAME)
        if draw(st.booleans()):
            pattern += f":{draw(st.sampled_from([port or 443, 443, 80, 8443]))}"
        patterns.append(pattern)
    return host, port, patterns


@FUZZ
@given(host_and_patterns())
def test_host_allowed_matches_whole_labels(case: tuple[str, int | None, list[str]]) -> None:
    host, port, patterns = case
    target = _target(host, port)
    expected = any(_label_match(target.host, target.effective_port, p) for p in patterns)
    assert host_allowed(target, patterns) is expected
    # A list allows what any one of its patterns allows.
    assert host_allowed(target, patterns) is any(host_allowed(target, [p]) for p in patterns)


@FUZZ
@given(AUTHORITY, SCHEME)
def test_host_allowed_empty_list_allows_and_own_host_matches(authority: str, scheme: str) -> None:
    target = parse_authority(scheme, authority)
    assert host_allowed(target, [])
    host = target.host.rstrip(".")
    assert host_allowed(target, [host])
    assert host_allowed(target, [f"{host}:{target.effective_port}"])
    other = target.effective_port % 65535 + 1
    assert not host_allowed(target, [f"{host}:{other}"])


@FUZZ
@given(NAME, LABEL)
def test_wildcard_never_matches_its_own_suffix_or_a_lookalike(suffix: str, label: str) -> None:
    assume(not f"{suffix}.{label}".endswith("." + suffix))  # e.g. 0.0 really is under *.0
    pattern = ["*." + suffix]
    assert host_allowed(_target(f"{label}.{suffix}"), pattern)
    assert not host_allowed(_target(suffix), pattern)
    assert not host_allowed(_target(label + suffix), pattern)
    assert not host_allowed(_target(f"{suffix}.{label}"), pattern)


# ---- proxy.headers ---------------------------------------------------------------------------

HEADER_NAMES = [
    b"host", b"Host", b"authorization", b"Authorization", b"x-forwarded-for", b"X-Forwarded-For",
    b"connection", b"Connection", b"keep-alive", b"te", b"trailer", b"transfer-encoding", b"upgrade",
    b"proxy-authorization", b"Proxy-Connection", b"content-length", b"expect", b"x-upstream-host",
    b"x-a", b"X-A", b"x-b", b"accept", b"cookie", b"set-cookie", b"sec-websocket-key",
    b"Sec-WebSocket-Protocol", b"sec-websocket-x",
]  # fmt: skip
TOKEN_NAME = st.builds(
    lambda a, rest: (a + rest).encode(),
    st.sampled_from(string.ascii_letters),
    st.text(alphabet=string.ascii_letters + string.digits + "-", max_size=8),
)
BEARER = st.text(alphabet=string.ascii_letters + string.digits + "._-", min_size=1, max_size=40).map(
    str.encode
)
FIELD_VALUE = st.text(alphabet=string.printable.strip("\r\n\x0b\x0c") + "\t", max_size=20).map(
    lambda v: v.encode()
)
CONNECTION_VALUE = st.lists(st.sampled_from(HEADER_NAMES) | TOKEN_NAME, max_size=3).map(
    lambda names: b", ".join(n.upper() if i % 2 else n for i, n in enumerate(names))
)


@st.composite
def header_lists(draw: st.DrawFn) -> list[tuple[bytes, bytes]]:
    out = []
    for _ in range(draw(st.integers(0, 12))):
        name = draw(st.sampled_from(HEADER_NAMES) | TOKEN_NAME)
        value = draw(CONNECTION_VALUE if name.lower() == b"connection" else FIELD_VALUE)
        out.append((name, value))
    return out


def _removed(headers: list[tuple[bytes, bytes]], drop: bytes | None) -> Callable[[bytes], bool]:
    named = {
        t.strip().lower()
        for n, v in headers
        if n.lower() == b"connection"
        for t in v.split(b",")
        if t.strip()
    }

    def removed(name: bytes) -> bool:
        lower = name.lower()
        return (
            lower in hdr.HOP_BY_HOP
            or lower.startswith(b"proxy-")
            or lower in named
            or lower in (b"host", b"expect", drop)
        )

    return removed


@FUZZ
@given(
    header_lists(),
    AUTHORITY.map(str.encode),
    BEARER,
    st.none() | st.sampled_from([b"127.0.0.1", b"::1", b"10.1.2.3"]),
    st.none() | st.sampled_from([b"x-upstream-host", b"x-a"]),
)
def test_outbound_headers(
    headers: list[tuple[bytes, bytes]],
    authority: bytes,
    bearer: bytes,
    client_ip: bytes | None,
    drop: bytes | None,
) -> None:
    out, replaced = hdr.outbound(headers, authority=authority, bearer=bearer, client_ip=client_ip, drop=drop)
    removed = _removed(headers, drop)
    # Host first, exactly one Authorization and it is our Bearer, last.
    assert out[0] == (b"host", authority)
    assert out[-1] == (b"authorization", b"Bearer " + bearer)
    assert [n for n, _ in out if n.lower() == b"authorization"] == [b"authorization"]
    assert [n for n, _ in out if n.lower() == b"host"] == [b"host"]
    # Nothing hop-by-hop (by name, by proxy- prefix or declared in Connection) goes out.
    assert not [n for n, _ in out[1:-1] if removed(n) and n != hdr.XFF]  # our XFF: see below
    # X-Forwarded-For: one header, the inbound list (in order) with the client appended.
    xff_in = [v.strip() for n, v in headers if n.lower() == hdr.XFF and not removed(n)]
    xff_out = [v for n, v in out if n.lower() == hdr.XFF]
    if xff_in or client_ip is not None:
        want = b", ".join(v for v in [*xff_in, *([client_ip] if client_ip else [])] if v)
        assert xff_out == [want]
    else:
        assert xff_out == []
    # Everything else keeps its order and its duplicates.
    chunked = any(n.lower() == b"transfer-encoding" for n, _ in headers)

    def plain(n: bytes) -> bool:
        lower = n.lower()
        return not (
            removed(n) or lower in (b"authorization", hdr.XFF) or (chunked and lower == b"content-length")
        )

    assert [h for h in out if plain(h[0])] == [h for h in headers if plain(h[0])]
    if replaced:
        assert any(n.lower() == b"authorization" for n, _ in headers)
    if any(n.lower() == b"authorization" and not removed(n) for n, _ in headers):
        assert replaced


@FUZZ
@given(header_lists(), BEARER)
def test_outbound_websocket_headers_have_no_host_and_one_bearer(
    headers: list[tuple[bytes, bytes]], bearer: bytes
) -> None:
    out, _ = hdr.outbound(headers, authority=b"a.example", bearer=bearer, client_ip=None, websocket=True)
    assert out[-1] == (b"authorization", b"Bearer " + bearer)
    assert sum(n.lower() == b"authorization" for n, _ in out) == 1
    assert not [n for n, _ in out if n.lower() == b"host" or n.lower() in hdr.WEBSOCKET_OWN]


@FUZZ
@given(header_lists())
def test_inbound_headers_drop_only_hop_by_hop_and_keep_order(headers: list[tuple[bytes, bytes]]) -> None:
    named = {
        t.strip().lower()
        for n, v in headers
        if n.lower() == b"connection"
        for t in v.split(b",")
        if t.strip()
    }

    def hop(name: bytes) -> bool:
        lower = name.lower()
        return lower in hdr.HOP_BY_HOP or lower.startswith(b"proxy-") or lower in named

    assert hdr.inbound(headers) == [h for h in headers if not hop(h[0])]


# ---- routing.audience ------------------------------------------------------------------------


@FUZZ
@given(SCHEME.map(lambda s: s.upper() if len(s) == 4 else s), AUTHORITY)
def test_dynamic_audience_is_lower_case_without_port(scheme: str, authority: str) -> None:
    target = parse_authority(scheme, authority)
    aud = audience.dynamic(target)
    assert aud == aud.lower()
    prefix, _, host = aud.partition("://")
    assert prefix == scheme.lower()
    assert host == target.host.rstrip(".")
    assert not host.endswith(".")
    if host.startswith("["):
        assert host.endswith("]")  # IPv6 stays bracketed, nothing after it
    else:
        assert ":" not in host
    # The same host on any port, or spelt with a trailing dot, is the same audience.
    dotted = target.host if ":" in target.host else target.host.rstrip(".") + "."
    other = parse_authority(scheme, _authority(dotted, 8443))
    assert audience.dynamic(other) == aud
    assert audience.Resolver().for_target(target) == (aud,)


@FUZZ
@given(st.lists(st.text(max_size=12), max_size=8), AUTHORITY)
def test_normalize_is_sorted_deduplicated_and_idempotent(auds: list[str], authority: str) -> None:
    norm = audience.normalize(auds)
    assert list(norm) == sorted(set(auds))
    assert audience.normalize(norm) == norm
    assert audience.normalize(reversed(auds)) == norm
    assert audience.key(norm) == ",".join(norm)
    resolver = audience.Resolver(auds)
    target = parse_authority("https", authority)
    assert resolver.for_target(target) == (norm if norm else (audience.dynamic(target),))


# ---- routing.egress.EgressProxies ------------------------------------------------------------

NO_PROXY_ENTRY = st.one_of(
    NAME,
    NAME.map(lambda n: "." + n),
    NAME.map(lambda n: "*." + n),
    IPV4.map(str),
    IPV6.map(str),
    IPV6.map(lambda a: f"[{a}]"),
    st.builds(lambda n, p: f"{n}:{p}", NAME | IPV4.map(str), PORT),
    st.builds(lambda a, p: f"[{a}]:{p}", IPV6, PORT),
    st.builds(lambda a, m: f"{a}/{m}", IPV4, st.integers(0, 40)),
    st.just("*"),
    st.text(alphabet=string.printable + "\xb2\u0663", max_size=12),
)
NO_PROXY = st.lists(NO_PROXY_ENTRY, max_size=6).flatmap(
    lambda entries: st.sampled_from([",", ", ", " "]).map(lambda sep: sep.join(entries))
)
LOOPBACK_HOST = st.one_of(
    st.just("localhost"),
    NAME.map(lambda n: n + ".localhost"),
    st.ip_addresses(network="127.0.0.0/8").map(str),
    st.just("[::1]"),
    st.ip_addresses(network="127.0.0.0/8").map(lambda a: f"[::ffff:{a}]"),
).flatmap(lambda h: st.sampled_from([h, h + "."]) if not h.startswith("[") else st.just(h))


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _egress(no_proxy: str, key: str = "NO_PROXY") -> EgressProxies:
    return EgressProxies.from_environ(
        {"HTTP_PROXY": "http://egress.example:3128", "HTTPS_PROXY": "egress.example:3129", key: no_proxy}
    )


@FUZZ
@given(NO_PROXY.filter(lambda v: v.isascii()), st.sampled_from(["NO_PROXY", "no_proxy"]), AUTHORITY, SCHEME)
def test_no_proxy_parsing_never_crashes_and_answers_every_target(
    no_proxy: str, key: str, authority: str, scheme: str
) -> None:
    egress = _egress(no_proxy, key)
    proxy = egress.proxy_for(parse_authority(scheme, authority))
    assert proxy in (None, egress.http if scheme == "http" else egress.https)
    if "*" in no_proxy.replace(",", " ").split():
        assert proxy is None and not egress.active


@FUZZ
@given(NO_PROXY)
@example("example.com:²")
@example("[::1]:²")
def test_no_proxy_with_any_text_never_crashes(no_proxy: str) -> None:
    _egress(no_proxy)


@FUZZ
@given(NO_PROXY, LOOPBACK_HOST, st.none() | PORT, SCHEME)
def test_loopback_is_never_proxied(no_proxy: str, host: str, port: int | None, scheme: str) -> None:
    try:
        egress = _egress(no_proxy)
    except ValueError:  # the NO_PROXY crash above; not what this property is about
        egress = _egress("")
    assert egress.proxy_for(parse_authority(scheme, _authority(host, port))) is None


@FUZZ
@given(NAME, LABEL, st.none() | PORT, SCHEME)
def test_no_proxy_domain_rules(name: str, label: str, port: int | None, scheme: str) -> None:
    assume(not _is_ip(name) and not _is_ip(f"{label}.{name}") and not _is_ip(label + name))  # names only
    sub = parse_authority(scheme, _authority(f"{label}.{name}", port))
    same = parse_authority(scheme, _authority(name, port))
    glued = parse_authority(scheme, _authority(label + name, port))
    assert _egress(name).proxy_for(sub) is None and _egress(name).proxy_for(same) is None
    assert _egress("." + name).proxy_for(sub) is None and _egress("." + name).proxy_for(same) is not None
    assert _egress("*." + name).proxy_for(same) is not None
    assert _egress(name).proxy_for(glued) is not None


# ---- routing.guard ---------------------------------------------------------------------------

DEFAULT_GUARD = Guard(parse_cidrs(DEFAULT_DENIED_CIDRS))
NUMERIC_HOST = st.one_of(
    st.builds(
        lambda parts, dot: ".".join(parts) + dot,
        st.lists(
            st.text(alphabet="0123456789abcdef", max_size=9).map(lambda h: "0x" + h)
            | st.text(alphabet=string.digits, min_size=1, max_size=11),
            min_size=1,
            max_size=5,
        ),
        st.sampled_from(["", "."]),
    ),
    IPV4.map(str),
    IPV4.map(lambda a: str(int(a))),
    IPV4.map(lambda a: hex(int(a))),
    IPV4.map(lambda a: ".".join(f"0{int(p):o}" for p in str(a).split("."))),
    NAME,
)


def _inet_aton(text: str) -> ipaddress.IPv4Address | None:
    try:
        return ipaddress.IPv4Address(socket.inet_aton(text))
    except OSError:
        return None


@FUZZ
@given(NUMERIC_HOST)
def test_literal_address_agrees_with_inet_aton_and_ipaddress(host: str) -> None:
    if not parse_authority_ok(host):
        return
    got = literal_address(host)
    assert got == _inet_aton(host.rstrip("."))
    try:
        strict = ipaddress.IPv4Address(host)
    except ValueError:
        return
    assert got == strict


@FUZZ
@given(IPV6)
def test_literal_address_reads_bracketed_ipv6(address: ipaddress.IPv6Address) -> None:
    assert literal_address(f"[{address}]") == address
    assert literal_address(f"[{address.exploded.upper()}]".lower()) == address


def parse_authority_ok(host: str) -> bool:
    try:
        parse_authority("http", host)
    except ValueError:
        return False
    return True


NETWORK_V4 = st.builds(
    lambda a, p: ipaddress.IPv4Network(f"{a}/{p}", strict=False), IPV4, st.integers(8, 32)
) | st.sampled_from([n for n in parse_cidrs(DEFAULT_DENIED_CIDRS) if n.version == 4])
NETWORK_V6 = st.builds(
    lambda a, p: ipaddress.IPv6Network(f"{a}/{p}", strict=False), IPV6, st.integers(16, 128)
) | st.sampled_from([n for n in parse_cidrs(DEFAULT_DENIED_CIDRS) if n.version == 6])


def _inside(network: Any, data: st.DataObject) -> Any:
    offset = data.draw(st.integers(0, network.num_addresses - 1))
    return network.network_address + offset


@FUZZ
@given(NETWORK_V4, st.data())
def test_every_ipv4_address_in_a_denied_range_is_denied_in_every_spelling(
    network: ipaddress.IPv4Network, data: st.DataObject
) -> None:
    guard = Guard([network])
    address = _inside(network, data)
    assert guard.denied(address)
    assert guard.denied(ipaddress.IPv6Address(f"::ffff:{address}"))  # IPv4-mapped
    if int(address) > 1:
        assert guard.denied(ipaddress.IPv6Address(f"::{address}"))  # IPv4-compatible
    for spelling in (
        str(address),
        str(int(address)),
        hex(int(address)),
        ".".join(f"0{int(p):o}" for p in str(address).split(".")),
        f"[::ffff:{address}]",
        f"[::ffff:{ipaddress.IPv6Address(f'::ffff:{address}').exploded[-9:]}]",
        str(address) + ".",
    ):
        assert guard.denied_literal(spelling), spelling


@FUZZ
@given(NETWORK_V6, st.data())
def test_every_ipv6_address_in_a_denied_range_is_denied(
    network: ipaddress.IPv6Network, data: st.DataObject
) -> None:
    guard = Guard([network])
    address = _inside(network, data)
    assert guard.denied(address)
    assert guard.denied_literal(f"[{address}]")
    assert guard.denied_literal(f"[{address.exploded.upper()}]".lower())


@FUZZ
@given(IPV4, NETWORK_V4)
def test_an_address_outside_every_range_is_allowed(address: ipaddress.IPv4Address, net: Any) -> None:
    guard = Guard([net])
    if address in net:
        return
    assert not guard.denied(address)
    assert not guard.denied(ipaddress.IPv6Address(f"::ffff:{address}"))
    assert not guard.denied_literal(str(address))


@FUZZ
@given(st.ip_addresses(network="169.254.0.0/16") | st.ip_addresses(network="0.0.0.0/8"))
def test_default_list_denies_metadata_and_unspecified_ranges(address: ipaddress.IPv4Address) -> None:
    assert DEFAULT_GUARD.denied_literal(str(address))
    assert DEFAULT_GUARD.denied_literal(f"[::ffff:{address}]")
    assert DEFAULT_GUARD.denied_literal(str(int(address)))


# ---- config durations and flags --------------------------------------------------------------

_NS = {
    "ns": 1,
    "us": 10**3,
    "µs": 10**3,
    "μs": 10**3,
    "ms": 10**6,
    "s": 10**9,
    "m": 60 * 10**9,
    "h": 3600 * 10**9,
}
_GO_PART = re.compile(r"([0-9]*)(?:\.([0-9]*))?(ns|us|µs|μs|ms|s|m|h)")
_MAX_NS = (1 << 63) - 1


def go_parse_duration(text: str) -> float:
    """Go's ``time.ParseDuration`` (int64 nanoseconds, ASCII digits, overflow is an error), in seconds."""
    s = text
    neg = s[:1] == "-"
    if s[:1] in "+-" and s:
        s = s[1:]
    if s == "0":
        return 0.0
    if not s:
        raise ValueError("invalid duration")
    total, pos = 0, 0
    while pos < len(s):
        m = _GO_PART.match(s, pos)
        if m is None or (not m.group(1) and not m.group(2)):
            raise ValueError("invalid duration")
        unit = _NS[m.group(3)]
        whole = int(m.group(1) or "0")
        frac = m.group(2) or ""
        if whole > _MAX_NS // unit:
            raise ValueError("overflow")
        ns = whole * unit + (int(frac) * unit // 10 ** len(frac) if frac else 0)
        total += ns
        if total > _MAX_NS + (1 if neg else 0):
            raise ValueError("overflow")
        pos = m.end()
    return (-total if neg else total) / 1e9


DURATION_TEXT = st.one_of(
    st.lists(
        st.tuples(
            st.builds(
                lambda whole, frac: whole + frac if whole or frac[1:] else "0",
                st.text(alphabet=string.digits, max_size=6),
                st.sampled_from(["", "."]).flatmap(
                    lambda dot: st.text(alphabet=string.digits, max_size=4 if dot else 0).map(
                        lambda f: dot + f
                    )
                ),
            ),
            st.sampled_from(list(_NS)),
        ),
        min_size=1,
        max_size=4,
    ).map(lambda parts: "".join(n + u for n, u in parts)),
    st.text(alphabet="0123456789.+-nsuµμmh ", max_size=12),
).flatmap(lambda d: st.sampled_from([d, "-" + d, "+" + d]))


@FUZZ
@given(DURATION_TEXT)
@example("1h30m")
@example("1.5h")
@example(".5s")
@example("1.s")
@example("-0")
def test_durations_parse_like_go(text: str) -> None:
    try:
        want: float | None = go_parse_duration(text.strip())
    except ValueError:
        want = None
    try:
        got: float | None = parse_duration(text)
    except ValueError:
        got = None
    if want is None:
        assert got is None, (text, got)
    else:
        # Go truncates each part to whole nanoseconds; the float sum keeps the fractions.
        assert got == pytest.approx(want, rel=1e-9, abs=1e-8), text
    assert parse_duration("1h30m") == 5400


@FUZZ
@given(st.text(max_size=30))
def test_duration_parser_raises_only_value_error(text: str) -> None:
    try:
        parse_duration(text)
    except ValueError:
        pass


@pytest.mark.parametrize("text", ["\u0661s", "10000000000000000000s", "1" + "0" * 400 + "s"])
def test_durations_reject_what_go_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


def _flag_rows() -> list[Any]:
    return list(config.PROXY_FLAGS)


FLAG_VALUE = st.one_of(
    st.text(max_size=24),
    DURATION_TEXT,
    AUTHORITY,
    st.sampled_from(
        ["", " ", "0", "-1", "1", "true", "false", ":0", "[::1]:0", "*", "*.x", "=", "a=b", "0s"]
    ),
    mutated(st.sampled_from(["127.0.0.1:8080", "30s", "https", "RS256", "k=v", "10.0.0.0/8", "/metrics"])),
)


def _load(argv: list[str], env: dict[str, str]) -> config.Settings | None:
    """config.load, mapping the only allowed failures (ConfigError, argparse's exit 2) to None."""
    try:
        return config.load(argv, env)
    except ConfigError:
        return None
    except SystemExit as exit_:
        # argparse: 2 for a usage error; 0 only when the value itself asked for help ("-h", "--he").
        asked_help = any(a.startswith(("-h", "--h")) for a in argv[1:])
        assert exit_.code == 2 or (exit_.code == 0 and asked_help), (argv, exit_.code)
        return None


@FEW
@given(st.sampled_from(_flag_rows()), FLAG_VALUE, st.sampled_from(["argv", "argv=", "env"]))
def test_any_value_for_any_flag_is_a_config_error_at_worst(row: Any, value: str, via: str) -> None:
    if via == "env":
        if "\x00" in value:
            return  # an environment cannot hold NUL
        argv, env = [], {row.env: value}
    elif via == "argv=":
        argv, env = [f"--{row.name}={value}"], {}
    else:
        argv, env = [f"--{row.name}", value], {}
    got = _load(argv, env)
    if got is not None and row.name == "listen-addr":
        assert (got.listen_host, got.listen_port) == values.listen_addr(value)


@FEW
@given(
    st.sampled_from(["HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "NO_PROXY"]),
    st.one_of(
        mutated(st.sampled_from(["http://proxy:3128", "https://[::1]:3128", "user:pw@proxy"])), st.text()
    ),
)
@example("HTTP_PROXY", "http://[::1")
@example("HTTPS_PROXY", "http://[zz]:80")
def test_any_proxy_variable_is_a_config_error_at_worst(name: str, value: str) -> None:
    if "\x00" in value:
        return
    _load([], {name: value})


@FEW
@given(
    st.sampled_from(["HTTP_PROXY", "HTTPS_PROXY"]),
    mutated(st.sampled_from(["http://proxy:3128", "https://proxy.example:8443", "user:pw@proxy"])).filter(
        lambda v: "[" not in v and "]" not in v and "\x00" not in v
    ),
)
def test_proxy_variables_without_brackets_are_a_config_error_at_worst(name: str, value: str) -> None:
    try:
        EgressProxies.from_environ({name: value})
    except EgressConfigError:
        pass
    _load([], {name: value})
