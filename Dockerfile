# syntax=docker/dockerfile:1
# Container image for aws-outbound-jwt-proxy: the package (not editable) in a venv, run as a
# non-root user, every setting from environment variables (LISTEN_ADDR, UPSTREAM_HOST, ...).
# Build: docker build -t aws-outbound-jwt-proxy .

# --- build: install the project and its dependencies into /opt/venv ---------------------------
FROM python:3.11-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
WORKDIR /src
COPY pyproject.toml README.md ./
COPY src ./src
RUN /opt/venv/bin/pip install .

# --- runtime: same base image, only the venv copied over --------------------------------------
FROM python:3.11-slim-bookworm
RUN groupadd --system --gid 65532 proxy \
 && useradd --system --uid 65532 --gid 65532 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin proxy
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
USER 65532:65532
# 8080: the proxy (LISTEN_ADDR, default :8080); 9090: metrics and health (METRICS_LISTEN_ADDR)
EXPOSE 8080 9090
ENTRYPOINT ["aws-outbound-jwt-proxy"]
