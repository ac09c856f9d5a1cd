"""Instructions per request, counted by valgrind's callgrind: an A/B measure that noise cannot move.

Wall-clock cells on a shared VM move by ±30 % run to run; the number of
instructions the server executes per request does not (the same build, the
same requests give the same count to within ~0.5 %). This runs the server under
test under ``valgrind --tool=callgrind`` with counting off, warms it up,
switches counting on for exactly ``--requests`` requests sent by
``h2load --h1 -c <connections>`` (h2load counts hypercorn's HTTP/1.1 answers
as "failed" for their empty reason phrase; every request is still "done"),
and prints the count divided by the requests.

It counts user-space instructions only: system calls and cache misses are not
in it, so a change that saves a write (or touches less memory) is worth more
than its count says. ``--cache-sim`` adds callgrind's cache simulation and
prints the data misses per request of a simulated 2 MiB L2 (one core's here):
the cost that grows with requests in flight even when the instruction count
does not. Under valgrind the server is ~50x slower; 300 requests at c = 1
take about half a minute.

    .venv/bin/python bench/instructions.py --row proxy --connections 1,64
    .venv/bin/python bench/instructions.py --row proxy --venv /tmp/venv-main   # the A side of an A/B
    .venv/bin/python bench/instructions.py --row proxy --connections 64 --cache-sim

Rows: ``proxy`` (the console script in front of the bench's nginx, tokens from
the STS emulator, as in ``run.py``), ``proxy-hypercorn`` (the same proxy under
``hypercorn --workers 0`` configured from the environment: one proxy-w2
worker's path) and ``hello`` (``bench/hello.py`` under
``hypercorn --workers 0``, the stack's ceiling). Needs valgrind
(``apt-get install -y valgrind``) and h2load (``nghttp2-client``).
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import run  # bench/ is on sys.path: this file runs as a script

# --cache-sim: callgrind simulates a first-level cache and a last-level one; the last level is
# set to one core's L2 here (2 MiB, 16-way), the level whose misses grow with requests in flight.
CACHE_SIM = ["--cache-sim=yes", "--LL=2097152,16,64"]


def count(venv: Path, row: str, conns: int, requests: int, cache_sim: bool = False) -> tuple[float, float]:
    """Instructions per request of one row at one concurrency, and simulated L2 data misses (or 0)."""
    opts = run.parse_args(["--rows", "proxy", "--venv", str(venv)])
    with tempfile.TemporaryDirectory(prefix="bench-instructions-") as tmpdir:
        tmp = Path(tmpdir)
        with run.nginx(tmp, "nginx", opts.wrk_cpu) as upstream, run.emulator(tmp, opts) as (sts_port, _):
            port = run.free_port()
            out = tmp / "callgrind.out"
            cmd = ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}"]
            cmd += CACHE_SIM if cache_sim else []
            cmd.append(str(venv / "bin" / "python"))
            env = run.proxy_env(sts_port)
            if row == "hello":
                cmd += [str(venv / "bin" / "hypercorn"), "--worker-class", "trio", "--workers", "0"]
                cmd += ["--config", str(run.BENCH_DIR / "hello.toml"), "--bind", f"127.0.0.1:{port}"]
                cmd.append(f"{run.BENCH_DIR / 'hello.py'}:app")
            elif row == "proxy-hypercorn":
                cmd += run.hypercorn_cmd(venv, 0, port)
                env = run.hypercorn_env(sts_port, upstream)
            else:
                cmd += [str(venv / "bin" / "aws-outbound-jwt-proxy"), "--listen-addr", f"127.0.0.1:{port}"]
                cmd += ["--upstream-host", upstream.url.removeprefix("http://").rstrip("/")]
                cmd += [f"--{flag}={value}" for flag, value in run.PROXY_SETTINGS.items()]
            log = (tmp / "server.log").open("w")
            server = subprocess.Popen(
                ["taskset", "-c", str(opts.server_cpu), *cmd],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
            try:
                deadline = time.monotonic() + 300
                while True:
                    try:
                        if run.get(port)[0] == 200:
                            break
                    except OSError:
                        pass
                    if time.monotonic() > deadline or server.poll() is not None:
                        raise SystemExit(f"instructions: {row} did not start: {run.log_tail(tmp, 'server')}")
                    time.sleep(0.5)
                url = f"http://127.0.0.1:{port}/"
                load = ["taskset", "-c", str(opts.wrk_cpu), "h2load", "--h1", "-c", str(conns), url]
                subprocess.run([*load, "-n", str(max(100, 4 * conns))], capture_output=True, check=True)
                control = ["callgrind_control"]
                subprocess.run([*control, "-i", "on", str(server.pid)], capture_output=True, check=True)
                measured = [*load, "-n", str(requests)]
                result = subprocess.run(measured, capture_output=True, text=True, check=True)
                subprocess.run([*control, "-i", "off", str(server.pid)], capture_output=True, check=True)
                subprocess.run([*control, "-d", str(server.pid)], capture_output=True, check=True)
            finally:
                server.terminate()
                server.wait(120)
                log.close()
            done = re.search(r"(\d+) done", result.stdout)
            if done is None or int(done.group(1)) != requests:
                raise SystemExit(f"instructions: h2load did not finish every request:\n{result.stdout}")
            totals = dict.fromkeys(("Ir", "DLmr", "DLmw"), 0)
            for dump in tmp.glob("callgrind.out*"):
                events: list[str] = []
                for line in dump.read_text().splitlines():
                    if line.startswith("events:"):
                        events = line.split()[1:]
                    elif line.startswith("totals:"):  # ("summary:" stays 0 with counting off at start)
                        for name, value in zip(events, line.split()[1:], strict=False):
                            if name in totals:
                                totals[name] += int(value)
            return totals["Ir"] / requests, (totals["DLmr"] + totals["DLmw"]) / requests


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    rows = ("proxy", "proxy-hypercorn", "hello")
    p.add_argument("--row", choices=rows, default="proxy", help="server under test")
    p.add_argument("--connections", default="1", help="comma-separated concurrencies (default 1)")
    p.add_argument("--requests", type=int, default=0, help="requests counted (default max(300, 20 x c))")
    p.add_argument(
        "--cache-sim",
        action="store_true",
        help="also simulate the caches and print L2 data misses per request (~2x slower)",
    )
    p.add_argument("--venv", type=Path, default=run.ROOT / ".venv", help="venv whose python runs the server")
    a = p.parse_args(argv)
    for tool in ("valgrind", "callgrind_control", "h2load", "taskset"):
        if shutil.which(tool) is None:
            p.error(f"{tool} not found (Debian: apt-get install -y valgrind nghttp2-client)")
    for conns in (int(c) for c in a.connections.split(",") if c.strip()):
        requests = a.requests or max(300, 20 * conns)
        per, misses = count(a.venv.resolve(), a.row, conns, requests, a.cache_sim)
        line = f"{a.row} c={conns} requests={requests} instructions/request={per:,.0f}"
        print(line + (f" L2-data-misses/request={misses:,.0f}" if a.cache_sim else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
