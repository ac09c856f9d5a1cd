"""Benchmark driver: the proxy next to reference rows that say what "fast" means on this machine.

Rows (the wrk rows are measured at every concurrency in --connections):
  direct       nginx itself (the upstream; shows it is not the bottleneck)
  nginx-proxy  a second nginx that proxy_passes to the first and sets Authorization: Bearer <fixed
               JWT>, keep-alive upstream connections (the practical limit of "add a header and forward")
  hello        bench/hello.py on `hypercorn --worker-class trio` (this stack's own ceiling)
  proxy        aws-outbound-jwt-proxy (console script, one process) with --upstream-host = nginx,
               tokens from the project's STS emulator
  proxy-w2     the same proxy as `hypercorn --worker-class trio -w 2 aws_outbound_jwt_proxy.asgi:app`,
               configured from the environment, on both CPUs (wrk shares CPU 0 with it)
  h2c          the proxy row's server driven by h2load over HTTP/2 with prior knowledge
               (--h2-clients connections x --h2-streams concurrent streams each)
  baseline     only with --baseline VENV: the proxy row again, run from another venv (an older
               commit installed there), right after the proxy row in every round: an A/B in one run
  (bench/scaling.py also starts hello-w2, fetch and fetch-w2 here: see its docstring)

wrk (and h2load) runs on CPU 0, the server under test on CPU 1; nginx upstreams and the STS emulator
share CPU 0 with the client when they only support the row. Prints a markdown report and writes it to
bench/results/<timestamp>.md. Stdlib only; run with the project venv: `just bench` or
`.venv/bin/python bench/run.py --help`.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import http.client
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from hello import BODY as HELLO_BODY  # bench/ is on sys.path: this file runs as a script

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
ROW_NAMES = ("direct", "nginx-proxy", "hello", "proxy", "proxy-w2", "h2c")
WRK_ROWS = ("direct", "nginx-proxy", "hello", "proxy", "baseline", "proxy-w2")
CLK_TCK = os.sysconf("SC_CLK_TCK")

NGINX_MAIN = """\
daemon off;
master_process on;
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    keepalive_requests 1000000000;
    keepalive_timeout 75s;
{servers}
}}
"""

NGINX_ORIGIN = """\
    server {{
        listen 127.0.0.1:{port};
        location / {{
            default_type text/plain;
            return 200 "{body}";
        }}
    }}"""

# The "practical limit" row: what nginx does for the same job (forward, add one header).
NGINX_FORWARD = """\
    upstream origin {{
        server {upstream};
        keepalive 64;
        keepalive_requests 1000000000;
        keepalive_timeout 75s;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://origin;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Authorization "Bearer {jwt}";
        }}
    }}"""


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def fixed_jwt() -> str:
    """A JWT-shaped constant about as long as the emulator's RS256 tokens (~1 KB), for nginx-proxy."""
    header = {"typ": "JWT", "alg": "RS256", "kid": "bench"}
    claims = {
        "iss": "https://bench.tokens.sts.global.api.aws",
        "sub": "arn:aws:iam::123456789012:role/bench",
        "aud": "https://bench.example",
        "iat": 1767225600,
        "exp": 1767229200,
        "jti": "00000000-0000-4000-8000-000000000000",
        "https://sts.amazonaws.com/": {"aws_account": "123456789012", "org_id": "o-bench", "tags": {}},
    }
    parts = [_b64(json.dumps(header).encode()), _b64(json.dumps(claims).encode()), _b64(bytes(256))]
    return ".".join(parts)


class RowFailed(Exception):
    """A row's servers could not be started; the report says why and the other rows still run."""


@dataclass
class Options:
    duration: int  # seconds (wrk takes whole seconds)
    warmup: int
    connections: list[int]
    threads: int
    rows: list[str]
    rounds: int
    venv: Path
    start_timeout: float
    results_dir: Path
    wrk_cpu: int
    server_cpu: int
    h2_clients: int
    h2_streams: int
    baseline: Path | None = None  # venv of the baseline row (--baseline)


@dataclass
class Cell:
    """One load run: a row at one concurrency."""

    rps: float
    p50_ms: float
    p99_ms: float
    errors: int
    cpu_us: float  # CPU time of the server under test per request
    rss_mib: float  # resident memory of the server under test (process tree) after the cell
    other_wrk: float  # share of wrk's CPU used by other processes (noise), 0..1
    other_server: float  # share of the server's CPU used by other processes (noise), 0..1
    shared: bool = False  # server and client share CPUs: other_* is one figure for both
    split: list[float] = field(default_factory=list)  # CPU share per worker process (multi-worker rows)
    steal: float = 0.0  # share of the server CPUs' time the hypervisor took (part of other_server), 0..1
    client_us: float = 0.0  # CPU per request of wrk (or h2load) and the helpers (nginx, emulator)


@dataclass
class Target:
    """What the client hits: the URL, the server process (its whole tree is measured) and a label."""

    url: str
    pid: int
    server: str
    helpers: list[int] = field(default_factory=list)  # processes sharing wrk's CPU (nginx, emulator)
    cpus: list[int] = field(default_factory=list)  # CPUs the server runs on (default: --server-cpu)


@dataclass
class RowResult:
    name: str
    cells: dict[int, list[Cell]] = field(default_factory=dict)
    server: str = ""
    notes: list[str] = field(default_factory=list)
    failed: str | None = None


# --- processes ------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextlib.contextmanager
def spawn(
    name: str, cmd: list[str], cpus: str, tmp: Path, env: dict[str, str] | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """Start `cmd` pinned to `cpus` (taskset execs it, so the pid is the server's); stop it on exit."""
    log = tmp / f"{name}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(["taskset", "-c", cpus, *cmd], stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        yield proc
    finally:
        family = tree(proc.pid)
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                print(f"bench: {name} ignored SIGTERM for 10 s; killed", file=sys.stderr)
                proc.kill()
                proc.wait()
        for pid in family[1:]:  # workers left behind by a supervisor that did not stop them
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)


def log_tail(tmp: Path, name: str) -> str:
    """Last non-empty line a server printed (for 'did not start' messages)."""
    path = tmp / f"{name}.log"
    lines = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1][:300] if lines else "no output"


def get(port: int, path: str = "/") -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def wait_ready(
    name: str, proc: subprocess.Popen[bytes], port: int, timeout: float, tmp: Path, want_200: bool
) -> None:
    """Poll until the server answers (any status, or 200 when `want_200`); RowFailed past the deadline."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RowFailed(f"{name} exited with status {proc.returncode}: {log_tail(tmp, name)}")
        try:
            status, _ = get(port)
        except (OSError, http.client.HTTPException) as exc:
            last = f"{type(exc).__name__}: {exc}"
        else:
            if status == 200 or not want_200:
                return
            last = f"HTTP {status}"
        time.sleep(0.1)
    raise RowFailed(f"{name} not ready within {timeout:g} s (last: {last}); log: {log_tail(tmp, name)}")


def wait_all_ready(name: str, proc: subprocess.Popen[bytes], port: int, timeout: float, tmp: Path) -> None:
    """Several workers share the port: wait for 20 answers in a row, each on a new connection,
    that are 200 with nginx's body, so every worker very likely has its token."""
    deadline = time.monotonic() + timeout
    streak, last = 0, "no answer"
    while streak < 20:
        if time.monotonic() > deadline:
            raise RowFailed(f"{name}: not every worker ready within {timeout:g} s (last: {last})")
        if proc.poll() is not None:
            raise RowFailed(f"{name} exited with status {proc.returncode}: {log_tail(tmp, name)}")
        try:
            status, body = get(port)
        except (OSError, http.client.HTTPException) as exc:
            streak, last = 0, f"{type(exc).__name__}: {exc}"
            time.sleep(0.1)
            continue
        if status == 200 and body == HELLO_BODY:
            streak += 1
        else:
            streak, last = 0, f"HTTP {status}"
            time.sleep(0.1)


def tree(pid: int) -> list[int]:
    """`pid` and all its descendants (nginx's worker, any server sub-process)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        todo.extend(children.get(p, []))
    return found


def cpu_busy(cpu: int) -> tuple[float, float]:
    """Seconds CPU `cpu` has been busy, and of those, lost to the hypervisor.

    Busy is running processes (user, nice, system) or stolen (steal: the virtual CPU
    wanted to run and the host ran something else). Interrupt time is left out:
    loopback traffic of the bench itself is handled there.
    """
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith(f"cpu{cpu} "):
            user, nice, system, _idle, _iowait, _irq, _softirq, steal = (int(x) for x in line.split()[1:9])
            return (user + nice + system + steal) / CLK_TCK, steal / CLK_TCK
    return 0.0, 0.0


def children_cpu() -> float:
    """CPU seconds of this script's finished children (the wrk and h2load runs)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def cpu_by_pid(pid: int) -> dict[int, float]:
    """CPU seconds (user + system) of every process in `pid`'s tree."""
    out = {}
    for p in tree(pid):
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            out[p] = (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime
    return out


def cpu_seconds(pid: int) -> float:
    return sum(cpu_by_pid(pid).values())


def memory_kib(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) in KiB summed over the process tree."""
    rss = hwm = 0
    for p in tree(pid):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    rss += int(line.split()[1])
                elif line.startswith("VmHWM:"):
                    hwm += int(line.split()[1])
    return rss, hwm


def python_of(pid: int) -> str:
    exe = os.path.realpath(f"/proc/{pid}/exe")
    out = subprocess.run(
        [exe, "-c", "import sys; print(sys.version.split()[0])"], capture_output=True, text=True
    )
    return f"Python {out.stdout.strip()} ({exe})"


# --- servers --------------------------------------------------------------------------------


def nginx_binary() -> str:
    found = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)
    if found is None:
        raise SystemExit("bench: nginx not found (Debian: apt-get install -y nginx; `just bench` does it)")
    return found


@contextlib.contextmanager
def nginx(tmp: Path, name: str, cpu: int, upstream: Target | None = None) -> Iterator[Target]:
    """An nginx answering the hello body itself, or (with `upstream`) forwarding to it with a Bearer."""
    home = tmp / name
    home.mkdir()
    port = free_port()
    if upstream is None:
        server = NGINX_ORIGIN.format(port=port, body=HELLO_BODY.decode().replace("\n", "\\n"))
    else:
        origin = upstream.url.removeprefix("http://").rstrip("/")
        server = NGINX_FORWARD.format(port=port, upstream=origin, jwt=fixed_jwt())
    conf = home / "nginx.conf"
    conf.write_text(NGINX_MAIN.format(tmp=home, servers=server))
    cmd = [nginx_binary(), "-p", str(home), "-e", str(home / "nginx-error.log"), "-c", str(conf)]
    with spawn(name, cmd, str(cpu), tmp) as proc:
        wait_ready(name, proc, port, 10, tmp, want_200=True)
        status, answer = get(port)
        if status != 200 or answer != HELLO_BODY:
            raise RowFailed(f"{name} answered {status} with a body that is not the hello body")
        version = subprocess.run([cmd[0], "-v"], capture_output=True, text=True).stderr.strip()
        helpers = [upstream.pid] if upstream else []
        yield Target(f"http://127.0.0.1:{port}/", proc.pid, version.replace("nginx version: ", ""), helpers)


@contextlib.contextmanager
def bare_app(
    tmp: Path, opts: Options, name: str, workers: int, upstream: Target | None = None
) -> Iterator[Target]:
    """bench/hello.py (or bench/fetch.py, forwarding to `upstream`) on `hypercorn --worker-class trio`.

    One worker runs on the server CPU, as the hello row does; more run on both CPUs like proxy-w2.
    """
    port = free_port()
    module, env = "hello", None
    if upstream is not None:
        module = "fetch"
        env = {**os.environ, "BENCH_UPSTREAM": upstream.url.removeprefix("http://").rstrip("/")}
    cmd = [str(opts.venv / "bin" / "hypercorn"), "--worker-class", "trio", "-w", str(workers)]
    cmd += ["--config", str(BENCH_DIR / "hello.toml"), "--bind", f"127.0.0.1:{port}"]
    cmd += [f"{BENCH_DIR / module}.py:app"]
    cpus = [opts.server_cpu] if workers == 1 else sorted({opts.wrk_cpu, opts.server_cpu})
    with spawn(name, cmd, ",".join(map(str, cpus)), tmp, env=env) as proc:
        wait_all_ready(name, proc, port, opts.start_timeout, tmp)
        helpers = [upstream.pid] if upstream else []
        server = f"{python_of(proc.pid)}, hypercorn -w {workers}"
        yield Target(f"http://127.0.0.1:{port}/", proc.pid, server, helpers, cpus if workers > 1 else [])


def proxy_env(sts_port: int) -> dict[str, str]:
    """The caller's environment minus any AWS_* setting, plus a fake identity aimed at the emulator."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(
        AWS_ENDPOINT_URL_STS=f"http://127.0.0.1:{sts_port}",
        AWS_REGION="us-east-1",
        AWS_ACCESS_KEY_ID="AKIDBENCH",
        AWS_SECRET_ACCESS_KEY="bench",
        AWS_EC2_METADATA_DISABLED="true",
        AWS_CONFIG_FILE="/dev/null",
        AWS_SHARED_CREDENTIALS_FILE="/dev/null",
    )
    return env


# The proxy's settings for both proxy rows: flags for the console script, env vars under hypercorn.
PROXY_SETTINGS = {
    "upstream-scheme": "http",
    "token-audience": "https://bench.example",
    "metrics-enabled": "false",
    "log-level": "warn",
}


@contextlib.contextmanager
def emulator(tmp: Path, opts: Options) -> Iterator[tuple[int, int]]:
    """The project's STS emulator on the client's CPU: yields (port, pid)."""
    script = str(opts.venv / "bin" / "aws-outbound-jwt-proxy")
    sts_port = free_port()
    cmd = [script, "sts-emulator", "--listen-addr", f"127.0.0.1:{sts_port}"]
    with spawn("sts-emulator", cmd, str(opts.wrk_cpu), tmp) as proc:
        wait_ready("sts-emulator", proc, sts_port, opts.start_timeout, tmp, want_200=False)
        yield sts_port, proc.pid


@contextlib.contextmanager
def proxy(tmp: Path, opts: Options, upstream: Target, venv: Path | None = None) -> Iterator[Target]:
    """The console script from `venv` (default --venv), one process, on the server CPU."""
    script = str((venv or opts.venv) / "bin" / "aws-outbound-jwt-proxy")
    with emulator(tmp, opts) as (sts_port, sts_pid):
        port = free_port()
        cmd = [script, "--listen-addr", f"127.0.0.1:{port}"]
        cmd += ["--upstream-host", upstream.url.removeprefix("http://").rstrip("/")]
        for flag, value in PROXY_SETTINGS.items():
            cmd += [f"--{flag}={value}"]
        with spawn("proxy", cmd, str(opts.server_cpu), tmp, env=proxy_env(sts_port)) as proc:
            wait_ready("proxy", proc, port, opts.start_timeout, tmp, want_200=True)
            status, body = get(port)
            if status != 200 or body != HELLO_BODY:
                raise RowFailed(f"proxy answered {status} with a body that is not nginx's")
            helpers = [upstream.pid, sts_pid]
            server = python_of(proc.pid)
            if venv is not None:
                version = subprocess.run([script, "--version"], capture_output=True, text=True).stdout
                server = f"{version.strip() or '?'} from {venv}, {server}"
            yield Target(f"http://127.0.0.1:{port}/", proc.pid, server, helpers)


def hypercorn_env(sts_port: int, upstream: Target) -> dict[str, str]:
    """proxy_env plus the proxy's settings as the environment variables the `hypercorn` command reads."""
    env = proxy_env(sts_port)
    env.update({flag.upper().replace("-", "_"): value for flag, value in PROXY_SETTINGS.items()})
    env["UPSTREAM_HOST"] = upstream.url.removeprefix("http://").rstrip("/")
    return env


def hypercorn_cmd(venv: Path, workers: int, port: int) -> list[str]:
    """The proxy under the `hypercorn` command (`workers` 0: served in hypercorn's own process)."""
    cmd = [str(venv / "bin" / "hypercorn"), "--worker-class", "trio", "-w", str(workers)]
    cmd += ["--keep-alive", "75", "--config", str(BENCH_DIR / "proxy-w2.toml")]
    return [*cmd, "--bind", f"127.0.0.1:{port}", "aws_outbound_jwt_proxy.asgi:app"]


@contextlib.contextmanager
def proxy_workers(tmp: Path, opts: Options, upstream: Target) -> Iterator[Target]:
    """`hypercorn --worker-class trio -w 2 aws_outbound_jwt_proxy.asgi:app`, configured from env.

    Both CPUs: the workers are not pinned apart, and wrk, nginx and the emulator share CPU 0.
    hypercorn's CLI has no flag for keep_alive_max_requests (its --max-requests restarts a worker
    after N requests, something else), so bench/proxy-w2.toml lifts the 1,000-request cap per
    connection that the console script lifts in code.
    """
    with emulator(tmp, opts) as (sts_port, sts_pid):
        port = free_port()
        prom = tmp / "prometheus-multiproc"
        prom.mkdir()
        env = hypercorn_env(sts_port, upstream)
        env["PROMETHEUS_MULTIPROC_DIR"] = str(prom)
        cmd = hypercorn_cmd(opts.venv, 2, port)
        cpus = sorted({opts.wrk_cpu, opts.server_cpu})
        with spawn("proxy-w2", cmd, ",".join(map(str, cpus)), tmp, env=env) as proc:
            wait_all_ready("proxy-w2", proc, port, opts.start_timeout, tmp)
            workers = len(tree(proc.pid)) - 1
            server = f"{python_of(proc.pid)}, hypercorn -w 2 ({workers} child processes)"
            helpers = [upstream.pid, sts_pid]
            yield Target(f"http://127.0.0.1:{port}/", proc.pid, server, helpers, cpus)


# --- load generators ------------------------------------------------------------------------


def wrk(opts: Options, url: str, conns: int, seconds: int) -> dict[str, float]:
    threads = max(1, min(opts.threads, conns))
    cmd = ["taskset", "-c", str(opts.wrk_cpu), "wrk", f"-t{threads}", f"-c{conns}", f"-d{seconds}s"]
    cmd += ["--timeout", "10s", "-s", str(BENCH_DIR / "report.lua"), url]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60)
    for line in out.stdout.splitlines():
        if line.startswith("BENCH "):
            return {k: float(v) for k, v in (item.split("=") for item in line.split()[1:])}
    raise RuntimeError(f"wrk printed no result (status {out.returncode}): {out.stderr.strip() or out.stdout}")


def percentile(sorted_values: list[float], pct: float) -> float:
    """Nearest-rank percentile of an already sorted list."""
    if not sorted_values:
        return 0.0
    rank = max(1, round(pct / 100 * len(sorted_values) + 0.5 - 1e-9))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def h2load(opts: Options, url: str, requests: int, log: Path, budget: float) -> dict[str, float]:
    """`h2load -n requests -c clients -m streams` over h2c (prior knowledge: an http:// URL).

    Bounded twice: by the request count and by `budget` seconds of wall time. Latency
    percentiles come from `--log-file` (one line per request: start µs, status, duration µs).
    """
    cmd = ["taskset", "-c", str(opts.wrk_cpu), "h2load", "-n", str(requests)]
    cmd += ["-c", str(opts.h2_clients), "-m", str(opts.h2_streams), "-t", "1"]
    cmd += ["-N", "10", "--log-file", str(log), url]  # -N: give up on a connection idle for 10 s
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=budget)
    text = out.stdout
    finished = re.search(r"finished in ([\d.]+)(m?s), ([\d.]+) req/s", text)
    counts = re.search(
        r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, "
        r"(\d+) errored, (\d+) timeout",
        text,
    )
    if out.returncode != 0 or not finished or not counts:
        raise RuntimeError(f"h2load failed (status {out.returncode}): {(out.stderr or text).strip()[-300:]}")
    seconds = float(finished.group(1)) / (1000 if finished.group(2) == "ms" else 1)
    total, _started, done, _ok, failed, _errored, _timeout = (int(g) for g in counts.groups())
    durations = []
    for line in log.read_text().splitlines():
        parts = line.split("\t")
        if len(parts) >= 3 and parts[1].startswith("2"):
            durations.append(int(parts[2]))
    durations.sort()
    return {
        "requests": float(done),
        "duration_us": seconds * 1e6,
        "p50_us": percentile([float(d) for d in durations], 50),
        "p99_us": percentile([float(d) for d in durations], 99),
        # h2load's "failed" counts network errors, time-outs and non-2xx/3xx statuses alike.
        "errors": float(failed + (total - done)),
    }


# --- measuring ------------------------------------------------------------------------------


def measure(opts: Options, target: Target, conns: int, row: str, tmp: Path) -> Cell:
    h2 = row == "h2c"
    h2_requests = 0
    if h2:
        # Calibrate the request count so the measured run lasts about --duration seconds.
        probe = h2load(opts, target.url, 2000, tmp / "h2load-warmup.log", 120)
        rate = probe["requests"] / max(probe["duration_us"] / 1e6, 1e-3)
        h2_requests = max(1000, min(5_000_000, round(rate * opts.duration)))
    elif opts.warmup > 0:
        wrk(opts, target.url, conns, opts.warmup)

    server_cpus = target.cpus or [opts.server_cpu]
    shared = opts.wrk_cpu in server_cpus
    busy_cpus = sorted({opts.wrk_cpu, *server_cpus})

    def snapshot() -> tuple[dict[int, float], dict[int, tuple[float, float]], float]:
        helpers = sum(cpu_seconds(pid) for pid in target.helpers) + children_cpu()
        return cpu_by_pid(target.pid), {c: cpu_busy(c) for c in busy_cpus}, helpers

    procs0, busy0, helpers0 = snapshot()
    if h2:
        res = h2load(opts, target.url, h2_requests, tmp / "h2load.log", opts.duration * 4 + 60)
    else:
        res = wrk(opts, target.url, conns, opts.duration)
    procs1, busy1, helpers1 = snapshot()

    per_proc = {p: procs1[p] - procs0.get(p, 0.0) for p in procs1}
    cpu = sum(per_proc.values())
    busy = {c: busy1[c][0] - busy0[c][0] for c in busy_cpus}
    stolen = sum(busy1[c][1] - busy0[c][1] for c in server_cpus)
    ours_on_wrk_cpu = helpers1 - helpers0
    seconds = res["duration_us"] / 1e6
    requests = res["requests"]
    if h2:
        errors = int(res["errors"])
    else:
        errors = int(sum(res[k] for k in ("connect", "read", "write", "status", "timeout")))
    if shared:
        # One figure for all the CPUs involved, as a share of their capacity (0..1).
        other = max(0.0, (sum(busy.values()) - cpu - ours_on_wrk_cpu) / seconds / len(busy_cpus))
        other_wrk = other_server = other
    else:
        other_wrk = max(0.0, (busy[opts.wrk_cpu] - ours_on_wrk_cpu) / seconds)
        other_server = max(0.0, (sum(busy[c] for c in server_cpus) - cpu) / seconds)
    split = []
    if row.endswith("-w2") and cpu > 0:  # a supervisor and its workers: how the load spread
        shares = (v / cpu for p, v in per_proc.items() if p != target.pid)
        split = sorted((share for share in shares if share >= 0.01), reverse=True)
    rss, _ = memory_kib(target.pid)
    return Cell(
        rps=requests / seconds,
        p50_ms=res["p50_us"] / 1000,
        p99_ms=res["p99_us"] / 1000,
        errors=errors,
        cpu_us=cpu / requests * 1e6 if requests else 0.0,
        rss_mib=rss / 1024,
        other_wrk=other_wrk,
        other_server=other_server,
        shared=shared,
        split=split,
        steal=stolen / seconds / len(server_cpus),
        client_us=ours_on_wrk_cpu / requests * 1e6 if requests else 0.0,
    )


@contextlib.contextmanager
def start_row(name: str, tmp: Path, opts: Options) -> Iterator[Target]:
    if name == "direct":
        with nginx(tmp, "nginx", opts.server_cpu) as target:
            yield target
    elif name == "nginx-proxy":
        with (
            nginx(tmp, "nginx", opts.wrk_cpu) as upstream,
            nginx(tmp, "nginx-proxy", opts.server_cpu, upstream) as target,
        ):
            yield target
    elif name in ("hello", "hello-w2"):
        with bare_app(tmp, opts, name, 2 if name == "hello-w2" else 1) as target:
            yield target
    elif name in ("fetch", "fetch-w2"):
        with (
            nginx(tmp, "nginx", opts.wrk_cpu) as upstream,
            bare_app(tmp, opts, name, 2 if name == "fetch-w2" else 1, upstream) as target,
        ):
            yield target
    elif name == "baseline":
        assert opts.baseline is not None
        with (
            nginx(tmp, "nginx", opts.wrk_cpu) as upstream,
            proxy(tmp, opts, upstream, opts.baseline) as target,
        ):
            yield target
    elif name == "proxy-w2":
        with nginx(tmp, "nginx", opts.wrk_cpu) as upstream, proxy_workers(tmp, opts, upstream) as target:
            yield target
    else:  # proxy, h2c
        with nginx(tmp, "nginx", opts.wrk_cpu) as upstream, proxy(tmp, opts, upstream) as target:
            yield target


def levels(row: str, opts: Options) -> list[int]:
    """The concurrencies a row is measured at (h2c: one level, clients x streams)."""
    return [opts.h2_clients * opts.h2_streams] if row == "h2c" else opts.connections


def level_label(row: str, conns: int, opts: Options) -> str:
    return f"{opts.h2_clients}x{opts.h2_streams}" if row == "h2c" else str(conns)


def run_row(result: RowResult, opts: Options, rnd: int) -> None:
    with tempfile.TemporaryDirectory(prefix=f"bench-{result.name}-") as tmpdir:
        tmp = Path(tmpdir)
        try:
            with start_row(result.name, tmp, opts) as target:
                result.server = target.server
                rss_before, _ = memory_kib(target.pid)
                for conns in levels(result.name, opts):
                    cell = measure(opts, target, conns, result.name, tmp)
                    result.cells.setdefault(conns, []).append(cell)
                    print(
                        f"  {result.name:11} c={level_label(result.name, conns, opts):<5} "
                        f"{cell.rps:9.0f} req/s  p99 {cell.p99_ms:7.2f} ms  {cell.errors} errors  "
                        f"other load {cell.other_wrk:.0%} / {cell.other_server:.0%}",
                        file=sys.stderr,
                    )
                rss_after, hwm = memory_kib(target.pid)
                if result.name in ("proxy", "baseline", "proxy-w2", "h2c"):
                    result.notes.append(
                        f"round {rnd}: {result.name} RSS {rss_before / 1024:.1f} MiB after start-up, "
                        f"{rss_after / 1024:.1f} MiB after the run (peak {hwm / 1024:.1f} MiB, "
                        "summed over its processes)"
                    )
        except (RowFailed, RuntimeError, subprocess.TimeoutExpired) as exc:
            result.failed = str(exc)
            print(f"  {result.name}: {exc}", file=sys.stderr)


# --- report ---------------------------------------------------------------------------------


def median_cell(cells: list[Cell]) -> Cell:
    return Cell(
        rps=statistics.median(c.rps for c in cells),
        p50_ms=statistics.median(c.p50_ms for c in cells),
        p99_ms=statistics.median(c.p99_ms for c in cells),
        errors=sum(c.errors for c in cells),
        cpu_us=statistics.median(c.cpu_us for c in cells),
        rss_mib=statistics.median(c.rss_mib for c in cells),
        other_wrk=max(c.other_wrk for c in cells),
        other_server=max(c.other_server for c in cells),
        steal=max(c.steal for c in cells),
        shared=cells[0].shared,
        split=cells[-1].split,
    )


def git_state() -> str:
    """Commit of the tree under test, and whether it has uncommitted changes."""
    head = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    )
    if head.returncode != 0:
        return "not a git checkout"
    dirty = subprocess.run(
        ["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no", "--", "src"],
        capture_output=True,
        text=True,
    )
    return head.stdout.strip() + (" + uncommitted changes in src/" if dirty.stdout.strip() else "")


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.machine()


def tool_version(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "not found"
    text = (out.stdout or out.stderr).strip()
    return text.splitlines()[0].split(" [")[0] if text else "?"


def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}" if a is not None and b else "—"


def report(results: list[RowResult], opts: Options, started: str, load: str, code: str) -> str:
    by_name = {r.name: r for r in results if not r.failed and r.cells}

    def rps(row: str, conns: int) -> float | None:
        r = by_name.get(row)
        return median_cell(r.cells[conns]).rps if r and conns in r.cells else None

    lines = [
        f"# Benchmark {started}",
        "",
        f"- machine: {os.cpu_count()} cores ({cpu_model()}); load average (1/5/15 min) {load}",
        f"- code: {code}",
        f"- client: {tool_version(['wrk', '-v'])}, -t{opts.threads} on CPU {opts.wrk_cpu}; "
        f"server under test on CPU {opts.server_cpu} (proxy-w2: on CPUs {opts.wrk_cpu} and "
        f"{opts.server_cpu}, sharing CPU {opts.wrk_cpu} with wrk, nginx and the STS emulator)",
        f"- {opts.duration} s per cell after {opts.warmup} s warm-up; "
        f"{opts.rounds} round(s), median of rounds shown",
        f"- GET / answered 200 with a {len(HELLO_BODY)}-byte body by every row (other statuses are errors)",
        "- proxy, baseline, proxy-w2, h2c, nginx-proxy rows: the upstream nginx (and the STS emulator) "
        f"share CPU {opts.wrk_cpu} with the client",
    ]
    if "h2c" in opts.rows:
        lines.append(
            f"- h2c: {tool_version(['h2load', '--version'])}, h2c with prior knowledge, "
            f"-c {opts.h2_clients} -m {opts.h2_streams} ({opts.h2_clients * opts.h2_streams} concurrent "
            "streams), request count set so the run lasts about the cell duration; p50/p99 from "
            "h2load's per-request --log-file"
        )
    for r in results:
        lines.append(f"- {r.name}: {r.server or 'not started'}")
    lines += [
        "",
        f"| row | c | req/s | p50 ms | p99 ms | errors | server CPU µs/req | RSS MiB | "
        f"other load CPU {opts.wrk_cpu} / {opts.server_cpu} |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        if r.failed:
            lines.append(f"| {r.name} | — | failed (see notes) | | | | | | |")
            continue
        for conns in levels(r.name, opts):
            if conns not in r.cells:
                continue
            c = median_cell(r.cells[conns])
            other = f"{c.other_wrk:.0%} (both)" if c.shared else f"{c.other_wrk:.0%} / {c.other_server:.0%}"
            cols = [r.name, level_label(r.name, conns, opts), f"{c.rps:,.0f}", f"{c.p50_ms:.2f}"]
            cols += [f"{c.p99_ms:.2f}", str(c.errors), f"{c.cpu_us:,.0f}", f"{c.rss_mib:.1f}", other]
            lines.append("| " + " | ".join(cols) + " |")
    lines += [
        "",
        "other load: CPU time used by processes outside the bench on the client's CPU and on the "
        'server\'s CPU while the cell ran, as a share of its wall time (worst round); "(both)": the '
        "server shares CPUs with the client, one figure for both (a share of both CPUs' time). Above "
        "a few % the cell is "
        "disturbed by other work.",
    ]

    lines += ["", "## Ratios (req/s)", ""]
    lines += [
        "| c | proxy ÷ hello | proxy ÷ nginx-proxy | proxy-w2 ÷ proxy | hello ÷ nginx-proxy |",
        "|---:|---:|---:|---:|---:|",
    ]
    for conns in opts.connections:
        cols = [
            str(conns),
            ratio(rps("proxy", conns), rps("hello", conns)),
            ratio(rps("proxy", conns), rps("nginx-proxy", conns)),
            ratio(rps("proxy-w2", conns), rps("proxy", conns)),
            ratio(rps("hello", conns), rps("nginx-proxy", conns)),
        ]
        lines.append("| " + " | ".join(cols) + " |")
    if "baseline" in opts.rows:
        lines += ["", "| c | proxy ÷ baseline (req/s) | proxy ÷ baseline (CPU µs/req) |", "|---:|---:|---:|"]
        for conns in opts.connections:
            cpu = {
                row: median_cell(by_name[row].cells[conns]).cpu_us
                for row in ("proxy", "baseline")
                if row in by_name and conns in by_name[row].cells
            }
            cols = [str(conns), ratio(rps("proxy", conns), rps("baseline", conns))]
            cols.append(ratio(cpu.get("proxy"), cpu.get("baseline")))
            lines.append("| " + " | ".join(cols) + " |")
    lines.append("")
    lines.append("— : a row it needs was not run or failed.")
    h2 = by_name.get("h2c")
    if h2:
        h2_rps = median_cell(next(iter(h2.cells.values()))).rps
        best_h1 = max((v for c in opts.connections if (v := rps("proxy", c)) is not None), default=None)
        lines.append(
            f"h2c ({opts.h2_clients}x{opts.h2_streams} streams) ÷ proxy over HTTP/1.1 at its best "
            f"concurrency: {ratio(h2_rps, best_h1)}"
        )

    direct = by_name.get("direct")
    if direct and 1 in direct.cells:
        base = median_cell(direct.cells[1]).p50_ms
        lines += ["", f"## Median latency added over a direct call at c = 1 (direct p50 {base:.3f} ms)", ""]
        lines += ["| row | p50 ms at c = 1 | added ms |", "|---|---:|---:|"]
        for r in results:
            if r.name in by_name and r.name != "direct" and 1 in r.cells:
                p50 = median_cell(r.cells[1]).p50_ms
                lines.append(f"| {r.name} | {p50:.3f} | {p50 - base:+.3f} |")

    splits = []
    for r in results:
        for conns, cells in r.cells.items():
            if cells and cells[-1].split:
                shares = " / ".join(f"{s:.0%}" for s in cells[-1].split)
                splits.append(f"{r.name} c={conns}: CPU share per worker process {shares}")

    if opts.rounds > 1:
        lines += [
            "",
            "## every round",
            "",
            "| row | c | req/s per round | p99 ms per round | other load per round |",
        ]
        lines.append("|---|---:|---|---|---|")
        for r in results:
            for conns, cells in r.cells.items():
                per_rps = " · ".join(f"{c.rps:,.0f}" for c in cells)
                p99 = " · ".join(f"{c.p99_ms:.1f}" for c in cells)
                other = " · ".join(f"{c.other_wrk:.0%}/{c.other_server:.0%}" for c in cells)
                label = level_label(r.name, conns, opts)
                lines.append(f"| {r.name} | {label} | {per_rps} | {p99} | {other} |")
    notes = [n for r in results for n in r.notes] + splits
    notes += [f"{r.name} failed: {r.failed}" for r in results if r.failed]
    for r in results:
        for conns, cells in r.cells.items():
            if errors := sum(c.errors for c in cells):
                notes.append(f"{r.name} at c={conns}: {errors} errors; its req/s counts failed requests too")
    if notes:
        lines += ["", "## notes", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


# --- main -----------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> Options:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=int, default=8, help="seconds measured per cell (default 8)")
    p.add_argument("--warmup", type=int, default=2, help="unmeasured seconds before each cell (default 2)")
    p.add_argument("--connections", default="1,16,64", help="comma-separated concurrencies (default 1,16,64)")
    p.add_argument("--threads", type=int, default=1, help="wrk threads (default 1: wrk has one core)")
    p.add_argument(
        "--rows", default=",".join(ROW_NAMES), help=f"rows to run, of {','.join(ROW_NAMES)} (default all)"
    )
    p.add_argument(
        "--rounds", type=int, default=1, help="interleaved rounds; the median is shown (default 1)"
    )
    p.add_argument("--venv", type=Path, default=ROOT / ".venv", help="venv whose python runs proxy and hello")
    p.add_argument(
        "--start-timeout", type=float, default=30.0, help="seconds a server gets to answer (default 30)"
    )
    p.add_argument(
        "--results-dir", type=Path, default=BENCH_DIR / "results", help="where the report is written"
    )
    p.add_argument(
        "--baseline",
        type=Path,
        help="venv holding another build of the proxy (e.g. an older commit, pip-installed): adds the "
        "baseline row after the proxy row, for an A/B in one run",
    )
    p.add_argument("--wrk-cpu", type=int, default=0, help="CPU for wrk and helpers (default 0)")
    p.add_argument("--server-cpu", type=int, default=1, help="CPU for the server under test (default 1)")
    p.add_argument("--h2-clients", type=int, default=4, help="h2c row: h2load connections (default 4)")
    p.add_argument(
        "--h2-streams", type=int, default=25, help="h2c row: concurrent streams per connection (default 25)"
    )
    a = p.parse_args(argv)
    rows = [r.strip() for r in a.rows.split(",") if r.strip()]
    if a.baseline is not None:
        if not (a.baseline / "bin" / "aws-outbound-jwt-proxy").exists():
            p.error(
                f"--baseline: {a.baseline}/bin/aws-outbound-jwt-proxy not found "
                "(pip install the other build into that venv)"
            )
        if "baseline" not in rows:
            rows.insert(rows.index("proxy") + 1 if "proxy" in rows else len(rows), "baseline")
    elif "baseline" in rows:
        p.error("--rows: the baseline row needs --baseline VENV")
    bad = [r for r in rows if r not in (*ROW_NAMES, "baseline")]
    if bad or not rows:
        p.error(
            f"--rows: unknown row(s) {', '.join(bad) or '(none given)'}; choose from {', '.join(ROW_NAMES)}"
        )
    try:
        conns = [int(c) for c in a.connections.split(",") if c.strip()]
    except ValueError:
        p.error(f"--connections: not a comma-separated list of integers: {a.connections!r}")
    if not conns or min(conns) < 1:
        p.error("--connections: each concurrency must be >= 1")
    if a.duration <= 0 or a.warmup < 0 or a.rounds < 1 or a.threads < 1:
        p.error("--duration must be > 0, --warmup >= 0, --rounds and --threads >= 1")
    if a.h2_clients < 1 or a.h2_streams < 1:
        p.error("--h2-clients and --h2-streams must be >= 1")
    cpus = os.sched_getaffinity(0)
    for flag, cpu in (("--wrk-cpu", a.wrk_cpu), ("--server-cpu", a.server_cpu)):
        if cpu not in cpus:
            p.error(f"{flag}: CPU {cpu} is not available (have {sorted(cpus)})")
    return Options(
        duration=a.duration,
        warmup=a.warmup,
        connections=conns,
        threads=a.threads,
        rows=rows,
        rounds=a.rounds,
        venv=a.venv.resolve(),
        start_timeout=a.start_timeout,
        results_dir=a.results_dir,
        wrk_cpu=a.wrk_cpu,
        server_cpu=a.server_cpu,
        h2_clients=a.h2_clients,
        h2_streams=a.h2_streams,
        baseline=a.baseline.resolve() if a.baseline is not None else None,
    )


def main(argv: list[str]) -> int:
    opts = parse_args(argv)
    needed = ["taskset"]
    needed += ["wrk"] if any(r in WRK_ROWS for r in opts.rows) else []
    needed += ["h2load"] if "h2c" in opts.rows else []
    for tool in needed:
        if shutil.which(tool) is None:
            raise SystemExit(
                f"bench: {tool} not found (Debian: apt-get install -y wrk nginx nghttp2-client; "
                "`just bench` does it)"
            )
    nginx_binary()
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    load = "before " + loadavg()
    code_before = git_state()
    results = [RowResult(name) for name in opts.rows]
    for rnd in range(1, opts.rounds + 1):
        print(f"round {rnd}/{opts.rounds}", file=sys.stderr)
        for result in results:
            if result.failed is None:
                run_row(result, opts, rnd)
    # The project is installed editable: the working tree is what ran. Say if it moved meanwhile.
    code_after = git_state()
    code = (
        code_before if code_after == code_before else f"{code_before} at the start, {code_after} at the end"
    )
    text = report(results, opts, started, f"{load}, after {loadavg()}", code)
    print(text)
    opts.results_dir.mkdir(parents=True, exist_ok=True)
    out = opts.results_dir / f"{time.strftime('%Y%m%d-%H%M%S')}.md"
    out.write_text(text)
    print(f"written to {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
