"""The interception CA: check it, mint a short-lived leaf certificate per host, serve TLS with it.

* :func:`read_certificate`, :func:`read_key` and :func:`load` check the
  ``--intercept-ca-cert`` / ``--intercept-ca-key`` files (readable PEM, a CA
  certificate allowed to sign certificates, its own private key) and raise
  ``ValueError`` with a one-line reason (:class:`CAError`, naming the file at
  fault, for the pair).
* :class:`LeafContexts` mints a leaf for a host the first time a tunnel to it
  is opened — SAN = the host, valid for :data:`LEAF_VALIDITY`, a fresh key —
  and caches the server ``ssl.SSLContext`` (ALPN ``h2`` and ``http/1.1``) per
  host, minting a new one shortly before the cached one expires.
* :func:`create_ca` makes a new CA for the ``dev-ca`` command, name-constrained
  to the hosts given.

Private keys never touch the disk. ``ssl`` loads a certificate chain and key
only from files, so each leaf's PEM goes through an anonymous pipe, opened by
its ``/dev/fd/N`` name.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
import secrets
import ssl
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey

LEAF_VALIDITY = datetime.timedelta(hours=24)
RENEW_BEFORE = datetime.timedelta(hours=1)  # a cached leaf closer than this to expiry is minted again
BACKDATE = datetime.timedelta(minutes=5)  # clients with a clock slightly behind still accept a new leaf
MAX_HOSTS = 256  # leaf contexts cached (least recently used dropped)
MAX_PEM = 1024 * 1024
ORGANIZATION = "aws-outbound-jwt-proxy"
# Name constraints of a CA for IP addresses only: permit this reserved name (RFC 6761), so no real DNS name.
NO_DNS_NAME = "invalid"

_HOST = re.compile(r"^(\*\.)?[a-z0-9_](?:[a-z0-9_.-]{0,251}[a-z0-9_])?$")


class CAError(ValueError):
    """The CA pair is unusable; ``which`` is ``"cert"`` or ``"key"``: the file to fix."""

    def __init__(self, which: str, message: str) -> None:
        super().__init__(message)
        self.which = which


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(MAX_PEM)
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror or exc}") from None


def _extension(cert: x509.Certificate, kind: type[x509.ExtensionType]) -> x509.ExtensionType | None:
    try:
        return cert.extensions.get_extension_for_class(kind).value
    except x509.ExtensionNotFound:
        return None


def read_certificate(path: str) -> x509.Certificate:
    """The CA certificate in ``path`` (the first in the file), checked; ``ValueError`` says why not."""
    try:
        cert = x509.load_pem_x509_certificate(_read(path))
    except ValueError as exc:
        if str(exc).startswith("cannot read"):
            raise
        raise ValueError(f"not a PEM certificate: {path}") from None
    constraints = _extension(cert, x509.BasicConstraints)
    if not isinstance(constraints, x509.BasicConstraints) or not constraints.ca:
        raise ValueError(f"not a CA certificate (no basicConstraints CA:TRUE): {path}")
    usage = _extension(cert, x509.KeyUsage)
    if isinstance(usage, x509.KeyUsage) and not usage.key_cert_sign:
        raise ValueError(f"the CA may not sign certificates (keyUsage without keyCertSign): {path}")
    if not isinstance(cert.public_key(), ec.EllipticCurvePublicKey | rsa.RSAPublicKey):
        raise ValueError(f"unsupported key type (use an EC or RSA CA): {path}")
    now = _now()
    if cert.not_valid_after_utc <= now:
        raise ValueError(f"expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC: {path}")
    if cert.not_valid_before_utc > now:
        raise ValueError(f"not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC: {path}")
    return cert


def read_key(path: str) -> PrivateKey:
    """The unencrypted PEM private key in ``path``; ``ValueError`` says why not."""
    data = _read(path)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise ValueError(f"the key is encrypted; give an unencrypted PEM key: {path}") from None
    except (ValueError, UnsupportedAlgorithm):
        raise ValueError(f"not a PEM private key: {path}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise ValueError(f"unsupported key type (use an EC or RSA key): {path}")
    return key


def _spki(key: ec.EllipticCurvePublicKey | rsa.RSAPublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


class IssuingCA:
    """A loaded, checked CA that mints leaf certificates. Its repr never shows the key."""

    __slots__ = ("_key", "certificate")

    def __init__(self, certificate: x509.Certificate, key: PrivateKey) -> None:
        self.certificate = certificate
        self._key = key

    def __repr__(self) -> str:
        return f"IssuingCA({self.certificate.subject.rfc4514_string()!r})"

    def issue(
        self, host: str, *, now: datetime.datetime, validity: datetime.timedelta = LEAF_VALIDITY
    ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        """A new leaf for ``host`` (a DNS name or an IP address, IPv6 with or without brackets)."""
        name = host.strip("[]").rstrip(".").lower()
        subject = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION)]
        san: x509.GeneralName
        try:
            san = x509.IPAddress(ipaddress.ip_address(name))
        except ValueError:
            san = x509.DNSName(name)
            # No CN for an address: OpenSSL would check a CN that looks like a host name
            # against the DNS name constraints.
            subject.append(x509.NameAttribute(NameOID.COMMON_NAME, name))
        key = ec.generate_private_key(ec.SECP256R1())
        ca_ski = _extension(self.certificate, x509.SubjectKeyIdentifier)
        aki = (
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski)
            if isinstance(ca_ski, x509.SubjectKeyIdentifier)
            else x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key())
        )
        not_after = min(now + validity, self.certificate.not_valid_after_utc)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name(subject))
            .issuer_name(self.certificate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(max(now - BACKDATE, self.certificate.not_valid_before_utc))
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(digital_signature=True), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectAlternativeName([san]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(aki, critical=False)
            .sign(self._key, hashes.SHA256())
        )
        return cert, key


def load(cert_path: str, key_path: str) -> IssuingCA:
    """The CA from its two files, or :class:`CAError` naming the file at fault."""
    try:
        cert = read_certificate(cert_path)
    except ValueError as exc:
        raise CAError("cert", str(exc)) from None
    try:
        key = read_key(key_path)
    except ValueError as exc:
        raise CAError("key", str(exc)) from None
    if _spki(cert.public_key()) != _spki(key.public_key()):  # type: ignore[arg-type]
        raise CAError("key", f"not the key of the CA certificate {cert_path}: {key_path}")
    return IssuingCA(cert, key)


# ---- serving TLS with a leaf --------------------------------------------------------------


def _fd_dir() -> str:
    return "/dev/fd" if os.path.isdir("/dev/fd") else "/proc/self/fd"


@contextmanager
def _in_memory(data: bytes) -> Iterator[str]:
    """A path that reads ``data`` once: an anonymous pipe's read end. Nothing is written to disk."""
    read_fd, write_fd = os.pipe()
    try:
        os.set_blocking(write_fd, False)  # far below any pipe's capacity; never wait for a reader
        try:
            written = os.write(write_fd, data)
        finally:
            os.close(write_fd)
        if written != len(data):
            raise OSError(f"a pipe took only {written} of {len(data)} bytes")
        yield f"{_fd_dir()}/{read_fd}"
    finally:
        os.close(read_fd)


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def server_context(chain: Sequence[x509.Certificate], key: PrivateKey) -> ssl.SSLContext:
    """A TLS server context presenting ``chain`` (leaf first), offering h2 and http/1.1."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.options |= ssl.OP_NO_COMPRESSION
    context.set_ciphers("ECDHE+AESGCM:ECDHE+CHACHA20")  # TLS 1.2 suites HTTP/2 allows (as hypercorn)
    context.set_alpn_protocols(["h2", "http/1.1"])
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    with _in_memory(b"".join(_pem(c) for c in chain)) as cert_path, _in_memory(key_pem) as key_path:
        context.load_cert_chain(cert_path, key_path)
    return context


class LeafContexts:
    """Server TLS contexts per host, each with a leaf minted by ``ca``; cached, renewed before expiry."""

    def __init__(
        self,
        ca: IssuingCA,
        *,
        validity: datetime.timedelta = LEAF_VALIDITY,
        max_hosts: int = MAX_HOSTS,
        clock: Callable[[], datetime.datetime] = _now,
    ) -> None:
        self.ca = ca
        self.validity = validity
        self.max_hosts = max_hosts
        self.clock = clock
        self._cache: OrderedDict[str, tuple[ssl.SSLContext, x509.Certificate]] = OrderedDict()

    def context(self, host: str) -> ssl.SSLContext:
        return self.entry(host)[0]

    def entry(self, host: str) -> tuple[ssl.SSLContext, x509.Certificate]:
        """The (context, leaf) serving ``host``; minted on first use or when close to expiry."""
        now = self.clock()
        cached = self._cache.get(host)
        if cached is not None and cached[1].not_valid_after_utc - now > RENEW_BEFORE:
            self._cache.move_to_end(host)
            return cached
        leaf, key = self.ca.issue(host, now=now, validity=self.validity)
        entry = self._cache[host] = (server_context([leaf, self.ca.certificate], key), leaf)
        self._cache.move_to_end(host)
        while len(self._cache) > self.max_hosts:
            self._cache.popitem(last=False)
        return entry


# ---- a new CA (dev-ca) --------------------------------------------------------------------


def _key_usage(*, digital_signature: bool = False, key_cert_sign: bool = False) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=key_cert_sign,
        crl_sign=key_cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def constraint_names(hosts: Sequence[str]) -> tuple[list[str], list[str]]:
    """``--host`` values → (DNS names, IP networks) for name constraints; ``ValueError`` on a bad one.

    ``*.example.com`` becomes ``example.com``: a DNS name constraint covers the
    name and every name below it.
    """
    dns: list[str] = []
    ips: list[str] = []
    for value in hosts:
        host = value.strip().lower().rstrip(".")
        try:
            network = ipaddress.ip_network(host.strip("[]"))
        except ValueError:
            if not _HOST.match(host) or ".." in host or "*" in host[2:]:
                raise ValueError(f"not a host name or IP address: {value!r}") from None
            name = host.removeprefix("*.")
            if name not in dns:
                dns.append(name)
        else:
            if str(network) not in ips:
                ips.append(str(network))
    return dns, ips


def _name_constraints(dns: Sequence[str], ips: Sequence[str]) -> x509.NameConstraints:
    """Permit exactly these names and addresses.

    A constraint only restricts names of its own type, so with no address given
    every address is excluded, and with no DNS name given only a reserved name
    is permitted.
    """
    permitted: list[x509.GeneralName] = [x509.DNSName(n) for n in dns or [NO_DNS_NAME]]
    permitted += [x509.IPAddress(ipaddress.ip_network(n)) for n in ips]
    excluded: list[x509.GeneralName] | None = None
    if not ips:
        excluded = [
            x509.IPAddress(ipaddress.ip_network("0.0.0.0/0")),
            x509.IPAddress(ipaddress.ip_network("::/0")),
        ]
    return x509.NameConstraints(permitted_subtrees=permitted, excluded_subtrees=excluded)


def create_ca(
    hosts: Sequence[str] = (), *, days: int = 365, now: datetime.datetime | None = None
) -> tuple[bytes, bytes]:
    """A new CA: (certificate PEM, unencrypted PKCS#8 key PEM). Name-constrained to ``hosts`` if any."""
    now = now or _now()
    dns, ips = constraint_names(hosts)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
            x509.NameAttribute(
                NameOID.COMMON_NAME, f"{ORGANIZATION} dev CA {now:%Y-%m-%d} {secrets.token_hex(3)}"
            ),
        ]
    )
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(digital_signature=True, key_cert_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    if hosts:
        builder = builder.add_extension(_name_constraints(dns, ips), critical=True)
    cert = builder.sign(key, hashes.SHA256())
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return _pem(cert), key_pem
