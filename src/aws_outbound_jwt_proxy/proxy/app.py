"""The proxy's Quart-Trio app: every path and method goes to the :class:`~.forward.Forwarder`.

Quart stays in the request path (request context, before/after hooks, error
handlers, response objects), with the parts that are wrong for a proxy
replaced: URL matching is skipped (every request is forwarded, raw path kept),
the request body streams with backpressure and the response has no timeout
(:mod:`.http`, :mod:`.body`), websockets are relayed (:mod:`.websocket`).
With ``--intercept-ca-cert`` the app offers CONNECT interception to the
server through the lifespan state (:mod:`.tunnel`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from hypercorn.typing import ASGIReceiveCallable, ASGISendCallable, Scope
from quart.ctx import RequestContext
from quart.globals import request_ctx
from quart_trio import QuartTrio

from ..config.settings import Settings
from ..intercept import ca
from ..routing.guard import Listener
from ..tokens.supervisor import TokenSource
from .body import ProxyRequest, ProxyResponse
from .exchange import NullObserver, RequestObserver
from .forward import Forwarder
from .http import ProxyHTTPConnection
from .tunnel import INTERCEPTION, Interception
from .websocket import ProxyWebsocketConnection

log = logging.getLogger("aws_outbound_jwt_proxy.serve")


class ProxyApp(QuartTrio):
    asgi_http_class = ProxyHTTPConnection
    # Not Quart's websocket wrapper: the relay needs the raw ASGI messages (close codes, rejects).
    asgi_websocket_class = ProxyWebsocketConnection  # type: ignore[assignment]
    request_class = ProxyRequest
    forwarder: Forwarder
    interception: Interception | None = None

    async def asgi_app(self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
        if scope["type"] == "lifespan" and self.interception is not None:
            # The server copies this state into every connection's: that is how it finds the offer.
            state = scope.get("state")
            if isinstance(state, dict):
                state[INTERCEPTION] = self.interception
            else:
                log.warning("the ASGI server keeps no lifespan state: CONNECT is not intercepted")
        await super().asgi_app(scope, receive, send)

    def create_url_adapter(self, request: Any) -> Any:
        # No URL map for requests: every path is proxied as is (no slash merging,
        # no redirects, no Host parsing by werkzeug).
        if request is not None:
            return None
        return super().create_url_adapter(request)

    async def preprocess_request(self, request_context: RequestContext | None = None) -> Any:
        # Quart walks the request's blueprints and every hook list per request; a proxy
        # registers none, so skip the walk unless someone did.
        if any(self.before_request_funcs.values()) or any(self.url_value_preprocessors.values()):
            return await super().preprocess_request(request_context)
        return None

    async def process_response(self, response: Any, request_context: RequestContext | None = None) -> Any:
        ctx = request_context or request_ctx
        if (
            ctx._after_request_functions
            or any(self.after_request_funcs.values())
            or not self.session_interface.is_null_session(ctx.session)
        ):
            return await super().process_response(response, request_context)
        return response

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
    if settings.intercepting:  # the pair was checked with the settings
        issuer = ca.load(settings.intercept_ca_cert, settings.intercept_ca_key)
        app.interception = Interception(forwarder.planner, ca.LeafContexts(issuer))

    @app.before_serving
    async def open_client() -> None:
        forwarder.open()
        app.nursery.start_soon(forwarder.maintain)

    @app.after_serving
    async def close_client() -> None:
        await forwarder.close()

    return app
