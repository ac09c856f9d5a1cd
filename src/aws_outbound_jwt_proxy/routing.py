"""Request → upstream target (REFERENCE.md A2), plus the upstream allow-list.

Pure logic: :class:`Router` is built once from the settings and resolves the
ASGI header list of each request to a :class:`Target` or raises
:class:`RouteError` with the status and body to answer with.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from .config import Settings

DEFAULT_PORTS = {"http": 80, "https": 443}

# A DNS name or IPv4 literal: letters, digits, '-', '_' and dots.
_NAME = re.compile(r"^[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,251}[A-Za-z0-9_])?\.?$")


@dataclass(frozen=True, slots=True)
class Target:
    """Where a request goes. ``host`` is lower-case, IPv6 kept in brackets."""

    scheme: str
    host: str
    port: int | None  # explicit port, None = the scheme's default
    authority: str  # host[:port] as sent in the outbound Host header

    @property
    def base_url(self) -> str:
        return f"{self.scheme}://{self.authority}"

    @property
    def effective_port(self) -> int:
        return self.port if self.port is not None else DEFAULT_PORTS[self.scheme]

    @property
    def default_port(self) -> bool:
        return self.port is None or self.port == DEFAULT_PORTS[self.scheme]


class RouteError(Exception):
    """The request cannot be routed: answer ``status`` with ``body``, call nothing."""

    def __init__(self, status: int, body: str) -> None:
        super().__init__(body)
        self.status = status
        self.body = body


def parse_authority(scheme: str, value: str) -> Target:
    """Validate a plain ``host[:port]`` (IPv6 in brackets) into a Target.

    Raises ``ValueError`` naming what is wrong; never echoes control characters.
    """
    if value == "":
        raise ValueError("empty host")
    if any(ord(c) < 0x21 or ord(c) == 0x7F for c in value):
        raise ValueError("host contains whitespace or control characters")
    if "://" in value:
        raise ValueError("must be host[:port] without a scheme")
    if "/" in value or "?" in value or "#" in value or "\\" in value:
        raise ValueError("must be host[:port] without a path")
    if "@" in value:
        raise ValueError("must be host[:port] without userinfo")
    port_text: str | None = None
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            raise ValueError("unterminated IPv6 literal")
        literal = value[1:end]
        rest = value[end + 1 :]
        try:
            ipaddress.IPv6Address(literal)
        except ValueError:
            raise ValueError("invalid IPv6 literal") from None
        host = f"[{literal.lower()}]"
        if rest:
            if not rest.startswith(":"):
                raise ValueError("junk after IPv6 literal")
            port_text = rest[1:]
    else:
        name, sep, port_part = value.rpartition(":")
        if sep:
            if ":" in name:
                raise ValueError("IPv6 literals must be in brackets")
            port_text = port_part
        else:
            name = value
        if not _NAME.match(name) or ".." in name:
            raise ValueError("invalid host name")
        host = name.lower()
    port: int | None = None
    if port_text is not None:
        if not port_text.isdigit() or len(port_text) > 5 or not 1 <= int(port_text) <= 65535:
            raise ValueError("invalid port")
        port = int(port_text)
    authority = host if port is None else f"{host}:{port}"
    return Target(scheme=scheme, host=host, port=port, authority=authority)


_LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})


def is_self(target: Target, server: tuple[str, int]) -> bool:
    """The target is the listener the request came in on (a request that would loop).

    Catches a routing header or Host naming the proxy's own address; a DNS name
    that resolves to the proxy is not detectable here.
    """
    host = target.host.strip("[]").rstrip(".")
    own_host, own_port = server[0], server[1]
    if target.effective_port != own_port:
        return False
    if host == own_host:
        return True
    return host in _LOOPBACK_NAMES and own_host in _LOOPBACK_NAMES


def host_allowed(target: Target, patterns: Sequence[str]) -> bool:
    """Match against ``host``, ``host:port`` and ``*.suffix`` patterns (lower-case).

    ``*.example.com`` matches ``a.example.com`` but not ``example.com``,
    ``xexample.com`` or ``example.com.evil``. Empty patterns allow everything.
    """
    if not patterns:
        return True
    host = target.host.rstrip(".")
    for pattern in patterns:
        pat_host, pat_port = _split_pattern(pattern)
        if pat_port is not None and pat_port != target.effective_port:
            continue
        if pat_host.startswith("*."):
            suffix = pat_host[1:]  # ".example.com"
            if host.endswith(suffix) and len(host) > len(suffix):
                return True
        elif host == pat_host:
            return True
    return False


def _split_pattern(pattern: str) -> tuple[str, int | None]:
    if pattern.startswith("["):
        end = pattern.find("]")
        rest = pattern[end + 1 :]
        if rest.startswith(":") and rest[1:].isdigit():
            return pattern[: end + 1], int(rest[1:])
        return pattern, None
    name, sep, port = pattern.rpartition(":")
    if sep and port.isdigit():
        return name, int(port)
    return pattern, None


class Router:
    """Built once from the settings; :meth:`resolve` runs per request."""

    def __init__(self, settings: Settings) -> None:
        self.scheme = settings.upstream_scheme
        self.allowed = settings.allowed_upstream_hosts
        self.header_label = settings.host_header
        self.pinned: Target | None = None
        if settings.pinned:
            self.pinned = parse_authority(self.scheme, settings.upstream_host)
        # ``Host`` mode reads the request's own Host; hypercorn maps h2 :authority to it.
        self.header = settings.host_header.lower().encode("latin-1")
        self.missing_body = f"no upstream: set --upstream-host or send the header {settings.host_header}\n"

    def resolve(
        self, headers: Iterable[tuple[bytes, bytes]], server: tuple[str, int] | None = None
    ) -> Target:
        """``server`` is the proxy address the client connected to (ASGI ``scope["server"]``)."""
        if self.pinned is not None:
            return self.pinned
        wanted = self.header
        value: bytes | None = None
        for name, val in headers:
            if name == wanted:
                if value is not None and val != value:
                    raise RouteError(400, f"conflicting {self.header_label} headers\n")
                value = val
        if value is None or value.strip() == b"":
            raise RouteError(400, self.missing_body)
        try:
            target = parse_authority(self.scheme, value.decode("latin-1"))
        except ValueError as exc:
            raise RouteError(400, f"invalid {self.header_label} header: {exc}\n") from None
        if not host_allowed(target, self.allowed):
            raise RouteError(403, "upstream not allowed\n")
        if server is not None and is_self(target, server):
            raise RouteError(508, "loop detected: the upstream is this proxy\n")
        return target
