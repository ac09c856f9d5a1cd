"""One HTTP request through the proxy: plan it, send it upstream, hand back the response to stream.

:class:`Forwarder` is built once per app and holds the :class:`~.plan.Planner`
and the :class:`~.upstream.Upstream`. :meth:`Forwarder.handle` runs per request
(from Quart's dispatch) and returns a :class:`~.body.ProxyResponse` that says how
the request went; the connection's owner (``proxy.http``) records that in the
:class:`~.exchange.Exchange`, streams the body, and calls :meth:`finish`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Protocol

import trio

from ..config.settings import Settings
from ..routing.guard import Guard, Listener
from ..tokens.supervisor import TokenSource
from . import headers as hdr
from .body import ClientBodyTimeout, ClientDisconnected, ProxyRequest, ProxyResponse, plain
from .dial import is_local_address
from .exchange import (
    CLIENT_GONE,
    DENIED_CIDR,
    NOT_ALLOWED,
    REQUEST_BODY_TIMEOUT,
    TOKEN_OK,
    DeniedUpstream,
    Exchange,
    LoopDetected,
    Refusal,
    RequestObserver,
    cause,
    classify,
    own_listener_refusal,
)
from .plan import Planner
from .upstream import Upstream

log = logging.getLogger("aws_outbound_jwt_proxy.forward")
access = logging.getLogger("aws_outbound_jwt_proxy.access")


class Forwarder:
    """Per-app state; :meth:`handle` runs per request, :meth:`begin`/:meth:`finish` bracket it."""

    def __init__(
        self,
        settings: Settings,
        tokens: TokenSource,
        observer: RequestObserver,
        listeners: Sequence[Listener] = (),
    ) -> None:
        """``listeners``: our own bound addresses, which routed requests may never target."""
        guard = Guard(settings.denied_upstream_cidrs, listeners, is_local_address)
        self.planner = Planner(settings, tokens, guard)
        self.upstream = Upstream(settings, guard, settings.egress)
        self.observer = observer
        self.body_timeout = settings.request_body_timeout

    # ---- lifecycle (before_serving / after_serving) -----------------------

    def open(self) -> None:
        self.upstream.open()

    async def maintain(self) -> None:
        """Background upkeep for the life of the app (idle upstream connections); cancel to stop."""
        await self.upstream.sweep_idle()

    async def close(self) -> None:
        await self.upstream.close()

    # ---- per request ------------------------------------------------------

    def begin(self, scope: Any) -> Exchange:
        self.observer.started()
        path = scope.get("raw_path") or b""
        return Exchange(scope.get("method", "GET"), path.decode("latin-1"), trio.current_time())

    def finish(self, ex: Exchange) -> None:
        """The access record and the observer call; exactly once per :meth:`begin`."""
        duration = trio.current_time() - ex.started
        access.info(
            "request",
            extra={
                "method": ex.method,
                "path": ex.path,
                "target": ex.target.authority if ex.target is not None else "",
                "status": ex.status,
                "duration_ms": round(duration * 1000, 3),
                # False when the response was cut (upstream failed mid-body, shutdown, client left).
                "complete": ex.complete,
            },
        )
        self.observer.finished(ex, duration)

    async def handle(self, request: ProxyRequest) -> ProxyResponse:
        scope: Any = request.scope
        plan = await self.planner.plan(scope)
        if isinstance(plan, Refusal):
            request.target, request.token_result = plan.target, plan.token_result
            response = plain(plan.status, plan.body, plan.retry_after)
            response.denied = plan.denied
            return response
        request.target, request.token_result = plan.target, TOKEN_OK
        started = trio.current_time()
        try:
            upstream = await self.upstream.send(scope["method"], plan, request.body)
        except ClientDisconnected:
            response = plain(CLIENT_GONE, "")
            response.client_gone = True
        except ClientBodyTimeout:
            log.warning("request body timed out", extra={"target": plan.target.authority})
            response = plain(408, REQUEST_BODY_TIMEOUT)
        except LoopDetected as loop:
            refusal = own_listener_refusal(loop.kind, plan.target)
            log.warning("upstream is this proxy's own listener", extra={"target": plan.target.authority})
            response = plain(refusal.status, refusal.body)
            response.denied = refusal.denied
        except DeniedUpstream:
            log.warning(
                "upstream address denied", extra={"target": plan.target.authority, "reason": DENIED_CIDR}
            )
            response = plain(403, NOT_ALLOWED)
            response.denied = DENIED_CIDR
        except Exception as exc:
            failure = classify(exc)
            log.error("upstream request failed", extra={"target": plan.target.authority, "cause": cause(exc)})
            response = plain(failure.status, failure.body)
            response.error_type = failure.error_type
            response.upstream_seconds = trio.current_time() - started
        else:
            response = ProxyResponse(
                upstream.status_code, hdr.inbound(upstream.headers.raw), upstream=upstream
            )
            response.upstream_seconds = trio.current_time() - started
        return response


class ForwardingApp(Protocol):
    """What the connection classes need of the app they serve: its forwarder."""

    forwarder: Forwarder
