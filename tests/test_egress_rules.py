"""Egress proxy selection (Go's ProxyFromEnvironment rules) and the SSRF guard's address rules: pure."""

from __future__ import annotations

import ipaddress

import pytest

from aws_outbound_jwt_proxy.routing.egress import EgressConfigError, EgressProxies, redact
from aws_outbound_jwt_proxy.routing.guard import DEFAULT_DENIED_CIDRS, Guard, literal_address, parse_cidrs
from aws_outbound_jwt_proxy.routing.target import parse_authority

ENV = {
    "HTTPS_PROXY": "http://user:s3cret@corp-proxy:3128",
    "http_proxy": "plain-proxy:8080",
    "NO_PROXY": "internal.example, .corp ,10.0.0.0/8 api.x:8443,[fd00::1],*.wild",
}


def _proxy(env: dict[str, str], url: str) -> str | None:
    scheme, _, authority = url.partition("://")
    return EgressProxies.from_environ(env).proxy_for(parse_authority(scheme, authority))


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("https://api.example.com", "http://user:s3cret@corp-proxy:3128"),
        ("http://api.example.com", "http://plain-proxy:8080"),  # no scheme means http://
        ("https://internal.example", None),  # a name matches itself ...
        ("https://a.internal.example", None),  # ... and its subdomains
        ("https://corp", "http://user:s3cret@corp-proxy:3128"),  # .corp: subdomains only
        ("https://b.corp", None),
        ("https://x.wild", None),
        ("https://wild", "http://user:s3cret@corp-proxy:3128"),
        ("https://10.1.2.3", None),  # CIDR
        ("https://11.1.2.3", "http://user:s3cret@corp-proxy:3128"),
        ("https://api.x:8443", None),  # host:port
        ("https://api.x", "http://user:s3cret@corp-proxy:3128"),
        ("https://[fd00::1]", None),
        ("http://localhost:8080", None),  # loopback is never proxied
        ("http://127.0.0.9", None),
        ("http://[::1]", None),
        ("http://[::ffff:127.0.0.1]", None),
        ("http://svc.localhost", None),
    ],
)
def test_proxy_for_follows_go_rules(url: str, expected: str | None) -> None:
    assert _proxy(ENV, url) == expected


def test_upper_case_wins_and_star_disables() -> None:
    env = {"HTTPS_PROXY": "http://upper:1", "https_proxy": "http://lower:1"}
    assert _proxy(env, "https://a.example") == "http://upper:1"
    assert _proxy({"https_proxy": "http://lower:1"}, "https://a.example") == "http://lower:1"
    assert _proxy({**env, "no_proxy": "*"}, "https://a.example") is None
    assert _proxy({}, "https://a.example") is None
    assert not EgressProxies.from_environ({}).active


@pytest.mark.parametrize("value", ["socks5://p:1080", "http://:8080", "http://p:notaport"])
def test_unusable_proxy_url_names_the_variable(value: str) -> None:
    with pytest.raises(EgressConfigError, match=r"^HTTPS_PROXY: "):
        EgressProxies.from_environ({"HTTPS_PROXY": value})


def test_redact_hides_credentials() -> None:
    assert redact("http://user:s3cret@corp-proxy:3128") == "http://***@corp-proxy:3128"
    assert redact("http://corp-proxy:3128") == "http://corp-proxy:3128"


@pytest.mark.parametrize(
    "host",
    [
        "169.254.169.254",
        "169.254.170.2",  # ECS credentials
        "169.254.170.23",  # EKS Pod Identity
        "[fd00:ec2::254]",  # EC2 IPv6 metadata
        "[::ffff:169.254.169.254]",  # IPv4-mapped
        "[::ffff:a9fe:a9fe]",
        "[::169.254.169.254]",  # IPv4-compatible
        "2852039166",  # one decimal number
        "0xa9fea9fe",
        "0251.0376.0251.0376",  # octal parts
        "169.254.43518",  # a.b.c with a 16-bit last part
        "169.254.169.254.",
        "[fe80::1]",
        "0.0.0.0",
        "[::]",
        "100.100.100.200",
    ],
)
def test_default_deny_list_covers_every_spelling(host: str) -> None:
    assert Guard(parse_cidrs(DEFAULT_DENIED_CIDRS)).denied_literal(host)


@pytest.mark.parametrize(
    "host", ["api.example.com", "127.0.0.1", "10.0.0.1", "[::1]", "1.2.3.4", "0x.example"]
)
def test_default_deny_list_allows_the_rest(host: str) -> None:
    assert not Guard(parse_cidrs(DEFAULT_DENIED_CIDRS)).denied_literal(host)


def test_literal_address_parses_only_addresses() -> None:
    assert literal_address("2130706433") == ipaddress.ip_address("127.0.0.1")
    assert literal_address("127.1") == ipaddress.ip_address("127.0.0.1")
    assert literal_address("api.example.com") is None
    assert literal_address("1e100") is None


def test_empty_deny_list_allows_everything_and_bad_cidr_is_named() -> None:
    assert not Guard(()).active and not Guard(()).denied_literal("169.254.169.254")
    with pytest.raises(ValueError, match=r"'10\.0\.0\.0/33'"):
        parse_cidrs(["10.0.0.0/8", "10.0.0.0/33"])
