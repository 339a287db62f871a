"""What a handler reads from the request: the app's state, who is asking, and what they own.

The ownership helpers raise a 404 (answered by `responses.not_found`, registered in main.py)
rather than returning None, so a route cannot forget the check's answer, and "missing" and
"someone else's" stay indistinguishable everywhere.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import TypeVar

from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request

from chat.config import Settings
from chat.runs import RunManager
from chat.service import Caller, ChatService
from chat.storage import Store

T = TypeVar("T")


async def off_loop(fn: Callable[..., T], *args, **kwargs) -> T:
    """Run blocking work (the store, big renders) in the request thread pool, not on the loop.

    Handlers that only read and render are plain `def`s, which FastHTML already runs there;
    this is for the async handlers and streams that also need the loop (runs, waiting).
    """
    return await run_in_threadpool(partial(fn, *args, **kwargs))


def store(req: Request) -> Store:
    """The app's store (the SQLite ChatStore unless a fork swaps it)."""
    return req.app.state.store


def runs(req: Request) -> RunManager:
    """The app's RunManager."""
    return req.app.state.runs


def settings(req: Request) -> Settings:
    """The app's Settings."""
    return req.app.state.settings


def uid(req: Request) -> str:
    """The identity of the browser (or account) making the request."""
    return req.scope["uid"]


def client_addr(req: Request) -> str:
    """The client's address for the limits (X-Forwarded-For only from TRUSTED_PROXIES)."""
    peer = req.client.host if req.client else None
    return req.app.state.limits.address(peer, req.headers.get("x-forwarded-for"))


def chat_service(req: Request) -> ChatService:
    """The app's chat service: the rules every front end's sends go through."""
    return req.app.state.chat


def caller(req: Request) -> Caller:
    """Who is asking, as the chat service counts them: identity and client address."""
    return Caller(uid(req), client_addr(req))


def is_htmx(req: Request) -> bool:
    """True for requests made by htmx rather than by plain navigation."""
    return req.headers.get("hx-request") == "true"


def missing() -> HTTPException:
    """The exception that answers 404 (the app's not-found page or fragment)."""
    return HTTPException(404)


def owned_conversation(req: Request, cid: str) -> dict:
    """The user's conversation `cid`; 404 if there is none or it is someone else's.

    Blocking (the store): async handlers call it through `off_loop`.
    """
    conv = store(req).conversation(cid, uid(req))
    if conv is None:
        raise missing()
    return conv


def owned_turn(req: Request, cid: str, tid: int | None) -> tuple[dict, dict]:
    """The user's conversation `cid` and its turn `tid`; 404 unless both are theirs and match.

    Blocking (the store): async handlers call it through `off_loop`.
    """
    conv = owned_conversation(req, cid)
    turn = store(req).turn(tid, uid(req)) if tid is not None else None
    if turn is None or turn["conversation_id"] != cid:
        raise missing()
    return conv, turn
