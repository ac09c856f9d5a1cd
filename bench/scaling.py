"""Two workers against one, measured in adjacent pairs: the w2 ÷ w1 ratio without the drift.

`run.py` starts each row's servers in turn and measures all of its levels
before the next row starts, so the two cells a ratio divides lie half a minute
apart, and on a shared VM the host's speed moves by ±30 % in that time. Here
every server starts once and stays up, and wrk alternates between the two of a
pair in short cells, the order flipped every pair (A B, B A, ...), so every
ratio divides two cells a few seconds apart; the servers not under load sit
idle. Pairs (--apps):

  proxy  the proxy row's console script (one process, CPU 1) against the proxy-w2
         row's `hypercorn --worker-class trio -w 2` (both CPUs), each with its own
         nginx upstream and STS emulator on CPU 0, exactly as `run.py` starts them
  fetch  the control: bench/fetch.py (hypercorn-trio plus one raw HTTP/1.1 round
         trip to its own nginx on CPU 0 per request; no framework, no client
         library) under `hypercorn -w 1` on CPU 1 against `-w 2` on both CPUs
  hello  bench/hello.py the same way: the stack with no upstream at all

Printed per pair and level: the median over the pairs of req/s and CPU per
request for each side, and of the two ratios, with their range; the share of
the server CPUs' time the hypervisor took (steal, from /proc/stat) on each
side, and the req/s ratio once each side is divided by the CPU time it was
left (rps / (1 - steal)): on a shared VM a second busy virtual CPU can cost
both of them time that no change to the server gets back. Then the limit: the
ratio a second worker could give at no extra CPU per request, 2 / (1 + client /
server) from the w1 cell, where client is what wrk and the pair's helpers spend
per request; once both CPUs are busy they share them with the workers.

    just bench-scaling            # proxy and fetch pairs, c = 16, 64, 8 pairs of 4 s cells (~6 min)
    .venv/bin/python bench/scaling.py --apps proxy --connections 16 --pairs 12 --duration 3

Every load run is wrk with `-d`: bounded in time; all traffic stays on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
from pathlib import Path

import run  # bench/ is on sys.path: this file runs as a script

PAIRS = {"proxy": ("proxy", "proxy-w2"), "fetch": ("fetch", "fetch-w2"), "hello": ("hello", "hello-w2")}


def spread(values: list[float], fmt: str) -> str:
    """Median and range: `1.80 (1.71 to 1.86)`."""
    return f"{statistics.median(values):{fmt}} ({min(values):{fmt}} to {max(values):{fmt}})"


def left(cell: run.Cell) -> float:
    """req/s per share of the server CPUs' time the hypervisor left it."""
    return cell.rps / max(1.0 - cell.steal, 0.01)


def limit(one: run.Cell) -> float:
    """The w2 ÷ w1 req/s this topology allows, from the one-worker cell.

    One worker saturates CPU 1 at `cpu_us` per request, so w1 serves 1 / cpu_us per
    CPU-second. With two workers both CPUs are busy, and every request also costs the
    client side's `client_us` (wrk, nginx, emulator) on them: at best
    2 / (cpu_us + client_us). The ratio of the two is 2 / (1 + client_us / cpu_us).
    """
    return 2 * one.cpu_us / (one.cpu_us + one.client_us) if one.cpu_us else 0.0


def levels(text: str) -> str:
    """--connections: checked here, so a mistake is reported with this script's usage."""
    if not all(part.strip().isdigit() and int(part) > 0 for part in text.split(",")):
        raise argparse.ArgumentTypeError(f"not a comma-separated list of positive integers: {text!r}")
    return text


def apps(text: str) -> list[str]:
    """--apps: a comma-separated subset of PAIRS, in the order given."""
    names = [part.strip() for part in text.split(",")]
    if not names or any(name not in PAIRS for name in names) or len(set(names)) < len(names):
        raise argparse.ArgumentTypeError(f"choose one or more of {', '.join(PAIRS)}, each once: {text!r}")
    return names


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--apps", type=apps, default="proxy,fetch", help="pairs to measure (default proxy,fetch)")
    p.add_argument("--connections", type=levels, default="16,64", help="wrk -c levels (default 16,64)")
    p.add_argument("--pairs", type=int, default=8, help="cells per server and level (default 8)")
    p.add_argument("--duration", type=int, default=4, help="seconds per cell (default 4)")
    p.add_argument("--venv", type=Path, default=run.ROOT / ".venv", help="venv whose proxy is measured")
    args = p.parse_args(argv)
    if args.pairs < 1 or args.duration < 1:
        p.error("--pairs and --duration must be at least 1")
    settings = ["--rows", "proxy", "--venv", str(args.venv), "--connections", args.connections]
    opts = run.parse_args([*settings, "--warmup", "0"])
    opts.duration = args.duration
    lines = [
        f"# Scaling by workers, {args.pairs} adjacent pairs of {args.duration} s cells per level",
        "",
        f"- code: {run.git_state()}; machine: {run.cpu_model()}; load average before {run.loadavg()}",
        "- w1: one process on CPU 1; w2: hypercorn -w 2 on CPUs 0 and 1, sharing CPU 0 with wrk "
        "and the pair's nginx upstream (and STS emulator)",
        "",
        "| pair | c | w1 req/s | w2 req/s | w2 ÷ w1 req/s | w1 CPU µs/req | w2 CPU µs/req "
        "| w2 ÷ w1 CPU/req | steal w1 / w2 | w2 ÷ w1 req/s per CPU left | limit | worst other load |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    with contextlib.ExitStack() as stack:
        targets, tmps = {}, {}
        for row in (row for app in args.apps for row in PAIRS[app]):
            tmps[row] = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=f"bench-scaling-{row}-")))
            targets[row] = stack.enter_context(run.start_row(row, tmps[row], opts))
        for conns in opts.connections:
            for target in targets.values():  # warm all up: pools filled, first-request paths taken
                run.wrk(opts, target.url, conns, 2)
            cells: dict[str, list[run.Cell]] = {row: [] for row in targets}
            for i in range(args.pairs):
                for app in args.apps:
                    for row in PAIRS[app] if i % 2 == 0 else reversed(PAIRS[app]):
                        cell = run.measure(opts, targets[row], conns, row, tmps[row])
                        cells[row].append(cell)
                        print(
                            f"  c={conns:<3} pair {i + 1}/{args.pairs} {row:8} {cell.rps:7.0f} req/s "
                            f"{cell.cpu_us:6.0f} µs/req  other load {cell.other_server:.0%} "
                            f"(steal {cell.steal:.0%})",
                            file=sys.stderr,
                        )
            for app in args.apps:
                one, two = (cells[row] for row in PAIRS[app])
                rps_ratio = [b.rps / a.rps for a, b in zip(one, two, strict=True)]
                cpu_ratio = [b.cpu_us / a.cpu_us for a, b in zip(one, two, strict=True)]
                left_ratio = [left(b) / left(a) for a, b in zip(one, two, strict=True)]
                limits = [limit(a) for a in one]
                steal = (statistics.median(c.steal for c in side) for side in (one, two))
                other = max(max(c.other_wrk, c.other_server) for c in one + two)
                lines.append(
                    f"| {app} | {conns} | {statistics.median(c.rps for c in one):,.0f} "
                    f"| {statistics.median(c.rps for c in two):,.0f} | {spread(rps_ratio, '.2f')} "
                    f"| {statistics.median(c.cpu_us for c in one):,.0f} "
                    f"| {statistics.median(c.cpu_us for c in two):,.0f} | {spread(cpu_ratio, '.2f')} "
                    f"| {' / '.join(f'{share:.0%}' for share in steal)} "
                    f"| {spread(left_ratio, '.2f')} | {statistics.median(limits):.2f} | {other:.0%} |"
                )
    lines += [
        "",
        "Ratios are per pair (the two cells run back to back), then the median and range over the pairs.",
        "Steal: median share of the server CPUs' time taken by the hypervisor (w1: CPU 1; w2: both).",
        "Limit: the w2 ÷ w1 req/s a second worker could give at no extra CPU per request, median over the "
        "pairs: 2 ÷ (1 + client ÷ server), from the w1 cell's CPU per request of the server and of the "
        "client side (wrk, nginx, emulator), which shares the CPUs once both are busy.",
    ]
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except run.RowFailed as exc:
        sys.exit(f"scaling: {exc}")
