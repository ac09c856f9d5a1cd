"""The proxy's Quart-Trio app: every path and method goes to the :class:`~.forward.Forwarder`.

Quart stays in the request path (request context, before/after hooks, error
handlers, response objects), with the parts that are wrong for a proxy
replaced: URL matching is skipped (every request is forwarded, raw path kept),
the request body streams with backpressure and the response has no timeout
(:mod:`.http`, :mod:`.body`), websockets are relayed (:mod:`.websocket`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from quart.ctx import RequestContext
from quart.globals import request_ctx
from quart_trio import QuartTrio

from ..config.settings import Settings
from ..routing.guard import Listener
from ..tokens.supervisor import TokenSource
from .body import ProxyRequest, ProxyResponse
from .exchange import NullObserver, RequestObserver
from .forward import Forwarder
from .http import ProxyHTTPConnection
from .websocket import ProxyWebsocketConnection


class ProxyApp(QuartTrio):
    asgi_http_class = ProxyHTTPConnection
    # Not Quart's websocket wrapper: the relay needs the raw ASGI messages (close codes, rejects).
    asgi_websocket_class = ProxyWebsocketConnection  # type: ignore[assignment]
    request_class = ProxyRequest
    forwarder: Forwarder

    def create_url_adapter(self, request: Any) -> Any:
        # No URL map for requests: every path is proxied as is (no slash merging,
        # no redirects, no Host parsing by werkzeug).
        if request is not None:
            return None
        return super().create_url_adapter(request)

    async def dispatch_request(self, request_context: RequestContext | None = None) -> ProxyResponse:
        request = (request_context or request_ctx).request
        assert isinstance(request, ProxyRequest)
        return await self.forwarder.handle(request)


def create_app(
    settings: Settings,
    tokens: TokenSource,
    *,
    observer: RequestObserver | None = None,
    listeners: Sequence[Listener] = (),
) -> QuartTrio:
    """The proxy app. ``observer`` receives every finished request (metrics); ``listeners``
    are our own bound addresses, never a valid upstream."""
    app = ProxyApp(__name__)
    app.config.update(
        MAX_CONTENT_LENGTH=None,  # Quart's 16 MB → 413 is wrong for a proxy
        BODY_TIMEOUT=None,
        RESPONSE_TIMEOUT=None,  # would cut long downloads and SSE
        PROVIDE_AUTOMATIC_OPTIONS=False,
    )
    forwarder = Forwarder(settings, tokens, observer or NullObserver(), listeners)
    app.forwarder = forwarder

    @app.before_serving
    async def open_client() -> None:
        forwarder.open()

    @app.after_serving
    async def close_client() -> None:
        await forwarder.close()

    return app
