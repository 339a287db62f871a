"""An API for other front ends (React, mobile), on the same conversations, identity and limits.

- POST /api/chat: a Vercel AI SDK chat request (`useChat`, the UI message stream protocol).
  It goes through the chat service like a page's send: the message is committed to the chat's
  conversation (the SDK's chat `id` names it; see `ChatService.send_chat`) and its reply runs as
  a server-owned run, streamed back by pydantic-ai's `VercelAIEventStream`. The client's history
  is untrusted: a known conversation's stored history is used, and a new chat's history is
  cleaned (chat/untrusted.py) before it is stored. A reply paused for tool approval ends with
  AI SDK 6 `tool-approval-request` chunks; a request whose last message carries the answers
  (`approval-responded` tool parts) decides them (`ChatService.decide_chat`) and streams the
  reply going on.
- POST /api/chat/{id}/stop: stop the reply being written in that chat (saved as stopped).
- GET /api/chat/{id}/stream: the SDK's `reconnectToStream`: 204 when nothing is being written,
  else the running reply's stream from its start.
- GET /api/conversations: the caller's conversations (JSON).
- GET /api/conversations/{cid}: one conversation's shown branch as pydantic-ai messages.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

from fasthtml.common import APIRouter
from pydantic import ValidationError
from pydantic_ai.messages import ModelMessage
from pydantic_ai.ui.vercel_ai import VercelAIAdapter, VercelAIEventStream
from pydantic_ai.ui.vercel_ai.request_types import (
    DynamicToolApprovalRespondedPart,
    RegenerateMessage,
    RequestData,
    TextUIPart,
    ToolApprovalResponded,
    ToolApprovalRespondedPart,
)
from pydantic_ai.ui.vercel_ai.response_types import (
    AbortChunk,
    BaseChunk,
    ToolApprovalRequestChunk,
)
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from chat.api_stream import (
    NOTHING_SHOWN,
    ReplyFailed,
    ReplyStopped,
    Shown,
    beating,
    reply_events,
    shown,
)
from chat.errors import describe_error
from chat.runs import Run
from chat.service import Caller, ChatRequest, Refused
from chat.transcript import to_json
from web.request import caller, chat_service, off_loop, runs, settings, store, uid

log = logging.getLogger(__name__)

ar = APIRouter(prefix="/api")


@dataclass
class _ReplyStream(VercelAIEventStream):
    """The protocol's event stream for a reply followed from its run, with the page's words for
    how it ended: an exception's text (an upstream body, a URL, a key) stays in the server log,
    and a comment line after `heartbeat` seconds of silence, so proxies keep the stream open
    while the model reads a long prompt or a tool runs."""

    heartbeat: float = 15.0
    awaiting: list[str] = field(default_factory=list)  # calls a paused reply waits on

    async def after_stream(self) -> AsyncIterator[BaseChunk]:
        """A paused reply asks for its approvals (AI SDK 6 `tool-approval-request`, the call's
        id doubling as the approval's) before the stream ends as usual: a pause is no error."""
        for call_id in self.awaiting:
            yield ToolApprovalRequestChunk(approval_id=call_id, tool_call_id=call_id)
        async for chunk in super().after_stream():
            yield chunk

    async def encode_stream(self, stream: AsyncIterator[BaseChunk]) -> AsyncIterator[str]:
        """The library's encoding, with a heartbeat comment whenever the reply is silent."""
        async for chunk in beating(stream, self.heartbeat):
            yield ": ping\n\n" if chunk is None else self.encode_event(chunk)

    async def on_error(self, error: Exception) -> AsyncIterator[BaseChunk]:
        """Stopped replies end with an abort; failed ones with the reply's generic message."""
        if isinstance(error, ReplyStopped):
            yield AbortChunk(reason="The reply was stopped.")
            return
        if not isinstance(error, ReplyFailed):
            log.warning("api reply stream failed: %r", error)
            error = ReplyFailed(describe_error(error))
        async for chunk in super().on_error(error):
            yield chunk


class _Adapter(VercelAIAdapter):
    """pydantic-ai's Vercel AI adapter, used to read a request's messages, and stricter."""

    def sanitize_messages(self, messages: Sequence[ModelMessage], **kwargs) -> list[ModelMessage]:
        """The library's sanitising (our whitelist, chat/untrusted.py, follows in the service)."""
        # The library warns about each part it strips; what a client sends is its own business
        # and the whitelist drops more anyway, so that is a debug line, not a warning per request.
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            sanitized = super().sanitize_messages(messages, **kwargs)
        for warning in caught:
            log.debug("client history: %s", warning.message)
        return sanitized


def _error(message: str, status: int, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _refused(refusal: Refused) -> JSONResponse:
    return _error(refusal.message, refusal.status, refusal.headers)


def _chat_request(req: Request, run_input: RequestData) -> ChatRequest:
    """The new message and the history before it, as the client tells them (blocking: CPU)."""
    messages = run_input.messages
    if not messages or messages[-1].role != "user":
        raise Refused("The last message must be the user's new message.", 422)
    text = "\n\n".join(p.text for p in messages[-1].parts if isinstance(p, TextUIPart))
    history: list[ModelMessage] = []
    if len(messages) > 1:
        adapter = _Adapter(agent=runs(req).agent, run_input=run_input)
        try:
            history = adapter.sanitize_messages(adapter.load_messages(messages[:-1]))
        except Exception as exc:  # a claim we cannot even read: refused, nothing stored
            log.info("unreadable api chat history: %r", exc)
            raise Refused("The chat's earlier messages could not be read.", 422) from None
    return ChatRequest(run_input.id, text, history)


def _approval_answers(run_input: RequestData) -> dict[str, bool]:
    """The approval decisions a request carries (AI SDK 6: tool parts in `approval-responded`
    state on the last message, the assistant's paused reply), by tool call id. The rest of the
    messages is the client's copy of the chat and is not read; a denial's reason is not passed
    to the model either (it is the client's text), the page's denial note is."""
    last = run_input.messages[-1] if run_input.messages else None
    if last is None or last.role != "assistant":
        return {}
    return {
        part.tool_call_id: part.approval.approved
        for part in last.parts
        if isinstance(part, ToolApprovalRespondedPart | DynamicToolApprovalRespondedPart)
        and isinstance(part.approval, ToolApprovalResponded)
    }


def _reply_response(
    req: Request, run: Run, who: Caller | None = None, *, skip: Shown = NOTHING_SHOWN
) -> Response:
    """The protocol stream of a reply, from its start (less what `skip` says the client holds);
    gives back `who`'s stream slot at the end."""
    events = _ReplyStream(
        accept=req.headers.get("accept"),
        sdk_version=6,
        # The same id however often the reply is resumed, so a client keeps one message for it.
        server_message_id=f"turn-{run.turn_id}",
        heartbeat=settings(req).heartbeat,
    )
    chunks = events.transform_stream(
        reply_events(
            run, heartbeat=settings(req).heartbeat, on_pause=events.awaiting.extend, skip=skip
        )
    )
    response = events.streaming_response(chunks)
    response.headers["Cache-Control"] = "no-cache"
    response.headers["X-Accel-Buffering"] = "no"
    if who is not None:
        response.background = BackgroundTask(chat_service(req).close_stream, who)
    return response


@ar("/chat", methods=["post"])
async def api_chat(req: Request):
    """Send a Vercel AI SDK chat's new message (or regenerate its last reply); stream the reply."""
    body = await req.body()
    if len(body) > settings(req).max_message_chars * 4 + 100_000:
        return _error("The request is too large.", 413)
    try:
        run_input = _Adapter.build_run_input(body)
    except ValidationError:
        return _error("That is not a chat request (the Vercel AI SDK's UI messages).", 422)
    service, who = chat_service(req), caller(req)
    skip = NOTHING_SHOWN
    try:
        if isinstance(run_input, RegenerateMessage):
            run = (await service.regenerate_chat(who, run_input.id)).runs[0]
        elif answers := _approval_answers(run_input):
            run, prior = await service.decide_chat(who, run_input.id, answers)
            skip = shown(prior)
        else:
            chat = await off_loop(_chat_request, req, run_input)
            run = (await service.send_chat(who, chat)).runs[0]
    except Refused as refusal:
        return _refused(refusal)
    return _reply_response(req, run, skip=skip)


@ar("/chat/{chat_id}/stop", methods=["post"])
async def api_chat_stop(req: Request, chat_id: str):
    """Stop the reply being written in a chat; what it wrote is kept, saved as stopped."""
    try:
        await chat_service(req).stop_chat(caller(req), chat_id)
    except Refused as refusal:
        return _refused(refusal)
    return Response(status_code=204)


@ar("/chat/{chat_id}/stream", methods=["get"])
async def api_chat_stream(req: Request, chat_id: str):
    """Resume a chat's reply (the AI SDK's `reconnectToStream`): 204 if none is being written."""
    service, who = chat_service(req), caller(req)
    try:
        run = await service.running_reply(who, chat_id)
    except Refused:  # a chat never sent here has nothing to resume, like one that finished
        run = None
    if run is None:
        return Response(status_code=204)
    if not await service.open_stream(who):
        return _error("Too many open streams: close some tabs.", 429)
    return _reply_response(req, run, who)


@ar("/conversations", methods=["get"])
async def api_conversations(req: Request):
    """The caller's conversations, most recently active first."""
    keys = ("id", "title", "model", "persona", "created_at", "updated_at")
    convs = await off_loop(store(req).conversations, uid(req))
    return JSONResponse({"conversations": [{k: c[k] for k in keys} for c in convs]})


@ar("/conversations/{cid}", methods=["get"])
async def api_conversation(req: Request, cid: str):
    """One conversation's shown branch as pydantic-ai messages (ModelMessagesTypeAdapter)."""
    conv = await off_loop(store(req).conversation, cid, uid(req))
    if conv is None:
        return _error("Not found.", 404)
    body = await off_loop(lambda: to_json(store(req).branch(conv["head_turn_id"])))
    return Response(body, media_type="application/json")
