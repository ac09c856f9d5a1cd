"""Where requests may go, over real sockets: egress proxies, forward-proxy requests, CONNECT, the SSRF guard.

Every upstream is on loopback. Names like ``upstream.test`` exist only in the
stub egress proxy's table, so a request that reaches the upstream through one
of them went through the egress proxy.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
import trio
import trio_websocket

from aws_outbound_jwt_proxy.config import settings as config
from tests.fixtures.egress import EgressProxy
from tests.fixtures.proxy import FAKE_JWT, FixedTokens, RecordingObserver, running_proxy
from tests.fixtures.upstreams import EGRESS_NAME, Upstream, WsUpstream

HTTP = ("--upstream-scheme", "http")
LOOPBACK_DENIED = ("--denied-upstream-cidrs", "127.0.0.0/8,::1/128")


def settings(*flags: str, env: dict[str, str] | None = None) -> config.Settings:
    argv = ["--listen-addr", "127.0.0.1:0", "--metrics-enabled", "false", *flags]
    return config.load(argv, env or {})


def port_of(host: str) -> int:
    return int(host.rsplit(":", 1)[1])


def echoed(response: httpx.Response | bytes) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(response if isinstance(response, bytes) else response.content)
    return data


async def raw(url: str, request: bytes) -> bytes:
    """Send ``request`` on a new connection; the proxy's answer (head and Content-Length body)."""
    stream = await trio.open_tcp_stream("127.0.0.1", port_of(url))
    async with stream:
        await stream.send_all(request)
        out = b""
        with trio.fail_after(10):
            while True:
                head, sep, body = out.partition(b"\r\n\r\n")
                if sep and b"transfer-encoding: chunked" in head.lower():
                    if body.endswith(b"0\r\n\r\n"):
                        return out
                elif sep:
                    length = next(
                        (
                            int(line.split(b":")[1])
                            for line in head.split(b"\r\n")
                            if line.lower().startswith(b"content-length:")
                        ),
                        0,
                    )
                    if len(body) >= length:
                        return out
                data = await stream.receive_some(65536)
                if not data:
                    return out
                out += data


# ---- egress proxy from the environment ------------------------------------------------------


async def test_http_upstream_goes_through_http_proxy_in_absolute_form(
    upstream: Upstream, egress_proxy: EgressProxy
) -> None:
    egress_proxy.hosts[EGRESS_NAME] = ("127.0.0.1", port_of(upstream.host))
    target = f"{EGRESS_NAME}:{port_of(upstream.host)}"
    s = settings(*HTTP, env={"HTTP_PROXY": egress_proxy.url})
    async with running_proxy(s, FixedTokens()) as url, httpx.AsyncClient() as client:
        r = await client.get(url + "/via?x=1", headers={"X-Upstream-Host": target})
    assert r.status_code == 200
    seen = echoed(r)
    assert seen["raw_path"] == "/via" and seen["query"] == "x=1"
    assert ["authorization", f"Bearer {FAKE_JWT}"] in seen["headers"]
    assert egress_proxy.seen == [("GET", f"http://{target}/via?x=1", None)]


async def test_https_upstream_goes_through_connect_tunnel_with_proxy_credentials(
    tls_upstream: Upstream, egress_proxy: EgressProxy, caplog: pytest.LogCaptureFixture
) -> None:
    egress_proxy.hosts[EGRESS_NAME] = ("127.0.0.1", port_of(tls_upstream.host))
    target = f"{EGRESS_NAME}:{port_of(tls_upstream.host)}"
    with_creds = egress_proxy.url.replace("http://", "http://user:s3cret@")
    s = settings("--upstream-ca-file", tls_upstream.ca_file, env={"https_proxy": with_creds})
    async with running_proxy(s, FixedTokens()) as url, httpx.AsyncClient() as client:
        r = await client.get(url + "/tunnel", headers={"X-Upstream-Host": target})
    assert r.status_code == 200 and echoed(r)["raw_path"] == "/tunnel"
    assert egress_proxy.seen == [("CONNECT", target, "Basic dXNlcjpzM2NyZXQ=")]
    assert tls_upstream.state.requests[0]["headers"][0] == ["host", target]
    assert "s3cret" not in caplog.text


async def test_no_proxy_and_loopback_connect_directly(upstream: Upstream, egress_proxy: EgressProxy) -> None:
    egress_proxy.hosts[EGRESS_NAME] = ("127.0.0.1", port_of(upstream.host))
    env = {"HTTP_PROXY": egress_proxy.url, "NO_PROXY": f"other.example,{EGRESS_NAME}"}
    async with running_proxy(settings(*HTTP, env=env), FixedTokens()) as url, httpx.AsyncClient() as c:
        loop = await c.get(url + "/loop", headers={"X-Upstream-Host": upstream.host})
        named = await c.get(
            url + "/np", headers={"X-Upstream-Host": f"{EGRESS_NAME}:{port_of(upstream.host)}"}
        )
    assert loop.status_code == 200 and echoed(loop)["raw_path"] == "/loop"  # loopback: never proxied
    assert named.status_code == 502  # NO_PROXY: resolved directly, and the name does not exist
    assert egress_proxy.seen == []


async def test_websocket_upstream_goes_through_the_egress_proxy(
    ws_upstream: WsUpstream, egress_proxy: EgressProxy
) -> None:
    egress_proxy.hosts[EGRESS_NAME] = ("127.0.0.1", port_of(ws_upstream.host))
    target = f"{EGRESS_NAME}:{port_of(ws_upstream.host)}"
    s = settings(*HTTP, env={"HTTP_PROXY": egress_proxy.url})
    async with running_proxy(s, FixedTokens()) as url:
        async with trio_websocket.open_websocket_url(
            url.replace("http://", "ws://") + "/ws", extra_headers=[(b"x-upstream-host", target.encode())]
        ) as ws:
            await ws.send_message("through the tunnel")
            assert await ws.get_message() == "through the tunnel"
    assert egress_proxy.seen == [("CONNECT", target, None)]
    assert ("authorization", f"Bearer {FAKE_JWT}") in [(n.lower(), v) for n, v in ws_upstream.headers]


# ---- forward-proxy (absolute-form) requests and CONNECT -----------------------------------------


async def test_absolute_form_request_routes_to_its_authority(upstream: Upstream) -> None:
    tokens = FixedTokens()
    async with running_proxy(settings(*HTTP), tokens) as url, httpx.AsyncClient(proxy=url) as client:
        r = await client.get(f"http://{upstream.host}/abs/p?q=%2F")
    assert r.status_code == 200
    seen = echoed(r)
    assert (seen["raw_path"], seen["query"]) == ("/abs/p", "q=%2F")
    assert seen["headers"][0] == ["host", upstream.host]
    assert ["authorization", f"Bearer {FAKE_JWT}"] in seen["headers"]
    assert tokens.asked == [("http://127.0.0.1",)]


async def test_absolute_https_url_and_fragment(upstream: Upstream) -> None:
    async with running_proxy(settings(*HTTP), FixedTokens()) as url:
        answer = await raw(
            url,
            f"GET https://{upstream.host}/frag?a=1#secret HTTP/1.1\r\nHost: {upstream.host}\r\n\r\n".encode(),
        )
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert b'"query":"a=1"' in body.replace(b" ", b"") and b"secret" not in body


async def test_absolute_form_with_a_different_routing_header_is_400(upstream: Upstream) -> None:
    async with running_proxy(settings(*HTTP), FixedTokens()) as url:
        answer = await raw(
            url,
            f"GET http://{upstream.host}/x HTTP/1.1\r\nHost: {upstream.host}\r\n"
            "X-Upstream-Host: other.example\r\n\r\n".encode(),
        )
    assert answer.startswith(b"HTTP/1.1 400") and b"another upstream" in answer
    assert upstream.state.requests == []


async def test_absolute_form_obeys_the_allow_list(upstream: Upstream) -> None:
    s = settings(*HTTP, "--allowed-upstream-hosts", "api.example.com")
    async with running_proxy(s, FixedTokens()) as url, httpx.AsyncClient(proxy=url) as client:
        r = await client.get(f"http://{upstream.host}/nope")
    assert r.status_code == 403 and r.text == "upstream not allowed\n"
    assert upstream.state.requests == []


async def test_pinned_mode_wins_over_an_absolute_url(upstream: Upstream) -> None:
    s = settings(*HTTP, "--upstream-host", upstream.host)
    async with running_proxy(s, FixedTokens()) as url, httpx.AsyncClient(proxy=url) as client:
        r = await client.get("http://elsewhere.example/pinned")
    assert r.status_code == 200 and echoed(r)["raw_path"] == "/pinned"


async def test_connect_is_405_and_calls_nothing(upstream: Upstream) -> None:
    tokens = FixedTokens()
    async with running_proxy(settings(*HTTP), tokens) as url:
        answer = await raw(url, f"CONNECT {upstream.host} HTTP/1.1\r\nHost: {upstream.host}\r\n\r\n".encode())
    assert answer.startswith(b"HTTP/1.1 405") and b"http:// URLs" in answer
    assert upstream.state.requests == [] and tokens.asked == []


# ---- the SSRF guard ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "host", ["127.0.0.1", "localhost", "[::ffff:127.0.0.1]", "2130706433", "127.1", "[::1]"]
)
async def test_denied_cidrs_refuse_literals_and_resolved_names(upstream: Upstream, host: str) -> None:
    tokens, obs = FixedTokens(), RecordingObserver()
    target = f"{host}:{port_of(upstream.host)}"
    async with running_proxy(settings(*HTTP, *LOOPBACK_DENIED), tokens, obs) as url:
        async with httpx.AsyncClient() as client:
            r = await client.get(url + "/ssrf", headers={"X-Upstream-Host": target})
    assert r.status_code == 403 and r.text == "upstream not allowed\n"
    assert upstream.state.requests == []
    if host != "localhost":  # a literal is refused before any token is asked for
        assert tokens.asked == []
    assert obs.calls[0]["denied"] == "denied_cidr"


async def test_denied_cidrs_apply_to_forward_proxy_and_websocket(
    upstream: Upstream, ws_upstream: WsUpstream
) -> None:
    async with running_proxy(settings(*HTTP, *LOOPBACK_DENIED), FixedTokens()) as url:
        async with httpx.AsyncClient(proxy=url) as client:
            r = await client.get(f"http://localhost:{port_of(upstream.host)}/abs")
        with pytest.raises(trio_websocket.ConnectionRejected) as info:
            async with trio_websocket.open_websocket_url(
                url.replace("http://", "ws://") + "/ws",
                extra_headers=[(b"x-upstream-host", f"localhost:{port_of(ws_upstream.host)}".encode())],
            ):
                pass
    assert r.status_code == 403 and upstream.state.requests == []
    assert info.value.status_code == 403 and ws_upstream.path == ""


async def test_pinned_upstream_is_exempt_and_empty_value_disables(upstream: Upstream) -> None:
    pinned = settings(*HTTP, *LOOPBACK_DENIED, "--upstream-host", upstream.host)
    off = settings(*HTTP, "--denied-upstream-cidrs", "")
    async with running_proxy(pinned, FixedTokens()) as a, running_proxy(off, FixedTokens()) as b:
        async with httpx.AsyncClient() as client:
            r1 = await client.get(a + "/pinned")
            r2 = await client.get(b + "/off", headers={"X-Upstream-Host": upstream.host})
    assert (r1.status_code, r2.status_code) == (200, 200)


def test_invalid_cidr_is_a_config_error_naming_the_flag() -> None:
    with pytest.raises(config.ConfigError, match="--denied-upstream-cidrs"):
        settings("--denied-upstream-cidrs", "10.0.0.0/33")
    with pytest.raises(config.ConfigError, match="DENIED_UPSTREAM_CIDRS"):
        config.load(["--listen-addr", "127.0.0.1:0"], {"DENIED_UPSTREAM_CIDRS": "nope"})


def test_default_deny_list() -> None:
    assert [str(n) for n in settings().denied_upstream_cidrs] == [
        "169.254.0.0/16",
        "fe80::/10",
        "fd00:ec2::/32",
        "0.0.0.0/8",
        "::/128",
        "100.100.100.200/32",
    ]


def test_bad_proxy_variable_is_a_config_error() -> None:
    with pytest.raises(config.ConfigError, match="HTTPS_PROXY"):
        settings(env={"HTTPS_PROXY": "socks5://127.0.0.1:1080"})
