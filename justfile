# Tasks for aws-outbound-jwt-proxy. Every recipe creates .venv first (scripts/setup) and uses only
# the tools inside it; `bench` also installs wrk, nginx and h2load with apt-get when they are missing.
# `just` itself comes with the test extras: ./scripts/setup puts it at .venv/bin/just.

set shell := ["bash", "-euo", "pipefail", "-c"]
set positional-arguments

# List the recipes
default:
    @"{{ just_executable() }}" --justfile "{{ justfile() }}" --list

# Run the test suite; arguments go to pytest (just test tests/test_config.py -q)
test *args:
    ./scripts/test "$@"

# ruff check, ruff format --check, mypy --strict and the import-layer contracts
lint:
    ./scripts/setup
    .venv/bin/ruff check src tests bench
    .venv/bin/ruff format --check src tests bench
    .venv/bin/mypy --strict src
    .venv/bin/lint-imports

# Apply ruff's safe fixes and format the code
fmt:
    ./scripts/setup
    .venv/bin/ruff check --fix src tests bench
    .venv/bin/ruff format src tests bench

# Benchmark the proxy against nginx, nginx proxy_pass and a bare hypercorn-trio app (just bench --duration 4 --rows proxy,hello)
bench *args: _bench-tools
    ./scripts/setup
    .venv/bin/python bench/run.py "$@"

# Two workers against one in adjacent pairs of short cells, the proxy and a bare control app (just bench-scaling --apps proxy,fetch,hello)
bench-scaling *args: _bench-tools
    ./scripts/setup
    .venv/bin/python bench/scaling.py "$@"

# Install wrk, nginx and h2load (nghttp2-client) from Debian when missing (needs root)
_bench-tools:
    #!/usr/bin/env bash
    set -euo pipefail
    missing=()
    command -v wrk >/dev/null || missing+=(wrk)
    command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || missing+=(nginx)
    command -v h2load >/dev/null || missing+=(nghttp2-client)
    if [ ${#missing[@]} -gt 0 ]; then
        echo "bench: installing ${missing[*]} with apt-get" >&2
        apt-get update -q
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"
    fi

# Start the demo: STS emulator + verifying upstream + proxy in one process
demo *args:
    ./scripts/demo "$@"

# Run the local STS emulator; flags pass through (just emulator --listen-addr 127.0.0.1:8090)
emulator *args:
    ./scripts/setup
    .venv/bin/aws-outbound-jwt-proxy sts-emulator "$@"

# Soak the real proxy under mixed load, 10 min by default; not in CI (just soak --minutes 1)
soak *args:
    ./scripts/setup
    .venv/bin/python bench/soak.py "$@"
