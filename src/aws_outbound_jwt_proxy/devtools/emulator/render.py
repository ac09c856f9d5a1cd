"""STS Query-protocol XML bodies (pure): success documents and ErrorResponse."""

from __future__ import annotations

import time
from xml.sax.saxutils import escape

NAMESPACE = "https://sts.amazonaws.com/doc/2011-06-15/"
CONTENT_TYPE = "text/xml"


def iso8601(epoch: int) -> str:
    """``1795946400`` → ``"2026-11-29T10:00:00Z"`` (UTC, whole seconds)."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


def _fields(fields: dict[str, str]) -> str:
    return "".join(f"<{name}>{escape(value)}</{name}>" for name, value in fields.items())


def success(action: str, fields: dict[str, str], request_id: str) -> str:
    """``<{action}Response><{action}Result>fields</…><ResponseMetadata><RequestId>…``."""
    return (
        f'<{action}Response xmlns="{NAMESPACE}">\n'
        f"  <{action}Result>{_fields(fields)}</{action}Result>\n"
        f"  <ResponseMetadata><RequestId>{escape(request_id)}</RequestId></ResponseMetadata>\n"
        f"</{action}Response>\n"
    )


def error(type_: str, code: str, message: str, request_id: str) -> str:
    """``<ErrorResponse><Error><Type/><Code/><Message/></Error><RequestId/></ErrorResponse>``."""
    return (
        f'<ErrorResponse xmlns="{NAMESPACE}">\n'
        f"  <Error>{_fields({'Type': type_, 'Code': code, 'Message': message})}</Error>\n"
        f"  <RequestId>{escape(request_id)}</RequestId>\n"
        f"</ErrorResponse>\n"
    )
