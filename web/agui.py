"""AG-UI (the Agent-User Interaction protocol) for the same agent, identity, limits and history.

- POST /api/ag-ui: a run, by pydantic-ai's AGUIAdapter. The run's `threadId` names one of the
  caller's conversations (created on first use; someone else's is a 404), the run's new user
  message is committed as its next turn, and the reply streams as AG-UI events while it is
  saved as the page saves its replies. The server's stored history is what the model sees.
- POST /api/ag-ui/{cid}/stop (cid: the thread id): Stop; the model call ends, the text so far
  is kept. A client that aborts its request (HttpAgent.abortRun) stops the reply the same way.

The deciding and saving is chat/agui_turns.py; this module reads the request and answers.
"""

from __future__ import annotations

import asyncio
import logging
import warnings
from collections.abc import AsyncIterator, Sequence
from zlib import crc32

from ag_ui.core import AssistantMessage, BaseEvent, RunAgentInput, RunErrorEvent, UserMessage
from fasthtml.common import APIRouter
from pydantic import ValidationError
from pydantic_ai import UsageLimits
from pydantic_ai.messages import ModelMessage, ModelRequest, UserPromptPart
from pydantic_ai.ui.ag_ui import AGUIAdapter, AGUIEventStream
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import JSONResponse

from chat import agui_turns, untrusted
from chat.agui_turns import ThreadRun, ThreadRuns
from chat.errors import describe_error
from chat.tools import ToolDeps
from web.request import client_addr, off_loop, runs, settings, store, uid

log = logging.getLogger(__name__)

ar = APIRouter(prefix="/api")


def _error(message: str, status: int, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


class _GenericErrors(AGUIEventStream):
    """The protocol's events, with the page's error messages: an exception's text (an upstream
    body, a URL, a key) stays in the server log."""

    async def on_error(self, error: Exception) -> AsyncIterator[BaseEvent]:
        """The library's RUN_ERROR, with a message for the user in place of the exception's."""
        async for event in super().on_error(error):
            if isinstance(event, RunErrorEvent):
                event = event.model_copy(update={"message": describe_error(error)})
            yield event


class _Adapter(AGUIAdapter):
    """pydantic-ai's AG-UI adapter, reading only the new user message from the client.

    The client's history, tools, state and resume answers are not taken: the history is the
    server's (chat/agui_turns.py), the tools are the agent's own, as on the page.
    """

    prompt: str = ""

    @property
    def messages(self) -> list[ModelMessage]:
        """The run's new user message: all the model takes from the client."""
        return [ModelRequest(parts=[UserPromptPart(content=self.prompt)])]

    def sanitize_messages(self, messages: Sequence[ModelMessage], **kwargs) -> list[ModelMessage]:
        """The whitelist of chat/untrusted.py (already plain text here: belt and braces)."""
        return untrusted.clean(messages)

    @property
    def toolset(self):
        """No client-side tools: the agent's tools are the page's."""
        return None

    @property
    def state(self):
        """Client state is not read."""
        return None

    @property
    def deferred_tool_results(self):
        """No resumed tool approvals from the client."""
        return None

    def build_event_stream(self) -> _GenericErrors:
        """The AG-UI event stream with generic error messages."""
        return _GenericErrors(
            self.run_input,
            accept=self.accept,
            ag_ui_version=self.ag_ui_version,
            include_usage=self.include_usage,
            manage_system_prompt=self.manage_system_prompt,
            preserve_file_data=self.preserve_file_data,
        )


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
    return "\n\n".join(texts).replace("\r\n", "\n")


def _parse(body: bytes) -> RunAgentInput:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_input = AGUIAdapter.build_run_input(body)
    for warning in caught:
        log.debug("ag-ui input: %s", warning.message)
    return run_input


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


def _thread_runs(req: Request) -> ThreadRuns:
    if getattr(req.app.state, "agui_runs", None) is None:
        req.app.state.agui_runs = ThreadRuns()
    return req.app.state.agui_runs


def _send_lock(req: Request) -> asyncio.Lock:
    """The user's send lock (the page's striped locks): checks and commit, one send at a time."""
    locks = getattr(req.app.state, "send_locks", None)
    if locks is None:
        locks = req.app.state.send_locks = [asyncio.Lock() for _ in range(64)]
    return locks[crc32(uid(req).encode()) % len(locks)]


@ar("/ag-ui", methods=["post"])
async def agui_run(req: Request):
    """Run the agent for an AG-UI RunAgentInput on the caller's thread; stream AG-UI events."""
    cfg, manager = settings(req), runs(req)
    if not manager.accepting:
        return _error("The server is restarting.", 503)
    media = req.headers.get("content-type", "").split(";")[0].strip().lower()
    if media != "application/json":  # also the CSRF check of a simple cross-site form
        return _error("Send the run input as application/json.", 415)
    body = await _read_capped(req, _body_cap(req))
    if body is None:
        return _error("The request is too large.", 413)
    try:
        run_input = await off_loop(_parse, body)
        text = new_user_text(run_input)
    except (ValidationError, ValueError):
        return _error("That is not an AG-UI run input this server can read.", 422)
    if not agui_turns.valid_thread_id(run_input.thread_id):
        return _error(agui_turns.THREAD_ID_RULE, 422)
    if not text.strip():
        return _error("Type a message before sending.", 422)
    if len(text) > cfg.max_message_chars:
        return _error(
            f"That message is {len(text):,} characters; the limit is {cfg.max_message_chars:,}.",
            413,
        )
    async with _send_lock(req):
        started = await _start(req, run_input, text)
    if isinstance(started, JSONResponse):
        return started
    run, adapter, model, persona = started
    return await _stream(req, run, adapter, model, persona)


async def _start(req: Request, run_input: RunAgentInput, text: str):
    """The checks, the thread's conversation and the committed turn (under the send lock)."""
    cfg, manager, limits, who = settings(req), runs(req), req.app.state.limits, uid(req)
    live = _thread_runs(req)
    conv = await off_loop(store(req).conversation, run_input.thread_id, who)
    if conv is not None and (manager.streaming_in(conv["id"]) or live.busy(conv["id"])):
        return _error("Wait for the reply to finish, or stop it, before sending.", 409)
    refused = limits.check_send(
        who, client_addr(req), running=manager.running(who), total_running=len(manager.runs)
    )
    if refused:
        return _error(refused.message, refused.status, refused.headers)
    if conv is None:
        conv = await off_loop(
            agui_turns.open_thread,
            store(req),
            who,
            run_input.thread_id,
            model=cfg.default_model,
            persona=next(iter(manager.personas)),
        )
        if conv is None:  # someone else's thread id: as if it did not exist
            return _error("Not found.", 404)
    model_name = conv["model"] or cfg.default_model
    try:
        model = manager.model_for(model_name)
    except Exception as exc:  # a model that cannot start: say so, as the page does
        log.warning("ag-ui model unavailable: %r", exc)
        return _error(describe_error(exc), 503)
    turn = await off_loop(agui_turns.begin, store(req), conv, text, model_name)
    run = ThreadRun(store(req), cfg, turn, who, on_saved=_titles(req, model))
    live.add(run)
    limits.api_started(who)
    adapter = _Adapter(agent=manager.agent, run_input=run_input, accept=req.headers.get("accept"))
    adapter.prompt = text
    persona = manager.personas.get(conv["persona"] or "")
    return run, adapter, model, persona


async def _stream(req: Request, run: ThreadRun, adapter: _Adapter, model, persona):
    cfg, limits = settings(req), req.app.state.limits
    live = _thread_runs(req)

    async def finished() -> None:
        # After the response, however it ended: a client that left is saved here.
        try:
            await run.settle()
        finally:
            live.discard(run)
            await limits.api_finished(run.owner)

    try:
        history = await off_loop(agui_turns.history, store(req), run.turn, cfg)
        events = adapter.run_stream_native(
            message_history=history,
            model=model,
            deps=ToolDeps(store(req), run.owner),
            instructions=persona.instructions if persona else None,
            model_settings=agui_turns.model_settings(cfg),
            usage_limits=UsageLimits(
                request_limit=cfg.request_limit, output_tokens_limit=cfg.output_tokens_limit
            ),
            cancellation_token=run.token,
        )
        response = adapter.streaming_response(adapter.transform_stream(run.record(events)))
    except Exception as exc:  # before any event (the history could not be read): say so
        log.warning("ag-ui reply %s could not start: %r", run.turn["id"], exc)
        run.settle_as("failed", describe_error(exc))
        await finished()
        return _error(describe_error(exc), 503)
    except BaseException:
        await finished()
        raise
    response.background = BackgroundTask(finished)
    return response


def _titles(req: Request, model):
    """After a thread's first exchange completes, name it as the page names a conversation."""
    manager = runs(req)

    def name(run: ThreadRun) -> None:
        if run.outcome and run.outcome["status"] == "complete" and run.turn["parent_id"] is None:
            manager.titles.start(model, run.cid, run.owner, run.turn["user_text"], run.text)

    return name


@ar("/ag-ui/{cid}/stop", methods=["post"])
async def agui_stop(req: Request, cid: str):
    """Stop the reply running in the caller's thread (its id is the conversation's): the text
    so far is saved as stopped."""
    conv = await off_loop(store(req).conversation, cid, uid(req))
    if conv is None:
        return _error("Not found.", 404)
    stopped = await _thread_runs(req).stop(conv["id"])
    return JSONResponse({"stopped": stopped})
