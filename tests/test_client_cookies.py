"""The shared upstream client never keeps a cookie, without httpx's per-response cookie adapters."""

from __future__ import annotations

import ssl

import httpx

from aws_outbound_jwt_proxy.config import settings as config
from aws_outbound_jwt_proxy.proxy import upstream as forward
from aws_outbound_jwt_proxy.routing.guard import Guard


async def test_client_cookie_store_ignores_set_cookie() -> None:
    settings = config.load(["--upstream-host", "example.test"], {})
    client = forward.client_for(
        forward.build_transport(ssl.create_default_context(), Guard(()), settings.egress)
    )
    try:
        assert isinstance(client.cookies, forward.NoClientCookies)
        request = httpx.Request("GET", "http://example.test/")
        response = httpx.Response(200, headers=[("set-cookie", "a=1; Path=/")], request=request)
        client.cookies.extract_cookies(response)
        assert len(client.cookies) == 0
        # Even a direct write to the jar keeps nothing.
        client.cookies.set("b", "2", domain="example.test")
        assert len(client.cookies) == 0
    finally:
        await client.aclose()
