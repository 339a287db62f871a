"""Tool approval: a paused reply's card, and Approve / Deny, which resume the same reply.

The rules (who may decide, expiry, resuming once) are chat/approvals.py's; these handlers parse,
check ownership (404 for anyone else's turn), call it and render.
"""

from __future__ import annotations

from fasthtml.common import APIRouter
from starlette.requests import Request

from chat import approvals
from components.approvals import ApprovalCard, ApprovalExpired
from components.messages import AssistantMessage, ToolCall
from web import links as urls
from web.links import turn_links
from web.request import missing, off_loop, owned_turn, runs, settings, store, uid
from web.responses import error_fragment, html
from web.views import reply

ar = APIRouter()

STOPPING = "The server is restarting; decide again in a moment."


@ar(urls.APPROVALS, methods=["get"])
def card(req: Request, cid: str, tid: int):
    """The calls a paused reply waits on, with Approve / Deny (or the note that they expired)."""
    conv, turn = owned_turn(req, cid, tid)
    if turn["status"] != approvals.AWAITING:
        return ""
    rows = store(req).approvals(tid)
    ttl = settings(req).tool_approval_ttl
    if conv["head_turn_id"] != tid:
        approvals.expire(store(req), turn, ttl, approvals.SUPERSEDED)
        return ApprovalExpired(approvals.SUPERSEDED)
    if approvals.expired(rows):
        approvals.expire(store(req), turn, ttl)
        return ApprovalExpired(approvals.expired_note(ttl))
    views = approvals.pending_views(rows)
    target = f"#reply-{tid}"
    waiting = [r for r in rows if r["decision"] is None]
    calls = [
        (
            view,
            urls.url(urls.APPROVE, cid=cid, tid=tid, seq=row["seq"]),
            urls.url(urls.DENY, cid=cid, tid=tid, seq=row["seq"]),
            target,
        )
        for view, row in zip(views, waiting, strict=True)
    ]
    expires = min(r["expires_at"] for r in waiting)[:16].replace("T", " ") if waiting else None
    # The calls shown in the reply above say they wait, rather than "Running…".
    return (ApprovalCard(calls, expires=expires), *(ToolCall(v, oob=True) for v in views))


@ar(urls.APPROVE, methods=["post"])
async def approve(req: Request, cid: str, tid: int, seq: int):
    """Approve a waiting call; once every call is decided, the reply goes on."""
    return await _decide(req, cid, tid, seq, True)


@ar(urls.DENY, methods=["post"])
async def deny(req: Request, cid: str, tid: int, seq: int):
    """Deny a waiting call: the model is told, and answers without it."""
    return await _decide(req, cid, tid, seq, False)


async def _decide(req: Request, cid: str, tid: int, seq: int, approve: bool):
    manager = runs(req)
    if not manager.accepting:
        return error_fragment(STOPPING, 503)
    conv, turn = await off_loop(owned_turn, req, cid, tid)
    ttl = settings(req).tool_approval_ttl
    latest = conv["head_turn_id"] == tid
    decision = await off_loop(approvals.decide, store(req), turn, seq, approve, ttl, latest=latest)
    if decision.state == "resume":
        manager.start(decision.turn, uid(req))
        links = turn_links(turn, await off_loop(store(req).siblings, cid, [turn["parent_id"]]))
        return html(AssistantMessage(tid, links=links, live=True))
    return await off_loop(_reply_now, req, conv, tid)


def _reply_now(req: Request, conv: dict, tid: int):
    """The reply as it stands after a decision that does not resume it."""
    turn = store(req).turn(tid, uid(req))
    if turn is None:
        raise missing()
    links = turn_links(turn, store(req).siblings(conv["id"], [turn["parent_id"]]))
    return reply(req, turn, links, last=conv["head_turn_id"] == tid)
