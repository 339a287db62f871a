"""Builds the app (settings -> store -> agent -> runs -> routes) and serves it."""

from __future__ import annotations

import argparse
import logging
import math
import multiprocessing
import os
import secrets
import sqlite3
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import quote

import uvicorn
from fasthtml.common import FastHTML
from pydantic_ai.models import Model
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.staticfiles import StaticFiles
from uvicorn.supervisors import Multiprocess

from chat.accounts import ACCOUNT_PREFIX
from chat.agent import ModelUnavailable, build_agent
from chat.attachments import stale_before
from chat.cluster import Cluster
from chat.config import Settings
from chat.drain import Drain
from chat.mcp import McpServers
from chat.redis_limits import limiter_for
from chat.runs import RunManager
from chat.security import SecurityMiddleware, server_error
from chat.service import ChatService
from chat.slow_clients import protocol_class
from chat.store import load_messages
from chat.stores import open_store
from components.head import Head
from web import agui, api, approvals, attachments, auth, chat, links, pages, responses, stream
from web.request import off_loop

log = logging.getLogger("chat")
LOG_FORMAT = "%(levelname)s %(name)s: %(message)s"
# Reachable without signing in when AUTH=password.
PUBLIC_PATHS = {links.LOGIN, links.SIGNUP, links.HEALTH, links.READY}
ROOT = Path(__file__).parent


class _SharedHead(tuple):
    """The page head, shared by all requests rather than copied into each.

    FastHTML deep-copies `hdrs` into every request (so a handler may add to its own copy); ours
    is never changed, and the copy cost ~0.2 ms per request and stayed alive with every open
    stream (the request outlives the response's first byte).
    """

    def __deepcopy__(self, memo: dict) -> _SharedHead:
        return self


def create_app(settings: Settings | None = None, *, model: Model | None = None) -> FastHTML:
    """Build the app. `model` replaces every configured model (tests pass a FunctionModel)."""
    settings = settings or Settings.from_env()

    async def lifespan(app):  # FastHTML takes an async generator, not a context manager
        store = open_store(settings)  # SQLite at DB_PATH, or Postgres at DATABASE_URL
        cluster = await _join_cluster(settings)
        # MCP servers (chat/mcp.py): started in the background, each in a task of its own; one
        # that fails is logged and noted in the replies that miss its tools.
        mcp = McpServers.from_settings(settings)
        await mcp.start()
        runs = RunManager(store, build_agent(mcp), settings, model=model, mcp=mcp, cluster=cluster)
        # Replies left 'streaming' were cut off: in one process, all of them (a crash); with
        # Redis, only those whose run lease has lapsed (other workers may be writing the rest).
        if interrupted := await runs.recover():
            log.warning("marked %d replies left streaming by a crash as interrupted", interrupted)
        runs.share()
        store.purge_deleted((datetime.now(UTC) - timedelta(days=1)).isoformat())
        store.purge_pending_attachments(stale_before())  # uploaded a day ago, never sent
        app.state.store = store
        load_messages("[]")  # builds pydantic's message validator now, not on the first message
        app.state.runs = runs
        # Load the configured model now, not on the first message (its SDK can take seconds to
        # import), and say at once if it cannot be started; replies will then explain it too.
        try:
            app.state.runs.model_for(settings.default_model)
        except ModelUnavailable as exc:
            log.warning("%s", exc)
        app.state.limits = limiter_for(settings)
        await app.state.limits.start()
        app.state.chat = ChatService(
            store, app.state.runs, app.state.limits, settings, off_loop=off_loop
        )
        # SIGTERM drains (chat/drain.py); SIGINT stops the replies at once.
        drain = app.state.drain = Drain(app.state.runs, settings.drain_grace)
        drain.install()
        try:
            yield
        finally:
            drain.uninstall()
            await app.state.runs.shutdown()
            await app.state.limits.close()
            await mcp.stop()
            if cluster is not None:
                await cluster.close()
            store.close()

    async def identify(req: Request, session):
        if settings.auth == "password":
            # Accounts: the identity is the signed-in user; everything else asks to sign in.
            if user_id := session.get("user"):
                user = req.app.state.store.user(user_id)
                # A deleted account, or a session ended by signing out or a new password.
                if user is not None and user["session_version"] == session.get("sv", 0):
                    req.scope["uid"] = ACCOUNT_PREFIX + user_id
                    return None
                session.clear()
            req.scope["uid"] = None
            if req.url.path in PUBLIC_PATHS:
                return None
            login = f"{links.LOGIN}?next={quote(req.url.path)}"
            if req.headers.get("hx-request") == "true":
                return Response(status_code=204, headers={"HX-Redirect": login})
            return RedirectResponse(login, status_code=303)
        # Every browser gets its own anonymous identity in the signed session cookie.
        if "uid" not in session:
            session["uid"] = secrets.token_urlsafe(18)
        req.scope["uid"] = session["uid"]
        return None

    app = FastHTML(
        title="Agent chat",
        hdrs=Head(),
        default_hdrs=False,
        surreal=False,
        canonical=False,
        secret_key=settings.secret_key,
        session_cookie="chat_session",
        same_site="lax",
        sess_https_only=settings.https_only,
        htmlkw={"lang": "en"},
        lifespan=lifespan,
        before=[identify],
        middleware=[
            Middleware(
                SecurityMiddleware, host_allowed=settings.host_allowed, hsts=settings.https_only
            )
        ],
        exception_handlers={
            404: responses.not_found,
            500: server_error,
            sqlite3.OperationalError: responses.busy,
        },
    )
    app.hdrs = _SharedHead(app.hdrs)  # after __init__, which turns it into a list
    app.state.settings = settings
    app.mount("/static", StaticFiles(directory=ROOT / "static"), name="static")
    pages.ar.to_app(app)
    chat.ar.to_app(app)
    stream.ar.to_app(app)
    auth.ar.to_app(app)
    api.ar.to_app(app)
    agui.ar.to_app(app)
    attachments.ar.to_app(app)
    approvals.ar.to_app(app)
    return app


async def _join_cluster(settings: Settings) -> Cluster | None:
    """With REDIS_URL: the shared run logs, Stop and leases, checked reachable now."""
    if not settings.redis_url:
        return None
    cluster = Cluster.connect(
        settings.redis_url,
        lease_seconds=settings.lease_seconds,
        lease_refresh=settings.lease_refresh,
        prefix=settings.redis_prefix,
    )
    try:
        await cluster.redis.ping()
    except Exception as exc:
        await cluster.close()
        raise RuntimeError(f"REDIS_URL is set, but Redis cannot be reached: {exc}") from None
    return cluster


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; each overrides the matching environment variable."""
    parser = argparse.ArgumentParser(
        description="A streaming chat site for pydantic-ai agents.",
        epilog="Settings also come from the environment or a .env file: MODEL, MODELS, HOST, "
        "PORT, DB_PATH, DATABASE_URL, SECRET_KEY, HTTPS, ALLOWED_HOSTS, AUTH, and the provider "
        "keys (OPENAI_API_KEY, ...).",
    )
    parser.add_argument("--host", help="address to listen on (HOST, default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port to listen on (PORT, default 5001)")
    parser.add_argument("--db", help="SQLite file (DB_PATH, default data/chat.db)")
    parser.add_argument("--model", help="pydantic-ai model string (MODEL, default: offline demo)")
    parser.add_argument(
        "--workers",
        type=int,
        help="processes to serve with (WORKERS, default 1; >1 needs REDIS_URL)",
    )
    return parser.parse_args(argv)


def _workers_problem(settings: Settings) -> str | None:
    if settings.workers < 1:
        return f"WORKERS={settings.workers}: it must be 1 or more"
    if settings.workers > 1 and not settings.redis_url:
        return (
            f"WORKERS={settings.workers} needs REDIS_URL: the worker processes share replies, "
            "Stop and limits through Redis. Set REDIS_URL, or use WORKERS=1"
        )
    return None


def serve(argv: list[str] | None = None) -> None:
    """Run the app with uvicorn, using command-line options over the environment."""
    args = parse_args(argv)
    overrides = {
        "host": args.host,
        "port": args.port,
        "db_path": Path(args.db) if args.db else None,
        "model": args.model,
        "workers": args.workers,
    }
    # One line and exit code 2, no traceback: what is wrong and how to put it right.
    try:
        settings = Settings.from_env(**{k: v for k, v in overrides.items() if v is not None})
    except ValueError as exc:  # such as DATABASE_URL without SECRET_KEY
        print(exc, file=sys.stderr)
        raise SystemExit(2) from None
    if problem := _workers_problem(settings):
        print(problem, file=sys.stderr)
        raise SystemExit(2)
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    if "*" in settings.allowed_hosts:
        log.info("answering any Host name; set ALLOWED_HOSTS to this site's names to restrict")
    options = dict(
        host=settings.host,
        port=settings.port,
        # Counted from the end of the drain (chat/drain.py): what is still open then, such as a
        # stream of a reply that has just ended, gets longer than the grace to close.
        timeout_graceful_shutdown=math.ceil(settings.drain_grace) + 5,
        log_level="info",
    )
    if settings.workers == 1:
        server = uvicorn.Server(
            uvicorn.Config(
                create_app(settings), http=protocol_class(settings.header_timeout), **options
            )
        )
        server.run()
        if not server.started:
            raise SystemExit(3)  # as uvicorn.run does: the app could not start
        return
    # Each worker is a fresh interpreter that imports `main:app` and reads the environment, so
    # the command-line options travel there.
    for name, value in (("HOST", args.host), ("PORT", args.port), ("DB_PATH", args.db)):
        if value is not None:
            os.environ[name] = str(value)
    if args.model:
        os.environ["MODEL"] = args.model
    config = uvicorn.Config(
        "main:app",
        http="main:http_protocol",
        workers=settings.workers,
        # A worker answers the supervisor's pings only once it has imported the app, which
        # takes seconds on a busy machine; uvicorn's 5 s default killed workers still starting.
        timeout_worker_healthcheck=30,
        **options,
    )
    Multiprocess(config, sockets=[config.bind_socket()]).run()


if __name__ == "__main__":
    serve()
elif __name__ != "__mp_main__":  # a worker re-running this file as its parent's script: no app
    if multiprocessing.parent_process() is not None:  # a worker: log as `python main.py` does
        logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    app = create_app()
    # A worker's protocol is named by import string, as a built class cannot cross processes.
    http_protocol = protocol_class(app.state.settings.header_timeout)
