# syntax=docker/dockerfile:1
# Container image for aws-outbound-jwt-proxy: the package (not editable) and its hash-locked
# dependencies in a venv, run as uid 65532, every setting from environment variables
# (LISTEN_ADDR, UPSTREAM_HOST, ...; see `aws-outbound-jwt-proxy --help`).
#   docker build --build-arg VERSION=0.1.0 --build-arg REVISION="$(git rev-parse HEAD)" \
#     -t aws-outbound-jwt-proxy .
# scripts/image-smoke repeats the install steps below without a container engine.
#
# The base is pinned by tag. For a release build pin it by digest as well, so the build is
# reproducible and a re-pushed tag cannot change it:
#   FROM python:3.11-slim-bookworm@sha256:<digest>   (docker buildx imagetools inspect <tag>)

# --- build: dependencies and the project into /opt/venv ---------------------------------------
FROM python:3.11-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore
RUN python -m venv /opt/venv
# Dependencies first, each file checked against its hash (scripts/lock writes the lock). This
# layer is reused until requirements.lock changes.
COPY requirements.lock /tmp/requirements.lock
RUN /opt/venv/bin/pip install --require-hashes --no-deps -r /tmp/requirements.lock
# Then the project itself: no resolution, everything it needs is in the layer above.
WORKDIR /src
COPY pyproject.toml README.md ./
COPY src ./src
RUN /opt/venv/bin/pip install --no-deps . \
 && /opt/venv/bin/pip check

# --- runtime: same base image, only the venv copied over --------------------------------------
FROM python:3.11-slim-bookworm
RUN groupadd --system --gid 65532 proxy \
 && useradd --system --uid 65532 --gid 65532 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin proxy
# Owned by root: the proxy cannot modify its own code (works with a read-only root filesystem).
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
USER 65532:65532
# 8080: the proxy (LISTEN_ADDR, default :8080); 9090: metrics and health (METRICS_LISTEN_ADDR)
EXPOSE 8080 9090
# Liveness of the process, without curl (not in the slim image). Assumes the default metrics
# listener; Kubernetes ignores HEALTHCHECK and uses the pod's probes instead.
HEALTHCHECK --interval=10s --timeout=5s --start-period=10s --retries=3 \
  CMD ["python", "-c", "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:9090/healthz', timeout=2)"]
# Build arguments last, so a new version or revision does not rebuild the layers above.
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG SOURCE=https://github.com/example/aws-outbound-jwt-proxy
LABEL org.opencontainers.image.title="aws-outbound-jwt-proxy" \
      org.opencontainers.image.description="Reverse proxy that signs outbound requests with short-lived AWS STS web identity JWTs" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.revision="${REVISION}"
ENTRYPOINT ["aws-outbound-jwt-proxy"]
