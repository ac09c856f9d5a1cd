"""``aws-outbound-jwt-proxy dev-ca --out DIR [--host H ...]``: a local CA for HTTPS interception.

Writes ``DIR/ca.pem`` and ``DIR/ca-key.pem`` (created 0600, never
overwritten) and prints how to start the proxy with them and how to make
clients trust the certificate. With ``--host`` the CA carries name
constraints: clients accept leaves it signs for those hosts (and their
subdomains) only, so a leaked key cannot impersonate anything else.
"""

from __future__ import annotations

import os
import shlex
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from cryptography import x509

from ..config import flags
from ..config.flags import ConfigError, Flag, ListFlag
from ..intercept import ca

PROG = "aws-outbound-jwt-proxy dev-ca"
DESCRIPTION = (
    "Create a CA for the proxy's HTTPS interception (--intercept-ca-cert/--intercept-ca-key)\n"
    "and print how to trust it. Local development only: anyone with the key can\n"
    "impersonate the hosts it may sign for. Never put it in a production image."
)
CERT_FILE = "ca.pem"
KEY_FILE = "ca-key.pem"
EXIT_EXISTS = 1


def _out(value: str) -> str:
    out = value.strip()
    if not out:
        raise ValueError("required: the directory to write ca.pem and ca-key.pem to")
    return out


def _hosts(items: list[str]) -> tuple[str, ...]:
    hosts = tuple(part.strip() for value in items for part in value.split(",") if part.strip())
    ca.constraint_names(hosts)  # ValueError names a bad one
    return hosts


OUT = Flag("out", "", _out, "directory for ca.pem and ca-key.pem (created if missing)", no_env=True)
HOSTS = ListFlag(
    "host",
    "",
    _hosts,
    "limit the CA to this host name, *.suffix or IP address (name constraints); default: no limit",
    no_env=True,
    metavar="HOST",
)
FLAGS: tuple[flags.Row, ...] = (OUT, HOSTS)


def _say(text: str = "") -> None:
    sys.stdout.write(text + "\n")


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Create ``path`` with ``mode`` from the start (never a moment with wider permissions)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _instructions(cert: Path, key: Path, certificate: x509.Certificate, hosts: Sequence[str]) -> None:
    dns, ips = ca.constraint_names(hosts)
    names = [*dns, *(ip.removesuffix("/32").removesuffix("/128") for ip in ips)]
    allowed = ",".join(h.strip().lower() for h in hosts if "/" not in h) or "api.example.com"
    c = shlex.quote(str(cert))
    _say(f"created {cert}")
    _say(f"created {key} (mode 0600: keep it private, never commit it or put it in an image)")
    _say(f"  subject      {certificate.subject.rfc4514_string()}")
    _say(f"  valid until  {certificate.not_valid_after_utc:%Y-%m-%d} (UTC)")
    if hosts:
        _say(f"  may sign for {', '.join(names)} only (a name includes its subdomains)")
    else:
        _say("  may sign for any host: limit it with --host (name constraints) unless you need that")
    _say()
    _say("Start the proxy with it (only the allowed hosts are intercepted):")
    _say(f"  aws-outbound-jwt-proxy --allowed-upstream-hosts {shlex.quote(allowed)} \\")
    _say(f"      --intercept-ca-cert {c} --intercept-ca-key {shlex.quote(str(key))}")
    _say()
    _say("Make your clients trust it (pick what they use):")
    _say("  macOS keychain (Safari, Chrome, curl and Go on macOS):")
    _say(f"    security add-trusted-cert -r trustRoot -k ~/Library/Keychains/login.keychain-db {c}")
    _say("  Debian/Ubuntu system store:")
    _say(f"    sudo cp {c} /usr/local/share/ca-certificates/aws-outbound-jwt-proxy-dev.crt")
    _say("    sudo update-ca-certificates")
    _say("  OpenSSL-based tools (Python ssl/httpx, Ruby, Go on Linux); replaces their default bundle:")
    _say(f"    export SSL_CERT_FILE={c}")
    _say("  curl (replaces its bundle; or pass --cacert):")
    _say(f"    export CURL_CA_BUNDLE={c}")
    _say("  Python requests (replaces certifi's bundle):")
    _say(f"    export REQUESTS_CA_BUNDLE={c}")
    _say("  Node.js (added to Node's own CAs):")
    _say(f"    export NODE_EXTRA_CA_CERTS={c}")
    _say()
    _say("Then send the app's HTTPS through the proxy: HTTPS_PROXY=http://127.0.0.1:8080")
    _say("(NO_PROXY=... for hosts it should reach directly). See docs/local-dev-proxy.md.")


def run(argv: Sequence[str], env: Mapping[str, str]) -> int:
    given = flags.parse(PROG, DESCRIPTION, FLAGS, argv, env)
    out, hosts = Path(given[OUT]), given[HOSTS]
    cert_path, key_path = out / CERT_FILE, out / KEY_FILE
    for existing in (key_path, cert_path):
        if existing.exists():
            sys.stderr.write(
                f"{PROG}: error: {existing} exists; refusing to overwrite a CA "
                "(delete both files or choose another --out)\n"
            )
            return EXIT_EXISTS
    cert_pem, key_pem = ca.create_ca(hosts)
    out.mkdir(mode=0o700, parents=True, exist_ok=True)
    _write_new(key_path, key_pem, 0o600)
    try:
        _write_new(cert_path, cert_pem, 0o644)
    except BaseException:
        key_path.unlink()  # no key without its certificate
        raise
    _instructions(cert_path, key_path, x509.load_pem_x509_certificate(cert_pem), hosts)
    return 0


def main(argv: list[str]) -> int:
    try:
        return run(argv, os.environ)
    except ConfigError as exc:
        flags.fail(PROG, exc)
    except OSError as exc:
        sys.stderr.write(f"{PROG}: error: {exc.strerror or exc}: {exc.filename or ''}\n")
        return EXIT_EXISTS
