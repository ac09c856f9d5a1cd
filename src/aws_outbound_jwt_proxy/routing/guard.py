"""The SSRF guard: upstream addresses that header, Host and forward-proxy routing may never reach.

Two lists: the deny list (``--denied-upstream-cidrs``) and our own listeners
(the proxy's and the metrics listener's bound addresses: a request aimed there
would loop through the proxy or read its metrics).

Pure: built once from ``--denied-upstream-cidrs``. Two checks, one rule:

* :meth:`Guard.denied_literal` for a target written as an address, in any
  form a resolver accepts (``169.254.169.254``, ``[::ffff:169.254.169.254]``,
  ``2852039166``, ``0xa9fea9fe``, ``0251.0376.0251.0376``, ``169.254.43518``),
  checked before any token is fetched;
* :meth:`Guard.denied` for each address a name resolved to, checked by the
  dialer, which then connects only to an address that passed (no second lookup).

IPv4-mapped and IPv4-compatible IPv6 addresses are checked as the IPv4
address they carry. The default list covers link-local (instance metadata,
the ECS and EKS credential endpoints), EC2's IPv6 metadata range, Alibaba's
metadata address and the unspecified addresses.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

DEFAULT_DENIED_CIDRS = (
    "169.254.0.0/16",
    "fe80::/10",
    "fd00:ec2::/32",
    "0.0.0.0/8",
    "::/128",
    "100.100.100.200/32",
)

# The numeric IPv4 spellings inet_aton accepts: 1 to 4 parts, decimal, octal or hex.
_NUMERIC = re.compile(r"^(?:0x[0-9a-f]*|[0-9]+)(?:\.(?:0x[0-9a-f]*|[0-9]+)){0,3}$")


def parse_cidrs(values: Iterable[str]) -> tuple[IPNetwork, ...]:
    """``["10.0.0.0/8", "fe80::/10", "1.2.3.4"]`` → networks; raises ValueError naming a bad entry."""
    out: list[IPNetwork] = []
    for value in values:
        text = value.strip()
        if not text:
            continue
        try:
            out.append(ipaddress.ip_network(text, strict=False))
        except ValueError:
            raise ValueError(f"invalid CIDR {value!r} (use e.g. 169.254.0.0/16 or fe80::/10)") from None
    return tuple(out)


def literal_address(host: str) -> IPAddress | None:
    """``host`` (as in a Target: lower-case, IPv6 in brackets) as an address, or None for a name."""
    if host.startswith("["):
        return ipaddress.IPv6Address(host[1:-1])
    name = host.rstrip(".").lower()
    if not _NUMERIC.match(name):
        return None
    try:
        return ipaddress.IPv4Address(socket.inet_aton(name))
    except OSError:
        return None


def _embedded_ipv4(address: IPAddress) -> ipaddress.IPv4Address | None:
    if isinstance(address, ipaddress.IPv4Address):
        return None
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    packed = address.packed
    if packed[:12] == bytes(12) and packed[12:] != bytes(4) and packed[12:] != b"\x00\x00\x00\x01":
        return ipaddress.IPv4Address(packed[12:])  # IPv4-compatible ::a.b.c.d (deprecated, still routed)
    return None


PROXY_LISTENER = "proxy"
METRICS_LISTENER = "metrics"


@dataclass(frozen=True, slots=True)
class Listener:
    """One of our own listeners: ``host`` as bound (``""``, ``0.0.0.0`` or ``::`` = every address)."""

    host: str
    port: int
    kind: str  # PROXY_LISTENER or METRICS_LISTENER

    def reached_by(self, address: IPAddress, port: int, is_local: Callable[[IPAddress], bool]) -> bool:
        if port != self.port:
            return False
        address = _embedded_ipv4(address) or address
        bound = self.host.strip("[]")
        if bound in ("", "0.0.0.0", "::"):
            return is_local(address)
        try:
            return (_embedded_ipv4(own := ipaddress.ip_address(bound)) or own) == address
        except ValueError:  # a name: its loopback addresses
            return bound == "localhost" and address.is_loopback


def _never_local(address: IPAddress) -> bool:
    return address.is_loopback or address.is_unspecified


class Guard:
    """The deny list, and our own listeners (a request there would loop, or read our metrics).

    An empty deny list allows every address; the listener check stays on.
    ``is_local`` says whether an address belongs to this machine (the dialer
    passes a real check; the default knows only loopback and unspecified).
    """

    def __init__(
        self,
        denied: Iterable[IPNetwork],
        listeners: Iterable[Listener] = (),
        is_local: Callable[[IPAddress], bool] = _never_local,
    ) -> None:
        self.networks = tuple(denied)
        self.listeners = tuple(listeners)
        self.is_local = is_local
        self._literal: dict[str, IPAddress | None] = {}

    @property
    def active(self) -> bool:
        """Whether the dialer must resolve names itself and check every address."""
        return bool(self.networks) or bool(self.listeners)

    def own(self, address: IPAddress, port: int) -> str | None:
        """The kind of our listener that ``address:port`` reaches, or None."""
        for listener in self.listeners:
            if listener.reached_by(address, port, self.is_local):
                return listener.kind
        return None

    def own_literal(self, host: str, port: int) -> str | None:
        """:meth:`own` for a target written as an address (any spelling); None for names."""
        if not self.listeners:
            return None
        address = self._address(host)
        return None if address is None else self.own(address, port)

    def _address(self, host: str) -> IPAddress | None:
        try:
            return self._literal[host]
        except KeyError:
            if len(self._literal) >= 4096:
                self._literal.clear()
            address = self._literal[host] = literal_address(host)
            return address

    def denied(self, address: IPAddress) -> bool:
        embedded = _embedded_ipv4(address)
        for net in self.networks:
            if address in net or (embedded is not None and embedded in net):
                return True
        return False

    def denied_literal(self, host: str) -> bool:
        """``host`` is an address literal (any spelling) in the deny list. Cached per host."""
        if not self.networks:
            return False
        address = self._address(host)
        return address is not None and self.denied(address)
