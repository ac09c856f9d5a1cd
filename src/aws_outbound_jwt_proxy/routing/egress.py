"""Which egress proxy an upstream call goes through, with Go's ``http.ProxyFromEnvironment`` rules.

Pure: :meth:`EgressProxies.from_environ` reads a mapping once at start-up and
:meth:`EgressProxies.proxy_for` answers per target, no I/O.

* ``HTTPS_PROXY`` for https upstreams, ``HTTP_PROXY`` for http upstreams; the
  upper-case name wins over the lower-case one when both are set and non-empty.
  A value without a scheme means ``http://``.
* ``NO_PROXY``: comma- or space-separated; ``*`` disables proxying; entries are
  IP addresses, CIDR ranges, host names (``example.com`` matches it and its
  subdomains; ``.example.com`` and ``*.example.com`` only the subdomains),
  each optionally with ``:port``.
* ``localhost`` and loopback addresses are never proxied.

A proxy URL may carry ``user:password@``: it is used for ``Proxy-Authorization``
and never shown (:func:`redact`).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from .target import Target

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class EgressConfigError(ValueError):
    """A proxy variable that cannot be used; the message names the variable."""


def _env_any(env: Mapping[str, str], *names: str) -> tuple[str, str] | None:
    for name in names:
        value = env.get(name, "").strip()
        if value:
            return name, value
    return None


def _proxy_url(name: str, value: str) -> str:
    url = value if "://" in value else "http://" + value
    try:
        parts = urlsplit(url)
    except ValueError as exc:
        raise EgressConfigError(f"{name}: invalid proxy URL ({exc})") from None
    if parts.scheme not in ("http", "https"):
        raise EgressConfigError(
            f"{name}: unsupported proxy scheme {parts.scheme!r} (use http:// or https://)"
        )
    if not parts.hostname:
        raise EgressConfigError(f"{name}: no host in proxy URL {redact(url)!r}")
    try:
        parts.port  # noqa: B018 - validates the port
    except ValueError:
        raise EgressConfigError(f"{name}: invalid port in proxy URL {redact(url)!r}") from None
    return url


def redact(url: str) -> str:
    """The URL with any ``user:password@`` replaced by ``***@`` (for logs)."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return parts._replace(netloc="***@" + parts.netloc.rpartition("@")[2]).geturl()


@dataclass(frozen=True, slots=True)
class _NoProxyRule:
    host: str = ""  # lower-case name without a leading dot ("" for address rules)
    subdomains_only: bool = False
    network: IPNetwork | None = None
    port: int | None = None

    def matches(
        self, host: str, address: ipaddress.IPv4Address | ipaddress.IPv6Address | None, port: int
    ) -> bool:
        if self.port is not None and self.port != port:
            return False
        if self.network is not None:
            return address is not None and address in self.network
        if address is not None:
            return False
        if host == self.host:
            return not self.subdomains_only
        return host.endswith("." + self.host)


def _split_host_port(entry: str) -> tuple[str, int | None]:
    if entry.startswith("["):
        end = entry.find("]")
        rest = entry[end + 1 :]
        port = int(rest[1:]) if rest.startswith(":") and _is_port(rest[1:]) else None
        return entry[1:end], port
    if entry.count(":") == 1:
        host, _, port_text = entry.partition(":")
        if _is_port(port_text):
            return host, int(port_text)
    return entry, None


def _is_port(text: str) -> bool:
    return text.isascii() and text.isdigit() and len(text) <= 5


def _no_proxy_rules(value: str) -> tuple[bool, tuple[_NoProxyRule, ...]]:
    rules: list[_NoProxyRule] = []
    for raw in value.replace(" ", ",").split(","):
        entry = raw.strip().lower()
        if not entry:
            continue
        if entry == "*":
            return True, ()
        if "/" in entry:
            try:
                rules.append(_NoProxyRule(network=ipaddress.ip_network(entry, strict=False)))
            except ValueError:
                pass  # Go ignores entries it cannot parse
            continue
        host, port = _split_host_port(entry)
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            subdomains_only = host.startswith((".", "*."))
            name = host.lstrip("*").lstrip(".").rstrip(".")
            if name:
                rules.append(_NoProxyRule(host=name, subdomains_only=subdomains_only, port=port))
            continue
        rules.append(_NoProxyRule(network=ipaddress.ip_network(address), port=port))
    return False, tuple(rules)


@dataclass(frozen=True, slots=True)
class EgressProxies:
    """The proxy environment, parsed once."""

    http: str | None = None
    https: str | None = None
    no_proxy_all: bool = False
    no_proxy: tuple[_NoProxyRule, ...] = field(default=())

    @classmethod
    def from_environ(cls, env: Mapping[str, str]) -> EgressProxies:
        """Read ``HTTP(S)_PROXY``/``NO_PROXY`` (either case); raises :class:`EgressConfigError`."""
        http = _env_any(env, "HTTP_PROXY", "http_proxy")
        https = _env_any(env, "HTTPS_PROXY", "https_proxy")
        no_proxy = _env_any(env, "NO_PROXY", "no_proxy")
        all_, rules = _no_proxy_rules(no_proxy[1] if no_proxy else "")
        return cls(
            http=_proxy_url(*http) if http else None,
            https=_proxy_url(*https) if https else None,
            no_proxy_all=all_,
            no_proxy=rules,
        )

    @property
    def active(self) -> bool:
        return (self.http is not None or self.https is not None) and not self.no_proxy_all

    def proxy_for(self, target: Target) -> str | None:
        """The proxy URL for a call to ``target``, or None to connect directly."""
        url = self.https if target.scheme == "https" else self.http
        if url is None or self.no_proxy_all:
            return None
        host = target.host.strip("[]").rstrip(".")
        if host == "localhost" or host.endswith(".localhost"):
            return None
        try:
            address: ipaddress.IPv4Address | ipaddress.IPv6Address | None = ipaddress.ip_address(host)
        except ValueError:
            address = None
        if address is not None and (
            address.is_loopback or (isinstance(address, ipaddress.IPv6Address) and _mapped_loopback(address))
        ):
            return None
        port = target.effective_port
        if any(rule.matches(host, address, port) for rule in self.no_proxy):
            return None
        return url


def _mapped_loopback(address: ipaddress.IPv6Address) -> bool:
    mapped = address.ipv4_mapped
    return mapped is not None and mapped.is_loopback
