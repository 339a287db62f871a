"""Builds the app (settings -> store -> agent -> runs -> routes) and serves it."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import secrets
from collections.abc import AsyncIterator
from pathlib import Path

import uvicorn
from fasthtml.common import H1, A, Div, FastHTML, Input, P, Response, Title, to_xml
from pydantic_ai.messages import ModelRequest, UserPromptPart
from pydantic_ai.models import Model
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse
from starlette.staticfiles import StaticFiles

from chat import sse
from chat.agent import build_agent
from chat.config import Settings
from chat.markdown import render
from chat.runs import Run, RunManager
from chat.security import SecurityMiddleware
from chat.store import ChatStore
from components.layout import Composer, Head, Page, Sidebar, Welcome
from components.messages import (
    AssistantMessage,
    LoadEarlier,
    ReplyFooter,
    SafeHTML,
    Tail,
    UserMessage,
)

log = logging.getLogger("chat")
ROOT = Path(__file__).parent


def title_from(text: str, limit: int = 60) -> str:
    """A first title for a conversation: its first message, shortened at a word."""
    words = " ".join(text.split())
    if len(words) <= limit:
        return words
    return words[:limit].rsplit(" ", 1)[0] + "…"


def create_app(settings: Settings | None = None, *, model: Model | None = None) -> FastHTML:
    """Build the app. `model` replaces every configured model (tests pass a FunctionModel)."""
    settings = settings or Settings.from_env()

    async def lifespan(app):  # FastHTML takes an async generator, not a context manager
        store = ChatStore(settings.db_path)
        interrupted = store.mark_interrupted()
        if interrupted:
            log.warning(
                "marked %d replies left streaming by a previous run as interrupted", interrupted
            )
        app.state.store = store
        app.state.runs = RunManager(store, build_agent(), settings, model=model)
        try:
            yield
        finally:
            await app.state.runs.shutdown()
            store.close()

    def identify(req: Request, session) -> None:
        # Every browser gets its own anonymous identity in the signed session cookie.
        if "uid" not in session:
            session["uid"] = secrets.token_urlsafe(18)
        req.scope["uid"] = session["uid"]

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
        middleware=[Middleware(SecurityMiddleware)],
        exception_handlers={404: not_found},
    )
    app.state.settings = settings
    app.mount("/static", StaticFiles(directory=ROOT / "static"), name="static")
    rt = app.route

    def store(req) -> ChatStore:
        return req.app.state.store

    def runs(req) -> RunManager:
        return req.app.state.runs

    def page(req, conv: dict | None) -> tuple:
        owner = req.scope["uid"]
        convs = store(req).conversations(owner)
        urls = {c["id"]: conversation.to(cid=c["id"]) for c in convs}
        cid = conv["id"] if conv else None
        model = (conv or {}).get("model") or settings.model
        if conv:
            turns = store(req).branch(conv["head_turn_id"], limit=settings.history_page + 1)
            more = len(turns) > settings.history_page
            turns = turns[-settings.history_page :]
            items = message_items(req, turns)
            if more:
                items = (LoadEarlier(older.to(cid=cid, before=turns[0]["id"])), *items)
        else:
            items = (Welcome(settings.demo),)
        title = conv["title"] if conv and conv["title"] else "New chat"
        return (
            Title(f"{title} · Agent chat"),
            *Page(
                title=title,
                sidebar=Sidebar(convs, urls, cid),
                messages=items,
                composer=Composer(send.to(), cid, max_chars=settings.max_message_chars),
                model=model,
                new_url=index.to(),
            ),
        )

    def message_items(req, turns: list[dict]) -> tuple:
        items = []
        for turn in turns:
            items.append(UserMessage(turn))
            items.append(reply_for(req, turn))
        return tuple(items)

    def reply_for(req, turn: dict):
        cid, tid = turn["conversation_id"], turn["id"]
        if runs(req).get(tid) is not None:
            # Still generating: render an empty placeholder; the stream replays what exists.
            return AssistantMessage(
                tid,
                status="streaming",
                stream_url=stream.to(cid=cid, tid=tid),
                stop_url=stop.to(cid=cid, tid=tid),
            )
        return AssistantMessage(
            tid,
            html=render(turn["reply_text"]),
            status=turn["status"],
            error=turn["error"],
            usage=_json(turn["usage"]),
            model=turn["model"],
        )

    @rt("/")
    def index(req):
        return page(req, None)

    @rt("/c/{cid}")
    def conversation(req, cid: str):
        conv = store(req).conversation(cid, req.scope["uid"])
        if conv is None:
            return not_found(req, None)
        return page(req, conv)

    @rt("/c/{cid}/older")
    def older(req, cid: str, before: int):
        owner = req.scope["uid"]
        conv = store(req).conversation(cid, owner)
        first = store(req).turn(before, owner)
        if conv is None or first is None or first["conversation_id"] != cid:
            return not_found(req, None)
        turns = store(req).branch(first["parent_id"], limit=settings.history_page + 1)
        more = len(turns) > settings.history_page
        turns = turns[-settings.history_page :]
        items = message_items(req, turns)
        if more:
            items = (LoadEarlier(older.to(cid=cid, before=turns[0]["id"])), *items)
        return Div(*items, id="earlier-page", cls="earlier-page")

    @rt("/send", methods=["post"])
    async def send(req, msg: str = "", cid: str = ""):
        owner = req.scope["uid"]
        htmx = req.headers.get("hx-request") == "true"
        text = msg.strip()
        if not text:
            return composer_error("Type a message before sending.", 422)
        if len(msg) > settings.max_message_chars:
            return composer_error(
                f"That message is {len(msg):,} characters; the limit is "
                f"{settings.max_message_chars:,}. Shorten it and send again.",
                413,
            )
        if not runs(req).accepting:
            return composer_error("The server is restarting. Send again in a moment.", 503)
        conv = store(req).conversation(cid, owner) if cid else None
        if cid and conv is None:
            return composer_error("That conversation does not exist.", 404)
        created = conv is None
        if created:
            conv = store(req).create_conversation(owner, model=settings.model)
            conv["title"] = title_from(text)
            store(req).set_title(conv["id"], conv["title"])
        # Committed before the model is called: nothing typed is ever lost.
        turn = store(req).add_turn(
            conv["id"],
            msg,
            [ModelRequest(parts=[UserPromptPart(content=msg)])],
            model=conv["model"] or settings.model or "demo",
        )
        runs(req).start(turn, owner)
        curl = conversation.to(cid=conv["id"])
        if not htmx:
            return RedirectResponse(curl, status_code=303)
        tid = turn["id"]
        parts = [
            UserMessage(turn),
            AssistantMessage(
                tid,
                status="streaming",
                stream_url=stream.to(cid=conv["id"], tid=tid),
                stop_url=stop.to(cid=conv["id"], tid=tid),
            ),
            Div(id="composer-error", cls="composer-error", role="alert", hx_swap_oob="true"),
        ]
        headers = {}
        if created:
            convs = store(req).conversations(owner)
            urls = {c["id"]: conversation.to(cid=c["id"]) for c in convs}
            side = Sidebar(convs, urls, conv["id"])
            side.attrs["hx-swap-oob"] = "true"
            parts += [
                side,
                Input(type="hidden", name="cid", value=conv["id"], id="cid", hx_swap_oob="true"),
                H1(conv["title"], id="chat-title", hx_swap_oob="true"),
                Div(id="welcome", hx_swap_oob="delete"),
            ]
            headers["HX-Push-Url"] = curl
        return Response(to_xml(tuple(parts)), headers=headers, media_type="text/html")

    @rt("/c/{cid}/turns/{tid}/stream")
    async def stream(req, cid: str, tid: int):
        turn = store(req).turn(tid, req.scope["uid"])
        if turn is None or turn["conversation_id"] != cid:
            return not_found(req, None)
        try:
            start = max(0, int(req.headers.get("last-event-id") or 0))
        except ValueError:
            start = 0
        run = runs(req).get(tid)
        chunks = live_events(run, start) if run else stored_events(turn, start)
        return sse.event_stream(chunks, accept_encoding=req.headers.get("accept-encoding", ""))

    async def live_events(run: Run, start: int) -> AsyncIterator[str]:
        async for kind, data in run.follow(start_block=start, heartbeat=settings.heartbeat):
            if kind == "blocks":
                html, total = data
                yield sse.event("blocks", to_xml(SafeHTML("".join(html))), id=str(total))
            elif kind == "tail":
                yield sse.event("tail", " " if run.done else to_xml(Tail(data)))
            elif kind == "ping":
                yield sse.comment()
            else:
                footer = ReplyFooter(
                    run.status, error=run.error, usage=run.usage, model=run.model_name
                )
                yield sse.event("end", to_xml(footer) or " ")
                yield sse.event("done", run.status)

    async def stored_events(turn: dict, start: int) -> AsyncIterator[str]:
        # The run already finished (and was saved): send its final state from the database.
        html = render(turn["reply_text"])
        body = SafeHTML(html) if html else ""
        if start == 0:
            yield sse.event("blocks", to_xml(body) or " ", id="1")
        else:
            # The client holds some live blocks already: replace them all at once.
            yield sse.event(
                "blocks", to_xml(Div(body, cls="md", id=f"md-{turn['id']}", hx_swap_oob="true"))
            )
        yield sse.event("tail", " ")
        status = "interrupted" if turn["status"] == "streaming" else turn["status"]
        footer = ReplyFooter(
            status, error=turn["error"], usage=_json(turn["usage"]), model=turn["model"]
        )
        yield sse.event("end", to_xml(footer) or " ")
        yield sse.event("done", status)

    @rt("/c/{cid}/turns/{tid}/stop", methods=["post"])
    def stop(req, cid: str, tid: int):
        turn = store(req).turn(tid, req.scope["uid"])
        if turn is None or turn["conversation_id"] != cid:
            return not_found(req, None)
        runs(req).stop(tid)
        return Response(status_code=204)

    @rt("/health")
    def health(req):
        return JSONResponse(
            {"status": "ok", "model": settings.model or "demo", "runs": len(runs(req).runs)}
        )

    return app


def composer_error(message: str, status: int) -> Response:
    """A message shown above the composer; the typed text stays where it is."""
    return Response(
        to_xml(P(message, cls="error")),
        status_code=status,
        media_type="text/html",
        headers={"HX-Retarget": "#composer-error", "HX-Reswap": "innerHTML"},
    )


def not_found(req, exc) -> Response:
    """404 for anything missing or not yours: the two are deliberately indistinguishable."""
    if req.headers.get("hx-request") == "true":
        return Response(
            to_xml(P("Not found.", cls="error")), status_code=404, media_type="text/html"
        )
    body = Div(
        H1("Not found"),
        P("There is nothing here, or it belongs to someone else."),
        A("Start a new chat", href="/"),
        cls="not-found",
    )
    head = to_xml((Title("Not found · Agent chat"), *Head()))
    html = f"<!doctype html><html lang='en'><head>{head}</head><body>{to_xml(body)}</body></html>"
    return Response(html, status_code=404, media_type="text/html")


def _json(raw: str | None) -> dict | None:
    return json.loads(raw) if raw else None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; each overrides the matching environment variable."""
    parser = argparse.ArgumentParser(description="A streaming chat site for pydantic-ai agents.")
    parser.add_argument("--host", help="address to listen on (HOST, default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port to listen on (PORT, default 5001)")
    parser.add_argument("--db", help="SQLite file (DB_PATH, default data/chat.db)")
    parser.add_argument("--model", help="pydantic-ai model string (MODEL, default: offline demo)")
    return parser.parse_args(argv)


class _Server(uvicorn.Server):
    """Uvicorn server that, on SIGTERM/SIGINT, first stops and saves the replies in flight.

    Uvicorn waits for open responses before shutting the app down; ending the runs ends their
    streams, so shutdown is prompt and every reply is saved as interrupted rather than lost.
    """

    def handle_exit(self, sig, frame) -> None:
        manager = getattr(app.state, "runs", None)
        loop = asyncio.get_event_loop()
        if manager is not None and manager.accepting and loop.is_running():
            loop.call_soon_threadsafe(lambda: loop.create_task(manager.shutdown()))
        super().handle_exit(sig, frame)


def serve(argv: list[str] | None = None) -> None:
    """Run the app with uvicorn, using command-line options over the environment."""
    global app
    args = parse_args(argv)
    overrides = {
        k: v
        for k, v in {
            "host": args.host,
            "port": args.port,
            "db_path": Path(args.db) if args.db else None,
            "model": args.model,
        }.items()
        if v is not None
    }
    settings = Settings.from_env(**overrides)
    app = create_app(settings)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    config = uvicorn.Config(
        app, host=settings.host, port=settings.port, timeout_graceful_shutdown=15, log_level="info"
    )
    _Server(config).run()


app = create_app()

if __name__ == "__main__":
    serve()
