"""A running reply as pydantic-ai stream events, for protocol adapters (Vercel AI, AG-UI).

`reply_events` is the one place that follows a run for an API client: it replays the reply from
its start and then follows it live, as the text deltas and tool calls pydantic-ai's UI event
streams (`VercelAIEventStream`, `AGUIEventStream`) turn into their protocol. It ends as
the reply ends: complete, or by raising `ReplyStopped` / `ReplyFailed` with the reply's own
(generic) message, which the event stream reports as an abort or an error. A reply paused for
tool approval (chat/approvals.py) is no error: it ends normally and tells `on_pause` which calls
wait, so the event stream can ask the client for the decisions; the stream of the resumed reply
can leave out what the client already holds (`shown`).

It reads the reply's run log (chat/runlog.py): each entry carries the source text added since
the one before and the tool calls in between, in the order the run produced them, so a slow
follower, or one in another process (REDIS_URL), sees the same sequence. Tool calls come whole
(`FunctionToolCallEvent`), with no part events for them.

`ended` waits for a reply's end (after a Stop), `beating` interleaves keep-alive beats.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TypeVar

from pydantic_ai.messages import (
    AgentStreamEvent,
    FunctionToolCallEvent,
    FunctionToolResultEvent,
    ModelMessage,
    PartDeltaEvent,
    PartEndEvent,
    PartStartEvent,
    TextPart,
    TextPartDelta,
    ToolCallPart,
    ToolReturnPart,
)

from chat.approvals import AWAITING
from chat.reply import ToolView, segments
from chat.runlog import Entry, ToolUpdate
from chat.runs import Run

T = TypeVar("T")


class ReplyStopped(Exception):
    """The reply was stopped (Stop, or the output limit): what it wrote so far is kept."""


class ReplyFailed(Exception):
    """The reply ended with an error; the message is the one the page shows, never a trace."""


# What a client that cannot decide approvals (no `on_pause`) is told of a paused reply.
PAUSED = "The reply waits for a tool call to be approved in the app."


@dataclass(frozen=True)
class Shown:
    """What a client already holds of a reply that was resumed after an approval: the first
    `chars` characters of its text and its tool calls `calls` (the AI SDK continues the paused
    message it sent back, so these are not streamed to it again)."""

    chars: int = 0
    calls: frozenset[str] = frozenset()


def shown(prior: list[ModelMessage]) -> Shown:
    """What the paused reply (a resumed run's `prior` messages) showed, as its run's seed
    (chat/approvals.py `seed`) puts it back at the start of the run's text."""
    source, calls = "", set()
    for part in segments(prior):
        if isinstance(part, str):
            source += ("\n\n" if source else "") + part
        else:
            calls.add(part.id)
    return Shown(len(source), frozenset(calls))


NOTHING_SHOWN = Shown()


async def reply_events(
    run: Run | AsyncIterator[Entry | None],
    *,
    heartbeat: float = 15.0,
    on_pause: Callable[[list[str]], None] | None = None,
    skip: Shown = NOTHING_SHOWN,
) -> AsyncIterator[AgentStreamEvent]:
    """The reply of `run` (or of a run log being followed, from any process: see
    `RunManager.follow`) from its start as pydantic-ai events, following it until it ends.

    A reply that paused for tool approval ends normally after `on_pause` is given the ids of
    the calls it waits on (the ones announced without a result); without `on_pause` it is
    reported as failed with `PAUSED`. What `skip` says the client already holds is left out."""
    entries = run.follow(0, heartbeat) if isinstance(run, Run) else run
    part: int | None = None  # index of the open text part, if one is open
    index = 0
    unanswered: dict[str, None] = {}  # calls announced without a result yet, in order
    to_skip = skip.chars
    async for entry in entries:
        if entry is None:  # a heartbeat: the caller keeps the connection alive (`beating`)
            continue
        # The log keeps text and items in the order the run produced them: an entry's text
        # came before its items (a tool call ends the text before it).
        delta = entry.text
        if to_skip:
            cut = min(to_skip, len(delta))
            delta, to_skip = delta[cut:], to_skip - cut
            index = index or 1  # the client's text part is the one before this delta
        if part is None and index:  # the blank line the page puts between parts, left out
            delta = delta.lstrip("\n")
        if delta and part is None:
            part, index = index, index + 1
            yield PartStartEvent(index=part, part=TextPart(content=delta))
        elif delta:
            yield PartDeltaEvent(index=part, delta=TextPartDelta(content_delta=delta))
        for item in entry.items:
            if isinstance(item, ToolView) and item.id in skip.calls:
                continue
            if isinstance(item, ToolView):
                if part is not None:
                    yield PartEndEvent(index=part, part=TextPart(content=""))
                    part = None
                yield FunctionToolCallEvent(part=_call(item), args_valid=True)
                unanswered[item.id] = None
            elif isinstance(item, ToolUpdate) and item.tool.outcome != "awaiting":
                yield FunctionToolResultEvent(part=_result(item.tool))
                unanswered.pop(item.tool.id, None)
        if (end := entry.end) is not None:
            if part is not None:
                yield PartEndEvent(index=part, part=TextPart(content=""))
            if end.status == "stopped" and not end.error:
                raise ReplyStopped("stopped")
            if end.status == AWAITING and on_pause is not None:
                on_pause(list(unanswered))
                return
            if end.status == AWAITING:
                raise ReplyFailed(PAUSED)
            if end.status != "complete":
                raise ReplyFailed(end.error or "The reply ended early.")
            return


async def ended(run: Run, timeout: float) -> bool:
    """Wait (at most `timeout` seconds) until `run` has ended, its end saved; True if it has."""

    async def end() -> None:
        async for entry in run.follow(0, timeout):
            if entry is not None and entry.end is not None:
                return

    try:
        await asyncio.wait_for(end(), timeout)
    except TimeoutError:
        return False
    return True


async def beating(stream: AsyncIterator[T], every: float) -> AsyncIterator[T | None]:
    """The items of `stream` as they come, and None after each `every` seconds of silence (for
    a keep-alive comment, so proxies keep a quiet stream open). Closing this closes `stream`."""
    items = aiter(stream)
    pending: asyncio.Future | None = None
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(anext(items))
            done, _ = await asyncio.wait({pending}, timeout=every)
            if not done:
                yield None
                continue
            task, pending = pending, None
            try:
                yield task.result()
            except StopAsyncIteration:
                return
    finally:
        # The client went away (or the stream ended): stop reading the source.
        if pending is not None:
            pending.cancel()
            await asyncio.gather(pending, return_exceptions=True)
        await items.aclose()


def _call(view: ToolView) -> ToolCallPart:
    try:
        args = json.loads(view.args) if view.args else {}
    except ValueError:  # shortened for display, or not JSON at all: passed on as text
        args = {"arguments": view.args}
    if not isinstance(args, dict):
        args = {"arguments": args}
    return ToolCallPart(tool_name=view.name, args=args, tool_call_id=view.id)


def _result(view: ToolView) -> ToolReturnPart:
    outcome = view.outcome if view.outcome in ("success", "failed", "denied", "retried") else None
    return ToolReturnPart(
        tool_name=view.name,
        content=view.result or "",
        tool_call_id=view.id,
        outcome=outcome or "interrupted",
    )
