# telemetry-processor: the service image.
#
#   docker build -t telemetry-processor .
#   docker compose --profile app up -d      (the processor beside TimescaleDB and Redis)
#   podman build --format docker -t telemetry-processor .
#
# podman builds OCI images by default, and the OCI format has no HEALTHCHECK: podman
# drops it with a warning. --format docker keeps it (tests/test_image.py builds so).
#
# Configuration is the environment (CONTRACT 3); nothing is baked in. `.env` is
# kept out of the build context by .dockerignore, so no secret ends up in a layer.

# The build stage: the package as a wheel, with the decoder's compiled way
# (processor/core/_speedups.c) built by a C compiler that stays in this stage.
# python:3.11-slim has Python's headers; a stand-in base built from Debian's
# python3 (../shared/tools/container-base-image.sh) gets them from python3-dev.
FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore
RUN apt-get update -qq \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends gcc libc6-dev >/dev/null \
 && { python -c "import os, sysconfig, sys; sys.exit(not os.path.exists(sysconfig.get_paths()['include'] + '/Python.h'))" \
      || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3-dev >/dev/null; } \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# The wheel, then its extension beside the source for `python processor.py` (below); the
# import fails the build if the compiled way was not built.
RUN pip wheel -q --no-deps --wheel-dir /wheels . \
 && pip install -q --no-deps --target /built /wheels/*.whl \
 && python -c "import sys; sys.path.insert(0, '/built'); import processor.core._speedups"

FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

# A fixed, numeric uid/gid: Kubernetes' runAsNonRoot can only check a number,
# and volume ownership stays the same across rebuilds. Not --system: system
# accounts are below 1000, and useradd warns about 10001 as one.
RUN groupadd --gid 10001 telemetry \
 && useradd --uid 10001 --gid telemetry --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin telemetry

WORKDIR /app

# Dependencies first, read from pyproject.toml alone: this layer is rebuilt when
# the dependency list changes, not on every edit of the source. The gateway
# extra too: the same image runs the live gateway (command `gateway`).
COPY pyproject.toml ./
RUN python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; print(*p['dependencies'], *p['optional-dependencies']['gateway'], sep=chr(10))" \
        > /tmp/requirements.txt \
 && pip install -r /tmp/requirements.txt \
 && rm /tmp/requirements.txt

# The source: .dockerignore lets through only the package, processor.py,
# schema.sql (a symlink to processor/schema.sql, kept as one) and the project files.
COPY . .

# The wheel installed too (no dependencies: they are above) for the `telemetry-processor`
# command and the package metadata. `python processor.py` imports /app/processor,
# the same code, with the same compiled extension copied in. The code is compiled
# here because /app stays read-only to the service user, which could not write
# __pycache__ at run time; chmod because COPY keeps the checkout's modes, which a
# umask of 077 would make root-only.
COPY --from=build /wheels /tmp/wheels
COPY --from=build /built/processor/core/_speedups.*.so processor/core/
RUN pip install --no-deps /tmp/wheels/*.whl \
 && rm -rf /tmp/wheels \
 && python -m compileall -q processor processor.py \
 && chmod -R a+rX,go-w /app

# Root owns /app; the service only reads it.
USER 10001:10001

# /metrics, /healthz, /readyz (METRICS_PORT).
EXPOSE 9464

# The processor drains in-flight writes on SIGTERM within SHUTDOWN_TIMEOUT_S
# (15 s). Docker's default stop timeout is 10 s: give it more
# (`docker stop -t 30`, compose `stop_grace_period: 30s`). Python is PID 1 here
# (exec-form CMD) and installs its own handlers, so the signal reaches it.
STOPSIGNAL SIGTERM

# Liveness from /healthz, with the standard library only (the slim image has no
# curl). urlopen raises on refusal, timeout and any non-2xx status: exit 1.
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('METRICS_PORT', '9464'), timeout=4)"]

CMD ["python", "processor.py"]
