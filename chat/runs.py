"""A reply as a server-owned task, with a state log that streams can replay and then follow.

POSTing a message starts a `Run`; the SSE endpoint only ever attaches to one. The run renders
model text as it arrives (coalesced to at most one update per `stream_tick`), keeps the finished
blocks and the current tail, and wakes its followers. Any number of followers (tabs, reloads,
reconnects) read the same state, so one message always means exactly one model call.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from pydantic_ai import Agent, CancellationToken, UsageLimits
from pydantic_ai.exceptions import (
    ModelAPIError,
    ModelHTTPError,
    RunCancelled,
    UnexpectedModelBehavior,
    UsageLimitExceeded,
)
from pydantic_ai.messages import (
    FunctionToolCallEvent,
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
from pydantic_ai.models import Model

from chat import budget
from chat.agent import ModelUnavailable, make_title, resolve_model, short_title
from chat.config import Settings
from chat.markdown import StreamRenderer
from chat.personas import load_personas
from chat.reply import ToolView
from chat.storage import Store
from chat.store import INTERRUPTED
from chat.tools import ToolDeps

log = logging.getLogger(__name__)

# Up to this many replies at once, each updates every `stream_tick`; beyond, updates (and reads
# from the model) slow down in proportion, so the CPU they share goes further.
_SHARED_TICK = 8
# How long a conversation's title waits for the server to be less busy before it is made anyway.
_TITLE_PATIENCE = 60.0


@dataclass
class Block:
    """A finished block of the reply's markdown, rendered to safe HTML."""

    html: str


@dataclass
class ToolUpdate:
    """A tool call's result arrived: the call already shown must be redrawn."""

    tool: ToolView


Item = Block | ToolView | ToolUpdate


class StalledError(Exception):
    """The model sent nothing for longer than the stall timeout."""


class FirstTokenTimeout(StalledError):
    """The model did not start its reply within the first-token timeout."""


@dataclass(eq=False)
class Run:
    """One reply being generated: its rendered state and the task generating it."""

    turn_id: int
    conversation_id: str
    owner: str
    model_name: str
    renderer: StreamRenderer = field(default_factory=StreamRenderer)
    items: list[Item] = field(default_factory=list)
    tail: str = ""
    status: str = "streaming"
    error: str | None = None
    usage: dict | None = None
    version: int = 0
    token: CancellationToken = field(default_factory=CancellationToken)
    task: asyncio.Task | None = None
    started: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    _changed: asyncio.Event = field(default_factory=asyncio.Event)
    _flush_handle: asyncio.TimerHandle | None = None
    _last_flush: float = 0.0
    _save_handle: asyncio.TimerHandle | None = None

    @property
    def done(self) -> bool:
        """True once the reply has ended, however it ended."""
        return self.status != "streaming"

    def publish(self) -> None:
        """Wake every follower: the state has changed."""
        self.version += 1
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def follow(
        self, *, start_block: int = 0, heartbeat: float = 15.0
    ) -> AsyncIterator[tuple[str, object]]:
        """Replay the state so far, then follow it live.

        Yields ("items", (new_items, items_sent_total)), ("tail", html), ("ping", None) after
        `heartbeat` seconds of silence, and finally ("end", self).
        """
        sent = min(start_block, len(self.items))
        sent_tail: str | None = None
        while True:
            changed = self._changed  # taken before reading state, so no wake-up is missed
            # Read once, before the items: a run that ends while this follower is suspended in a
            # `yield` below adds its last items then, and they must still be sent before "end".
            done = self.done
            if len(self.items) > sent:
                new = self.items[sent:]
                sent = len(self.items)
                yield "items", (new, sent)
            if self.tail != sent_tail and not (sent_tail is None and not self.tail and done):
                sent_tail = self.tail
                yield "tail", self.tail
            if done:
                yield "end", self
                return
            try:
                await asyncio.wait_for(changed.wait(), heartbeat)
            except TimeoutError:
                yield "ping", None


class RunManager:
    """Starts, tracks, stops and finishes runs; saves every reply however it ends."""

    def __init__(
        self, store: Store, agent: Agent, settings: Settings, *, model: Model | None = None
    ):
        self.store = store
        self.agent = agent
        self.settings = settings
        self._model_override = model  # tests pass a FunctionModel here
        self._models: dict[str, Model] = {}
        self.runs: dict[int, Run] = {}
        self.titles: dict[str, asyncio.Task] = {}
        self.personas = load_personas()
        self.accepting = True

    def streaming_in(self, cid: str) -> bool:
        """True while a reply in conversation `cid` is being generated."""
        return any(run.conversation_id == cid for run in self.runs.values())

    def running(self, owner: str) -> int:
        """How many of `owner`'s replies are being generated now."""
        return sum(1 for run in self.runs.values() if run.owner == owner)

    def get(self, turn_id: int) -> Run | None:
        """The live run for a turn, if it is still generating."""
        return self.runs.get(turn_id)

    def start(self, turn: dict, owner: str) -> Run:
        """Start generating the reply to `turn` (already committed) as a server-owned task."""
        run = Run(
            turn_id=turn["id"],
            conversation_id=turn["conversation_id"],
            owner=owner,
            model_name=turn["model"] or "demo",
        )
        self.runs[run.turn_id] = run
        run.task = asyncio.create_task(self._drive(run, turn), name=f"run-{run.turn_id}")
        return run

    def stop(self, turn_id: int) -> bool:
        """Ask a live run to stop; its partial reply is kept. False if it is not running."""
        run = self.runs.get(turn_id)
        if run is None or run.done:
            return False
        run.token.cancel()
        return True

    async def shutdown(self, timeout: float = 10.0) -> None:
        """Stop accepting runs, stop the ones in flight and wait until they are saved."""
        self.accepting = False
        tasks = [run.task for run in self.runs.values() if run.task]
        for run in list(self.runs.values()):
            run.token.cancel()
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=timeout)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=2)

    def _persona_instructions(self, run: Run) -> str | None:
        conv = self.store.conversation(run.conversation_id, run.owner)
        persona = self.personas.get((conv or {}).get("persona") or "")
        return persona.instructions if persona else None

    def model_for(self, name: str) -> Model:
        """The Model for a model string (the test override, when one is set)."""
        return self._model(name)

    def _model(self, name: str) -> Model:
        if self._model_override is not None:
            return self._model_override
        if name not in self._models:
            self._models[name] = resolve_model(name, self.settings)
        return self._models[name]

    # The task ------------------------------------------------------------------------------

    async def _drive(self, run: Run, turn: dict) -> None:
        request = ModelRequest(parts=[UserPromptPart(content=turn["user_text"])])
        messages: list[ModelMessage] = [request]
        status, error = "failed", None
        events = None
        try:
            cfg = self.settings
            fitted = budget.fit(
                # A long conversation's history takes a while to read and validate: not on the loop.
                await asyncio.to_thread(self.store.history, turn),
                max_messages=cfg.history_max_messages,
                max_chars=cfg.history_max_chars,
            )
            history = fitted.messages
            if fitted.note:  # shown at the top of this reply, and kept with its text
                run.renderer.feed(f"*{fitted.note}*\n\n")
                self._schedule(run)
            model = self._model(run.model_name)
            async with self.agent.run_stream_events(
                turn["user_text"],
                message_history=history,
                model=model,
                deps=ToolDeps(self.store, run.owner),
                instructions=self._persona_instructions(run),
                cancellation_token=run.token,
                usage_limits=UsageLimits(
                    request_limit=cfg.request_limit, output_tokens_limit=cfg.output_tokens_limit
                ),
                model_settings={"max_retries": cfg.model_retries},
            ) as events:
                loop = asyncio.get_running_loop()
                deadline = None
                # Before a model request's first event the server reads the whole prompt, which
                # on a local CPU model takes far longer than any pause between tokens: that wait
                # has its own, longer limit. A tool result means a new request follows.
                waiting = True
                try:
                    # One deadline, pushed back by every event: no task or timer per token.
                    async with asyncio.timeout(cfg.first_token_timeout) as deadline:
                        async for event in events:
                            waiting = isinstance(event, FunctionToolResultEvent)
                            limit = cfg.first_token_timeout if waiting else cfg.stall_timeout
                            deadline.reschedule(loop.time() + limit)
                            self._on_event(run, event)
                            if pause := self._pace(run):
                                await asyncio.sleep(pause)
                except TimeoutError:
                    if deadline is not None and deadline.expired():
                        raise (FirstTokenTimeout if waiting else StalledError) from None
                    raise
            result = events.result
            if result is not None:
                messages = result.new_messages()
                run.usage = _usage(result.usage, run)
            status = "complete"
        except RunCancelled as exc:
            messages = exc.new_messages() or messages
            if self.accepting:
                status = "stopped"  # the user pressed Stop
            else:  # the server is shutting down: not the user's doing
                status, error = "interrupted", INTERRUPTED
        except asyncio.CancelledError:
            status, error = "interrupted", INTERRUPTED
            messages = _salvage(events, messages)
            raise
        except Exception as exc:
            error = describe_error(exc)
            log.warning("reply %s failed: %s", run.turn_id, error, exc_info=not _expected(exc))
            messages = _salvage(events, messages)
        finally:
            self._finish(run, status, error, messages)
            if status == "complete" and turn["parent_id"] is None:
                self._start_title(run, turn)

    def _start_title(self, run: Run, turn: dict) -> None:
        """Name the conversation after its first exchange, in the background."""
        cid = run.conversation_id
        conv = self.store.conversation(cid, run.owner)
        if cid in self.titles or conv is None or conv["title"] != short_title(turn["user_text"]):
            return  # already being named, or named already (by the model or by the user)

        async def title() -> None:
            # A title is a nicety (the first words of the message stand in for it): while the
            # server is busy with replies, it waits its turn, for up to a minute.
            loop = asyncio.get_running_loop()
            until = loop.time() + _TITLE_PATIENCE
            while len(self.runs) > _SHARED_TICK and loop.time() < until:
                await asyncio.sleep(0.5)
            try:
                new = await asyncio.wait_for(
                    make_title(self._model(run.model_name), turn["user_text"], run.renderer.source),
                    timeout=30,
                )
            except Exception as exc:
                log.info("no title for %s: %s", cid, exc)
                return
            conv = self.store.conversation(cid, run.owner)
            # Only replace the provisional title; a name the user chose is kept.
            if conv and conv["title"] == short_title(turn["user_text"]) and new:
                self.store.set_title(cid, new)

        task = asyncio.create_task(title(), name=f"title-{cid}")
        self.titles[cid] = task
        task.add_done_callback(lambda _: self.titles.pop(cid, None))

    async def wait_title(self, cid: str, timeout: float = 20.0) -> None:
        """Wait (bounded) for a conversation's title to be written, if one is being made."""
        task = self.titles.get(cid)
        if task is not None:
            await asyncio.wait([task], timeout=timeout)

    def _on_event(self, run: Run, event: object) -> None:
        if isinstance(event, FunctionToolCallEvent):
            self._text_done(run)
            run.items.append(ToolView.from_call(event.part))
            run.publish()
            return
        if isinstance(event, FunctionToolResultEvent):
            for item in run.items:
                if isinstance(item, ToolView) and item.id == event.tool_call_id:
                    item.settle(event.part)
                    run.items.append(ToolUpdate(item))
                    run.publish()
            return
        text = None
        if isinstance(event, PartStartEvent) and isinstance(event.part, TextPart):
            text = event.part.content
            if run.renderer.source and text is not None:
                text = "\n\n" + text  # a new text part (e.g. after a tool call) starts a new block
        elif isinstance(event, PartDeltaEvent) and isinstance(event.delta, TextPartDelta):
            text = event.delta.content_delta
        if text:
            if run.first_token_at is None:
                run.first_token_at = time.monotonic()
            run.renderer.feed(text)
            self._schedule(run)

    def _tick(self) -> float:
        """How often a reply's page is updated at most. Under load, less often: each update
        costs CPU every stream shares. A few replies update every `stream_tick`; a hundred
        update a few times a second."""
        return self.settings.stream_tick * max(1.0, len(self.runs) / _SHARED_TICK)

    def _pace(self, run: Run) -> float:
        """Seconds a run waits before reading on from its model; 0 unless under load.

        Reading faster than the page is updated only spends CPU early: under load a reply that
        is already showing reads once per tick (taking everything that arrived meanwhile in
        one go), so replies still waiting for their first words get the server first.
        """
        if len(self.runs) <= _SHARED_TICK or run.first_token_at is None:
            return 0.0
        return max(0.0, self._until_next_flush(run))

    def _until_next_flush(self, run: Run) -> float:
        """Seconds until a tick has passed since the run's last render (<= 0: it has)."""
        return run._last_flush + self._tick() - asyncio.get_running_loop().time()

    def _schedule(self, run: Run) -> None:
        """Coalesce updates: render at once if the last render was a tick ago, else at the tick."""
        if run._flush_handle is not None:
            return
        wait = self._until_next_flush(run)
        if wait <= 0:
            self._flush(run)
        else:
            run._flush_handle = asyncio.get_running_loop().call_later(wait, self._flush, run)

    def _text_done(self, run: Run) -> None:
        """End the current run of text (a tool call follows): all of it becomes blocks."""
        if run._flush_handle is not None:
            run._flush_handle.cancel()
            run._flush_handle = None
        new, _ = run.renderer.update(final=True)
        run.items.extend(Block(h) for h in new)
        run.tail = ""

    def _flush(self, run: Run) -> None:
        run._flush_handle = None
        if run.done:
            return
        run._last_flush = asyncio.get_running_loop().time()
        new, run.tail = run.renderer.update()
        run.items.extend(Block(h) for h in new)
        run.publish()
        if run._save_handle is None:
            # Text reaches the disk within `flush_every` of arriving, even if the model then
            # goes quiet: one write per interval, never one per token.
            run._save_handle = asyncio.get_running_loop().call_later(
                self.settings.flush_every, self._save_partial, run
            )

    def _save_partial(self, run: Run) -> None:
        run._save_handle = None
        if not run.done:
            self.store.save_partial(run.turn_id, run.renderer.source)

    def _finish(self, run: Run, status: str, error: str | None, messages: list) -> None:
        self._text_done(run)
        if run._save_handle is not None:
            run._save_handle.cancel()
            run._save_handle = None
        text = run.renderer.source or _text_of(messages)
        if status != "complete" and text and not _has_text(messages):
            # Keep the partial reply in the history, so the next turn sees what the user saw.
            messages = [*messages, ModelResponse(parts=[TextPart(content=text)])]
        try:
            self.store.finish_turn(
                run.turn_id,
                status=status,
                reply_text=text,
                messages=messages,
                error=error,
                usage=run.usage,
            )
        except Exception:
            log.exception("could not save reply %s", run.turn_id)
        run.error = error
        run.status = status
        self.runs.pop(run.turn_id, None)
        run.publish()


def _salvage(events, fallback: list[ModelMessage]) -> list[ModelMessage]:
    """The messages a failed run produced, if it got far enough to have any."""
    if events is None:
        return fallback
    try:
        return events.new_messages() or fallback
    except Exception:
        return fallback


def _text_of(messages: list[ModelMessage]) -> str:
    """The reply text in `messages` (for replies whose text was never streamed)."""
    return "\n\n".join(
        p.content
        for m in messages
        if isinstance(m, ModelResponse)
        for p in m.parts
        if isinstance(p, TextPart) and p.content
    )


def _has_text(messages: list[ModelMessage]) -> bool:
    return any(
        isinstance(m, ModelResponse) and any(isinstance(p, TextPart) and p.content for p in m.parts)
        for m in messages
    )


def _usage(usage, run: Run) -> dict:
    """Token counts from the provider, and timing measured here.

    Some servers (llama.cpp's, several local ones) send no usage in a stream; pydantic-ai then
    counts zero of both. A reply always has a prompt, so that is "not reported" (None), never a
    real zero to show or to add to a total.
    """
    end = time.monotonic()
    first = run.first_token_at
    streaming = end - first if first else 0.0
    reported = bool(usage.input_tokens or usage.output_tokens)
    output = usage.output_tokens if reported else None
    return {
        "input_tokens": usage.input_tokens if reported else None,
        "output_tokens": output,
        "requests": usage.requests,
        "tool_calls": usage.tool_calls,
        "seconds": round(end - run.started, 3),
        "first_token_seconds": round(first - run.started, 3) if first else None,
        "tokens_per_second": round(output / streaming, 1) if output and streaming > 0 else None,
    }


def _expected(exc: Exception) -> bool:
    return isinstance(exc, ModelAPIError | UsageLimitExceeded | ModelUnavailable | StalledError)


_OVERFLOW_MARKS = ("context_length_exceeded", "maximum context length", "context window")


def _context_overflow(exc: Exception) -> bool:
    """An HTTP 400 that says the prompt does not fit the model's context window (OpenAI, vLLM,
    llama.cpp and others word it in one of a few ways)."""
    if not isinstance(exc, ModelHTTPError) or exc.status_code != 400:
        return False
    said = f"{exc.message} {exc.body}".lower()
    return any(mark in said for mark in _OVERFLOW_MARKS)


def describe_error(exc: Exception) -> str:
    """A message for the user: what went wrong and what to do, never a traceback or a key."""
    if isinstance(exc, ModelUnavailable):
        return str(exc)
    if isinstance(exc, FirstTokenTimeout):
        return (
            "The model did not start its reply in time (FIRST_TOKEN_TIMEOUT), so it was ended. "
            "Try again, or try a shorter conversation."
        )
    if isinstance(exc, StalledError):
        return "The model stopped sending the reply, so it was ended. Try again."
    if isinstance(exc, UsageLimitExceeded):
        return (
            "The reply was stopped because it reached this site's usage limit per reply "
            "(MAX_OUTPUT_TOKENS / MAX_MODEL_REQUESTS)."
        )
    if _context_overflow(exc):
        return (
            "The conversation is too long for this model's context window. Start a new "
            "conversation, or give the model server a larger context (llama.cpp: --n_ctx)."
        )
    if isinstance(exc, ModelHTTPError):
        code = exc.status_code
        if code in (401, 403):
            return f"The model service rejected the credentials (HTTP {code}). Check the API key."
        if code == 404:
            return "The model service does not know this model (HTTP 404). Check MODEL."
        if code == 429:
            return "The model service is rate limiting requests (HTTP 429). Try again shortly."
        return f"The model service answered with an error (HTTP {code}). Try again."
    if isinstance(exc, ModelAPIError):
        return "The model service could not be reached or broke off the reply. Try again."
    if isinstance(exc, UnexpectedModelBehavior) and "without content" in str(exc):
        # llama.cpp's server answers a prompt longer than its context with an empty stream.
        return (
            "The model ended its reply without sending anything. A local model server does "
            "this when the conversation is longer than its context window (llama.cpp: --n_ctx): "
            "start a new conversation, or give the server a larger context."
        )
    if isinstance(exc, UnexpectedModelBehavior):
        return "The model sent a reply that could not be understood. Try again."
    return "Something went wrong while generating this reply. Try again."
