"""Prometheus series of the proxy: label rules, cheap recording, one registry per app.

:class:`Metrics` owns every series (the reference's series plus our token series) and
renders the scrape. Recording resolves label children once per label tuple and
keeps them in a dict, so the hot path is a dict lookup and an ``observe``.
:class:`NullMetrics` has the same methods and records nothing (metrics off).

Several worker processes: when ``PROMETHEUS_MULTIPROC_DIR`` is set before
``prometheus_client`` is imported, values live in per-process mmap files there
and every scrape sums them (``MultiProcessCollector``). Gauges then need a mode:
active requests and cached sets are ``livesum``; token expiry keeps the
soonest expiry over live workers. Call :meth:`Metrics.close` when a worker
stops so its live gauges leave the sum.
"""

from __future__ import annotations

import math
import os
import re
import time
from collections.abc import Callable, Iterable, Sequence

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, multiprocess, values
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from .. import __version__
from ..proxy.exchange import TOKEN_OK, Exchange
from ..proxy.exchange import NullObserver as NullRequestObserver
from ..routing.target import DEFAULT_PORTS
from ..tokens.supervisor import NullObserver, SetState, TokenObserver
from . import health

CANONICAL_METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"}
)
OTHER_METHOD = "_OTHER"
OTHER = "_OTHER"  # server_address and server_port of upstreams past the cap
MAX_UPSTREAMS = 100
UPSTREAM_IDLE = 3600.0
# 1 ms .. 30 s: fast local upstreams up to --upstream-timeout's default.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

UNKNOWN = "unknown"  # error_class of a failed fetch that carried none

EXPIRY = "token_expiry_seconds"
# Multi-process mode only: each worker writes its tokens' expiry (unix time) here;
# the scrape turns the soonest one into seconds left. Never exported itself.
_EXPIRY_AT = "token_expiry_unixtime_internal"
_GONE = math.inf  # "no longer cached" for _EXPIRY_AT (a removed label stays in the mmap file)


# ---- label rules (pure) -------------------------------------------------------


# Labels the reference emits only sometimes (error_type on failure, server_port when
# not the scheme default, error_class on error). prometheus-client gives every
# series of a metric the same label names, so the empty ones are cut from the text.
_EMPTY_OPTIONAL = re.compile(rb'(?<=[{,])(?:error_type|server_port|error_class)="",?')


def drop_empty_labels(text: bytes) -> bytes:
    """Remove optional labels whose value is empty from an exposition (values are escaped,
    so ``name=""`` can only be a label, never part of a value)."""
    return _EMPTY_OPTIONAL.sub(b"", text).replace(b",}", b"}")


def port_label(scheme: str, port: int | None) -> str:
    """``server_port``: empty (label absent) for no port or the scheme's default port."""
    if port is None or DEFAULT_PORTS.get(scheme) == port:
        return ""
    return str(port)


# ---- multi-process mode ---------------------------------------------------------


def multiprocess_dir() -> str | None:
    """The mmap directory when prometheus_client was imported in multi-process mode, else None."""
    if not getattr(values.ValueClass, "_multiprocess", False):
        return None
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or os.environ.get("prometheus_multiproc_dir")


class _MultiprocessCollector(Collector):
    """Every worker's files summed; the internal expiry gauge turned into seconds left."""

    def __init__(self, path: str) -> None:
        self._inner = multiprocess.MultiProcessCollector(None, path)  # type: ignore[no-untyped-call]

    def collect(self) -> Iterable[Metric]:
        for family in self._inner.collect():  # type: ignore[no-untyped-call]
            if family.name != _EXPIRY_AT:
                yield family
                continue
            now = time.time()
            gauge = GaugeMetricFamily(EXPIRY, _EXPIRY_HELP, labels=["audience"])
            for sample in family.samples:
                if sample.value != _GONE:
                    gauge.add_metric([sample.labels["audience"]], max(0.0, sample.value - now))
            yield gauge


class _ExpiryCollector(Collector):
    """Single-process ``token_expiry_seconds``: computed from the expiry map at scrape time."""

    def __init__(self, tokens: TokenMetrics) -> None:
        self._tokens = tokens

    def describe(self) -> Iterable[Metric]:
        return [GaugeMetricFamily(EXPIRY, _EXPIRY_HELP, labels=["audience"])]

    def collect(self) -> Iterable[Metric]:
        gauge = GaugeMetricFamily(EXPIRY, _EXPIRY_HELP, labels=["audience"])
        now = time.time()
        for audience, at in self._tokens.expiry().items():
            gauge.add_metric([audience], max(0.0, at - now))
        return [gauge]


_EXPIRY_HELP = "Seconds until the current token of the audience set expires (0: no valid token)."


# ---- the series -------------------------------------------------------------------


class TokenMetrics:
    """Implements :class:`tokens.TokenObserver`; called on the event loop's thread only
    (from request tasks on a cache hit or miss, from fetch tasks when a fetch ends).

    ``token_expiry_seconds`` comes from ``Supervisor.snapshot`` (see :meth:`watch`),
    read on the event loop just before each scrape (:meth:`sync`). In multi-process
    mode another worker may answer the scrape, so each worker also writes its
    expiries after every fetch and whenever a set leaves its cache. (A new set needs
    no write: it holds no token until its first fetch finishes.)
    """

    def __init__(self, m: Metrics) -> None:
        self._m = m
        self._push = m.multiprocess_dir is not None
        self._count = 0
        self._hits: dict[str, Counter] = {}
        self._misses: dict[str, Counter] = {}
        self._fetches: dict[
            tuple[str, bool, str | None, bool], tuple[Counter, Histogram, Counter | None]
        ] = {}
        self._snapshot: Callable[[], Sequence[SetState]] | None = None
        self._expiry: dict[str, float] = {}  # audience -> unix expiry (0: none); replaced, never mutated

    def watch(self, snapshot: Callable[[], Sequence[SetState]]) -> None:
        """Source of token expiry: ``Supervisor.snapshot`` (call it on the event loop only)."""
        self._snapshot = snapshot

    def expiry(self) -> dict[str, float]:
        """Audience set -> unix time its token expires (0 when it holds none)."""
        return self._expiry

    def fetch_finished(
        self, audience: str, ok: bool, error_class: str | None, seconds: float, background: bool
    ) -> None:
        key = (audience, ok, error_class, background)
        children = self._fetches.get(key)
        if children is None:
            m, result = self._m, "ok" if ok else "error"
            children = self._fetches[key] = (
                m.token_fetch.labels(audience, result, "" if ok else (error_class or UNKNOWN)),
                m.token_fetch_duration.labels(result),
                m.token_refresh.labels(audience, result) if background else None,
            )
        count, duration, refresh = children
        count.inc()
        duration.observe(seconds)
        if refresh is not None:
            refresh.inc()
        if self._push:
            self.sync()

    def cache_hit(self, audience: str) -> None:
        child = self._hits.get(audience)
        if child is None:
            child = self._hits[audience] = self._m.token_cache_hit.labels(audience)
        child.inc()

    def cache_miss(self, audience: str) -> None:
        child = self._misses.get(audience)
        if child is None:
            child = self._misses[audience] = self._m.token_cache_miss.labels(audience)
        child.inc()

    def cached_sets(self, count: int) -> None:
        self._m.token_cached_audiences.set(count)
        if count < self._count:  # a set left the cache
            if self._push:  # drop its expiry for the other workers' scrapes
                self.sync()
            else:
                self._forget_evicted()
        self._count = count

    def _forget_evicted(self) -> None:
        """Drop the per-audience series of sets no longer cached, so their number stays
        bounded by --token-cache-max-entries (single-process mode; in multi-process mode
        prometheus-client keeps every series written to its files)."""
        if self._snapshot is None:
            return
        live = {s.audience for s in self._snapshot()}
        m = self._m
        for audience in [a for a in self._hits if a not in live]:
            m.token_cache_hit.remove(audience)
            del self._hits[audience]
        for audience in [a for a in self._misses if a not in live]:
            m.token_cache_miss.remove(audience)
            del self._misses[audience]
        for key in [k for k in self._fetches if k[0] not in live]:
            audience, ok, error_class, background = key
            result = "ok" if ok else "error"
            m.token_fetch.remove(audience, result, "" if ok else (error_class or UNKNOWN))
            if background:
                m.token_refresh.remove(audience, result)  # absent label sets are ignored
            del self._fetches[key]

    def sync(self) -> None:
        """Re-read every set's expiry (O(sets)). On the event loop: before a scrape, after a fetch."""
        if self._snapshot is None:
            return
        now = time.time()
        new = {
            s.audience: 0.0 if s.seconds_left is None else math.floor(now + s.seconds_left)
            for s in self._snapshot()
        }
        gauge = self._m.expiry_at
        if gauge is not None:
            for audience in self._expiry.keys() - new.keys():
                gauge.labels(audience).set(_GONE)
            for audience, at in new.items():
                if self._expiry.get(audience) != at:
                    gauge.labels(audience).set(at)
        self._expiry = new


class Metrics:
    """Every series, registered in this instance's own registry (or the worker's mmap files)."""

    def __init__(
        self,
        *,
        process_collectors: bool = True,
        max_upstreams: int = MAX_UPSTREAMS,
        upstream_idle: float = UPSTREAM_IDLE,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``max_upstreams`` distinct (server_address, server_port) pairs get series of their
        own; later ones fold into ``_OTHER``. A pair unused for ``upstream_idle`` seconds
        loses its series at the next scrape (single-process mode), freeing its place."""
        # no *_created series: the same names as the reference (this switch is process-wide)
        prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]
        self.multiprocess_dir = multiprocess_dir()
        self.registry = CollectorRegistry()  # what a scrape renders
        # In multi-process mode the series write to mmap files and the scrape reads all files.
        reg = None if self.multiprocess_dir else self.registry
        self.server_duration = Histogram(
            "http_server_request_duration_seconds",
            "Duration of inbound requests handled by the proxy.",
            ["http_request_method", "http_response_status_code"],
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        self.active_requests = Gauge(
            "http_server_active_requests",
            "Inbound requests in flight.",
            registry=reg,
            multiprocess_mode="livesum",
        )
        self.client_duration = Histogram(
            "http_client_request_duration_seconds",
            "Duration of outbound calls (token included); error_type only on failure.",
            ["server_address", "server_port", "error_type", "token_result"],
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        self.build_info = Gauge(
            "aws_outbound_jwt_proxy_build_info",
            "Always 1; the version label is the running release.",
            ["version"],
            registry=reg,
            multiprocess_mode="max",
        )
        self.build_info.labels(__version__).set(1)
        self.upstream_denied = Counter(
            "upstream_denied_count",
            "Requests refused because their upstream is not allowed "
            "(reason: allow_list, or denied_cidr for the SSRF deny list).",
            ["reason"],
            registry=reg,
        )
        self.token_fetch = Counter(
            "token_fetch_count",
            "STS GetWebIdentityToken calls by audience set and result.",
            ["audience", "result", "error_class"],
            registry=reg,
        )
        self.token_cache_hit = Counter(
            "token_cache_hit_count", "Token requests answered from the cache.", ["audience"], registry=reg
        )
        self.token_cache_miss = Counter(
            "token_cache_miss_count", "Token requests with no valid cached token.", ["audience"], registry=reg
        )
        self.token_cached_audiences = Gauge(
            "token_cached_audiences",
            "Audience sets in the token cache.",
            registry=reg,
            multiprocess_mode="livesum",
        )
        self.token_refresh = Counter(
            "token_refresh",
            "Background token fetches (pre-warm and refresh before expiry) by result.",
            ["audience", "result"],
            registry=reg,
        )
        self.token_fetch_duration = Histogram(
            "token_fetch_duration_seconds",
            "Duration of STS GetWebIdentityToken calls.",
            ["result"],
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        self.tokens = TokenMetrics(self)
        self.expiry_at: Gauge | None = None
        if self.multiprocess_dir:
            self.expiry_at = Gauge(
                _EXPIRY_AT, "internal", ["audience"], registry=None, multiprocess_mode="livemin"
            )
            self.registry.register(_MultiprocessCollector(self.multiprocess_dir))
        else:
            self.registry.register(_ExpiryCollector(self.tokens))
        if process_collectors:
            # The Python equivalents of go_* / process_*. process_* and python_gc_* describe
            # one process, so in multi-process mode only python_info is exported.
            prometheus_client.PlatformCollector(registry=self.registry)
            if not self.multiprocess_dir:
                prometheus_client.ProcessCollector(registry=self.registry)
                prometheus_client.GCCollector(registry=self.registry)
        self._server: dict[tuple[str, int], Histogram] = {}
        self._client: dict[tuple[str, str, int | None, str | None, str], Histogram] = {}
        self._max_upstreams = max_upstreams
        self._upstream_idle = upstream_idle
        self._clock = clock
        self._upstreams: dict[tuple[str, str], float] = {}  # (address, port label) -> last used
        self._active_inc = self.active_requests.inc
        self._active_dec = self.active_requests.dec

    def watch(self, snapshot: Callable[[], Sequence[SetState]]) -> None:
        """Where ``token_expiry_seconds`` comes from: pass ``Supervisor.snapshot``."""
        self.tokens.watch(snapshot)

    # ---- hot path ----

    def request_started(self) -> None:
        """An inbound request arrived (``http_server_active_requests`` +1)."""
        self._active_inc()

    def request_finished(self, method: str, status: int, seconds: float) -> None:
        """Exactly once per :meth:`request_started` (in a ``finally``): active -1, duration observed."""
        self._active_dec()
        if method not in CANONICAL_METHODS:
            method = OTHER_METHOD
        key = (method, status)
        child = self._server.get(key)
        if child is None:
            child = self._server[key] = self.server_duration.labels(method, str(status))
        child.observe(seconds)

    def upstream_finished(
        self,
        host: str,
        scheme: str,
        port: int | None,
        seconds: float,
        error: str | None,
        token_result: str,
    ) -> None:
        """One outbound call (or its failed token step): ``error`` is an ``error_type`` label or None."""
        key = (host, scheme, port, error, token_result)
        child = self._client.get(key)
        if child is None:
            address, port_text = host, port_label(scheme, port)
            if (address, port_text) not in self._upstreams and len(self._upstreams) >= self._max_upstreams:
                address = port_text = OTHER  # past the cap: one shared series for the rest
            child = self._client[key] = self.client_duration.labels(
                address, port_text, error or "", token_result
            )
            if address != OTHER:
                self._upstreams[(address, port_text)] = self._clock()
        elif self._upstreams:
            upstream = (host, port_label(scheme, port))
            if upstream in self._upstreams:
                self._upstreams[upstream] = self._clock()
        child.observe(seconds)

    def _forget_idle_upstreams(self) -> None:
        """Drop the series of upstreams unused for ``upstream_idle`` (single-process mode)."""
        if self.multiprocess_dir:
            return  # prometheus-client keeps every series written to its files
        cutoff = self._clock() - self._upstream_idle
        idle = {u for u, used in self._upstreams.items() if used < cutoff}
        if not idle:
            return
        for key in list(self._client):
            host, scheme, port, error, token_result = key
            address = (host, port_label(scheme, port))
            if address in idle:
                del self._client[key]
                try:
                    self.client_duration.remove(*address, error or "", token_result)
                except KeyError:
                    pass
            elif address not in self._upstreams:  # folded into _OTHER: re-resolve on next use
                del self._client[key]
        for address in idle:
            del self._upstreams[address]

    # ---- proxy.exchange.RequestObserver (what the proxy app calls) ----

    def started(self) -> None:
        """A request arrived."""
        self._active_inc()

    def finished(self, exchange: Exchange, duration: float) -> None:
        """A request ended. The outbound series is recorded once the token step ran: the
        upstream call's time, or the whole time for a token failure (upstream not called)."""
        ex = exchange
        self.request_finished(ex.method, ex.status, duration)
        if ex.denied is not None:
            self.upstream_denied.labels(ex.denied).inc()
        target, token_result = ex.target, ex.token_result
        if target is None or token_result is None:
            return  # not routed: no outbound call was attempted
        upstream_seconds = ex.upstream_seconds
        if upstream_seconds is None:
            if token_result == TOKEN_OK:
                return  # client left before the upstream answered: no outcome to record
            upstream_seconds = duration
        self.upstream_finished(
            target.host, target.scheme, target.port, upstream_seconds, ex.error_type, token_result
        )

    # ---- scrape / lifecycle ----

    def prepare(self) -> None:
        """On the event loop, just before a scrape renders: token expiry up to date, idle
        upstreams' series dropped."""
        self.tokens.sync()
        self._forget_idle_upstreams()

    def render(self, accept: str) -> tuple[bytes, str]:
        """The scrape body and its content type (OpenMetrics when ``accept`` asks for it)."""
        encode, content_type = choose_encoder(accept)
        return drop_empty_labels(encode(self.registry)), content_type

    def close(self) -> None:
        """Worker stopping: in multi-process mode drop its live gauges from the sum."""
        if self.multiprocess_dir:
            multiprocess.mark_process_dead(os.getpid(), self.multiprocess_dir)  # type: ignore[no-untyped-call]


class NullMetrics(NullRequestObserver):
    """Metrics disabled: the same methods, nothing recorded (``started``/``finished``
    come from the request path's own no-op observer)."""

    tokens: TokenObserver = NullObserver()

    def watch(self, snapshot: Callable[[], Sequence[SetState]]) -> None:
        pass

    def request_started(self) -> None:
        pass

    def request_finished(self, method: str, status: int, seconds: float) -> None:
        pass

    def upstream_finished(
        self,
        host: str,
        scheme: str,
        port: int | None,
        seconds: float,
        error: str | None,
        token_result: str,
    ) -> None:
        pass

    def close(self) -> None:
        pass


def create_app(metrics: Metrics, ready: health.Ready, path: str) -> health.ASGIApp:
    """The metrics listener's ASGI app: ``path`` (scrape), /healthz, /readyz, 404 elsewhere."""
    return health.create_app(metrics.render, ready, path, prepare=metrics.prepare)
