"""AG-UI (the Agent-User Interaction protocol) over the chat service, like /api/chat.

- POST /api/ag-ui: a run. The run's `threadId` names one of the caller's conversations, under
  that very id (created on first use; someone else's is a 404). The run's new user message goes
  through the chat service as a page's message does (`ChatService.send_thread`: the same
  checks, limits, send lock and commit) and its reply is a server-owned run, streamed back as
  AG-UI events by pydantic-ai's `AGUIEventStream` from the run's events (chat/api_stream.py).
  The server keeps the history: of the client's messages only the new user text is read.
- POST /api/ag-ui/{cid}/stop (cid: the thread id): Stop; answers once the partial reply is saved.

A client that aborts its run (`HttpAgent.abortRun()`, CopilotKit's stop button) only closes the
connection: AG-UI has no other way to say Stop and no way to resume a run, so here a closed
connection stops the reply (saved as stopped, its text so far kept), unlike /api/chat, whose
client can reconnect to a reply that goes on. The page's Stop and busy check see AG-UI replies
as their own, since they are the same runs.
"""

from __future__ import annotations

import asyncio
import logging
import re
import warnings
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from ag_ui.core import AssistantMessage, BaseEvent, RunAgentInput, UserMessage
from fasthtml.common import APIRouter
from pydantic import ValidationError
from pydantic_ai.exceptions import RunCancelled
from pydantic_ai.messages import (
    AgentStreamEvent,
    FunctionToolCallEvent,
    ModelRequest,
    UserPromptPart,
)
from pydantic_ai.ui.ag_ui import AGUIAdapter, AGUIEventStream
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from chat import untrusted
from chat.api_stream import ReplyFailed, ReplyStopped, beating, ended, reply_events
from chat.errors import describe_error
from chat.runs import Run
from chat.service import Caller, ChatService, Refused
from web.request import caller, chat_service, off_loop, settings

log = logging.getLogger(__name__)

ar = APIRouter(prefix="/api")

# A thread id names a conversation (page /c/{id}): URL-safe, and too long to guess first.
THREAD_ID = re.compile(r"[A-Za-z0-9_-]{16,128}")
THREAD_ID_RULE = "threadId must be 16 to 128 letters, digits, '-' or '_' (a UUID will do)."
# How long Stop waits for the stopped reply to be saved before answering.
STOP_WAIT = 10.0
# Stops of replies whose client went away, running after their request (kept from the GC).
_stopping: set[asyncio.Task] = set()


def _error(message: str, status: int, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _refused(refusal: Refused) -> JSONResponse:
    return _error(refusal.message, refusal.status, refusal.headers)


@dataclass
class _ReplyStream(AGUIEventStream):
    """The protocol's events for a reply followed from its run, with the page's words for how it
    ended (an exception's text stays in the server log), and an SSE comment after `heartbeat`
    seconds of silence, so proxies keep the stream open while the model reads or a tool runs
    (closing it would stop the reply, see above)."""

    heartbeat: float = 15.0

    async def encode_stream(self, stream: AsyncIterator[BaseEvent]) -> AsyncIterator[str]:
        """The library's encoding, with a keep-alive comment whenever the reply is silent."""
        if not self.content_type.startswith("text/event-stream"):  # protobuf: no comments
            async for event in stream:
                yield self.encode_event(event)
            return
        async for event in beating(stream, self.heartbeat):
            yield ": ping\n\n" if event is None else self.encode_event(event)

    async def handle_function_tool_call(
        self, event: FunctionToolCallEvent
    ) -> AsyncIterator[BaseEvent]:
        """A run's tool call comes whole, as it is made: TOOL_CALL_START, _ARGS and _END."""
        async for e in self.handle_tool_call_start(event.part):
            yield e
        async for e in self.handle_tool_call_end(event.part):
            yield e

    async def on_error(self, error: Exception) -> AsyncIterator[BaseEvent]:
        """RUN_ERROR with the reply's own generic message, never an exception's text."""
        if not isinstance(error, ReplyFailed):
            log.warning("ag-ui reply stream failed: %r", error)
            error = ReplyFailed(describe_error(error))
        async for event in super().on_error(error):
            yield event


async def _events(
    run: Run, heartbeat: float, left: Callable[[], None]
) -> AsyncIterator[AgentStreamEvent]:
    """The run's events; a stopped reply ends as the run's cancellation (RUN_FINISHED), and
    `left` is called if the stream is closed before the reply has ended."""
    try:
        async for event in reply_events(run, heartbeat=heartbeat):
            yield event
    except ReplyStopped:
        raise RunCancelled("The reply was stopped.") from None
    finally:
        if not run.done:
            left()


def _stop_when_left(service: ChatService, who: Caller, run: Run) -> Callable[[], None]:
    """What to do when the client goes away mid-reply (its abort): stop the reply, through the
    service, in a task of its own, since the request's own task is being cancelled."""

    async def stop() -> None:
        try:
            await service.stop(who, run.conversation_id, run.turn_id)
        except Refused:  # the conversation was deleted meanwhile: nothing is left to stop
            pass
        except Exception:
            log.exception("could not stop ag-ui reply %s after its client left", run.turn_id)

    def left() -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # closed by the GC as the process ends: its shutdown ends the run
            return
        task = loop.create_task(stop(), name=f"ag-ui-left-{run.turn_id}")
        _stopping.add(task)
        task.add_done_callback(_stopping.discard)

    return left


def new_user_text(run_input: RunAgentInput) -> str:
    """The text of the client's new turn: its user messages after the last assistant message,
    through the whitelist (attachments become notes). Earlier messages are not read at all."""
    messages = run_input.messages
    last = max((i for i, m in enumerate(messages) if isinstance(m, AssistantMessage)), default=-1)
    users = [m for m in messages[last + 1 :] if isinstance(m, UserMessage)]
    with warnings.catch_warnings(record=True) as caught:  # a client's odd content: not ours
        warnings.simplefilter("always")
        loaded = untrusted.clean(AGUIAdapter.load_messages(users))
    for warning in caught:
        log.debug("ag-ui input: %s", warning.message)
    texts = [
        part.content
        for m in loaded
        if isinstance(m, ModelRequest)
        for part in m.parts
        if isinstance(part, UserPromptPart) and isinstance(part.content, str)
    ]
    return "\n\n".join(texts)


def _parse(body: bytes) -> tuple[RunAgentInput, str]:
    """The run input and its new user text (blocking: CPU)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_input = AGUIAdapter.build_run_input(body)
    for warning in caught:
        log.debug("ag-ui input: %s", warning.message)
    return run_input, new_user_text(run_input)


async def _read_capped(req: Request, cap: int) -> bytes | None:
    """The request body, or None past `cap` bytes (read no further than that)."""
    try:
        if int(req.headers.get("content-length") or 0) > cap:
            return None
    except ValueError:
        return None
    body = bytearray()
    async for chunk in req.stream():
        body += chunk
        if len(body) > cap:
            return None
    return bytes(body)


def _body_cap(req: Request) -> int:
    """Clients resend the whole conversation with every run (the protocol's way), so the cap
    allows the history the server keeps besides the message itself."""
    cfg = settings(req)
    return (cfg.max_message_chars + (cfg.history_max_chars or 200_000)) * 4 + 100_000


def _reply_response(req: Request, run_input: RunAgentInput, run: Run, who: Caller) -> Response:
    """The AG-UI event stream of a reply, from its start."""
    heartbeat = settings(req).heartbeat
    stream = _ReplyStream(run_input, accept=req.headers.get("accept"), heartbeat=heartbeat)
    left = _stop_when_left(chat_service(req), who, run)
    response = stream.streaming_response(stream.transform_stream(_events(run, heartbeat, left)))
    response.headers["Cache-Control"] = "no-cache"
    response.headers["X-Accel-Buffering"] = "no"
    return response


@ar("/ag-ui", methods=["post"])
async def agui_run(req: Request):
    """Send an AG-UI run's new user message on the caller's thread; stream the reply's events."""
    media = req.headers.get("content-type", "").split(";")[0].strip().lower()
    if media != "application/json":  # also the CSRF check of a simple cross-site form
        return _error("Send the run input as application/json.", 415)
    body = await _read_capped(req, _body_cap(req))
    if body is None:
        return _error("The request is too large.", 413)
    try:
        run_input, text = await off_loop(_parse, body)
    except (ValidationError, ValueError):
        return _error("That is not an AG-UI run input this server can read.", 422)
    if not THREAD_ID.fullmatch(run_input.thread_id or ""):
        return _error(THREAD_ID_RULE, 422)
    who = caller(req)
    try:
        sent = await chat_service(req).send_thread(who, run_input.thread_id, text)
    except Refused as refusal:
        return _refused(refusal)
    return _reply_response(req, run_input, sent.runs[0], who)


@ar("/ag-ui/{cid}/stop", methods=["post"])
async def agui_stop(req: Request, cid: str):
    """Stop the reply running in the caller's thread (its id is the conversation's); answers
    once the text so far is saved as stopped."""
    service, who = chat_service(req), caller(req)
    try:
        run = await service.running_reply(who, cid)
        stopped = await service.stop_chat(who, cid)
    except Refused as refusal:
        return _refused(refusal)
    if run is not None and stopped:
        await ended(run, STOP_WAIT)
    return JSONResponse({"stopped": bool(stopped)})
