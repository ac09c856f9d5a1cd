"""HTTP forwarding over real sockets: proxy app (hypercorn trio) ↔ real upstream servers."""

from __future__ import annotations

import errno
import gc
import json
import logging
from typing import Any

import h11
import httpx
import pytest
import trio
import trio_websocket

from aws_outbound_jwt_proxy.proxy.exchange import UpstreamFailure, UpstreamTimeout, classify
from aws_outbound_jwt_proxy.proxy.plan import VIA_VALUE
from aws_outbound_jwt_proxy.routing.target import Target
from tests.fixtures.proxy import (
    FAKE_JWT,
    FailingTokens,
    FixedTokens,
    RecordingObserver,
    proxy_settings,
    running_proxy,
)
from tests.fixtures.upstreams import GZIPPED, Silent, Upstream, refused_port

HTTP = ("--upstream-scheme", "http")


async def raw_exchange(base_url: str, request: bytes) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """Send ``request`` bytes as is on a fresh connection; parse one response."""
    host, port = base_url.removeprefix("http://").rsplit(":", 1)
    stream = await trio.open_tcp_stream(host, int(port))
    async with stream:
        await stream.send_all(request)
        conn = h11.Connection(h11.CLIENT)
        conn.send(h11.Request(method="GET", target="/", headers=[("host", "x")]))  # put h11 in SEND_BODY
        conn.send(h11.EndOfMessage())
        status, headers, body = 0, [], b""
        with trio.fail_after(10):
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(await stream.receive_some(65536))
                elif isinstance(event, h11.Response):
                    status, headers = event.status_code, list(event.headers)
                elif isinstance(event, h11.Data):
                    body += bytes(event.data)
                elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                    return status, headers, body


def access_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "aws_outbound_jwt_proxy.access"]


def echoed(response: httpx.Response | bytes) -> dict[str, Any]:
    body = response if isinstance(response, bytes) else response.content
    data: dict[str, Any] = json.loads(body)
    return data


async def test_path_and_query_forwarded_byte_for_byte(upstream: Upstream) -> None:
    target = b"/a%2Fb//c/./d/../e;p=1?x=1&x=2&x=&y=%2F%20&x=1"
    async with running_proxy(proxy_settings(*HTTP), FixedTokens()) as url:
        req = b"GET " + target + b" HTTP/1.1\r\nHost: proxy\r\nX-Upstream-Host: " + upstream.host.encode()
        status, _, body = await raw_exchange(url, req + b"\r\nConnection: close\r\n\r\n")
    assert status == 200
    seen = echoed(body)
    assert seen["raw_path"] + "?" + seen["query"] == target.decode()


async def test_headers_order_duplicates_hop_by_hop_host_xff_no_defaults(upstream: Upstream) -> None:
    async with running_proxy(proxy_settings(*HTTP), FixedTokens()) as url:
        req = (
            b"GET /h HTTP/1.1\r\n"
            b"Host: proxy.local\r\n"
            b"X-B: 2\r\n"
            b"X-Upstream-Host: " + upstream.host.encode() + b"\r\n"
            b"X-A: 1\r\n"
            b"Connection: close, X-Secret\r\n"
            b"X-Secret: hop\r\n"
            b"Keep-Alive: timeout=5\r\n"
            b"Proxy-Authorization: Basic cHJveHk=\r\n"
            b"Proxy-Connection: keep-alive\r\n"
            b"TE: trailers\r\n"
            b"X-Forwarded-For: 203.0.113.7\r\n"
            b"X-B: 3\r\n"
            b"\r\n"
        )
        status, _, body = await raw_exchange(url, req)
    assert status == 200
    assert echoed(body)["headers"] == [
        ["host", upstream.host],
        ["x-b", "2"],
        ["x-a", "1"],
        ["x-forwarded-for", "203.0.113.7, 127.0.0.1"],
        ["x-b", "3"],
        ["via", VIA_VALUE.decode()],  # our hop marker (loops through other proxies are refused)
        ["authorization", f"Bearer {FAKE_JWT}"],
    ]


async def test_authorization_replaced_and_never_logged(
    upstream: Upstream, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    async with running_proxy(proxy_settings(*HTTP), FixedTokens()) as url, httpx.AsyncClient() as client:
        r = await client.get(
            url + "/auth",
            headers={"X-Upstream-Host": upstream.host, "Authorization": "Basic aW5ib3VuZDpzZWNyZXQ="},
        )
    assert r.status_code == 200
    assert [v for n, v in echoed(r)["headers"] if n == "authorization"] == [f"Bearer {FAKE_JWT}"]
    assert any("replaced inbound Authorization" in rec.getMessage() for rec in caplog.records)
    for rec in caplog.records:
        text = rec.getMessage() + repr(rec.__dict__)
        assert FAKE_JWT not in text and "aW5ib3VuZDpzZWNyZXQ=" not in text


async def test_user_agent_and_accept_encoding_pass_through_when_sent(upstream: Upstream) -> None:
    async with running_proxy(proxy_settings(*HTTP), FixedTokens()) as url, httpx.AsyncClient() as client:
        r = await client.get(url + "/ua", headers={"X-Upstream-Host": upstream.host, "User-Agent": "curl/8"})
    names = {n: v for n, v in echoed(r)["headers"]}
    assert names["user-agent"] == "curl/8"
    assert names["accept-encoding"] == "gzip, deflate"  # the client's own, unchanged


async def test_response_set_cookies_separate_and_hop_by_hop_dropped(upstream: Upstream) -> None:
    async with running_proxy(proxy_settings(*HTTP), FixedTokens()) as url:
        req = b"GET /cookie HTTP/1.1\r\nHost: p\r\nX-Upstream-Host: " + upstream.host.encode()
        status, headers, _ = await raw_exchange(url, req + b"\r\nConnection: close\r\n\r\n")
        assert status == 200
        assert [v for n, v in headers if n == b"set-cookie"] == [
            b"session=secret-a; Path=/",
            b"theme=dark; Path=/",
        ]
        req = b"GET /hop HTTP/1.1\r\nHost: p\r\nX-Upstream-Host: " + upstream.host.encode()
        status, headers, body = await raw_exchange(url, req + b"\r\nConnection: close\r\n\r\n")
    names = [n for n, _ in headers]
    assert status == 200 and body == b"hop\n"
    assert b"x-hop" not in names and b"keep-alive" not in names and b"proxy-authenticate" not in names
    assert (b"x-end", b"kept") in headers


async def test_cookies_from_one_client_never_reach_another(upstream: Upstream) -> None:
    async with running_proxy(proxy_settings(*HTTP), FixedTokens()) as url:
        async with httpx.AsyncClient() as a:
            r = await a.get(url + "/cookie", headers={"X-Upstream-Host": upstream.host})
            assert len(r.headers.get_list("set-cookie")) == 2
        async with httpx.AsyncClient() as b:
            r = await b.get(url + "/who", headers={"X-Upstream-Host": upstream.host})
    assert r.status_code == 200
    assert all(n != "cookie" for n, _ in echoed(r)["headers"])
    assert upstream.state.requests[-1]["raw_path"] == "/who"


async def test_redirect_passes_through(upstream: Upstream) -> None:
    async with running_proxy(proxy_settings(*HTTP), FixedTokens()) as url, httpx.AsyncClient() as client:
        r = await client.get(url + "/redirect", headers={"X-Upstream-Host": upstream.host})
    assert r.status_code == 302 and r.headers["location"] == "/elsewhere"
    assert [q["raw_path"] for q in upstream.state.requests] == ["/redirect"]


async def test_compressed_body_passes_undecoded(upstream: Upstream) -> None:
    async with running_proxy(proxy_settings(*HTTP), FixedTokens()) as url:
        req = b"GET /gzip HTTP/1.1\r\nHost: p\r\nX-Upstream-Host: " + upstream.host.encode()
        status, headers, body = await raw_exchange(url, req + b"\r\nConnection: close\r\n\r\n")
    assert status == 200 and (b"content-encoding", b"gzip") in headers
    assert body == GZIPPED


async def test_request_bodies_stream_through_unchanged(upstream: Upstream) -> None:
    payload = bytes(range(256)) * 80_000  # 20 MB: above Quart's 16 MB MAX_CONTENT_LENGTH

    async def chunks() -> Any:
        for i in range(0, len(payload), 1 << 20):
            yield payload[i : i + (1 << 20)]

    import hashlib

    want = hashlib.sha256(payload).hexdigest()
    async with running_proxy(proxy_settings(*HTTP), FixedTokens()) as url, httpx.AsyncClient() as client:
        fixed = await client.post(url + "/len", headers={"X-Upstream-Host": upstream.host}, content=payload)
        chunked = await client.put(
            url + "/chunked", headers={"X-Upstream-Host": upstream.host}, content=chunks()
        )
        empty = await client.post(url + "/empty", headers={"X-Upstream-Host": upstream.host})
    assert fixed.status_code == 200 and echoed(fixed)["body_sha256"] == want
    assert ["content-length", str(len(payload))] in echoed(fixed)["headers"]
    assert chunked.status_code == 200 and echoed(chunked)["body_sha256"] == want
    assert ["transfer-encoding", "chunked"] in echoed(chunked)["headers"]
    assert echoed(empty)["method"] == "POST" and echoed(empty)["body_size"] == 0


async def test_http2_client_without_content_length(upstream: Upstream) -> None:
    async def chunks() -> Any:
        yield b"a" * 100_000
        yield b"b" * 100_000

    async with running_proxy(proxy_settings(*HTTP), FixedTokens()) as url:
        async with httpx.AsyncClient(http1=False, http2=True) as client:
            r = await client.post(url + "/h2", headers={"X-Upstream-Host": upstream.host}, content=chunks())
            g = await client.get(url + "/h2get", headers={"X-Upstream-Host": upstream.host})
    assert r.http_version == "HTTP/2" and r.status_code == 200
    assert echoed(r)["body_size"] == 200_000
    assert g.status_code == 200 and echoed(g)["body_size"] == 0 and echoed(g)["method"] == "GET"


@pytest.mark.parametrize(
    "value",
    [
        None,
        "",
        "http://up.example",
        "up.example/path",
        "user@up.example",
        "up example",
        "up.example:99999",
        "up.example:http",
        "[::1",
    ],
)
async def test_bad_routing_header_is_400_and_nothing_called(upstream: Upstream, value: str | None) -> None:
    tokens = FixedTokens()
    headers = {} if value is None else {"X-Upstream-Host": value}
    async with running_proxy(proxy_settings(*HTTP), tokens) as url, httpx.AsyncClient() as client:
        r = await client.get(url + "/x", headers=headers)
    assert r.status_code == 400
    assert r.headers["content-type"].startswith("text/plain")
    assert "X-Upstream-Host" in r.text
    assert tokens.asked == [] and upstream.state.requests == []


async def test_allow_list_403(upstream: Upstream) -> None:
    tokens = FixedTokens()
    settings = proxy_settings(*HTTP, "--allowed-upstream-hosts", "*.example.com")
    async with running_proxy(settings, tokens) as url, httpx.AsyncClient() as client:
        r = await client.get(url + "/x", headers={"X-Upstream-Host": upstream.host})
    assert r.status_code == 403 and r.text == "upstream not allowed\n"
    assert tokens.asked == [] and upstream.state.requests == []


async def test_pinned_upstream_and_host_mode(upstream: Upstream) -> None:
    async with running_proxy(proxy_settings(*HTTP, "--upstream-host", upstream.host), FixedTokens()) as url:
        async with httpx.AsyncClient() as client:
            r = await client.get(url + "/pinned")
    assert r.status_code == 200 and ["host", upstream.host] in echoed(r)["headers"]
    async with running_proxy(proxy_settings(*HTTP, "--host-header", "Host"), FixedTokens()) as url:
        req = b"GET /hostmode HTTP/1.1\r\nHost: " + upstream.host.encode() + b"\r\nConnection: close\r\n\r\n"
        status, _, body = await raw_exchange(url, req)
    assert status == 200 and echoed(body)["headers"][0] == ["host", upstream.host]


async def test_token_unavailable_is_502_and_upstream_not_called(
    upstream: Upstream, caplog: pytest.LogCaptureFixture
) -> None:
    tokens = FailingTokens("AccessDenied")
    async with running_proxy(proxy_settings(*HTTP), tokens) as url, httpx.AsyncClient() as client:
        r = await client.get(url + "/x", headers={"X-Upstream-Host": upstream.host})
    assert r.status_code == 502 and r.text == "token unavailable\n"
    assert tokens.asked == [("http://127.0.0.1",)]
    assert upstream.state.requests == []
    errors = [rec for rec in caplog.records if rec.levelno == logging.ERROR]
    assert any(
        getattr(rec, "error_class", None) == "AccessDenied"
        and getattr(rec, "audience", None) == "http://127.0.0.1"
        for rec in errors
    )


async def test_refused_upstream_is_502_with_error_then_access_record(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    port = refused_port()
    async with running_proxy(proxy_settings(*HTTP), FixedTokens()) as url, httpx.AsyncClient() as client:
        r = await client.get(url + "/down?q=1", headers={"X-Upstream-Host": f"127.0.0.1:{port}"})
    assert r.status_code == 502 and r.text == "upstream unavailable\n"
    names = [rec.name for rec in caplog.records if rec.name.startswith("aws_outbound_jwt_proxy.")]
    err_at = names.index("aws_outbound_jwt_proxy.forward")
    assert names.index("aws_outbound_jwt_proxy.access") > err_at
    err = next(rec for rec in caplog.records if rec.name == "aws_outbound_jwt_proxy.forward")
    assert err.levelno == logging.ERROR
    assert err.__dict__["target"] == f"127.0.0.1:{port}" and "Connect" in err.__dict__["cause"]
    rec = access_records(caplog)[-1]
    fields = {k: rec.__dict__[k] for k in ("method", "path", "target", "status", "duration_ms")}
    assert fields["method"] == "GET" and fields["path"] == "/down" and fields["status"] == 502
    assert fields["target"] == f"127.0.0.1:{port}" and isinstance(fields["duration_ms"], float)
    assert rec.getMessage() == "request" and rec.levelno == logging.INFO


async def test_no_response_headers_in_time_is_504(silent_upstream: Silent) -> None:
    settings = proxy_settings(*HTTP, "--upstream-timeout", "300ms")
    async with running_proxy(settings, FixedTokens()) as url, httpx.AsyncClient() as client:
        with trio.fail_after(10):
            r = await client.post(
                url + "/slow", headers={"X-Upstream-Host": silent_upstream.host}, content=b"x"
            )
    assert r.status_code == 504 and r.text == "upstream timeout\n"
    assert silent_upstream.accepted  # it really was called


async def test_access_record_for_unroutable_request(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    async with running_proxy(proxy_settings(*HTTP), FixedTokens()) as url, httpx.AsyncClient() as client:
        await client.delete(url + "/nowhere/%2F?x=1")
    rec = access_records(caplog)[-1]
    assert (rec.__dict__["method"], rec.__dict__["path"], rec.__dict__["target"], rec.__dict__["status"]) == (
        "DELETE",
        "/nowhere/%2F",
        "",
        400,
    )


async def test_malformed_requests_get_4xx_and_server_keeps_serving(
    upstream: Upstream, caplog: pytest.LogCaptureFixture
) -> None:
    async with running_proxy(proxy_settings(*HTTP), FixedTokens()) as url:
        status, _, _ = await raw_exchange(url, b"NOT HTTP AT ALL\r\n\r\n")
        assert 400 <= status < 500
        status, _, _ = await raw_exchange(url, b"GET /x HTTP/1.1\r\nHost: p\r\nContent-Length: zz\r\n\r\n")
        assert 400 <= status < 500
        req = b"GET http://elsewhere/x HTTP/1.1\r\nHost: p\r\nX-Upstream-Host: " + upstream.host.encode()
        status, _, _ = await raw_exchange(url, req + b"\r\nConnection: close\r\n\r\n")
        assert 400 <= status < 500
        req = b"GET /caf\xe9 HTTP/1.1\r\nHost: p\r\nX-Upstream-Host: " + upstream.host.encode()
        status, _, _ = await raw_exchange(url, req + b"\r\nConnection: close\r\n\r\n")
        assert 400 <= status < 500
        req = b"OPTIONS * HTTP/1.1\r\nHost: p\r\nX-Upstream-Host: " + upstream.host.encode()
        status, _, body = await raw_exchange(url, req + b"\r\nConnection: close\r\n\r\n")
        assert status == 200 and echoed(body)["raw_path"] == "*"
        async with httpx.AsyncClient() as client:
            r = await client.get(url + "/still-ok", headers={"X-Upstream-Host": upstream.host})
    assert r.status_code == 200
    assert not [rec for rec in caplog.records if rec.exc_info]


async def test_https_upstream_verified_with_ca_file_and_h2_by_alpn(tls_upstream: Upstream) -> None:
    settings = proxy_settings("--upstream-scheme", "https", "--upstream-ca-file", tls_upstream.ca_file)
    async with running_proxy(settings, FixedTokens()) as url, httpx.AsyncClient() as client:
        r = await client.post(
            url + "/tls?a=1", headers={"X-Upstream-Host": tls_upstream.host}, content=b"x" * 5000
        )
        again = await client.get(url + "/tls2", headers={"X-Upstream-Host": tls_upstream.host})
    assert r.status_code == 200 and again.status_code == 200
    seen = echoed(r)
    assert seen["http_version"] == "2" and seen["body_size"] == 5000
    assert (seen["raw_path"], seen["query"]) == ("/tls", "a=1")
    assert ["host", tls_upstream.host] in seen["headers"]
    assert ["authorization", f"Bearer {FAKE_JWT}"] in seen["headers"]


async def test_https_upstream_with_untrusted_certificate_is_502(
    tls_upstream: Upstream, caplog: pytest.LogCaptureFixture
) -> None:
    async with running_proxy(proxy_settings("--upstream-scheme", "https"), FixedTokens()) as url:
        async with httpx.AsyncClient() as client:
            r = await client.get(url + "/tls", headers={"X-Upstream-Host": tls_upstream.host})
    assert r.status_code == 502 and r.text == "upstream unavailable\n"
    assert tls_upstream.state.requests == []
    err = next(rec for rec in caplog.records if rec.name == "aws_outbound_jwt_proxy.forward")
    assert "CERTIFICATE_VERIFY_FAILED" in err.__dict__["cause"]


async def test_observer_sees_status_token_result_and_error_type(
    upstream: Upstream, silent_upstream: Silent
) -> None:
    obs = RecordingObserver()
    settings = proxy_settings(*HTTP, "--upstream-timeout", "300ms")
    refused = f"127.0.0.1:{refused_port()}"
    async with running_proxy(settings, FixedTokens(), obs) as url, httpx.AsyncClient() as client:
        for host in (upstream.host, refused, silent_upstream.host, ""):
            await client.get(url + "/o", headers={"X-Upstream-Host": host} if host else {})
    async with (
        running_proxy(settings, FailingTokens("Throttling"), obs) as url,
        httpx.AsyncClient() as client,
    ):
        await client.get(url + "/o", headers={"X-Upstream-Host": upstream.host})
    got = [(c["status"], c["token_result"], c["error_type"]) for c in obs.calls]
    assert got == [
        (200, "ok", None),
        (502, "ok", "connection_refused"),
        (504, "ok", "timeout"),
        (400, None, None),
        (502, "fetch_error", None),
    ]
    assert obs.active == 0
    ok = obs.calls[0]
    target = ok["target"]
    assert isinstance(target, Target) and target.authority == upstream.host
    assert isinstance(ok["upstream_seconds"], float) and isinstance(ok["duration"], float)


def test_classify_upstream_failures() -> None:
    refused = httpx.ConnectError("x")
    refused.__cause__ = OSError("all attempts failed")
    refused.__cause__.__cause__ = ConnectionRefusedError(111, "refused")
    assert classify(refused) == UpstreamFailure(502, "upstream unavailable\n", "connection_refused")
    assert classify(httpx.ConnectTimeout("t")) == UpstreamFailure(504, "upstream timeout\n", "timeout")
    assert classify(UpstreamTimeout("no headers")).error_type == "timeout"
    assert classify(trio_websocket.ConnectionTimeout()).error_type == "timeout"
    assert classify(httpx.RemoteProtocolError("reset")) == UpstreamFailure(
        502, "upstream unavailable\n", "unknown"
    )
    group = BaseExceptionGroup("g", [OSError(errno.ECONNREFUSED, "refused")])
    assert classify(group).error_type == "connection_refused"


async def test_head_and_expect_continue(upstream: Upstream) -> None:
    async with running_proxy(proxy_settings(*HTTP), FixedTokens()) as url, httpx.AsyncClient() as client:
        head = await client.head(url + "/cookie", headers={"X-Upstream-Host": upstream.host})
        post = await client.post(
            url + "/expect",
            headers={"X-Upstream-Host": upstream.host, "Expect": "100-continue"},
            content=b"e" * 70_000,
        )
    assert head.status_code == 200 and head.content == b""
    assert upstream.state.requests[0]["method"] == "HEAD"
    assert post.status_code == 200 and echoed(post)["body_size"] == 70_000
    # answered once, here: the expectation is not forwarded as well
    assert "expect" not in [name for name, _ in echoed(post)["headers"]]


async def test_httpx_never_reads_proxy_variables_itself(
    upstream: Upstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    dead = f"http://127.0.0.1:{refused_port()}"
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "all_proxy"):
        monkeypatch.setenv(name, dead)
    async with running_proxy(proxy_settings(*HTTP), FixedTokens()) as url:
        async with httpx.AsyncClient(trust_env=False) as client:
            r = await client.get(url + "/env", headers={"X-Upstream-Host": upstream.host})
    assert r.status_code == 200 and echoed(r)["raw_path"] == "/env"


async def test_a_proxied_request_leaves_no_reference_cycles(upstream: Upstream) -> None:
    """Each request's upstream response, its request and the parser die when the request ends.

    Objects in reference cycles wait for the cyclic garbage collector, whose passes
    over everything young cost every request in flight (and cache misses) under load.
    One keep-alive client connection, so no per-connection state is in the count.
    """
    head = b"GET /gc HTTP/1.1\r\nHost: proxy\r\nX-Upstream-Host: " + upstream.host.encode() + b"\r\n\r\n"
    async with running_proxy(proxy_settings(*HTTP), FixedTokens()) as url:
        host, port = url.removeprefix("http://").rsplit(":", 1)
        stream = await trio.open_tcp_stream(host, int(port))
        conn = h11.Connection(h11.CLIENT)

        async def one_request() -> int:
            await stream.send_all(head)
            conn.send(h11.Request(method="GET", target="/gc", headers=[("host", "proxy")]))
            conn.send(h11.EndOfMessage())
            status = 0
            with trio.fail_after(10):
                while not isinstance(event := conn.next_event(), h11.EndOfMessage):
                    if event is h11.NEED_DATA:
                        conn.receive_data(await stream.receive_some(65536))
                    elif isinstance(event, h11.Response):
                        status = event.status_code
            conn.start_next_cycle()
            return status

        async with stream:
            assert await one_request() == 200  # warm: pools and caches filled
            gc.collect()
            gc.disable()
            gc.set_debug(gc.DEBUG_SAVEALL)
            try:
                statuses = [await one_request() for _ in range(20)]
                gc.collect()
                cyclic = {type(o).__module__ + "." + type(o).__qualname__ for o in gc.garbage}
            finally:
                gc.set_debug(0)
                gc.garbage.clear()
                gc.enable()
    assert statuses == [200] * 20
    per_request = {
        "httpx._models.Response",
        "httpx._models.Request",
        "aws_outbound_jwt_proxy.proxy.h1._Reader",
    }
    assert not cyclic & per_request, sorted(cyclic)
