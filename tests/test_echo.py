"""echo-upstream over real sockets: the echo's shape, streaming, logging and JWT verification.

Valid and expired tokens come from the project's STS emulator via boto3.
Forged and otherwise hostile tokens are made here with keys the test
controls, served by a small OIDC issuer (discovery + JWKS) in a thread.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from joserfc import jwk, jwt

from aws_outbound_jwt_proxy.config.flags import ConfigError
from aws_outbound_jwt_proxy.devtools import echo, verify
from tests.fixtures.echo import EchoFactory, EchoUpstream, start_echo
from tests.fixtures.emulator import EmulatorProcess, StsEmulator
from tests.fixtures.upstreams import make_tls, refused_port

AUDIENCE = "https://api.example.com"
# Anything shaped like a compact JWS (header.payload.signature); a log line must never hold one.
JWT_SHAPE = re.compile(r"eyJ[\w-]{8,}\.[\w-]*\.[\w-]*")


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64json(doc: dict[str, Any]) -> str:
    return b64(json.dumps(doc).encode())


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


class Issuer:
    """A minimal OIDC issuer: discovery + JWKS over HTTP, keys the test controls."""

    def __init__(self) -> None:
        self.keys: list[jwk.Key] = [jwk.RSAKey.generate_key(2048, parameters={"kid": "rsa-1"})]
        self.jwks_hits = 0
        self._lock = threading.Lock()
        issuer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path == "/.well-known/openid-configuration":
                    doc: dict[str, Any] = {"issuer": issuer.url, "jwks_uri": issuer.url + "/jwks.json"}
                elif self.path == "/jwks.json":
                    with issuer._lock:
                        issuer.jwks_hits += 1
                        doc = {"keys": [k.as_dict(private=False) for k in issuer.keys]}
                else:
                    self.send_error(404)
                    return
                body = json.dumps(doc).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def add_key(self, key: jwk.Key) -> None:
        with self._lock:
            self.keys.append(key)

    def claims(self, **overrides: Any) -> dict[str, Any]:
        now = int(time.time())
        claims: dict[str, Any] = {"iss": self.url, "sub": "arn:aws:iam::123456789012:role/test"}
        claims.update(aud=AUDIENCE, iat=now, exp=now + 300, jti="test-jti")
        claims.update(overrides)
        return claims

    def sign(self, claims: dict[str, Any], key: jwk.Key | None = None, alg: str = "RS256") -> str:
        key = self.keys[0] if key is None else key
        header = {"alg": alg, "typ": "JWT", "kid": key.kid}
        return jwt.encode(header, claims, key, algorithms=[alg])

    def __enter__(self) -> Issuer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def issuer() -> Iterator[Issuer]:
    with Issuer() as server:
        yield server


@pytest.fixture(scope="module")
def shared_issuer() -> Iterator[Issuer]:
    with Issuer() as server:
        server.add_key(jwk.ECKey.generate_key("P-384", parameters={"kid": "ec-1"}))
        yield server


def verifying_echo_for(issuer_url: str) -> Iterator[EchoUpstream]:
    """Body of a module-scoped fixture: an echo verifying tokens for AUDIENCE from ``issuer_url``."""
    upstream = start_echo(issuer_url, AUDIENCE)
    yield upstream
    upstream.stop()


@pytest.fixture(scope="module")
def verifying_echo(shared_issuer: Issuer) -> Iterator[EchoUpstream]:
    """One verifying echo for the many reject/accept cases (module-scoped: one start-up)."""
    yield from verifying_echo_for(shared_issuer.url)


def raw_request(host: str, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send bytes exactly as given (``Connection: close``); status, headers, body of the reply."""
    address, _, port = host.rpartition(":")
    with socket.create_connection((address, int(port)), timeout=10) as sock:
        sock.sendall(request)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in header_lines)}
    return int(status_line.split()[1]), headers, body


# ---- echo shape ----------------------------------------------------------


def test_echo_keeps_raw_target_header_order_duplicates_and_hashes_body(echo_upstream: EchoFactory) -> None:
    upstream = echo_upstream()
    body = b"hello \x00\xff world" * 1000
    request = (
        b"POST /a%2Fb//c/%7E?x=1&x=2&x=1&e= HTTP/1.1\r\n"
        b"Host: example.test:8443\r\n"
        b"X-Dup: one\r\n"
        b"X-Other: z\r\n"
        b"x-dup: two\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n"
        b"Connection: close\r\n\r\n" + body
    )
    status, headers, reply = raw_request(upstream.host, request)
    assert status == 200
    assert headers["content-type"] == "application/json"
    doc = json.loads(reply)
    assert doc["method"] == "POST"
    assert doc["target"] == "/a%2Fb//c/%7E?x=1&x=2&x=1&e="
    assert doc["path"] == "/a%2Fb//c/%7E"
    assert doc["query"] == "x=1&x=2&x=1&e="
    assert doc["headers"] == [
        ["host", "example.test:8443"],
        ["x-dup", "one"],
        ["x-other", "z"],
        ["x-dup", "two"],
        ["content-length", str(len(body))],
        ["connection", "close"],
    ]
    assert doc["body"] == {"length": len(body), "sha256": hashlib.sha256(body).hexdigest()}
    assert "claims" not in doc


def test_echo_answers_any_method(echo_upstream: EchoFactory) -> None:
    upstream = echo_upstream()
    with httpx.Client(base_url=upstream.url) as client:
        for method in ("GET", "PUT", "PATCH", "DELETE", "OPTIONS", "PURGE"):
            response = client.request(method, "/any/where")
            assert response.status_code == 200, method
            assert response.json()["method"] == method
            assert response.json()["body"]["length"] == 0
        head = client.head("/x")
        assert head.status_code == 200
        assert head.content == b""


def test_echo_over_http2_cleartext(echo_upstream: EchoFactory) -> None:
    upstream = echo_upstream()
    with httpx.Client(base_url=upstream.url, http1=False, http2=True) as client:
        response = client.post("/h2%2F//x?a=1&a=1", content=b"h2 body")
    assert response.http_version == "HTTP/2"
    doc = response.json()
    assert (doc["http_version"], doc["target"]) == ("2", "/h2%2F//x?a=1&a=1")
    assert doc["body"] == {"length": 7, "sha256": hashlib.sha256(b"h2 body").hexdigest()}


def test_echo_over_https_h2_and_http11(echo_upstream: EchoFactory, tmp_path: Path) -> None:
    ca, cert, key = make_tls(tmp_path)
    upstream = echo_upstream(None, None, "--tls-cert", cert, "--tls-key", key)
    assert upstream.url.startswith("https://127.0.0.1:")
    for http2, version in ((True, "HTTP/2"), (False, "HTTP/1.1")):
        with httpx.Client(
            base_url=upstream.url, verify=ssl.create_default_context(cafile=ca), http2=http2
        ) as c:
            response = c.get("/tls?x=1")
        assert (response.status_code, response.http_version) == (200, version)
        assert response.json()["target"] == "/tls?x=1"


async def test_serve_in_process_reports_its_url_and_stops_on_cancel(issuer: Issuer) -> None:
    options = echo.Options(port=0, issuer=issuer.url, audience=AUDIENCE)
    async with trio.open_nursery() as nursery:
        url = await nursery.start(echo.serve, options)
        assert url.startswith("http://127.0.0.1:") and not url.endswith(":0")
        async with httpx.AsyncClient(base_url=url) as client:
            token = issuer.sign(issuer.claims())
            ok = await client.get("/in-process", headers=bearer(token))
            refused = await client.get("/in-process")
        nursery.cancel_scope.cancel()
    assert ok.status_code == 200
    assert ok.json()["claims"]["sub"] == "arn:aws:iam::123456789012:role/test"
    assert refused.status_code == 401


def test_echo_streams_a_large_upload_in_flat_memory(echo_upstream: EchoFactory) -> None:
    upstream = echo_upstream()
    size, block = 256 * 1024 * 1024, bytes(range(256)) * 256
    expected = hashlib.sha256()
    for _ in range(size // len(block)):
        expected.update(block)

    def peak_rss_kib() -> int:
        for line in open(f"/proc/{upstream.proc.pid}/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
        raise AssertionError("no VmHWM")

    def chunks() -> Iterator[bytes]:
        for _ in range(size // len(block)):
            yield block

    with httpx.Client(base_url=upstream.url, timeout=60) as client:
        client.get("/warm-up")
        before = peak_rss_kib()
        response = client.post("/upload", content=chunks())  # chunked: no Content-Length
    assert response.json()["body"] == {"length": size, "sha256": expected.hexdigest()}
    growth_mib = (peak_rss_kib() - before) / 1024
    assert growth_mib < 32, f"peak RSS grew {growth_mib:.0f} MiB for a 256 MiB upload"


def test_request_log_line_has_host_and_truncated_credential(echo_upstream: EchoFactory) -> None:
    upstream = echo_upstream()
    secret = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJsb2dnaW5nLXRlc3QifQ.c2lnbmF0dXJlLXNpZ25hdHVyZQ"
    with httpx.Client(base_url=upstream.url) as client:
        client.get("/logged?q=1", headers={"Authorization": f"Bearer {secret}", "Host": "svc.example"})
        client.get("/basic", headers={"Authorization": "Basic dXNlcjpw"})
    record = upstream.wait_for(lambda r: r.get("msg") == "request" and r.get("target") == "/logged?q=1")
    assert record["host"] == "svc.example"
    assert record["authorization"] == f"Bearer {secret[:12]}…"
    assert record["status"] == 200
    basic = upstream.wait_for(lambda r: r.get("msg") == "request" and r.get("target") == "/basic")
    assert basic["authorization"] == "Basic dX…"  # a short secret shows at most a third
    assert secret not in upstream.stderr()
    assert "dXNlcjpw" not in upstream.stderr()
    assert JWT_SHAPE.search(upstream.stderr()) is None


def test_redact_never_shows_a_whole_secret() -> None:
    assert echo.redact("Bearer " + "a" * 100) == "Bearer " + "a" * 12 + "…"
    assert echo.redact("Bearer abc") == "Bearer a…"
    assert echo.redact("Bearer ab") == "Bearer …"
    assert echo.redact("bare-token-without-scheme") == "bare-tok…"
    assert echo.redact("Bearer") == "Be…"  # one word: treated as the secret


def test_bearer_token_parsing() -> None:
    assert echo.bearer_token([(b"authorization", b"Bearer abc.def.ghi")]) == "abc.def.ghi"
    assert echo.bearer_token([(b"authorization", b"bearer  abc")]) == "abc"
    for headers in (
        [],
        [(b"authorization", b"Basic abc")],
        [(b"authorization", b"Bearer ")],
        [(b"authorization", b"Bearer a"), (b"authorization", b"Bearer b")],
    ):
        with pytest.raises(verify.InvalidToken):
            echo.bearer_token(headers)


# ---- configuration -------------------------------------------------------


def test_load_defaults_and_env_fallback() -> None:
    options, level, fmt = echo.load([], {})
    assert options == echo.Options("127.0.0.1", 8081, None, None, 60.0)
    assert (level, fmt) == ("info", "json")
    options, _, _ = echo.load(
        ["--leeway", "5s"],
        {
            "ECHO_UPSTREAM_ISSUER": "http://i.test",
            "ECHO_UPSTREAM_AUDIENCE": "a",
            "ECHO_UPSTREAM_LEEWAY": "9s",
        },
    )
    assert (options.issuer, options.audience, options.leeway) == ("http://i.test", "a", 5.0)


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["--listen-addr", "nope"], "--listen-addr"),
        (["--issuer", "ftp://x"], "--issuer"),
        (["--issuer", "http://x?a=b"], "--issuer"),
        (["--audience", "a"], "--audience"),
        (["--issuer", "http://x", "--audience", "a b"], "--audience"),
        (["--leeway", "5x"], "--leeway"),
        (["--leeway", "2h"], "--leeway"),
        (["--log-level", "loud"], "--log-level"),
        (["--log-format", "xml"], "--log-format"),
        (["--tls-cert", "/nonexistent.pem"], "--tls-cert"),
        (["--tls-cert", __file__], "--tls-key"),  # the pair, both or neither
        (["--tls-cert", __file__, "--tls-key", __file__], "--tls-cert"),  # not PEM
    ],
)
def test_load_rejects_bad_flags(argv: list[str], flag: str) -> None:
    with pytest.raises(ConfigError) as info:
        echo.load(argv, {})
    assert info.value.flag == flag


def test_cli_bad_flag_is_one_line_and_exit_2() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "aws_outbound_jwt_proxy", "echo-upstream", "--leeway", "soon"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert "--leeway" in result.stderr


def test_port_in_use_is_a_start_up_error_naming_the_address(echo_upstream: EchoFactory) -> None:
    upstream = echo_upstream()
    result = subprocess.run(
        [sys.executable, "-m", "aws_outbound_jwt_proxy", "echo-upstream", "--listen-addr", upstream.host],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 1
    record = json.loads(result.stderr.strip().splitlines()[-1])
    assert record["level"] == "error"
    assert record["addr"] == upstream.host
    assert "in use" in record["error"]


def test_sigterm_exits_0(echo_upstream: EchoFactory) -> None:
    upstream = echo_upstream()
    assert upstream.stop() == 0


# ---- verification --------------------------------------------------------


def forged(shared: Issuer) -> str:
    """Right kid, iss and aud, but signed by a key the issuer never published."""
    other = jwk.RSAKey.generate_key(2048, parameters={"kid": "rsa-1"})
    return shared.sign(shared.claims(), key=other)


def alg_none(shared: Issuer) -> str:
    header = {"alg": "none", "typ": "JWT", "kid": shared.keys[0].kid}
    return f"{b64json(header)}.{b64json(shared.claims())}."


def hs256_with_public_key(shared: Issuer) -> str:
    """The classic key-confusion attack: HMAC keyed with the issuer's public key."""
    header = {"alg": "HS256", "typ": "JWT", "kid": shared.keys[0].kid}
    signing_input = f"{b64json(header)}.{b64json(shared.claims())}"
    public = json.dumps(shared.keys[0].as_dict(private=False)).encode()
    signature = hmac.new(public, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(signature)}"


def rs384(shared: Issuer) -> str:
    return shared.sign(shared.claims(), alg="RS384")


def tampered(shared: Issuer) -> str:
    header, _, signature = shared.sign(shared.claims()).split(".")
    return f"{header}.{b64json(shared.claims(sub='someone-else'))}.{signature}"


def ec_key_for_rs256(shared: Issuer) -> str:
    """An RS256 header naming the EC key: key type must match the algorithm."""
    header = {"alg": "RS256", "typ": "JWT", "kid": "ec-1"}
    return jwt.encode(header, shared.claims(), shared.keys[0], algorithms=["RS256"])


NOT_ALLOWED = "algorithm not allowed (RS256 or ES384 only)"
BAD_TOKENS = {
    "forged": (forged, "bad signature"),
    "tampered": (tampered, "bad signature"),
    "future-iat": (lambda s: s.sign(s.claims(iat=int(time.time()) + 600)), "issued in the future"),
    "wrong-audience": (lambda s: s.sign(s.claims(aud="https://other.example")), "wrong audience"),
    "wrong-audience-list": (lambda s: s.sign(s.claims(aud=["https://a", "https://b"])), "wrong audience"),
    "no-audience": (lambda s: s.sign(s.claims(aud=None)), "missing claim: aud"),
    "wrong-issuer": (lambda s: s.sign(s.claims(iss="https://evil.example")), "wrong issuer"),
    "no-exp": (lambda s: s.sign(s.claims(exp=None)), "missing claim: exp"),
    "alg-none": (alg_none, NOT_ALLOWED),
    "hs256-public-key": (hs256_with_public_key, NOT_ALLOWED),
    "rs384": (rs384, NOT_ALLOWED),
    "key-type-mismatch": (ec_key_for_rs256, "token does not match its key"),
    "malformed": (lambda s: "not-a-jwt", "malformed token"),
}


@pytest.mark.parametrize("case", sorted(BAD_TOKENS))
def test_verifier_rejects(case: str, shared_issuer: Issuer, verifying_echo: EchoUpstream) -> None:
    make, reason = BAD_TOKENS[case]
    token = make(shared_issuer)
    response = httpx.post(
        f"{verifying_echo.url}/protected?case={case}",
        headers=bearer(token),
        content=b"payload",
    )
    assert response.status_code == 401
    assert response.json() == {"error": "invalid_token", "reason": reason}
    assert token not in response.text
    assert response.headers["www-authenticate"] == 'Bearer error="invalid_token"'
    record = verifying_echo.wait_for(lambda r: r.get("target") == f"/protected?case={case}")
    assert (record["status"], record["reason"], record["body_bytes"]) == (401, reason, 7)
    assert token not in verifying_echo.stderr()
    assert JWT_SHAPE.search(verifying_echo.stderr()) is None


def test_malformed_requests_get_4xx_and_the_server_keeps_serving(verifying_echo: EchoUpstream) -> None:
    status, _, body = raw_request(
        verifying_echo.host,
        b"GET /latin1 HTTP/1.1\r\nHost: h\r\nAuthorization: Bearer eyJ\xe9.x.y\r\nConnection: close\r\n\r\n",
    )
    assert (status, json.loads(body)["reason"]) == (401, "malformed token")
    status, _, _ = raw_request(verifying_echo.host, b"NOT HTTP AT ALL\r\n\r\n")
    assert 400 <= status < 500
    response = httpx.get(f"{verifying_echo.url}/after")
    assert response.status_code == 401  # still serving (no bearer)
    assert "Traceback" not in verifying_echo.stderr()


@pytest.mark.parametrize("authorization", [None, "Basic dXNlcjpwYXNz", "Bearer"])
def test_verifier_rejects_missing_bearer(authorization: str | None, verifying_echo: EchoUpstream) -> None:
    headers = {"Authorization": authorization} if authorization else {}
    response = httpx.get(verifying_echo.url + "/x", headers=headers)
    assert response.status_code == 401
    assert response.json() == {"error": "invalid_token", "reason": "missing bearer token"}


@pytest.fixture(scope="module")
def emulator_echo(sts_emulator_process: EmulatorProcess) -> Iterator[EchoUpstream]:
    """A verifying echo trusting the project's STS emulator (the session-wide process)."""
    yield from verifying_echo_for(sts_emulator_process.issuer)


def mint(emulator: StsEmulator, audiences: list[str], alg: str = "RS256") -> str:
    """A real token from the emulator, fetched the way the proxy does: boto3 GetWebIdentityToken."""
    client = emulator.boto3_client()
    response = client.get_web_identity_token(Audience=audiences, SigningAlgorithm=alg, DurationSeconds=300)
    token: str = response["WebIdentityToken"]
    return token


@pytest.mark.parametrize("alg", ["RS256", "ES384"])
def test_emulator_token_is_accepted_and_claims_echoed(
    alg: str, sts_emulator: StsEmulator, emulator_echo: EchoUpstream
) -> None:
    token = mint(sts_emulator, ["https://other.example", AUDIENCE], alg)
    response = httpx.put(f"{emulator_echo.url}/ok?alg={alg}", headers=bearer(token), content=b"abc")
    assert response.status_code == 200, response.text
    doc = response.json()
    claims = doc["claims"]
    assert claims["iss"] == sts_emulator.issuer
    assert sorted(claims["aud"]) == sorted(["https://other.example", AUDIENCE])
    assert claims["sub"].startswith("arn:aws:")
    assert claims["exp"] > time.time()
    assert "https://sts.amazonaws.com/" in claims
    assert doc["target"] == f"/ok?alg={alg}"
    assert doc["body"]["length"] == 3
    record = emulator_echo.wait_for(lambda r: r.get("target") == f"/ok?alg={alg}")
    assert record["status"] == 200
    assert token not in emulator_echo.stderr()
    assert JWT_SHAPE.search(emulator_echo.stderr()) is None


@pytest.mark.parametrize(
    ("expiration_seconds", "status"),
    [(-300, 401), (-30, 200)],  # the echo allows 60 s of clock skew
)
def test_emulator_expired_token_is_rejected_beyond_leeway(
    expiration_seconds: int, status: int, sts_emulator: StsEmulator, emulator_echo: EchoUpstream
) -> None:
    sts_emulator.set_faults(expiration_seconds=expiration_seconds, count=1)
    token = mint(sts_emulator, [AUDIENCE])
    response = httpx.get(f"{emulator_echo.url}/", headers=bearer(token))
    assert response.status_code == status, response.text
    if status == 401:
        assert response.json() == {"error": "invalid_token", "reason": "token expired"}


def test_emulator_token_for_another_audience_is_rejected(
    sts_emulator: StsEmulator, emulator_echo: EchoUpstream
) -> None:
    token = mint(sts_emulator, ["https://other.example"])
    response = httpx.get(f"{emulator_echo.url}/", headers=bearer(token))
    assert response.status_code == 401
    assert response.json() == {"error": "invalid_token", "reason": "wrong audience"}


def test_es384_token_from_own_key_is_accepted(shared_issuer: Issuer, verifying_echo: EchoUpstream) -> None:
    ec_key = next(k for k in shared_issuer.keys if k.kid == "ec-1")
    token = shared_issuer.sign(shared_issuer.claims(), key=ec_key, alg="ES384")
    response = httpx.get(f"{verifying_echo.url}/", headers=bearer(token))
    assert response.status_code == 200, response.text


def test_without_audience_flag_any_audience_is_accepted_but_required(
    issuer: Issuer, echo_upstream: EchoFactory
) -> None:
    upstream = echo_upstream(issuer.url)
    with httpx.Client(base_url=upstream.url) as client:
        ok = client.get("/", headers=bearer(issuer.sign(issuer.claims(aud="x"))))
        assert ok.status_code == 200
        assert ok.json()["claims"]["aud"] == "x"
        missing = client.get("/", headers=bearer(issuer.sign(issuer.claims(aud=None))))
        assert missing.status_code == 401
        assert missing.json()["reason"] == "missing claim: aud"


def test_unknown_kid_refetches_jwks_once(issuer: Issuer, echo_upstream: EchoFactory) -> None:
    upstream = echo_upstream(issuer.url, AUDIENCE)
    with httpx.Client(base_url=upstream.url) as client:
        first = client.get("/", headers=bearer(issuer.sign(issuer.claims())))
        assert first.status_code == 200
        assert issuer.jwks_hits == 1
        again = client.get("/", headers=bearer(issuer.sign(issuer.claims())))
        assert again.status_code == 200
        assert issuer.jwks_hits == 1  # cached

        rotated = jwk.RSAKey.generate_key(2048, parameters={"kid": "rsa-2"})
        issuer.add_key(rotated)
        token = issuer.sign(issuer.claims(), key=rotated)
        response = client.get("/", headers=bearer(token))
        assert response.status_code == 200, response.text
        assert issuer.jwks_hits == 2  # one refetch for the new kid

        stranger = jwk.RSAKey.generate_key(2048, parameters={"kid": "never-published"})
        for _ in range(3):
            response = client.get("/", headers=bearer(issuer.sign(issuer.claims(), stranger)))
            assert response.status_code == 401
            assert response.json()["reason"] == "unknown key id"
        assert issuer.jwks_hits == 2  # junk kids do not make it hammer the issuer


def test_unreachable_issuer_is_503(echo_upstream: EchoFactory) -> None:
    upstream = echo_upstream(f"http://127.0.0.1:{refused_port()}")
    response = httpx.get(upstream.url + "/", headers={"Authorization": "Bearer a.b.c"})
    assert response.status_code == 401  # malformed before any fetch
    token = "eyJhbGciOiJSUzI1NiJ9.e30.c2ln"
    response = httpx.get(upstream.url + "/", headers=bearer(token))
    assert response.status_code == 503
    assert response.json() == {"error": "keys_unavailable", "reason": "discovery fetch failed: ConnectError"}


# ---- pure verification parts ---------------------------------------------


def test_discovery_document_must_name_the_issuer() -> None:
    assert verify.discovery_url("https://i.test/") == "https://i.test/.well-known/openid-configuration"
    good = {"issuer": "https://i.test", "jwks_uri": "https://i.test/keys"}
    assert verify.jwks_uri_from(good, "https://i.test") == "https://i.test/keys"
    bad: list[object] = [[], {**good, "issuer": "https://evil"}, {**good, "jwks_uri": "file:///etc/passwd"}]
    for doc in bad:
        with pytest.raises(verify.KeysUnavailable):
            verify.jwks_uri_from(doc, "https://i.test")


def test_keys_from_keeps_public_signing_keys_only() -> None:
    rsa = jwk.RSAKey.generate_key(2048, parameters={"kid": "r"})
    doc = {
        "keys": [
            rsa.as_dict(private=False),
            rsa.as_dict(private=True) | {"kid": "private"},
            {"kty": "oct", "k": "c2VjcmV0", "kid": "hmac"},
            {"kty": "RSA", "kid": "broken"},
            rsa.as_dict(private=False) | {"kid": "enc", "use": "enc"},
        ]
    }
    assert [k.kid for k in verify.keys_from(doc)] == ["r"]
    with pytest.raises(verify.KeysUnavailable):
        verify.keys_from({"no": "keys"})
