# syntax=docker/dockerfile:1
# Image for the mailbox service: each container runs `mailbox serve` (the worker manager).
# Build:  docker build -t mailbox:0.1.0 .
# The Helm chart in deploy/helm/mailbox runs it as user 10001 with a read-only root
# filesystem and an emptyDir at /tmp.

# ---- build stage: install the package and its dependencies into a venv ----------------
FROM python:3.12-slim AS build

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN python -m venv /opt/venv
ENV PATH="/opt/venv/bin:${PATH}"

WORKDIR /src
# Only what `pip install .` needs (see .dockerignore).
COPY pyproject.toml README.md ./
COPY service ./service
RUN pip install --no-cache-dir --upgrade pip \
 && pip install --no-cache-dir . \
 && test -x /opt/venv/bin/mailbox

# ---- runtime stage -----------------------------------------------------------------
FROM python:3.12-slim

LABEL org.opencontainers.image.title="mailbox" \
      org.opencontainers.image.description="Durable per-thread run mailbox on NATS JetStream" \
      org.opencontainers.image.version="0.1.0"

RUN groupadd --system --gid 10001 mailbox \
 && useradd --system --uid 10001 --gid 10001 --no-create-home \
      --home-dir /nonexistent --shell /usr/sbin/nologin mailbox

COPY --from=build /opt/venv /opt/venv

ENV PATH="/opt/venv/bin:${PATH}" \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    MAILBOX_METRICS_PORT=9464 \
    MAILBOX_HEALTH_PORT=8081

USER 10001
WORKDIR /tmp

EXPOSE 9464 8081

ENTRYPOINT ["mailbox", "serve"]
