# The chat site as a small image: Python slim, the runtime dependencies from pyproject.toml,
# the code read-only under /app, and everything the app writes (SQLite database, WAL files,
# session key) in the volume at /data. See docs/DEPLOY.md.
#
#   docker build -t agent-chat .
#   docker run -p 127.0.0.1:5001:5001 -v agent-chat-data:/data agent-chat
FROM python:3.12-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# Dependencies first, in their own layer, so a code change does not reinstall them. No lock file
# is committed (see STYLE.md), so uv installs pyproject.toml's [project] dependencies (tested
# lower bounds upwards); the dev group (pytest, Playwright, ruff) is not part of them.
COPY pyproject.toml ./
RUN pip install --no-cache-dir "uv==0.13.8" \
    && uv pip install --system --no-cache -r pyproject.toml \
    && pip uninstall --yes uv

# A fixed numeric uid, so Kubernetes' runAsNonRoot can check it and a bind-mounted host
# directory can be given to it (chown 10001). The code stays root-owned: the app cannot change it.
RUN groupadd --system --gid 10001 chat \
    && useradd --system --uid 10001 --gid chat --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin chat \
    && mkdir /data \
    && chown chat:chat /data

COPY . .

# HOST: listen on every interface of the container. DB_PATH: the database, its WAL files and
# .secret_key (the session-signing key, unless SECRET_KEY is set) all live in the volume.
ENV HOST=0.0.0.0 \
    PORT=5001 \
    DB_PATH=/data/chat.db

VOLUME ["/data"]
EXPOSE 5001
USER 10001:10001

# Slim images have no curl: ask /health with Python's standard library, bypassing any proxy.
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as u; u.build_opener(u.ProxyHandler({})).open('http://127.0.0.1:%s/health' % os.environ.get('PORT', '5001'), timeout=4)"]

# SIGTERM drains: no new replies, /ready answers 503, running replies get DRAIN_GRACE (25 s) to
# finish and what is left is saved as interrupted; compose.yaml and kubernetes.yaml allow 60 s.
# Exec form: python is PID 1 and receives the signal itself (with WORKERS > 1 it passes it on).
# One worker by default: more need REDIS_URL (compose.yaml sets WORKERS=2 with a Redis).
STOPSIGNAL SIGTERM
CMD ["python", "main.py"]
