"""Where a request goes: :class:`Target` and the one parser for ``host[:port]``.

A leaf: imports nothing from the project. Routing, configuration validation,
audience derivation and metrics all describe an upstream with these values.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

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
        if "%" in literal:
            raise ValueError("IPv6 zone ids are not allowed")
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
