"""Soak: the real proxy under mixed load for minutes, watching RSS, open fds and upstream connections.

Starts three processes on 127.0.0.1 only: the project's STS emulator, local upstreams (this file
with ``--serve-upstreams``: an HTTP app, a WebSocket echo server and a raw server that resets
mid-body) and the proxy itself (the ``aws-outbound-jwt-proxy`` console script, metrics on,
header routing, 5 min tokens so background refreshes happen during the run). Then ``--concurrency``
workers (default 32) send mixed traffic for ``--minutes`` (default 10):

* small GETs; 1 MiB downloads and 1 MiB uploads (streamed both ways);
* WebSocket sessions (a few echoed messages, then close);
* upstream errors: a 500 from the upstream, a refused upstream port (502), a reset mid-body;
* a few workers use HTTP/2 (h2c with prior knowledge: httpx ``http1=False, http2=True``).

Every ``--interval`` seconds (default 30) it samples the proxy's RSS, open fds, ESTABLISHED
sockets to the upstream ports (/proc/<pid>/fd + /proc/<pid>/net/tcp{,6}) and STS fetches (from
/metrics), and prints a markdown table at the end. With ``--workers N`` the proxy runs N worker
processes and every figure is the sum over all its processes (supervisor, workers, and
multiprocessing's resource tracker).

Pass: RSS growth from the end of warm-up to the end of the load < 10 MiB, open fds back to the
pre-load baseline once the clients are gone, and at most 0.5 % unexpected outcomes (a wrong status
or body, a transport error, an operation over 60 s; each kind is listed). Exit 0 on pass, 1 on fail.
Not part of CI: ``just soak`` or ``.venv/bin/python bench/soak.py --minutes 1``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import trio
import trio_websocket
from run import tree  # bench/ is on sys.path: this file runs as a script

ROOT = Path(__file__).resolve().parent.parent
MIB = 1 << 20
CHUNK = 64 * 1024
RSS_LIMIT_MIB = 10.0
OP_TIMEOUT = 60.0  # one operation (request, stream, websocket session) never takes longer than this
START_TIMEOUT = 30.0
SETTLE_TIMEOUT = 60.0  # > --read-header-timeout (10 s) + UPSTREAM_KEEPALIVE
WARM_PASSES = 50  # warm-up passes at most (each on new connections)
UPSTREAM_KEEPALIVE = 5.0  # the upstream closes idle keep-alive connections after this long (Node's default)
UNEXPECTED_LIMIT = (
    0.005  # share of operations allowed a wrong answer (see "unexpected outcomes" in the report)
)

# kind → weight; h2 workers only do the HTTP kinds (see Load.pick).
MIX = {
    "small": 50,
    "download": 10,
    "upload": 10,
    "websocket": 10,
    "status500": 7,
    "refused": 6,
    "reset": 7,
}
HTTP_KINDS = ("small", "download", "upload", "status500")


# ---- upstreams (run in their own process with --serve-upstreams) --------------------------------


async def _upstream_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """``/bytes/N``: N bytes streamed; ``/status/N``: that status; anything else: a small body."""
    if scope["type"] == "lifespan":
        while True:
            msg = await receive()
            await send({"type": msg["type"] + ".complete"})
            if msg["type"] == "lifespan.shutdown":
                return
    if scope["type"] != "http":
        return
    size = 0
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            return
        size += len(msg.get("body", b""))
        if not msg.get("more_body", False):
            break
    path: str = scope["path"]
    if path.startswith("/bytes/"):
        total = int(path.rsplit("/", 1)[1])
        headers = [(b"content-length", str(total).encode()), (b"content-type", b"application/octet-stream")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        block = b"d" * CHUNK
        sent = 0
        while sent < total:
            part = block[: min(CHUNK, total - sent)]
            sent += len(part)
            await send({"type": "http.response.body", "body": part, "more_body": sent < total})
        return
    status = int(path.rsplit("/", 1)[1]) if path.startswith("/status/") else 200
    body = str(size).encode()
    headers = [(b"content-length", str(len(body)).encode()), (b"content-type", b"text/plain")]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def _ws_echo(request: trio_websocket.WebSocketRequest) -> None:
    ws = await request.accept()
    with contextlib.suppress(trio_websocket.ConnectionClosed):
        while True:
            await ws.send_message(await ws.get_message())


async def _reset_mid_body(stream: trio.SocketStream) -> None:
    """Reads a request head, promises 1 MiB, sends 64 KiB, then resets the connection (RST)."""
    try:
        buf = b""
        while b"\r\n\r\n" not in buf and len(buf) < 65536:
            data = await stream.receive_some(65536)
            if not data:
                return
            buf += data
        await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % MIB + b"r" * CHUNK)
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    finally:
        await stream.aclose()


async def serve_upstreams() -> None:
    import hypercorn.trio
    from hypercorn.config import Config

    cfg = Config()
    cfg.bind = ["127.0.0.1:0"]
    cfg.accesslog = None
    cfg.keep_alive_timeout = UPSTREAM_KEEPALIVE
    async with trio.open_nursery() as nursery:
        binds: list[str] = await nursery.start(partial(hypercorn.trio.serve, _upstream_app, cfg))
        ws = await nursery.start(partial(trio_websocket.serve_websocket, _ws_echo, "127.0.0.1", 0, None))
        listeners: list[trio.SocketListener] = await nursery.start(
            partial(trio.serve_tcp, _reset_mid_body, 0, host="127.0.0.1")
        )
        ports = {
            "http": int(binds[0].rsplit(":", 1)[1]),
            "ws": ws.port,
            "reset": listeners[0].socket.getsockname()[1],
        }
        print(json.dumps(ports), flush=True)


# ---- processes ----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextlib.contextmanager
def child(
    name: str, cmd: list[str], tmp: Path, env: dict[str, str] | None = None
) -> Iterator[subprocess.Popen[str]]:
    """Start ``cmd`` (stderr to tmp/<name>.log, stdout piped); SIGTERM, then SIGKILL after 15 s, on exit."""
    log = (tmp / f"{name}.log").open("w")
    proc = subprocess.Popen(
        cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log, text=True, env=env
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        log.close()


def wait_http(url: str, proc: subprocess.Popen[str], want: int | None = None) -> None:
    """Poll ``url`` until it answers (with ``want`` when given), at most START_TIMEOUT seconds."""
    deadline = time.monotonic() + START_TIMEOUT
    last = "no answer"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"soak: {proc.args[0]} exited with {proc.returncode} while starting")
        try:
            status = httpx.get(url, timeout=2).status_code
        except httpx.HTTPError as exc:
            last = type(exc).__name__
        else:
            if want is None or status == want:
                return
            last = f"HTTP {status}"
        time.sleep(0.2)
    raise SystemExit(f"soak: {url} not ready within {START_TIMEOUT:g} s (last: {last})")


def clean_env(extra: dict[str, str]) -> dict[str, str]:
    """os.environ without AWS_* and proxy variables (loopback only), plus ``extra``."""
    drop = ("HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "ALL_PROXY")
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_") and k.upper() not in drop}
    env.update(extra)
    return env


# ---- what we watch --------------------------------------------------------------------------------


@dataclass
class Sample:
    seconds: float
    requests: int
    unexpected: int
    rss_kib: int
    fds: int
    upstream_conns: int
    sts_fetches: int


def workers_of(pid: int) -> list[int]:
    """The processes that serve: ``pid`` itself, or with ``--workers`` its multiprocessing children."""
    workers = []
    for member in tree(pid)[1:]:
        with contextlib.suppress(OSError):
            if b"multiprocessing.spawn" in Path(f"/proc/{member}/cmdline").read_bytes():
                workers.append(member)
    return workers or [pid]


def _fds(pid: int) -> Iterator[str]:
    """Where every open fd of ``pid``'s processes points (``socket:[inode]``, a path, ``pipe:[…]``)."""
    for member in tree(pid):
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{member}/fd"):
                with contextlib.suppress(OSError):
                    yield os.readlink(f"/proc/{member}/fd/{fd}")


def rss_kib(pid: int) -> int:
    total = 0
    for member in tree(pid):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{member}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
    return total


def fd_count(pid: int) -> int:
    return sum(1 for _ in _fds(pid))


def established_to(pid: int, ports: set[int]) -> int:
    """The processes' ESTABLISHED TCP sockets whose remote port is in ``ports``."""
    inodes = {target[8:-1] for target in _fds(pid) if target.startswith("socket:[")}
    count = 0
    for table in ("tcp", "tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
                cols = line.split()
                remote_port = int(cols[2].rsplit(":", 1)[1], 16)
                if cols[3] == "01" and remote_port in ports and cols[9] in inodes:
                    count += 1
    return count


_STATES = {"01": "ESTABLISHED", "06": "TIME_WAIT", "08": "CLOSE_WAIT", "0A": "LISTEN"}


def fd_kinds(pid: int) -> Counter[str]:
    """What the open fds are: ``socket <state> <local port>-><remote port>``, ``pipe``, ``anon_inode:…``…"""
    sockets: dict[str, str] = {}
    for table in ("tcp", "tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
                cols = line.split()
                local, remote = (int(c.rsplit(":", 1)[1], 16) for c in cols[1:3])
                sockets[cols[9]] = f"tcp {_STATES.get(cols[3], cols[3])} :{local}->:{remote}"
    kinds: Counter[str] = Counter()
    for target in _fds(pid):
        if target.startswith("socket:["):
            kinds[sockets.get(target[8:-1], "socket (not tcp)")] += 1
        else:
            kinds[re.sub(r"\[\d+\]$", "", target)] += 1
    return kinds


_FETCHES = re.compile(r"^token_fetch_count_total\{[^}]*\} ([0-9.e+]+)$", re.M)


def sts_fetches(metrics_url: str) -> int:
    try:
        text = httpx.get(metrics_url, timeout=5).text
    except httpx.HTTPError:
        return -1
    return int(sum(float(v) for v in _FETCHES.findall(text)))


# ---- load -----------------------------------------------------------------------------------------


@dataclass
class Load:
    proxy: str  # http://127.0.0.1:PORT
    upstream: str  # 127.0.0.1:PORT of the HTTP app
    ws: str
    reset: str
    refused: str
    done: Counter[str] = field(default_factory=Counter)
    unexpected: Counter[str] = field(default_factory=Counter)
    examples: Counter[str] = field(default_factory=Counter)

    @property
    def total(self) -> int:
        return sum(self.done.values())

    def pick(self, rng: random.Random, h2: bool) -> str:
        kinds = HTTP_KINDS if h2 else tuple(MIX)
        return rng.choices(kinds, weights=[MIX[k] for k in kinds])[0]

    def bad(self, kind: str, what: str) -> None:
        self.unexpected[kind] += 1
        self.examples[f"{kind}: {what}"[:160]] += 1

    async def run(self, kind: str, client: httpx.AsyncClient) -> None:
        route = {"X-Upstream-Host": self.upstream}
        if kind == "small":
            r = await client.get(self.proxy + "/small", headers=route)
            ok = r.status_code == 200 and r.text == "0"
        elif kind == "status500":
            r = await client.get(self.proxy + "/status/500", headers=route)
            ok = r.status_code == 500
        elif kind == "refused":
            r = await client.get(self.proxy + "/refused", headers={"X-Upstream-Host": self.refused})
            ok = r.status_code == 502
        elif kind == "download":
            got = 0
            async with client.stream("GET", self.proxy + f"/bytes/{MIB}", headers=route) as r:
                async for chunk in r.aiter_raw():
                    got += len(chunk)
            ok = r.status_code == 200 and got == MIB
        elif kind == "upload":
            r = await client.post(self.proxy + "/upload", headers=route, content=_upload_body())
            ok = r.status_code == 200 and r.text == str(MIB)
        else:
            ok = await (self._reset(client) if kind == "reset" else self._websocket())
            self.done[kind] += 1
            if not ok:
                self.bad(kind, "wrong answer")
            return
        self.done[kind] += 1
        if not ok:
            body = r.content[:80] if kind != "download" else b"(streamed)"
            self.bad(kind, f"HTTP {r.status_code} {r.http_version}: {body!r}")

    async def _reset(self, client: httpx.AsyncClient) -> bool:
        """The upstream resets mid-body: the client must see an aborted (short) response, not a clean end."""
        got = 0
        try:
            async with client.stream(
                "GET", self.proxy + "/reset", headers={"X-Upstream-Host": self.reset}
            ) as r:
                async for chunk in r.aiter_raw():
                    got += len(chunk)
        except httpx.TransportError:
            return True
        return got < MIB

    async def _websocket(self) -> bool:
        url = self.proxy.replace("http://", "ws://") + "/ws"
        async with trio_websocket.open_websocket_url(
            url, extra_headers=[(b"x-upstream-host", self.ws.encode())]
        ) as ws:
            for i in range(5):
                message = f"m{i}" if i % 2 else bytes([i]) * 1024
                await ws.send_message(message)
                if await ws.get_message() != message:
                    return False
        return True


async def _upload_body() -> AsyncIterator[bytes]:
    block = b"u" * CHUNK
    for _ in range(MIB // CHUNK):
        yield block


async def worker(load: Load, client: httpx.AsyncClient, h2: bool, seed: int, deadline: float) -> None:
    rng = random.Random(seed)
    for _ in range(10_000_000):  # bounded in count as well as by the deadline
        if trio.current_time() >= deadline:
            return
        kind = load.pick(rng, h2)
        with trio.move_on_after(OP_TIMEOUT) as scope:
            try:
                await load.run(kind, client)
            except Exception as exc:  # any client-side failure is an outcome to report, not a crash
                load.done[kind] += 1
                load.bad(kind, f"{type(exc).__name__}: {exc}")
        if scope.cancelled_caught:
            load.done[kind] += 1
            load.bad(kind, f"no answer within {OP_TIMEOUT:g} s" + (" (h2c)" if h2 else " (HTTP/1.1)"))


@dataclass
class Run:
    pid: int
    load: Load
    ports: set[int]  # the upstreams'
    listeners: set[int]  # the proxy's own (proxy and metrics)
    metrics_url: str
    started: float = 0.0
    samples: list[Sample] = field(default_factory=list)

    def sample(self) -> Sample:
        s = Sample(
            seconds=time.monotonic() - self.started,
            requests=self.load.total,
            unexpected=sum(self.load.unexpected.values()),
            rss_kib=rss_kib(self.pid),
            fds=fd_count(self.pid),
            upstream_conns=established_to(self.pid, self.ports),
            sts_fetches=sts_fetches(self.metrics_url),
        )
        self.samples.append(s)
        print(
            f"soak: t={s.seconds:5.0f}s requests={s.requests} unexpected={s.unexpected} "
            f"rss={s.rss_kib / 1024:.1f}MiB fds={s.fds} upstream={s.upstream_conns}",
            file=sys.stderr,
        )
        return s


async def sampler(run: Run, interval: float, deadline: float) -> None:
    next_at = trio.current_time()
    for _ in range(100_000):
        run.sample()
        next_at += interval
        if next_at > deadline:
            return
        await trio.sleep_until(next_at)  # the sampling period, not synchronisation


def closing(pid: int, ports: set[int]) -> int:
    """Sockets of the proxy's listeners (``ports``) whose client has gone (CLOSE_WAIT)."""
    return sum(
        n
        for kind, n in fd_kinds(pid).items()
        if kind.startswith("tcp CLOSE_WAIT ") and int(kind.split()[2].split("->")[0][1:]) in ports
    )


async def settle(run: Run) -> tuple[int, Counter[str]]:
    """Bring the proxy to a comparable idle state and count its fds.

    1. Wait (bounded) until no client connection of the proxy is left in CLOSE_WAIT (the proxy
       closes one when its client's FIN arrives, or on its keep-alive timer).
    2. Wait until the upstream has closed the proxy's idle pool connections (UPSTREAM_KEEPALIVE);
       16 requests on one client connection then make the pool drop those (it checks its idle
       connections at least every 5 s) and keep one live one.
    3. Count while that one client connection is still open, once the count is stable.
    """
    deadline = trio.current_time() + SETTLE_TIMEOUT
    while closing(run.pid, run.listeners) and trio.current_time() < deadline:  # noqa: ASYNC110
        await trio.sleep(0.5)  # polling /proc
    await trio.sleep(UPSTREAM_KEEPALIVE + 1)  # the upstream's idle timer, then the pool's check
    limits = httpx.Limits(max_connections=1)
    async with httpx.AsyncClient(timeout=OP_TIMEOUT, limits=limits) as client:
        for _ in range(16):
            r = await client.get(run.load.proxy + "/small", headers={"X-Upstream-Host": run.load.upstream})
            r.raise_for_status()
        last, stable = fd_count(run.pid), 0
        while stable < 4 and trio.current_time() < deadline:
            await trio.sleep(0.5)
            now = fd_count(run.pid)
            stable = stable + 1 if now == last else 0
            last = now
        return last, fd_kinds(run.pid)


async def drive(
    run: Run, minutes: float, concurrency: int, h2_workers: int, interval: float
) -> tuple[int, Counter[str]]:
    load = run.load
    # Warm-up passes: one of each kind, so first-use allocations are not counted as growth.
    # Each pass on new connections, until every worker process has served one (holds an
    # upstream connection): with --workers the kernel decides which worker accepts.
    for _ in range(WARM_PASSES):
        async with (
            httpx.AsyncClient(timeout=OP_TIMEOUT) as c1,
            httpx.AsyncClient(timeout=OP_TIMEOUT, http1=False, http2=True) as c2,
        ):
            for kind in MIX:
                await load.run(kind, c1)
            for kind in HTTP_KINDS:
                await load.run(kind, c2)
        if all(established_to(worker, run.ports) for worker in workers_of(run.pid)):
            break
    else:
        print(f"soak: a worker served none of {WARM_PASSES} warm-up passes", file=sys.stderr)
    baseline = await settle(run)
    load.done.clear()
    run.started = time.monotonic()
    deadline = trio.current_time() + minutes * 60
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=OP_TIMEOUT, limits=limits) as h1:
        h2_clients = [httpx.AsyncClient(timeout=OP_TIMEOUT, http1=False, http2=True) for _ in range(2)]
        async with contextlib.AsyncExitStack() as stack:
            for c in h2_clients:
                await stack.enter_async_context(c)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(sampler, run, interval, deadline)
                for i in range(concurrency):
                    h2 = i < h2_workers
                    client = h2_clients[i % len(h2_clients)] if h2 else h1
                    nursery.start_soon(worker, load, client, h2, i, deadline)
    run.sample()  # end of load
    return baseline


def machine() -> str:
    cpu = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / (1 << 30)
    return (
        f"{os.cpu_count()} vCPU {cpu}, {mem:.0f} GiB RAM, Linux {platform.release()}, "
        f"Python {platform.python_version()}"
    )


def report(
    run: Run,
    args: argparse.Namespace,
    baseline: tuple[int, Counter[str]],
    end: tuple[int, Counter[str]],
    warm_s: float,
) -> bool:
    samples = run.samples
    load_samples = samples[:-1] if len(samples) > 1 else samples
    warm = next((s for s in load_samples if s.seconds >= warm_s), load_samples[-1])
    last = samples[-1]
    growth = (last.rss_kib - warm.rss_kib) / 1024
    unexpected = sum(run.load.unexpected.values())
    answers_ok = unexpected <= UNEXPECTED_LIMIT * max(run.load.total, 1)
    rss_ok = growth < RSS_LIMIT_MIB
    fds_ok = end[0] <= baseline[0]
    lines = [
        f"Soak: {args.minutes:g} min, c={args.concurrency} ({args.h2_workers} on h2c), "
        f"proxy --workers {args.workers}, {machine()}.",
        "",
        "| t (s) | requests | unexpected | RSS (MiB) | open fds | upstream ESTABLISHED | STS fetches |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in samples:
        lines.append(
            f"| {s.seconds:.0f} | {s.requests} | {s.unexpected} | {s.rss_kib / 1024:.1f} | {s.fds} "
            f"| {s.upstream_conns} | {s.sts_fetches} |"
        )
    mix = ", ".join(f"{k} {run.load.done[k]}" for k in MIX)
    lines += [
        "",
        f"Mix: {mix}.",
        f"- RSS growth after warm-up (t={warm.seconds:.0f} s → end): {growth:+.1f} MiB "
        f"(limit < {RSS_LIMIT_MIB:g}): {'pass' if rss_ok else 'FAIL'}",
        f"- open fds: baseline {baseline[0]}, after the load {end[0]}: {'pass' if fds_ok else 'FAIL'}",
        f"- unexpected outcomes: {unexpected} of {run.load.total} (limit {UNEXPECTED_LIMIT:.1%}): "
        f"{'pass' if answers_ok else 'FAIL'}",
    ]
    if not fds_ok:
        lines += [f"  - {n:+d} {kind}" for kind, n in sorted((end[1] - baseline[1]).items())]
        lines += [f"  - {-n:+d} {kind}" for kind, n in sorted((baseline[1] - end[1]).items())]
    lines += [f"  - {n} x {what}" for what, n in run.load.examples.most_common(10)]
    print("\n".join(lines))
    return rss_ok and fds_ok and answers_ok


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--minutes", type=float, default=10.0, help="load duration (default 10)")
    parser.add_argument("--concurrency", type=int, default=32, help="concurrent workers (default 32)")
    parser.add_argument("--h2-workers", type=int, default=4, help="workers on h2c clients (default 4)")
    parser.add_argument("--interval", type=float, default=30.0, help="seconds between samples (default 30)")
    parser.add_argument(
        "--warmup", type=float, default=None, help="seconds of warm-up (default min(60, 1/4))"
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="the proxy's --workers (default 1); all its processes watched",
    )
    parser.add_argument("--serve-upstreams", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_upstreams:
        with contextlib.suppress(KeyboardInterrupt):
            trio.run(serve_upstreams)
        return 0
    if not 0 < args.minutes <= 24 * 60 or not 1 <= args.concurrency <= 1024 or not 1 <= args.workers <= 8:
        parser.error("--minutes must be in (0, 1440], --concurrency in [1, 1024] and --workers in [1, 8]")
    warm_s = args.warmup if args.warmup is not None else min(60.0, args.minutes * 60 / 4)
    exe = shutil.which("aws-outbound-jwt-proxy", path=str(Path(sys.executable).parent)) or shutil.which(
        "aws-outbound-jwt-proxy"
    )
    if exe is None:
        raise SystemExit("soak: aws-outbound-jwt-proxy console script not found (run ./scripts/setup)")
    tmp = Path(tempfile.mkdtemp(prefix="soak-"))
    sts_port, proxy_port, metrics_port = free_port(), free_port(), free_port()
    sts_url = f"http://127.0.0.1:{sts_port}"
    with contextlib.ExitStack() as stack:
        emu = stack.enter_context(
            child(
                "sts-emulator",
                [exe, "sts-emulator", "--listen-addr", f"127.0.0.1:{sts_port}"],
                tmp,
                clean_env({}),
            )
        )
        ups = stack.enter_context(
            child("upstreams", [sys.executable, __file__, "--serve-upstreams"], tmp, clean_env({}))
        )
        assert ups.stdout is not None
        ports = json.loads(ups.stdout.readline() or "{}")
        if not ports:
            raise SystemExit(f"soak: upstreams did not start (see {tmp}/upstreams.log)")
        wait_http(sts_url + "/.well-known/jwks.json", emu, 200)
        aws = {
            "AWS_ENDPOINT_URL_STS": sts_url,
            "AWS_REGION": "us-east-1",
            "AWS_ACCESS_KEY_ID": "AKIASOAKTEST00000000",
            "AWS_SECRET_ACCESS_KEY": "soak-secret",
            "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_CONFIG_FILE": "/dev/null",
            "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
        }
        flags = [
            *("--listen-addr", f"127.0.0.1:{proxy_port}"),
            *("--metrics-enabled", "true", "--metrics-listen-addr", f"127.0.0.1:{metrics_port}"),
            *("--upstream-scheme", "http", "--upstream-timeout", "20s"),
            *("--token-duration", "5m", "--token-refresh-skew", "1m"),
            *("--log-level", "warn", "--shutdown-timeout", "5s"),
            *("--workers", str(args.workers)),
        ]
        proxy = stack.enter_context(child("proxy", [exe, *flags], tmp, clean_env(aws)))
        metrics = f"http://127.0.0.1:{metrics_port}"
        wait_http(metrics + "/healthz", proxy, 200)
        load = Load(
            proxy=f"http://127.0.0.1:{proxy_port}",
            upstream=f"127.0.0.1:{ports['http']}",
            ws=f"127.0.0.1:{ports['ws']}",
            reset=f"127.0.0.1:{ports['reset']}",
            refused=f"127.0.0.1:{free_port()}",
        )
        upstream_ports = {ports["http"], ports["ws"], ports["reset"]}
        run = Run(proxy.pid, load, upstream_ports, {proxy_port, metrics_port}, metrics + "/metrics")
        print(f"soak: proxy pid {proxy.pid}, logs in {tmp}", file=sys.stderr)
        baseline = trio.run(drive, run, args.minutes, args.concurrency, args.h2_workers, args.interval)
        end = trio.run(settle, run)
        passed = report(run, args, baseline, end, warm_s)
        if proxy.poll() is not None:
            print(f"soak: the proxy exited with {proxy.returncode} during the run", file=sys.stderr)
            passed = False
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
