"""CONNECT interception over real sockets and real TLS, all on loopback.

The proxy intercepts with a test CA (``intercept_ca``); the upstream's
certificate comes from another CA (``tls_upstream``/``wss_upstream``), passed
with --upstream-ca-file. Clients trust only the interception CA, so a
successful request proves the proxy terminated TLS in the tunnel with its own
leaf and called the upstream over verified TLS itself.
"""

from __future__ import annotations

import hashlib
import logging
import ssl
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import hypercorn.trio
import pytest
import trio
import trio_websocket

from aws_outbound_jwt_proxy.config import settings as config
from aws_outbound_jwt_proxy.proxy.app import create_app
from aws_outbound_jwt_proxy.proxy.plan import CONNECT_NOT_FIRST
from aws_outbound_jwt_proxy.routing.router import RouteError, Router
from aws_outbound_jwt_proxy.routing.target import Target
from aws_outbound_jwt_proxy.server import patches
from aws_outbound_jwt_proxy.server.binding import hypercorn_config
from tests.fixtures.child import Child
from tests.fixtures.echo import EchoFactory, EchoUpstream
from tests.fixtures.emulator import StsEmulator
from tests.fixtures.intercept import InterceptCA
from tests.fixtures.process import ProxyFactory, base_env
from tests.fixtures.proxy import FAKE_JWT, AccessLog, FixedTokens, proxy_settings, running_proxy
from tests.fixtures.upstreams import Upstream, WsUpstream, make_tls, read_request_head

pytestmark = pytest.mark.filterwarnings("ignore::trio.TrioDeprecationWarning")


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1].split("/")[0])


def intercepting(intercept_ca: InterceptCA, upstream_ca: str, *flags: str) -> config.Settings:
    """Interception on, only ``localhost`` allowed; --upstream-scheme http shows tunnels still use https."""
    return proxy_settings(
        *intercept_ca.flags(),
        "--upstream-ca-file",
        upstream_ca,
        "--allowed-upstream-hosts",
        "localhost",
        "--upstream-scheme",
        "http",
        *flags,
    )


def trusting(ca_file: str) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=ca_file)


def client(proxy: str, ca_file: str, **kwargs: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(proxy=proxy, verify=trusting(ca_file), trust_env=False, timeout=30, **kwargs)


async def connect(proxy: str, authority: str, before: bytes = b"") -> tuple[trio.SocketStream, bytes, bytes]:
    """A raw CONNECT (after ``before``, sent first on the same connection): (stream, answer head, rest)."""
    stream = await trio.open_tcp_stream("127.0.0.1", port_of(proxy))
    await stream.send_all(before + f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode())
    with trio.fail_after(10):
        if before:
            head, rest = await read_request_head(stream)
            length = int(
                next(
                    v
                    for n, _, v in (h.partition(b": ") for h in head.split(b"\r\n"))
                    if n.lower() == b"content-length"
                )
            )
            while len(rest) < length:
                rest += await stream.receive_some(65536)
            stream_rest = rest[length:]
            if stream_rest:
                raise AssertionError(stream_rest)
        head, rest = await read_request_head(stream)
    return stream, head, rest


@pytest.fixture
def tokens() -> FixedTokens:
    return FixedTokens()


@pytest.fixture
async def proxy(intercept_ca: InterceptCA, tls_upstream: Upstream, tokens: FixedTokens) -> AsyncIterator[str]:
    async with running_proxy(intercepting(intercept_ca, tls_upstream.ca_file), tokens) as url:
        yield url


def header(record: dict[str, Any], name: str) -> list[str]:
    return [v for n, v in record["headers"] if n == name]


# ---- through the tunnel -------------------------------------------------------------------


async def test_http11_in_the_tunnel_reaches_the_upstream_with_the_token(
    proxy: str,
    intercept_ca: InterceptCA,
    tls_upstream: Upstream,
    tokens: FixedTokens,
    access_log: AccessLog,
) -> None:
    port = port_of(tls_upstream.url)
    body = b"x" * (1024 * 1024 + 7)

    async def chunks() -> AsyncIterator[bytes]:
        for i in range(0, len(body), 65536):
            yield body[i : i + 65536]

    async with client(proxy, intercept_ca.cert) as http:
        resp = await http.post(
            f"https://localhost:{port}/v1/items%2Fa//b?x=1&x=2",
            content=chunks(),
            headers={"Authorization": "Basic c2VjcmV0", "X-Upstream-Host": "evil.example", "X-Trace": "t1"},
        )
    assert resp.status_code == 200, resp.text
    assert resp.http_version == "HTTP/1.1"
    seen = tls_upstream.state.requests[0]
    assert resp.json() == seen
    assert (seen["method"], seen["raw_path"], seen["query"]) == ("POST", "/v1/items%2Fa//b", "x=1&x=2")
    assert (seen["body_size"], seen["body_sha256"]) == (len(body), hashlib.sha256(body).hexdigest())
    assert header(seen, "host") == [f"localhost:{port}"]
    assert header(seen, "authorization") == [f"Bearer {FAKE_JWT}"]
    assert header(seen, "x-trace") == ["t1"]
    assert header(seen, "x-upstream-host") == []  # the routing header means nothing in a tunnel
    assert tokens.asked == [("https://localhost",)]  # the dynamic audience, https
    with trio.fail_after(5):
        records = await access_log.wait_for(1)
    rec = records[0]
    assert (rec.method, rec.path, rec.status) == ("POST", "/v1/items%2Fa//b", 200)  # type: ignore[attr-defined]
    assert rec.target == f"localhost:{port}"  # type: ignore[attr-defined]


async def test_http2_in_the_tunnel_with_concurrent_streams(
    proxy: str, intercept_ca: InterceptCA, tls_upstream: Upstream
) -> None:
    port = port_of(tls_upstream.url)
    async with client(proxy, intercept_ca.cert, http1=False, http2=True) as http:
        responses: list[httpx.Response] = []

        async def get(i: int) -> None:
            responses.append(await http.get(f"https://localhost:{port}/h2/{i}?q={i}"))

        async with trio.open_nursery() as nursery:
            for i in range(5):
                nursery.start_soon(get, i)
    assert sorted(r.json()["raw_path"] for r in responses) == [f"/h2/{i}" for i in range(5)]
    assert {r.http_version for r in responses} == {"HTTP/2"}
    for seen in tls_upstream.state.requests:
        assert header(seen, "authorization") == [f"Bearer {FAKE_JWT}"]
        assert header(seen, "host") == [f"localhost:{port}"]


async def test_streamed_response_arrives_before_it_ends(
    proxy: str, intercept_ca: InterceptCA, tls_upstream: Upstream
) -> None:
    port = port_of(tls_upstream.url)
    async with client(proxy, intercept_ca.cert, http2=True) as http:
        async with http.stream("GET", f"https://localhost:{port}/sse") as resp:
            events = resp.aiter_raw()
            with trio.fail_after(10):
                assert await events.__anext__() == b"data: one\n\n"
                tls_upstream.state.sse_go.set()  # the upstream sends the rest only now
                assert b"".join([chunk async for chunk in events]) == b"data: two\n\n"


async def test_websocket_in_the_tunnel(
    intercept_ca: InterceptCA, wss_upstream: WsUpstream, tokens: FixedTokens
) -> None:
    settings = intercepting(intercept_ca, wss_upstream.ca_file)
    port = port_of(wss_upstream.host)
    async with running_proxy(settings, tokens) as url:
        stream, head, rest = await connect(url, f"localhost:{port}")
        assert head.startswith(b"HTTP/1.1 200 "), head
        assert rest == b""
        tls = trio.SSLStream(stream, trusting(intercept_ca.cert), server_hostname="localhost")
        async with trio.open_nursery() as nursery:
            ws = await trio_websocket.wrap_client_stream(
                nursery,
                tls,
                f"localhost:{port}",
                "/chat?room=1",  # type: ignore[arg-type]
            )
            await ws.send_message("hello")
            with trio.fail_after(10):
                assert await ws.get_message() == "hello"
            await ws.aclose()
    assert wss_upstream.path == "/chat?room=1"
    assert ("authorization", f"Bearer {FAKE_JWT}") in wss_upstream.headers


async def test_plain_requests_are_served_as_before_with_interception_on(
    intercept_ca: InterceptCA, tls_upstream: Upstream, upstream: Upstream, tokens: FixedTokens
) -> None:
    settings = proxy_settings(
        *intercept_ca.flags(), "--upstream-scheme", "http", "--allowed-upstream-hosts", upstream.host
    )
    async with running_proxy(settings, tokens) as url:
        async with httpx.AsyncClient(proxy=url, trust_env=False, timeout=30) as http:
            resp = await http.get(f"{upstream.url}/absolute?x=1")  # forward-proxy form, no CONNECT
        assert resp.status_code == 200, resp.text
        async with httpx.AsyncClient(http1=False, http2=True, trust_env=False, timeout=30) as h2c:
            resp = await h2c.get(f"{url}/h2c", headers={"X-Upstream-Host": upstream.host})
        assert resp.status_code == 200 and resp.http_version == "HTTP/2"
    assert [r["raw_path"] for r in upstream.state.requests] == ["/absolute", "/h2c"]
    assert all(header(r, "authorization") == [f"Bearer {FAKE_JWT}"] for r in upstream.state.requests)


# ---- refusals -------------------------------------------------------------------------------


async def test_a_host_outside_the_allow_list_gets_403_and_nothing_is_called(
    proxy: str,
    intercept_ca: InterceptCA,
    tls_upstream: Upstream,
    tokens: FixedTokens,
    access_log: AccessLog,
) -> None:
    port = port_of(tls_upstream.url)
    stream, head, rest = await connect(proxy, f"127.0.0.1:{port}")  # the same upstream, not allowed
    async with stream:
        assert head.startswith(b"HTTP/1.1 403 "), head
        while b"upstream not allowed\n" not in rest:
            rest += await stream.receive_some(65536)
    async with client(proxy, intercept_ca.cert) as http:
        with pytest.raises(httpx.ProxyError, match="403"):
            await http.get(f"https://127.0.0.1:{port}/never")
    assert tls_upstream.state.requests == []
    assert tokens.asked == []
    with trio.fail_after(5):
        records = await access_log.wait_for(2)
    assert [(r.method, r.status) for r in records] == [("CONNECT", 403), ("CONNECT", 403)]  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("authority", "allowed", "status", "body"),
    [
        ("localhost", "localhost", 400, b"host:port expected"),
        ("localhost:1/x", "localhost", 400, b"invalid CONNECT target"),
        # denied by --denied-upstream-cidrs (below); the metadata address itself is tried only inside a
        # private network namespace (tests/test_ssrf_namespace.py), so no packet can reach it from here
        ("127.0.0.2:443", "127.0.0.2", 403, b"upstream not allowed"),
        ("127.0.0.1:PROXY", "127.0.0.1", 508, b"loop"),  # the proxy itself
    ],
)
async def test_connect_targets_the_proxy_refuses(
    intercept_ca: InterceptCA, tokens: FixedTokens, authority: str, allowed: str, status: int, body: bytes
) -> None:
    settings = proxy_settings(
        *intercept_ca.flags(), "--allowed-upstream-hosts", allowed, "--denied-upstream-cidrs", "127.0.0.2/32"
    )
    async with running_proxy(settings, tokens) as url:
        stream, head, rest = await connect(url, authority.replace("PROXY", str(port_of(url))))
        async with stream:
            assert head.startswith(f"HTTP/1.1 {status} ".encode()), head
            with trio.fail_after(10):
                while body not in rest:
                    rest += await stream.receive_some(65536)
    assert tokens.asked == []


async def test_connect_after_another_request_on_the_connection_is_not_tunnelled(
    proxy: str, tls_upstream: Upstream, tokens: FixedTokens
) -> None:
    first = b"GET /first HTTP/1.1\r\nHost: proxy\r\n\r\n"  # no routing header: 400, connection kept
    stream, head, rest = await connect(proxy, f"localhost:{port_of(tls_upstream.url)}", before=first)
    async with stream:
        assert head.startswith(b"HTTP/1.1 400 "), head
        with trio.fail_after(10):
            while CONNECT_NOT_FIRST.encode() not in rest:
                rest += await stream.receive_some(65536)
    assert tls_upstream.state.requests == [] and tokens.asked == []


class Warnings(logging.Handler):
    """The proxy's warning records; ``await arrived.wait()`` until one came."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []
        self.arrived = trio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        self.arrived.set()


@pytest.fixture
def warnings() -> Iterator[Warnings]:
    logger = logging.getLogger("aws_outbound_jwt_proxy")
    handler = Warnings()
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)


async def test_a_client_not_trusting_the_ca_fails_the_handshake_and_the_proxy_serves_on(
    proxy: str, intercept_ca: InterceptCA, tls_upstream: Upstream, warnings: Warnings
) -> None:
    port = port_of(tls_upstream.url)
    async with client(proxy, tls_upstream.ca_file) as http:  # trusts the upstream's CA, not ours
        with pytest.raises(httpx.ConnectError) as refused:
            await http.get(f"https://localhost:{port}/refused")
    causes = []
    error: BaseException | None = refused.value
    while error is not None:
        causes.append(error)
        error = error.__cause__ or error.__context__
    assert any(isinstance(e, ssl.SSLCertVerificationError) for e in causes), causes
    with trio.fail_after(10):
        await warnings.arrived.wait()
    [failed] = warnings.records
    assert failed.getMessage().startswith("TLS handshake in an intercepted tunnel failed")
    assert failed.target == f"localhost:{port}"  # type: ignore[attr-defined]
    # "tlsv1 alert unknown ca", or an EOF when the client hangs up without sending its alert
    assert failed.cause  # type: ignore[attr-defined]
    assert tls_upstream.state.requests == []
    async with client(proxy, intercept_ca.cert) as http:
        assert (await http.get(f"https://localhost:{port}/after")).status_code == 200


async def test_secrets_stay_out_of_the_logs(
    proxy: str, intercept_ca: InterceptCA, tls_upstream: Upstream, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    port = port_of(tls_upstream.url)
    for http2 in (False, True):
        async with client(proxy, intercept_ca.cert, http2=http2) as http:
            resp = await http.get(
                f"https://localhost:{port}/x", headers={"Authorization": "Bearer client-secret"}
            )
            assert resp.status_code == 200
    # Ours and hypercorn's; the HTTP libraries log header values at debug, so the
    # proxy keeps them at warning (observe.logs; the process test reads all of stderr).
    records = [r for r in caplog.records if r.name.startswith(("aws_outbound_jwt_proxy", "hypercorn"))]
    assert any(r.getMessage() == "intercepting" for r in records)  # debug records were captured
    logged = "\n".join(f"{r.getMessage()} {r.__dict__}" for r in records)
    key = open(intercept_ca.key).read().splitlines()[1]  # noqa: ASYNC230 - a small local file
    for secret in (FAKE_JWT, FAKE_JWT.split(".")[2], "client-secret", key):
        assert secret not in logged


async def test_connect_inside_the_tls_listener(
    tmp_path: Path, intercept_ca: InterceptCA, tls_upstream: Upstream, tokens: FixedTokens
) -> None:
    (tmp_path / "listener").mkdir()
    listener_ca, cert, key = make_tls(tmp_path / "listener")  # the proxy's own HTTPS listener
    patches.install()  # as the serving code does
    settings = proxy_settings(
        *intercept_ca.flags(),
        "--upstream-ca-file",
        tls_upstream.ca_file,
        "--allowed-upstream-hosts",
        "localhost",
    )
    app = create_app(settings, tokens)
    cfg = hypercorn_config("127.0.0.1", 0, certfile=cert, keyfile=key, graceful_timeout=1.0)
    port = port_of(tls_upstream.url)
    async with trio.open_nursery() as nursery:
        [url] = await nursery.start(partial(hypercorn.trio.serve, app, cfg))
        outer_ctx = trusting(listener_ca)
        outer_ctx.set_alpn_protocols(["http/1.1"])
        outer = trio.SSLStream(
            await trio.open_tcp_stream("127.0.0.1", port_of(url)), outer_ctx, server_hostname="localhost"
        )
        await outer.send_all(f"CONNECT localhost:{port} HTTP/1.1\r\n\r\n".encode())
        with trio.fail_after(10):
            head, rest = await read_request_head(outer)  # type: ignore[arg-type]
            assert head.startswith(b"HTTP/1.1 200 ") and rest == b"", head
            inner = trio.SSLStream(outer, trusting(intercept_ca.cert), server_hostname="localhost")
            await inner.send_all(f"GET /tls-in-tls HTTP/1.1\r\nHost: localhost:{port}\r\n\r\n".encode())
            head, rest = await read_request_head(inner)  # type: ignore[arg-type]
        assert head.startswith(b"HTTP/1.1 200 "), head
        await trio.aclose_forcefully(inner)
        # An ordinary request on the TLS listener is served as ever (the bytes read are put back).
        verify = trusting(listener_ca)
        async with httpx.AsyncClient(verify=verify, trust_env=False, timeout=30) as http:
            plain = await http.get(f"{url}/plain-on-tls", headers={"X-Upstream-Host": f"localhost:{port}"})
        assert (plain.status_code, plain.http_version) == (200, "HTTP/1.1"), plain.text
        nursery.cancel_scope.cancel()
    assert [r["raw_path"] for r in tls_upstream.state.requests] == ["/tls-in-tls", "/plain-on-tls"]
    for seen in tls_upstream.state.requests:
        assert header(seen, "authorization") == [f"Bearer {FAKE_JWT}"]


async def test_a_tunnel_never_reuses_an_http_route_to_the_same_authority(
    intercept_ca: InterceptCA, upstream: Upstream, tokens: FixedTokens
) -> None:
    # A plain-http upstream: first reached as http:// (forward-proxy form), then through a tunnel,
    # which must use https (and fail against it) rather than the cached http:// route.
    settings = proxy_settings(
        *intercept_ca.flags(), "--upstream-scheme", "http", "--allowed-upstream-hosts", "127.0.0.1"
    )
    async with running_proxy(settings, tokens) as url:
        async with httpx.AsyncClient(proxy=url, trust_env=False, timeout=30) as http:
            assert (await http.get(f"{upstream.url}/plain")).status_code == 200
        async with client(url, intercept_ca.cert) as https:
            resp = await https.get(f"https://{upstream.host}/tunnelled")
        assert resp.status_code == 502, resp.text
    assert [r["raw_path"] for r in upstream.state.requests] == ["/plain"]


def test_connect_targets_are_https_and_need_an_allow_list() -> None:
    router = Router(scheme="http", header="X-Upstream-Host", allowed=("api.example.com",))
    assert router.connect("api.example.com:443") == Target(
        "https", "api.example.com", None, "api.example.com"
    )
    assert router.connect("API.example.com:8443").base_url == "https://api.example.com:8443"
    with pytest.raises(RouteError) as refused:
        Router(scheme="https", header="X-Upstream-Host").connect("api.example.com:443")
    assert refused.value.status == 403  # an empty list allows nothing to be intercepted


# ---- the real process: console script and the hypercorn command ---------------------------------

AUD = "https://localhost"  # the dynamic audience of any https://localhost:<port> target


def _verified(echo: EchoUpstream, proxy_url: str, intercept_ca: InterceptCA) -> str:
    """h1 then h2 through the interception to the verifying echo upstream; the token it verified."""
    port = port_of(echo.url)
    token = ""
    for http2, version in ((False, "HTTP/1.1"), (True, "HTTP/2")):
        verify = trusting(intercept_ca.cert)
        with httpx.Client(proxy=proxy_url, verify=verify, http2=http2, trust_env=False, timeout=30) as c:
            resp = c.get(f"https://localhost:{port}/e2e?h2={http2}", headers={"X-Upstream-Host": "x.test"})
        assert (resp.status_code, resp.http_version) == (200, version), resp.text
        doc = resp.json()
        assert doc["claims"]["aud"] == AUD
        assert doc["target"] == f"/e2e?h2={http2}"
        [bearer] = [v for n, v in doc["headers"] if n == "authorization"]
        token = bearer.removeprefix("Bearer ")
    return token


def test_console_script_intercepts_end_to_end(
    tmp_path: Path,
    sts_emulator: StsEmulator,
    echo_upstream: EchoFactory,
    proxy_process: ProxyFactory,
    intercept_ca: InterceptCA,
) -> None:
    upstream_ca, cert, key = make_tls(tmp_path)  # the echo's certificate, from another CA
    echo = echo_upstream(sts_emulator.issuer, AUD, "--tls-cert", cert, "--tls-key", key)
    proxy = proxy_process(
        [
            *intercept_ca.flags(),
            "--upstream-ca-file",
            upstream_ca,
            "--allowed-upstream-hosts",
            "localhost",
            "--log-level",
            "debug",
        ],
        base_env(sts_emulator.env),
    )
    token = _verified(echo, proxy.url, intercept_ca)
    started = proxy.wait_for(lambda r: r.get("msg") == "proxy listening")
    assert started["intercept_connect"] is True
    records: list[dict[str, Any]] = []  # the access records, once both have come
    proxy.wait_for(lambda r: r.get("msg") == "request" and (records.append(r) or len(records) == 2))
    assert [(r["path"], r["status"], r["target"]) for r in records] == [
        ("/e2e", 200, f"localhost:{port_of(echo.url)}")
    ] * 2
    text = "\n".join(proxy.lines)  # everything it logged, at debug
    assert token and token not in text and token.split(".")[2] not in text
    assert open(intercept_ca.key).read().splitlines()[1] not in text


class Hypercorn(Child):
    """``hypercorn --worker-class trio`` serving the proxy app, its stderr collected like a Child's."""

    name = "hypercorn"

    def __init__(self, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            [
                *(
                    str(Path(sys.executable).with_name("hypercorn")),
                    "--worker-class",
                    "trio",
                    "--workers",
                    "0",
                ),
                *("--bind", "127.0.0.1:0", "aws_outbound_jwt_proxy.asgi:app"),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env={**env, "PYTHONUNBUFFERED": "1"},
        )
        self.lines = []
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()


def test_hypercorn_command_intercepts_end_to_end(
    tmp_path: Path, sts_emulator: StsEmulator, echo_upstream: EchoFactory, intercept_ca: InterceptCA
) -> None:
    upstream_ca, cert, key = make_tls(tmp_path)
    echo = echo_upstream(sts_emulator.issuer, AUD, "--tls-cert", cert, "--tls-key", key)
    env = base_env(sts_emulator.env)
    env.update(
        {
            "INTERCEPT_CA_CERT": intercept_ca.cert,
            "INTERCEPT_CA_KEY": intercept_ca.key,
            "UPSTREAM_CA_FILE": upstream_ca,
            "ALLOWED_UPSTREAM_HOSTS": "localhost",
            "METRICS_ENABLED": "false",
        }
    )
    server = Hypercorn(env)
    try:
        running = server.wait_for(lambda r: str(r.get("msg", "")).startswith("Running on http://"))
        _verified(echo, running["msg"].split()[2], intercept_ca)
        server.wait_for(lambda r: r.get("msg") == "request" and r.get("status") == 200)
    finally:
        server.kill()


async def test_a_stalled_connect_head_is_cut_off_by_the_header_timeout(
    intercept_ca: InterceptCA, tls_upstream: Upstream, tokens: FixedTokens
) -> None:
    settings = intercepting(intercept_ca, tls_upstream.ca_file, "--read-header-timeout", "200ms")
    async with running_proxy(settings, tokens) as url:
        stream = await trio.open_tcp_stream("127.0.0.1", port_of(url))
        async with stream:
            await stream.send_all(b"CONNECT localhost:")  # and never the rest
            with trio.fail_after(5):
                assert await stream.receive_some(1024) == b""  # closed, no answer
    assert tokens.asked == []
