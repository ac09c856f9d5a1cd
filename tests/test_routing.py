"""Routing and audience: pure functions, no sockets."""

from __future__ import annotations

import pytest

from aws_outbound_jwt_proxy.config import settings as config
from aws_outbound_jwt_proxy.proxy.plan import build_router
from aws_outbound_jwt_proxy.routing import audience
from aws_outbound_jwt_proxy.routing.router import RouteError, Router, host_allowed
from aws_outbound_jwt_proxy.routing.target import Target, parse_authority


def _router(*argv: str) -> Router:
    return build_router(config.load(list(argv), env={}))


def test_pinned_ignores_header() -> None:
    r = _router("--upstream-host", "API.example.com:8443")
    t = r.resolve([(b"x-upstream-host", b"evil.example.com")])
    assert t.authority == "api.example.com:8443"
    assert t.base_url == "https://api.example.com:8443"


def test_header_mode() -> None:
    r = _router()
    t = r.resolve([(b"host", b"proxy"), (b"x-upstream-host", b"api.example.com")])
    assert (t.scheme, t.host, t.port) == ("https", "api.example.com", None)


def test_host_mode_reads_host() -> None:
    r = _router("--host-header", "Host", "--upstream-scheme", "http")
    t = r.resolve([(b"host", b"svc.internal:8080")])
    assert t.base_url == "http://svc.internal:8080"


def test_missing_header_names_flag_and_header() -> None:
    with pytest.raises(RouteError) as info:
        _router().resolve([(b"host", b"proxy")])
    assert info.value.status == 400
    assert "--upstream-host" in info.value.body
    assert "X-Upstream-Host" in info.value.body


@pytest.mark.parametrize(
    "value",
    [
        "https://api.example.com",
        "api.example.com/path",
        "user@api.example.com",
        "api example.com",
        "api.example.com\t",
        "api.example.com:0",
        "api.example.com:65536",
        "api.example.com:http",
        "api.example.com:",
        "::1",
        "[::1",
        "[nothex]:80",
        "a\x01b",
        "..",
        "",
    ],
)
def test_invalid_authority(value: str) -> None:
    with pytest.raises(ValueError):
        parse_authority("https", value)


def test_ipv6_kept_in_brackets() -> None:
    t = parse_authority("https", "[2001:DB8::1]:8443")
    assert t.host == "[2001:db8::1]"
    assert audience.dynamic(t) == "https://[2001:db8::1]"


def test_dynamic_audience_lowercases_and_strips_port() -> None:
    t = parse_authority("https", "API.Example.com:443")
    assert audience.dynamic(t) == "https://api.example.com"
    assert audience.normalize(["b", "a", "b"]) == ("a", "b")
    assert audience.key(("a", "b")) == "a,b"


def test_static_audience_set_is_normalized_once() -> None:
    s = config.load(["--token-audience", "z", "--token-audience", "a", "--token-audience", "z"], env={})
    res = audience.Resolver(s.token_audiences)
    t = parse_authority("https", "x.example.com")
    assert res.for_target(t) == ("a", "z")
    assert res.for_target(t) is res.for_target(t)


@pytest.mark.parametrize(
    ("host", "allowed"),
    [
        ("a.example.com", True),
        ("deep.a.example.com", True),
        ("example.com", False),
        ("xexample.com", False),
        ("example.com.evil", False),
        ("api.other.io:8443", True),
        ("api.other.io", False),
        ("exact.io", True),
        ("exact.io:9999", True),
        ("EXACT.IO", True),
    ],
)
def test_allow_list(host: str, allowed: bool) -> None:
    patterns = ("*.example.com", "api.other.io:8443", "exact.io")
    assert host_allowed(parse_authority("https", host), patterns) is allowed


def test_allow_list_forbidden_is_403() -> None:
    r = _router("--allowed-upstream-hosts", "*.example.com")
    with pytest.raises(RouteError) as info:
        r.resolve([(b"x-upstream-host", b"example.com.evil")])
    assert info.value.status == 403
    assert info.value.body.strip() == "upstream not allowed"


def test_conflicting_routing_headers() -> None:
    with pytest.raises(RouteError):
        _router().resolve([(b"x-upstream-host", b"a.example.com"), (b"x-upstream-host", b"b.example.com")])


def test_target_default_port() -> None:
    assert Target("https", "h", 443, "h:443").default_port
    assert not Target("https", "h", 8443, "h:8443").default_port


@pytest.mark.parametrize(
    ("value", "server", "loop"),
    [
        ("127.0.0.1:8080", ("127.0.0.1", 8080), True),
        ("localhost:8080", ("127.0.0.1", 8080), True),
        ("[::1]:8080", ("::1", 8080), True),
        ("10.0.0.5", ("10.0.0.5", 443), True),  # https default port
        ("127.0.0.1:8081", ("127.0.0.1", 8080), False),
        ("api.example.com:8080", ("127.0.0.1", 8080), False),
    ],
)
def test_routing_to_the_proxy_itself_is_a_loop(value: str, server: tuple[str, int], loop: bool) -> None:
    router = _router()
    headers = [(b"x-upstream-host", value.encode())]
    if loop:
        with pytest.raises(RouteError) as info:
            router.resolve(headers, server)
        assert info.value.status == 508
    else:
        assert router.resolve(headers, server).authority == value.lower()
