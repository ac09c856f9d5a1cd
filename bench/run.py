"""Benchmark driver: wrk against nginx, the proxy, and a bare hypercorn-trio "hello" app.

Rows (each measured at every concurrency in --connections):
  direct  nginx itself (the upstream; shows it is not the bottleneck)
  proxy   aws-outbound-jwt-proxy with --upstream-host = nginx, tokens from the project's STS emulator
  hello   bench/hello.py on `hypercorn --worker-class trio` (this stack's own ceiling)

wrk runs on CPU 0 and the server under test on CPU 1 (nginx and the STS emulator share CPU 0
with wrk when they only support the proxy). Prints a markdown report and writes it to
bench/results/<timestamp>.md. Stdlib only; run with the project venv: `just bench` or
`.venv/bin/python bench/run.py --help`.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import os
import platform
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
ROW_NAMES = ("direct", "proxy", "hello")
CLK_TCK = os.sysconf("SC_CLK_TCK")

NGINX_CONF = """\
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
    server {{
        listen 127.0.0.1:{port};
        location / {{
            default_type text/plain;
            return 200 "{body}";
        }}
    }}
}}
"""


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


@dataclass
class Cell:
    """One wrk run: a row at one concurrency."""

    rps: float
    p50_ms: float
    p99_ms: float
    errors: int
    cpu_us: float  # CPU time of the server under test per request
    other_wrk: float  # share of wrk's CPU used by other processes (noise), 0..1
    other_server: float  # share of the server's CPU used by other processes (noise), 0..1


@dataclass
class Target:
    """What wrk hits: the URL, the server process (its whole tree is measured) and a label."""

    url: str
    pid: int
    server: str
    helpers: list[int] = field(default_factory=list)  # processes sharing wrk's CPU (nginx, emulator)


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
    name: str, cmd: list[str], cpu: int, tmp: Path, env: dict[str, str] | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """Start `cmd` pinned to `cpu` (taskset execs it, so the pid is the server's); stop it on exit."""
    log = tmp / f"{name}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            ["taskset", "-c", str(cpu), *cmd], stdout=out, stderr=subprocess.STDOUT, env=env
        )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                print(f"bench: {name} ignored SIGTERM for 10 s; killed", file=sys.stderr)
                proc.kill()
                proc.wait()


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


def cpu_busy(cpu: int) -> float:
    """Seconds CPU `cpu` has run processes (user, nice, system) or lost to the hypervisor (steal).

    Interrupt time is left out: loopback traffic of the bench itself is handled there.
    """
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith(f"cpu{cpu} "):
            user, nice, system, _idle, _iowait, _irq, _softirq, steal = (int(x) for x in line.split()[1:9])
            return (user + nice + system + steal) / CLK_TCK
    return 0.0


def children_cpu() -> float:
    """CPU seconds of this script's finished children (the wrk runs)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def cpu_seconds(pid: int) -> float:
    total = 0
    for p in tree(pid):
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / CLK_TCK


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
def nginx(tmp: Path, cpu: int) -> Iterator[Target]:
    port = free_port()
    conf = tmp / "nginx.conf"
    body = HELLO_BODY.decode().replace("\n", "\\n")
    conf.write_text(NGINX_CONF.format(tmp=tmp, port=port, body=body))
    cmd = [nginx_binary(), "-p", str(tmp), "-e", str(tmp / "nginx-error.log"), "-c", str(conf)]
    with spawn("nginx", cmd, cpu, tmp) as proc:
        wait_ready("nginx", proc, port, 10, tmp, want_200=True)
        version = subprocess.run([cmd[0], "-v"], capture_output=True, text=True).stderr.strip()
        yield Target(f"http://127.0.0.1:{port}/", proc.pid, version.replace("nginx version: ", ""))


@contextlib.contextmanager
def hello(tmp: Path, opts: Options) -> Iterator[Target]:
    port = free_port()
    cmd = [
        str(opts.venv / "bin" / "hypercorn"),
        "--worker-class",
        "trio",
        "--config",
        str(BENCH_DIR / "hello.toml"),
        "--bind",
        f"127.0.0.1:{port}",
        f"{BENCH_DIR / 'hello.py'}:app",
    ]
    with spawn("hello", cmd, opts.server_cpu, tmp) as proc:
        wait_ready("hello", proc, port, opts.start_timeout, tmp, want_200=True)
        yield Target(f"http://127.0.0.1:{port}/", proc.pid, python_of(proc.pid))


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


@contextlib.contextmanager
def proxy(tmp: Path, opts: Options, upstream: Target) -> Iterator[Target]:
    script = str(opts.venv / "bin" / "aws-outbound-jwt-proxy")
    sts_port, port = free_port(), free_port()
    emulator_cmd = [script, "sts-emulator", "--listen-addr", f"127.0.0.1:{sts_port}"]
    with spawn("sts-emulator", emulator_cmd, opts.wrk_cpu, tmp) as emulator:
        wait_ready("sts-emulator", emulator, sts_port, opts.start_timeout, tmp, want_200=False)
        upstream_host = upstream.url.removeprefix("http://").rstrip("/")
        cmd = [
            script,
            "--listen-addr",
            f"127.0.0.1:{port}",
            "--upstream-host",
            upstream_host,
            "--upstream-scheme",
            "http",
            "--token-audience",
            "https://bench.example",
            "--metrics-enabled=false",
            "--log-level",
            "warn",
        ]
        with spawn("proxy", cmd, opts.server_cpu, tmp, env=proxy_env(sts_port)) as proc:
            wait_ready("proxy", proc, port, opts.start_timeout, tmp, want_200=True)
            status, body = get(port)
            if status != 200 or body != HELLO_BODY:
                raise RowFailed(f"proxy answered {status} with a body that is not nginx's")
            helpers = [upstream.pid, emulator.pid]
            yield Target(f"http://127.0.0.1:{port}/", proc.pid, python_of(proc.pid), helpers)


# --- wrk ------------------------------------------------------------------------------------


def wrk(opts: Options, url: str, conns: int, seconds: int) -> dict[str, float]:
    threads = max(1, min(opts.threads, conns))
    cmd = ["taskset", "-c", str(opts.wrk_cpu), "wrk", f"-t{threads}", f"-c{conns}", f"-d{seconds}s"]
    cmd += ["--timeout", "10s", "-s", str(BENCH_DIR / "report.lua"), url]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60)
    for line in out.stdout.splitlines():
        if line.startswith("BENCH "):
            return {k: float(v) for k, v in (item.split("=") for item in line.split()[1:])}
    raise RuntimeError(f"wrk printed no result (status {out.returncode}): {out.stderr.strip() or out.stdout}")


def measure(opts: Options, target: Target, conns: int) -> Cell:
    if opts.warmup > 0:
        wrk(opts, target.url, conns, opts.warmup)

    def snapshot() -> tuple[float, float, float, float]:
        helpers = sum(cpu_seconds(pid) for pid in target.helpers) + children_cpu()
        return cpu_seconds(target.pid), cpu_busy(opts.server_cpu), helpers, cpu_busy(opts.wrk_cpu)

    before = snapshot()
    res = wrk(opts, target.url, conns, opts.duration)
    cpu, server_busy, ours_on_wrk_cpu, wrk_busy = (b - a for a, b in zip(before, snapshot(), strict=True))
    seconds = res["duration_us"] / 1e6
    requests = res["requests"]
    errors = int(sum(res[k] for k in ("connect", "read", "write", "status", "timeout")))
    return Cell(
        rps=requests / seconds,
        p50_ms=res["p50_us"] / 1000,
        p99_ms=res["p99_us"] / 1000,
        errors=errors,
        cpu_us=cpu / requests * 1e6 if requests else 0.0,
        other_wrk=max(0.0, (wrk_busy - ours_on_wrk_cpu) / seconds),
        other_server=max(0.0, (server_busy - cpu) / seconds),
    )


@contextlib.contextmanager
def start_row(name: str, tmp: Path, opts: Options) -> Iterator[Target]:
    if name == "direct":
        with nginx(tmp, opts.server_cpu) as target:
            yield target
    elif name == "hello":
        with hello(tmp, opts) as target:
            yield target
    else:
        with nginx(tmp, opts.wrk_cpu) as upstream, proxy(tmp, opts, upstream) as target:
            yield target


def run_row(result: RowResult, opts: Options, rnd: int) -> None:
    with tempfile.TemporaryDirectory(prefix=f"bench-{result.name}-") as tmpdir:
        tmp = Path(tmpdir)
        try:
            with start_row(result.name, tmp, opts) as target:
                result.server = target.server
                rss_before, _ = memory_kib(target.pid)
                for conns in opts.connections:
                    cell = measure(opts, target, conns)
                    result.cells.setdefault(conns, []).append(cell)
                    print(
                        f"  {result.name:6} c={conns:<3} {cell.rps:9.0f} req/s  p99 {cell.p99_ms:7.2f} ms  "
                        f"other load {cell.other_wrk:.0%} / {cell.other_server:.0%}",
                        file=sys.stderr,
                    )
                rss_after, hwm = memory_kib(target.pid)
                if result.name == "proxy":
                    result.notes.append(
                        f"round {rnd}: proxy RSS {rss_before / 1024:.1f} MiB after start-up, "
                        f"{rss_after / 1024:.1f} MiB after the run (peak {hwm / 1024:.1f} MiB)"
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
        other_wrk=max(c.other_wrk for c in cells),
        other_server=max(c.other_server for c in cells),
    )


def git_state() -> str:
    """Commit of the tree under test, and whether it has uncommitted changes."""
    head = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    )
    if head.returncode != 0:
        return "not a git checkout"
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain"], capture_output=True, text=True)
    return head.stdout.strip() + (" + uncommitted changes" if dirty.stdout.strip() else "")


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.machine()


def report(results: list[RowResult], opts: Options, started: str, load: str) -> str:
    wrk_version = subprocess.run(["wrk", "-v"], capture_output=True, text=True).stdout.split(" [")[0]
    lines = [
        f"# Benchmark {started}",
        "",
        f"- machine: {os.cpu_count()} cores ({cpu_model()}); load average (1/5/15 min) {load}",
        f"- code: {git_state()}",
        f"- client: {wrk_version}, -t{opts.threads} on CPU {opts.wrk_cpu}; "
        f"server under test on CPU {opts.server_cpu}",
        f"- {opts.duration} s per cell after {opts.warmup} s warm-up; "
        f"{opts.rounds} round(s), median of rounds shown",
        f"- GET / answered 200 with a {len(HELLO_BODY)}-byte body by every row (other statuses are errors)",
        f"- proxy row: nginx upstream and STS emulator share CPU {opts.wrk_cpu} with wrk",
    ]
    for r in results:
        lines.append(f"- {r.name}: {r.server or 'not started'}")
    lines += [
        "",
        f"| row | c | req/s | p50 ms | p99 ms | errors | server CPU µs/req | "
        f"other load CPU {opts.wrk_cpu} / {opts.server_cpu} |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        if r.failed:
            lines.append(f"| {r.name} | — | failed (see notes) | | | | | |")
            continue
        for conns in opts.connections:
            c = median_cell(r.cells[conns])
            cols = [r.name, str(conns), f"{c.rps:,.0f}", f"{c.p50_ms:.2f}", f"{c.p99_ms:.2f}"]
            cols += [str(c.errors), f"{c.cpu_us:,.0f}", f"{c.other_wrk:.0%} / {c.other_server:.0%}"]
            lines.append("| " + " | ".join(cols) + " |")
    lines += [
        "",
        "other load: CPU time used by processes outside the bench on wrk's CPU and on the server's CPU "
        "while the cell ran, as a share of its wall time (worst round). Above a few % the cell is "
        "disturbed by other work.",
    ]
    by_name = {r.name: r for r in results}
    lines += ["", "## proxy ÷ ceiling (hello)", ""]
    px, hl = by_name.get("proxy"), by_name.get("hello")
    if px and hl and not px.failed and not hl.failed:
        lines += ["| c | proxy req/s | hello req/s | proxy ÷ hello |", "|---:|---:|---:|---:|"]
        for conns in opts.connections:
            p, h = median_cell(px.cells[conns]).rps, median_cell(hl.cells[conns]).rps
            lines.append(f"| {conns} | {p:,.0f} | {h:,.0f} | {p / h:.2f} |")
    else:
        lines.append("not available: needs both the proxy and hello rows.")
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
                rps = " · ".join(f"{c.rps:,.0f}" for c in cells)
                p99 = " · ".join(f"{c.p99_ms:.1f}" for c in cells)
                other = " · ".join(f"{c.other_wrk:.0%}/{c.other_server:.0%}" for c in cells)
                lines.append(f"| {r.name} | {conns} | {rps} | {p99} | {other} |")
    notes = [n for r in results for n in r.notes]
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
        "--rows", default=",".join(ROW_NAMES), help="rows to run, of direct,proxy,hello (default all)"
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
    p.add_argument("--wrk-cpu", type=int, default=0, help="CPU for wrk and helpers (default 0)")
    p.add_argument("--server-cpu", type=int, default=1, help="CPU for the server under test (default 1)")
    a = p.parse_args(argv)
    rows = [r.strip() for r in a.rows.split(",") if r.strip()]
    bad = [r for r in rows if r not in ROW_NAMES]
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
    )


def main(argv: list[str]) -> int:
    opts = parse_args(argv)
    for tool in ("wrk", "taskset"):
        if shutil.which(tool) is None:
            raise SystemExit(
                f"bench: {tool} not found (Debian: apt-get install -y wrk; `just bench` does it)"
            )
    nginx_binary()
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    load = "before " + loadavg()
    results = [RowResult(name) for name in opts.rows]
    for rnd in range(1, opts.rounds + 1):
        print(f"round {rnd}/{opts.rounds}", file=sys.stderr)
        for result in results:
            if result.failed is None:
                run_row(result, opts, rnd)
    text = report(results, opts, started, f"{load}, after {loadavg()}")
    print(text)
    opts.results_dir.mkdir(parents=True, exist_ok=True)
    out = opts.results_dir / f"{time.strftime('%Y%m%d-%H%M%S')}.md"
    out.write_text(text)
    print(f"written to {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
