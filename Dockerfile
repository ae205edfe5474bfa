# chat-worker image: a venv built in one stage, copied into a clean slim runtime.
#
#   docker build -t chat-worker:0.1.0 .
#   docker run --rm -e WORKER_UPSTREAM_BASE_URL=https://host/v1 chat-worker:0.1.0
#
# Pin the base by digest in CI with --build-arg PYTHON_IMAGE=python:3.11-slim-bookworm@sha256:...
# An optional constraints.txt at the repository root (e.g. `pip freeze` of a tested venv)
# pins every dependency; without it pip resolves the ranges in pyproject.toml.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

# The venv has no pip of its own: the base image's pip installs into it, so the runtime
# stage ships neither pip nor setuptools.
RUN python -m venv --without-pip /opt/venv

WORKDIR /src

# Dependencies first, in their own layer: it is rebuilt only when pyproject.toml (or the
# constraints) change, not on every code change.
COPY pyproject.toml constraints*.txt ./
RUN python -c 'import tomllib; p = tomllib.load(open("pyproject.toml", "rb")); print("\n".join(p["project"]["dependencies"]))' > requirements.txt \
    && if [ -f constraints.txt ]; then set -- --constraint constraints.txt; fi \
    && pip --python /opt/venv/bin/python install --no-cache-dir --requirement requirements.txt "$@"

# The package itself, without touching the dependencies resolved above.
COPY README.md ./
COPY worker/ worker/
RUN pip --python /opt/venv/bin/python install --no-cache-dir --no-deps . \
    && pip --python /opt/venv/bin/python check

FROM ${PYTHON_IMAGE} AS runtime

ARG APP_UID=10001

LABEL org.opencontainers.image.title="chat-worker" \
      org.opencontainers.image.description="RabbitMQ worker for OpenAI-compatible chat completions" \
      org.opencontainers.image.licenses="Apache-2.0"

# A passwd entry for the numeric user, so getpwuid() and friends work; no home, no shell.
RUN groupadd --system --gid "${APP_UID}" chatworker \
    && useradd --system --no-log-init --uid "${APP_UID}" --gid "${APP_UID}" \
       --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin chatworker

COPY --from=build /opt/venv /opt/venv

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    WORKER_HTTP_PORT=8080

WORKDIR /app
USER ${APP_UID}:${APP_UID}
EXPOSE 8080

# Kubernetes ignores this; it serves `docker run` and compose.
HEALTHCHECK --interval=30s --timeout=5s --start-period=15s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('WORKER_HTTP_PORT', '8080'), timeout=3)"]

# The worker handles SIGTERM itself: stop consuming, drain for WORKER_SHUTDOWN_GRACE, exit 0.
STOPSIGNAL SIGTERM
ENTRYPOINT ["chat-worker"]
CMD ["run"]
