"""An API for other front ends (React, mobile), behind the same identity and limits.

- POST /api/chat: the Vercel AI SDK data stream protocol (`useChat`), by pydantic-ai's own
  VercelAIAdapter, for the same agent, tools and model. The client holds the history.
- GET /api/conversations: the caller's conversations (JSON).
- GET /api/conversations/{cid}: one conversation's shown branch as pydantic-ai messages.
"""

from __future__ import annotations

from fasthtml.common import APIRouter
from pydantic_ai import UsageLimits
from pydantic_ai.ui.vercel_ai import VercelAIAdapter
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from chat.tools import ToolDeps
from chat.transcript import to_json
from web.views import runs, settings, store, uid

ar = APIRouter(prefix="/api")


def _error(message: str, status: int) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


@ar("/chat", methods=["post"])
async def api_chat(req: Request):
    """Run the agent for a Vercel AI SDK chat request and stream its protocol events."""
    cfg, manager = settings(req), runs(req)
    if not manager.accepting:
        return _error("The server is restarting.", 503)
    if len(await req.body()) > cfg.max_message_chars * 4 + 100_000:
        return _error("The request is too large.", 413)
    refused = req.app.state.limits.check_send(uid(req), manager.running(uid(req)))
    if refused:
        return _error(refused, 429)
    try:
        model = manager.model_for(cfg.default_model)
    except Exception as exc:  # a model that cannot start: say so, as the page does
        return _error(str(exc), 503)
    return await VercelAIAdapter.dispatch_request(
        req,
        agent=manager.agent,
        model=model,
        deps=ToolDeps(store(req), uid(req)),
        usage_limits=UsageLimits(
            request_limit=cfg.request_limit, output_tokens_limit=cfg.output_tokens_limit
        ),
        model_settings={"max_retries": cfg.model_retries},
    )


@ar("/conversations", methods=["get"])
async def api_conversations(req: Request):
    """The caller's conversations, most recently active first."""
    keys = ("id", "title", "model", "persona", "created_at", "updated_at")
    convs = store(req).conversations(uid(req))
    return JSONResponse({"conversations": [{k: c[k] for k in keys} for c in convs]})


@ar("/conversations/{cid}", methods=["get"])
async def api_conversation(req: Request, cid: str):
    """One conversation's shown branch as pydantic-ai messages (ModelMessagesTypeAdapter)."""
    conv = store(req).conversation(cid, uid(req))
    if conv is None:
        return _error("Not found.", 404)
    body = to_json(store(req).branch(conv["head_turn_id"]))
    return Response(body, media_type="application/json")
