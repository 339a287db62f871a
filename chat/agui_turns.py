"""An AG-UI run as a turn of the caller's conversation: the thread's conversation, the committed
user message, the history the model sees, Stop, and the reply saved however the run ends.

The protocol (parsing the run input, encoding events) is pydantic-ai's AGUIAdapter, in
web/agui.py; this module decides and saves, with no HTTP in it. The server keeps the history:
of what a client sends, only its new user message is read, so a client's copy of the
conversation (which it may have edited) never reaches the model or the store.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from pydantic_ai import AgentRunResultEvent, CancellationToken
from pydantic_ai.exceptions import RunCancelled
from pydantic_ai.messages import (
    FunctionToolResultEvent,
    ModelMessage,
    ModelRequest,
    ModelResponse,
    PartDeltaEvent,
    PartStartEvent,
    TextPart,
    TextPartDelta,
    UserPromptPart,
)

from chat import budget
from chat.agent import short_title
from chat.config import Settings
from chat.errors import FirstTokenTimeout, StalledError, describe_error, expected
from chat.outcome import clean, has_text, storable, text_of, usage_of
from chat.storage import Store
from chat.store import INTERRUPTED

log = logging.getLogger(__name__)

# A thread id names a conversation (page /c/{id}): URL-safe, and too long to guess first.
THREAD_ID = re.compile(r"[A-Za-z0-9_-]{16,128}")
THREAD_ID_RULE = "threadId must be 16 to 128 letters, digits, '-' or '_' (a UUID will do)."
# How long Stop waits for the stopped reply to be saved before answering.
STOP_WAIT = 10.0


def valid_thread_id(thread_id: str) -> bool:
    """True for a thread id that may name a conversation."""
    return bool(THREAD_ID.fullmatch(thread_id or ""))


def open_thread(
    store: Store, owner: str, thread_id: str, *, model: str, persona: str | None
) -> dict | None:
    """The owner's conversation for `thread_id`, created on first use; None if the id names
    someone else's (or a deleted) conversation. Blocking (the store)."""
    conv = store.conversation(thread_id, owner)
    if conv is not None:
        return conv
    claimed = store.claim_conversation(thread_id, owner, model=model, persona=persona)
    # Claimed meanwhile by another request of the same owner: theirs all the same.
    return claimed or store.conversation(thread_id, owner)


def begin(store: Store, conv: dict, text: str, model_name: str) -> dict:
    """Commit the user's message as the thread's next turn, before the model is called."""
    if not conv["title"]:
        conv["title"] = short_title(text)
        store.set_title(conv["id"], conv["title"])
    request = ModelRequest(parts=[UserPromptPart(content=text)])
    return store.add_turn(conv["id"], text, [request], model=model_name)


def history(store: Store, turn: dict, settings: Settings) -> list[ModelMessage]:
    """The stored history the turn's reply is generated from, fitted to the history budget."""
    fitted = budget.fit(
        store.history(turn),
        max_messages=settings.history_max_messages,
        max_chars=settings.history_max_chars,
    )
    return fitted.messages


def model_settings(settings: Settings) -> dict:
    """The model settings every reply is asked with (as the page's replies)."""
    out: dict = {"max_retries": settings.model_retries}
    if settings.output_tokens_limit:
        out["max_tokens"] = settings.output_tokens_limit
    return out


@dataclass(eq=False)
class ThreadRun:
    """One AG-UI reply: its committed turn, its Stop token, and what it has produced so far."""

    store: Store
    settings: Settings
    turn: dict
    owner: str
    # Called once the reply is saved (e.g. to name the conversation after its first exchange).
    on_saved: Callable[[ThreadRun], None] | None = None
    token: CancellationToken = field(default_factory=CancellationToken)
    started: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    text: str = ""
    usage: dict | None = None
    outcome: dict | None = None  # what to save, once the run has ended
    saved: asyncio.Event = field(default_factory=asyncio.Event)
    interrupted: bool = False  # stopped by the server shutting down, not by the user
    _result: list[ModelMessage] | None = None
    _stall: Exception | None = None
    _watchdog: asyncio.TimerHandle | None = None
    _partial_at: float = 0.0

    @property
    def cid(self) -> str:
        """The conversation (thread) this reply belongs to."""
        return self.turn["conversation_id"]

    async def record(self, events: AsyncIterator) -> AsyncIterator:
        """Pass the run's pydantic-ai events on, and save the turn however the run ends.

        Stop and a stall end the run through its cancellation token, so the model call ends
        too. A client that goes away (the protocol's abort) cancels the request's task: then
        nothing can be awaited here, and `settle` (run after the response) saves instead.
        """
        request = ModelRequest(parts=[UserPromptPart(content=self.turn["user_text"])])
        self._arm(self.settings.first_token_timeout)
        try:
            async for event in events:
                self._see(event)
                yield event
                if self._partial_due():
                    await self._save_partial()
            if self._result is None:  # the stream ended without a result: not a reply
                raise RuntimeError("the run ended without a result")
            self._end("complete", None, self._result)
        except RunCancelled as exc:
            messages = exc.new_messages() or [request]
            if self._stall is not None:
                self._end("failed", describe_error(self._stall), messages)
                raise self._stall from None
            if self.interrupted:
                self._end("interrupted", INTERRUPTED, messages)
            else:
                self._end("stopped", None, messages)
            raise
        except Exception as exc:
            error = describe_error(exc)
            log.warning(
                "ag-ui reply %s failed: %s", self.turn["id"], error, exc_info=not expected(exc)
            )
            self._end("failed", error, [request])
            raise
        finally:
            self._disarm()
            if self.outcome is None:
                self.settle_as("stopped", None)  # the client went away: `settle` saves
            else:
                await self.save()

    def settle_as(self, status: str, error: str | None) -> None:
        """Decide how the reply ended, if `record` has not (it never ran, or was cut off)."""
        if self.outcome is None:
            request = ModelRequest(parts=[UserPromptPart(content=self.turn["user_text"])])
            self._end(status, error, [request])

    async def settle(self) -> None:
        """Save the turn if `record` could not (the client left before or while it ran)."""
        self.settle_as("stopped", None)
        await self.save()

    async def save(self) -> None:
        """Save how the reply ended (once), as the page saves its replies."""
        if self.saved.is_set() or self.outcome is None:
            return
        try:
            await asyncio.to_thread(self.store.finish_turn, self.turn["id"], **self.outcome)
        except Exception:  # the next start marks a turn left streaming as interrupted
            log.exception("could not save ag-ui reply %s", self.turn["id"])
        finally:
            self.saved.set()
        if self.on_saved is not None:
            try:
                self.on_saved(self)
            except Exception:  # a nicety (a title): the reply is saved already
                log.exception("after saving ag-ui reply %s", self.turn["id"])

    # Watching the events -------------------------------------------------------------------

    def _see(self, event: object) -> None:
        waiting = isinstance(event, FunctionToolResultEvent)  # a new model request follows
        self._arm(self.settings.first_token_timeout if waiting else self.settings.stall_timeout)
        piece = None
        if isinstance(event, PartStartEvent) and isinstance(event.part, TextPart):
            piece = event.part.content
            if self.text and piece is not None:
                piece = "\n\n" + piece  # a new text part (after a tool call) is a new block
        elif isinstance(event, PartDeltaEvent) and isinstance(event.delta, TextPartDelta):
            piece = event.delta.content_delta
        elif isinstance(event, AgentRunResultEvent):
            result = event.result
            self._result = result.new_messages()
            self.usage = usage_of(result.usage, self.started, self.first_token_at)
        if piece:
            if self.first_token_at is None:
                self.first_token_at = time.monotonic()
            self.text += piece

    def _arm(self, seconds: float) -> None:
        """(Re)start the stall watchdog: a model that sends nothing for `seconds` is stopped."""
        self._disarm()
        self._watchdog = asyncio.get_running_loop().call_later(seconds, self._stalled)

    def _disarm(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()

    def _stalled(self) -> None:
        self._stall = FirstTokenTimeout() if self.first_token_at is None else StalledError()
        self.token.cancel()

    def _partial_due(self) -> bool:
        return bool(self.text) and time.monotonic() - self._partial_at >= self.settings.flush_every

    async def _save_partial(self) -> None:
        """Save the text so far, so a crash keeps what the client was shown."""
        self._partial_at = time.monotonic()
        text = clean(self.text)
        messages = [
            ModelRequest(parts=[UserPromptPart(content=self.turn["user_text"])]),
            ModelResponse(parts=[TextPart(content=text)]),
        ]
        try:
            await asyncio.to_thread(self.store.save_partial, self.turn["id"], text, messages)
        except Exception as exc:  # the final save still comes
            log.warning("could not save the partial ag-ui reply %s: %s", self.turn["id"], exc)

    def _end(self, status: str, error: str | None, messages: list[ModelMessage]) -> None:
        if not any(isinstance(p, UserPromptPart) for m in messages[:1] for p in m.parts):
            # The adapter hands the user's message over as history, so the run's "new"
            # messages start after it: the turn keeps it, as the page's turns do.
            request = ModelRequest(parts=[UserPromptPart(content=self.turn["user_text"])])
            messages = [request, *messages]
        text = clean(self.text or text_of(messages))
        if status != "complete" and text and not has_text(messages):
            # Keep the partial reply in the history, so the next turn sees what the user saw.
            messages = [*messages, ModelResponse(parts=[TextPart(content=text)])]
        self.outcome = dict(
            status=status,
            reply_text=text,
            messages=storable(list(messages)),
            error=error,
            usage=self.usage if status == "complete" else None,
        )


class ThreadRuns:
    """The AG-UI replies running in this process, by conversation: Stop and busy checks.

    In-process, like the page's runs today (RunManager.runs); with several workers, Stop
    reaches a reply through the chat service's control channel instead.
    """

    def __init__(self) -> None:
        self.live: dict[str, ThreadRun] = {}

    def busy(self, cid: str) -> bool:
        """True while a reply in conversation `cid` is being generated here."""
        return cid in self.live

    def add(self, run: ThreadRun) -> None:
        """Track a reply that is starting."""
        self.live[run.cid] = run

    def discard(self, run: ThreadRun) -> None:
        """Forget a reply that has ended."""
        if self.live.get(run.cid) is run:
            del self.live[run.cid]

    async def stop(self, cid: str) -> bool:
        """Stop the reply in `cid` and wait (bounded) until it is saved; False if none runs."""
        run = self.live.get(cid)
        if run is None:
            return False
        run.token.cancel()
        try:
            await asyncio.wait_for(run.saved.wait(), STOP_WAIT)
        except TimeoutError:
            log.warning("ag-ui reply %s not saved %.0f s after Stop", run.turn["id"], STOP_WAIT)
        return True

    def stop_all(self) -> None:
        """Stop every reply (the server is shutting down); each is saved as it ends."""
        for run in list(self.live.values()):
            run.interrupted = True
            run.token.cancel()
