"""The chat's sending rules: whether a message may be sent now, and why not.

(A later change moves these rules into a chat service in chat/, out of the web layer.)
"""

from __future__ import annotations

from fasthtml.common import Response
from starlette.requests import Request

from web.request import client_addr, runs, settings, uid
from web.responses import error_fragment


async def check_message(
    req: Request, msg: str, replies: int = 1, cid: str | None = None
) -> Response | None:
    """Why a message cannot be sent (as an error response), or None if it can.

    With `cid`, a reply still being written in that conversation refuses it too: the new turn's
    history would lack that reply. Called last before committing: a message that passes (and
    only one that passes) has been counted against the limits.
    """
    limit = settings(req).max_message_chars
    if not msg.strip():
        return error_fragment("Type a message before sending.", 422)
    if len(msg) > limit:
        return error_fragment(
            f"That message is {len(msg):,} characters; the limit is {limit:,}. "
            "Shorten it and send again.",
            413,
        )
    if not runs(req).accepting:
        return error_fragment("The server is restarting. Send again in a moment.", 503)
    if cid is not None and await runs(req).streaming_in(cid):
        return error_fragment("Wait for the reply to finish, or stop it, before sending.", 409)
    refused = req.app.state.limits.check_send(
        uid(req),
        client_addr(req),
        running=await runs(req).running(uid(req)),
        total_running=await runs(req).total_running(),
        count=replies,
    )
    if refused:
        response = error_fragment(refused.message, refused.status)
        response.headers.update(refused.headers)
        return response
    return None
