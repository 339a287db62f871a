"""An API for other front ends (React, mobile), behind the same identity and limits.

- POST /api/chat: the Vercel AI SDK data stream protocol (`useChat`), by pydantic-ai's own
  VercelAIAdapter, for the same agent, tools and model. The client holds the history, so that
  history is untrusted: it is rebuilt as plain text and paired tool calls (chat/untrusted.py).
- GET /api/conversations: the caller's conversations (JSON).
- GET /api/conversations/{cid}: one conversation's shown branch as pydantic-ai messages.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import AsyncIterator, Sequence

from fasthtml.common import APIRouter
from pydantic_ai import UsageLimits
from pydantic_ai.messages import ModelMessage
from pydantic_ai.ui.vercel_ai import VercelAIAdapter, VercelAIEventStream
from pydantic_ai.ui.vercel_ai.response_types import BaseChunk, ErrorChunk
from starlette.background import BackgroundTasks
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from chat import untrusted
from chat.errors import describe_error
from chat.tools import ToolDeps
from chat.transcript import to_json
from web.request import client_addr, runs, settings, store, uid

log = logging.getLogger(__name__)

ar = APIRouter(prefix="/api")


class _GenericErrors(VercelAIEventStream):
    """The protocol's event stream, with the page's error messages: an exception's text (an
    upstream body, a URL, a key) stays in the server log."""

    async def on_error(self, error: Exception) -> AsyncIterator[BaseChunk]:
        """The library's error events, with a message for the user in place of the exception's."""
        log.warning("api reply failed: %r", error)
        async for chunk in super().on_error(error):
            yield (
                ErrorChunk(error_text=describe_error(error))
                if isinstance(chunk, ErrorChunk)
                else chunk
            )


class _Adapter(VercelAIAdapter):
    """pydantic-ai's Vercel AI adapter, stricter about what the client sends and says back."""

    def sanitize_messages(self, messages: Sequence[ModelMessage], **kwargs) -> list[ModelMessage]:
        """The library's sanitising, then our whitelist (chat/untrusted.py) on top."""
        # The library warns about each part it strips; what a client sends is its own business
        # and the whitelist drops more anyway, so that is a debug line, not a warning per request.
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            sanitized = super().sanitize_messages(messages, **kwargs)
        for warning in caught:
            log.debug("client history: %s", warning.message)
        return untrusted.clean(sanitized)

    def build_event_stream(self) -> _GenericErrors:
        """The Vercel AI event stream with generic error messages."""
        return _GenericErrors(
            self.run_input,
            accept=self.accept,
            sdk_version=self.sdk_version,
            server_message_id=self.server_message_id,
            manage_system_prompt=self.manage_system_prompt,
        )


def _error(message: str, status: int, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


@ar("/chat", methods=["post"])
async def api_chat(req: Request):
    """Run the agent for a Vercel AI SDK chat request and stream its protocol events."""
    cfg, manager, limits, who = settings(req), runs(req), req.app.state.limits, uid(req)
    if not manager.accepting:
        return _error("The server is restarting.", 503)
    if len(await req.body()) > cfg.max_message_chars * 4 + 100_000:
        return _error("The request is too large.", 413)
    refused = limits.check_send(
        who,
        client_addr(req),
        running=await manager.running(who),
        total_running=await manager.total_running(),
    )
    if refused:
        return _error(refused.message, refused.status, refused.headers)
    try:
        model = manager.model_for(cfg.default_model)
    except Exception as exc:  # a model that cannot start: say so, as the page does
        log.warning("api model unavailable: %r", exc)
        return _error(describe_error(exc), 503)
    # Counted as running until the stream ends, however it ends, like a page's reply.
    limits.api_started(who)
    try:
        response = await _Adapter.dispatch_request(
            req,
            agent=manager.agent,
            model=model,
            deps=ToolDeps(store(req), who),
            usage_limits=UsageLimits(
                request_limit=cfg.request_limit, output_tokens_limit=cfg.output_tokens_limit
            ),
            model_settings={"max_retries": cfg.model_retries},
        )
    except BaseException:
        await limits.api_finished(who)
        raise
    tasks = BackgroundTasks([response.background] if response.background else [])
    tasks.add_task(limits.api_finished, who)
    response.background = tasks
    return response


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
