"""What the app offers the server for CONNECT interception: the admission check and a TLS context per host.

ASGI has no way to hand a CONNECT'ed socket to the app, so the server takes
the tunnel itself, before the HTTP layer (``server.tunnel``), and needs two
things only the app has: whether a ``CONNECT host:port`` may be intercepted
(the app's allow-list and SSRF guard, :meth:`.plan.Planner.admit`) and a
certificate for the host (the interception CA). The app puts an
:class:`Interception` in the ASGI lifespan state under :data:`INTERCEPTION`;
the server finds it in the state it gets for every connection, and marks a
tunnel's connection with its target (:data:`.plan.TUNNEL`) so that the
planner sends every request inside it there.
"""

from __future__ import annotations

import ssl
from typing import Any

from ..intercept import ca
from ..routing.target import Target
from .exchange import Refusal
from .plan import TUNNEL, Planner

INTERCEPTION = "aws_outbound_jwt_proxy.interception"  # lifespan state key: the Interception, when on

__all__ = ["INTERCEPTION", "TUNNEL", "Interception", "offered"]


class Interception:
    """Built once per app when ``--intercept-ca-cert`` is set."""

    def __init__(self, planner: Planner, leaves: ca.LeafContexts) -> None:
        self.planner = planner
        self.leaves = leaves

    def admit(self, authority: str, server: tuple[str, int] | None) -> Target | None:
        """The target to tunnel to, or None: the request goes to the app, which answers the refusal."""
        admitted = self.planner.admit(authority, server)
        return None if isinstance(admitted, Refusal) else admitted

    def tls_context(self, target: Target) -> ssl.SSLContext:
        """The server context for the tunnel: a leaf for the target's host, h2 and http/1.1 by ALPN."""
        return self.leaves.context(target.host)

    @staticmethod
    def tunnel_state(state: dict[str, Any], target: Target) -> dict[str, Any]:
        """The connection state for a tunnel to ``target`` (a new dict: ``state`` is shared)."""
        return {**state, TUNNEL: target}


def offered(state: Any) -> Interception | None:
    """The Interception in a connection's state; None when off or when already inside a tunnel."""
    if not isinstance(state, dict) or TUNNEL in state:
        return None
    interception = state.get(INTERCEPTION)
    return interception if isinstance(interception, Interception) else None
