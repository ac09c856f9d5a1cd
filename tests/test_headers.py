"""Pure header rules: hop-by-hop, Host, X-Forwarded-For, Authorization, response headers."""

from __future__ import annotations

from aws_outbound_jwt_proxy.proxy import headers as hdr


def out(headers: list[tuple[bytes, bytes]], **kw: object) -> tuple[list[tuple[bytes, bytes]], bool]:
    args: dict[str, object] = {"authority": b"up.example:8443", "bearer": b"JWT", "client_ip": b"10.0.0.9"}
    args.update(kw)
    return hdr.outbound(headers, **args)  # type: ignore[arg-type]


def test_order_and_duplicates_kept_host_first_bearer_last() -> None:
    headers, replaced = out(
        [
            (b"host", b"proxy.local"),
            (b"x-b", b"2"),
            (b"x-a", b"1"),
            (b"x-b", b"3"),
            (b"accept", b"*/*"),
        ]
    )
    assert headers == [
        (b"host", b"up.example:8443"),
        (b"x-b", b"2"),
        (b"x-a", b"1"),
        (b"x-b", b"3"),
        (b"accept", b"*/*"),
        (b"x-forwarded-for", b"10.0.0.9"),
        (b"authorization", b"Bearer JWT"),
    ]
    assert replaced is False


def test_hop_by_hop_and_connection_named_headers_dropped() -> None:
    headers, _ = out(
        [
            (b"connection", b"keep-alive, X-Secret , close"),
            (b"x-secret", b"s"),
            (b"keep-alive", b"timeout=5"),
            (b"proxy-authorization", b"Basic abc"),
            (b"proxy-connection", b"keep-alive"),
            (b"te", b"trailers"),
            (b"trailer", b"x-t"),
            (b"transfer-encoding", b"chunked"),
            (b"upgrade", b"h2c"),
            (b"x-kept", b"yes"),
        ]
    )
    names = [n for n, _ in headers]
    assert names == [b"host", b"x-kept", b"x-forwarded-for", b"authorization"]


def test_inbound_authorization_replaced_and_reported() -> None:
    headers, replaced = out([(b"authorization", b"Basic dXNlcjpwYXNz"), (b"Authorization", b"Bearer old")])
    assert replaced is True
    assert [v for n, v in headers if n == b"authorization"] == [b"Bearer JWT"]
    assert all(b"dXNlcjpwYXNz" not in v and v != b"Bearer old" for _, v in headers)


def test_xff_appended_to_existing_list_in_place() -> None:
    headers, _ = out(
        [
            (b"x-a", b"1"),
            (b"x-forwarded-for", b"1.1.1.1, 2.2.2.2"),
            (b"x-b", b"2"),
            (b"x-forwarded-for", b"3.3.3.3"),
        ]
    )
    assert headers[1:4] == [
        (b"x-a", b"1"),
        (b"x-forwarded-for", b"1.1.1.1, 2.2.2.2, 3.3.3.3, 10.0.0.9"),
        (b"x-b", b"2"),
    ]


def test_no_client_ip_keeps_existing_xff_and_adds_none() -> None:
    assert (b"x-forwarded-for", b"1.1.1.1") in out([(b"x-forwarded-for", b"1.1.1.1")], client_ip=None)[0]
    assert all(n != b"x-forwarded-for" for n, _ in out([], client_ip=None)[0])


def test_routing_header_dropped_and_no_user_agent_invented() -> None:
    headers, _ = out([(b"x-upstream-host", b"up.example"), (b"x-a", b"1")], drop=b"x-upstream-host")
    names = [n for n, _ in headers]
    assert b"x-upstream-host" not in names
    assert b"user-agent" not in names and b"accept-encoding" not in names


def test_websocket_handshake_headers() -> None:
    headers, _ = out(
        [
            (b"host", b"p"),
            (b"connection", b"Upgrade"),
            (b"upgrade", b"websocket"),
            (b"sec-websocket-key", b"k"),
            (b"sec-websocket-version", b"13"),
            (b"sec-websocket-protocol", b"chat"),
            (b"origin", b"https://app"),
        ],
        websocket=True,
    )
    assert headers == [
        (b"origin", b"https://app"),
        (b"x-forwarded-for", b"10.0.0.9"),
        (b"authorization", b"Bearer JWT"),
    ]


def test_response_headers_hop_by_hop_dropped_set_cookie_kept_separate() -> None:
    got = hdr.inbound(
        [
            (b"set-cookie", b"a=1"),
            (b"connection", b"x-hop"),
            (b"x-hop", b"1"),
            (b"transfer-encoding", b"chunked"),
            (b"keep-alive", b"timeout=5"),
            (b"set-cookie", b"b=2"),
            (b"content-length", b"10"),
        ]
    )
    assert got == [(b"set-cookie", b"a=1"), (b"set-cookie", b"b=2"), (b"content-length", b"10")]


def test_connection_tokens_case_insensitive() -> None:
    assert hdr.connection_named([(b"Connection", b"Foo, BAR,,")]) == {b"foo", b"bar"}


def test_content_length_dropped_when_transfer_encoding_present() -> None:
    from aws_outbound_jwt_proxy.proxy.headers import outbound

    inbound_headers = [
        (b"content-length", b"5"),
        (b"transfer-encoding", b"chunked"),
        (b"x-keep", b"1"),
    ]
    out, _ = outbound(inbound_headers, authority=b"up", bearer=b"t", client_ip=None)
    assert out == [(b"host", b"up"), (b"x-keep", b"1"), (b"authorization", b"Bearer t")]
    plain, _ = outbound([(b"content-length", b"5")], authority=b"up", bearer=b"t", client_ip=None)
    assert (b"content-length", b"5") in plain
