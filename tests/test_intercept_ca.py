"""The interception CA: checked at start-up, leaves minted per host, and the ``dev-ca`` command.

TLS here is real (trio's SSLStream on both sides of an in-memory stream pair):
a client trusting only the interception CA accepts the leaf the proxy would
present, and refuses one a name-constrained CA may not sign.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import trio
import trio.testing
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from aws_outbound_jwt_proxy.config.flags import ConfigError
from aws_outbound_jwt_proxy.devtools import devca
from aws_outbound_jwt_proxy.intercept import ca
from tests.fixtures.intercept import InterceptCA, write_ca
from tests.fixtures.proxy import proxy_settings
from tests.fixtures.upstreams import make_tls

BIN = Path(sys.executable).parent
NOW = datetime.datetime(2030, 1, 1, tzinfo=datetime.UTC)


async def handshake(server: ssl.SSLContext, client: ssl.SSLContext, host: str) -> str | None:
    """A TLS handshake between the two contexts; the ALPN protocol chosen (``ssl.SSLError`` on failure)."""
    client_end, server_end = trio.testing.memory_stream_pair()
    tls_server = trio.SSLStream(server_end, server, server_side=True)
    tls_client = trio.SSLStream(client_end, client, server_hostname=host)

    async def serve() -> None:
        try:
            await tls_server.do_handshake()
        except trio.BrokenResourceError:
            pass  # the client refused our certificate: its side raises the reason

    refused: ssl.SSLError | None = None
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve)
        try:
            await tls_client.do_handshake()
        except trio.BrokenResourceError as exc:
            assert isinstance(exc.__cause__, ssl.SSLError), exc.__cause__
            refused = exc.__cause__
            await trio.aclose_forcefully(tls_client)  # the server side stops waiting
    if refused is not None:
        raise refused
    return tls_client.selected_alpn_protocol()


def client_context(ca_file: str) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=ca_file)
    context.set_alpn_protocols(["h2", "http/1.1"])
    return context


# ---- leaves ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "san", "cn"),
    [
        ("api.example.com", x509.DNSName("api.example.com"), "api.example.com"),
        ("127.0.0.1", x509.IPAddress(ipaddress.ip_address("127.0.0.1")), None),
        ("[::1]", x509.IPAddress(ipaddress.ip_address("::1")), None),
    ],
)
def test_a_leaf_names_exactly_its_host_and_is_short_lived(
    intercept_ca: InterceptCA, host: str, san: x509.GeneralName, cn: str | None
) -> None:
    issuer = ca.load(intercept_ca.cert, intercept_ca.key)
    leaf, key = issuer.issue(host, now=datetime.datetime.now(datetime.UTC))
    leaf.verify_directly_issued_by(issuer.certificate)
    assert leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value == (
        x509.SubjectAlternativeName([san])
    )
    names = leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    assert [n.value for n in names] == ([cn] if cn else [])
    assert leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert leaf.not_valid_after_utc - leaf.not_valid_before_utc <= ca.LEAF_VALIDITY + ca.BACKDATE
    assert leaf.public_key() == key.public_key()
    assert "PRIVATE" not in repr(issuer)


def test_leaf_contexts_are_cached_per_host_and_renewed_before_expiry(intercept_ca: InterceptCA) -> None:
    now = [datetime.datetime.now(datetime.UTC)]
    leaves = ca.LeafContexts(ca.load(intercept_ca.cert, intercept_ca.key), max_hosts=2, clock=lambda: now[0])
    first = leaves.entry("a.test")
    assert leaves.entry("a.test") is first
    assert leaves.entry("b.test")[1].serial_number != first[1].serial_number
    now[0] += ca.LEAF_VALIDITY - ca.RENEW_BEFORE + datetime.timedelta(seconds=1)
    renewed = leaves.entry("a.test")
    assert renewed is not first and renewed[1].not_valid_after_utc > first[1].not_valid_after_utc
    leaves.entry("c.test")  # over max_hosts: the least recently used (b.test) goes
    assert leaves.entry("a.test") is renewed


def test_a_leaf_never_outlives_its_ca(tmp_path: Path) -> None:
    cert_pem, key_pem = ca.create_ca(days=1, now=NOW)
    (tmp_path / "c.pem").write_bytes(cert_pem)
    (tmp_path / "k.pem").write_bytes(key_pem)
    issuer = ca.IssuingCA(x509.load_pem_x509_certificate(cert_pem), ca.read_key(str(tmp_path / "k.pem")))
    leaf, _ = issuer.issue("a.test", now=NOW + datetime.timedelta(hours=20))
    assert leaf.not_valid_after_utc == issuer.certificate.not_valid_after_utc


async def test_a_client_trusting_the_ca_accepts_the_leaf_and_gets_h2(intercept_ca: InterceptCA) -> None:
    leaves = ca.LeafContexts(ca.load(intercept_ca.cert, intercept_ca.key))
    client = client_context(intercept_ca.cert)
    assert await handshake(leaves.context("localhost"), client, "localhost") == "h2"
    http1 = client_context(intercept_ca.cert)
    http1.set_alpn_protocols(["http/1.1"])
    assert await handshake(leaves.context("localhost"), http1, "localhost") == "http/1.1"
    with pytest.raises(ssl.SSLCertVerificationError, match="mismatch"):
        await handshake(leaves.context("localhost"), client, "other.test")


async def test_name_constraints_limit_what_clients_accept(tmp_path: Path) -> None:
    constrained = write_ca(tmp_path, ["localhost", "*.example.com"])
    leaves = ca.LeafContexts(ca.load(constrained.cert, constrained.key))
    client = client_context(constrained.cert)
    for host in ("localhost", "api.example.com", "example.com"):
        assert await handshake(leaves.context(host), client, host) == "h2"
    # Outside the DNS names, and any address at all (none was given).
    for host in ("example.org", "127.0.0.1"):
        with pytest.raises(ssl.SSLCertVerificationError, match="subtree"):
            await handshake(leaves.context(host), client, host)


# ---- start-up checks -------------------------------------------------------------------------


def _expect_error(argv: list[str], flag: str, message: str, env: dict[str, str] | None = None) -> None:
    with pytest.raises(ConfigError) as info:
        proxy_settings(*argv) if env is None else _load_env(argv, env)
    assert info.value.flag == flag
    assert message in info.value.message


def _load_env(argv: list[str], env: dict[str, str]) -> object:
    from aws_outbound_jwt_proxy.config import settings as config

    return config.load(["--listen-addr", "127.0.0.1:0", "--metrics-enabled", "false", *argv], env)


ALLOW = ["--allowed-upstream-hosts", "localhost"]


def test_the_pair_and_an_allow_list_start_interception(intercept_ca: InterceptCA) -> None:
    settings = proxy_settings(*intercept_ca.flags(), *ALLOW)
    assert settings.intercepting
    assert not proxy_settings().intercepting  # nothing changes without the flags


def test_interception_needs_both_files_and_an_allow_list(intercept_ca: InterceptCA) -> None:
    cert, key = intercept_ca.cert, intercept_ca.key
    _expect_error(["--intercept-ca-cert", cert, *ALLOW], "--intercept-ca-key", "must be given together")
    _expect_error([*ALLOW], "INTERCEPT_CA_CERT", "must be given together", {"INTERCEPT_CA_KEY": key})
    _expect_error(intercept_ca.flags(), "--allowed-upstream-hosts", "required with --intercept-ca-cert")
    _expect_error(
        [],
        "ALLOWED_UPSTREAM_HOSTS",
        "required with INTERCEPT_CA_CERT",
        {"INTERCEPT_CA_CERT": cert, "INTERCEPT_CA_KEY": key},
    )
    _expect_error(
        [*intercept_ca.flags(), *ALLOW, "--upstream-host", "api.example.com"],
        "--intercept-ca-cert",
        "cannot be combined with --upstream-host",
    )


def test_unusable_ca_files_are_errors_naming_the_flag(tmp_path: Path, intercept_ca: InterceptCA) -> None:
    _, leaf_cert, leaf_key = make_tls(tmp_path)
    cert, key = intercept_ca.cert, intercept_ca.key
    cases = [
        (str(tmp_path / "missing.pem"), key, "--intercept-ca-cert", "cannot read"),
        (str(tmp_path), key, "--intercept-ca-cert", "cannot read"),  # a directory
        (key, key, "--intercept-ca-cert", "not a PEM certificate"),
        (leaf_cert, leaf_key, "--intercept-ca-cert", "not a CA certificate"),
        (cert, cert, "--intercept-ca-key", "not a PEM private key"),
        (cert, leaf_key, "--intercept-ca-key", "not the key of the CA certificate"),
    ]
    for cert_path, key_path, flag, message in cases:
        _expect_error(
            ["--intercept-ca-cert", cert_path, "--intercept-ca-key", key_path, *ALLOW], flag, message
        )

    encrypted = tmp_path / "encrypted.pem"
    encrypted.write_bytes(
        ca.read_key(key).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    _expect_error(
        ["--intercept-ca-cert", cert, "--intercept-ca-key", str(encrypted), *ALLOW],
        "--intercept-ca-key",
        "the key is encrypted",
    )
    old_cert, old_key = ca.create_ca(days=1, now=NOW - datetime.timedelta(days=3650))
    (tmp_path / "old.pem").write_bytes(old_cert)
    (tmp_path / "old-key.pem").write_bytes(old_key)
    _expect_error(
        [
            "--intercept-ca-cert",
            str(tmp_path / "old.pem"),
            "--intercept-ca-key",
            str(tmp_path / "old-key.pem"),
            *ALLOW,
        ],
        "--intercept-ca-cert",
        "expired on",
    )


def test_console_script_without_allow_list_exits_2_naming_it(intercept_ca: InterceptCA) -> None:
    result = subprocess.run(
        [str(BIN / "aws-outbound-jwt-proxy"), *intercept_ca.flags()],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "aws-outbound-jwt-proxy: error: --allowed-upstream-hosts: required with --intercept-ca-cert: "
        "interception only tunnels to allowed hosts"
    ]


# ---- dev-ca ---------------------------------------------------------------------------------


def test_dev_ca_creates_a_constrained_ca_the_proxy_accepts(tmp_path: Path) -> None:
    out = tmp_path / "ca"
    result = subprocess.run(
        [
            str(BIN / "aws-outbound-jwt-proxy"),
            "dev-ca",
            "--out",
            str(out),
            "--host",
            "localhost",
            "--host",
            "127.0.0.1",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    cert, key = out / "ca.pem", out / "ca-key.pem"
    assert stat.S_IMODE(os.stat(key).st_mode) == 0o600
    for line in (
        f"security add-trusted-cert -r trustRoot -k ~/Library/Keychains/login.keychain-db {cert}",
        "sudo update-ca-certificates",
        f"export SSL_CERT_FILE={cert}",
        f"export CURL_CA_BUNDLE={cert}",
        f"export REQUESTS_CA_BUNDLE={cert}",
        f"export NODE_EXTRA_CA_CERTS={cert}",
        f"--intercept-ca-cert {cert} --intercept-ca-key {key}",
        "may sign for localhost, 127.0.0.1 only",
    ):
        assert line in result.stdout, line
    constraints = x509.load_pem_x509_certificate(cert.read_bytes()).extensions.get_extension_for_class(
        x509.NameConstraints
    )
    assert constraints.critical
    assert list(constraints.value.permitted_subtrees or []) == [
        x509.DNSName("localhost"),
        x509.IPAddress(ipaddress.ip_network("127.0.0.1/32")),
    ]
    settings = proxy_settings(
        "--intercept-ca-cert",
        str(cert),
        "--intercept-ca-key",
        str(key),
        "--allowed-upstream-hosts",
        "localhost",
    )
    assert settings.intercepting


def test_dev_ca_never_overwrites_a_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert devca.run(["--out", str(tmp_path)], {}) == 0
    out = capsys.readouterr().out
    assert "may sign for any host" in out
    cert = x509.load_pem_x509_certificate((tmp_path / "ca.pem").read_bytes())
    with pytest.raises(x509.ExtensionNotFound):
        cert.extensions.get_extension_for_class(x509.NameConstraints)
    key_before = (tmp_path / "ca-key.pem").read_bytes()
    (tmp_path / "ca.pem").unlink()  # even with the certificate gone, the key stays
    assert devca.run(["--out", str(tmp_path), "--host", "localhost"], {}) == devca.EXIT_EXISTS
    err = capsys.readouterr().err
    assert err == (
        f"aws-outbound-jwt-proxy dev-ca: error: {tmp_path / 'ca-key.pem'} exists; "
        "refusing to overwrite a CA (delete both files or choose another --out)\n"
    )
    assert (tmp_path / "ca-key.pem").read_bytes() == key_before
    assert not (tmp_path / "ca.pem").exists()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "--out: required"),
        (["--out", "x", "--host", "a b"], "--host: not a host name or IP address: 'a b'"),
        (["--out", "x", "--host", "api.example.com:443"], "--host: not a host name or IP address"),
    ],
)
def test_dev_ca_usage_errors(argv: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message.split(": ", 1)[1]) as info:
        devca.run(argv, {})
    assert info.value.flag == message.split(":")[0]
