"""Tool approval: a reply that calls a tool needing approval pauses, and the user's decision
resumes it (pydantic-ai deferred tool requests).

A run whose output is `DeferredToolRequests` ends as `awaiting_approval`: its messages are
saved as usual and each call waiting for a decision becomes a row (store: `add_approvals`), so
the pause survives reloads and restarts. Deciding every call starts a new run on the same turn,
fed the stored messages and `DeferredToolResults`; its reply continues in the same message. A
call left undecided past TOOL_APPROVAL_TTL expires: the turn ends as failed, with a note.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from pydantic_ai import DeferredToolRequests, DeferredToolResults, ToolDenied
from pydantic_ai.messages import (
    ModelMessage,
    ModelRequest,
    ModelResponse,
    RetryPromptPart,
    ToolCallPart,
    ToolReturnPart,
)

from chat.reply import ToolView, segments
from chat.store import load_messages

log = logging.getLogger(__name__)

AWAITING = "awaiting_approval"
DENIED = "The user denied this tool call. Answer without it, and do not call it again unasked."
UNANSWERED = "This tool call was never approved, so it did not run."


def expired_note(ttl: float) -> str:
    """What an expired approval says in its reply."""
    return (
        f"A tool call waited more than {_duration(ttl)} for approval and expired; nothing was "
        "run. Retry to ask again."
    )


SUPERSEDED = (
    "A newer message was sent in this conversation before this tool call was approved, so it "
    "was not run."
)


def _duration(seconds: float) -> str:
    if seconds >= 3600 and seconds % 3600 == 0:
        hours = int(seconds // 3600)
        return f"{hours} hour{'s' if hours != 1 else ''}"
    if seconds >= 60:
        minutes = round(seconds / 60)
        return f"{minutes} minute{'s' if minutes != 1 else ''}"
    return f"{seconds:g} seconds"


@dataclass(frozen=True)
class Resume:
    """What a resumed run needs: the turn's messages so far and the decisions on its calls."""

    prior: list[ModelMessage]
    results: DeferredToolResults


def now() -> datetime:
    """The current time (UTC); tests move it."""
    return datetime.now(UTC)


# Hooks called by chat/runs.py ----------------------------------------------------------------


def run_input(run: Any, turn: dict, history: list[ModelMessage], text_done) -> tuple:
    """The prompt, history and deferred results for a run, and the messages it starts from.

    A resumed run (turn["resume"]) has no new prompt: its history is the conversation plus the
    turn's messages so far, and its reply is seeded with what the paused reply showed. Tool
    calls left unanswered in earlier turns (an approval never given) are answered as not run,
    since models refuse a history with a call that has no result.
    """
    history = close_dangling(history)
    resume: Resume | None = turn.get("resume")
    if resume is None:
        return turn["user_text"], history, None, None
    seed(run, resume, text_done)
    return None, [*history, *resume.prior], resume.results, list(resume.prior)


def seed(run: Any, resume: Resume, text_done) -> None:
    """Show the paused reply again at the start of its resumed run (but not the calls being
    decided: the resumed run announces those itself)."""
    pending = set(resume.results.approvals)
    for part in segments(resume.prior):
        if isinstance(part, str):
            run.renderer.feed(("\n\n" if run.renderer.source else "") + part)
        elif part.id not in pending:
            text_done(run)
            run.items.append(part)
    text_done(run)


def whole(prior: list[ModelMessage] | None, messages: list[ModelMessage]) -> list[ModelMessage]:
    """A resumed run's messages with the turn's earlier ones in front (however it ended)."""
    if not prior or (messages and messages[0] is prior[0]):
        return messages
    return [*prior, *messages]


def outcome(store: Any, run: Any, result: Any, ttl: float) -> str:
    """The status of a run that ended normally: `awaiting_approval` when its output asks for
    approvals (which are stored now), else complete."""
    output = getattr(result, "output", None)
    if not isinstance(output, DeferredToolRequests):
        return "complete"
    calls = [_row(c) for c in output.approvals]
    # Calls run outside the agent (CallDeferred) are not offered here: answered as not run.
    store.add_approvals(run.turn_id, calls, (now() + timedelta(seconds=ttl)).isoformat())
    return AWAITING


def _row(call: ToolCallPart) -> dict:
    view = ToolView.from_call(call)
    return {"tool_call_id": call.tool_call_id, "tool_name": view.name, "args": view.args}


def close_dangling(history: list[ModelMessage]) -> list[ModelMessage]:
    """`history` with a 'not run' result after every tool call that has none."""
    answered = {
        p.tool_call_id
        for m in history
        if isinstance(m, ModelRequest)
        for p in m.parts
        if isinstance(p, ToolReturnPart | RetryPromptPart)
    }
    messages = list(history)
    out: list[ModelMessage] = []
    for i, message in enumerate(messages):
        out.append(messages[i])
        if not isinstance(message, ModelResponse):
            continue
        returns = [
            ToolReturnPart(tool_name=p.tool_name, content=UNANSWERED, tool_call_id=p.tool_call_id)
            for p in message.parts
            if isinstance(p, ToolCallPart) and p.tool_call_id not in answered
        ]
        if not returns:
            continue
        following = messages[i + 1] if i + 1 < len(messages) else None
        if isinstance(following, ModelRequest):
            # The results of one response belong in one request: merged into the next one.
            messages[i + 1] = replace(following, parts=[*returns, *following.parts])
        else:
            out.append(ModelRequest(parts=returns))
    return out


# Deciding ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Decision:
    """What deciding one call led to: `resume` when every call is decided and the run may go on."""

    state: str  # "pending" (others wait) | "resume" | "expired" | "gone"
    turn: dict | None = None


def expired(rows: list[dict]) -> bool:
    """True if the undecided calls of a turn have waited past their expiry."""
    pending = [r for r in rows if r["decision"] is None]
    return bool(pending) and any(datetime.fromisoformat(r["expires_at"]) <= now() for r in pending)


def expire(store: Any, turn: dict, ttl: float, note: str | None = None) -> None:
    """End a turn whose approval expired (or was superseded by a newer message): failed, with
    the note, its calls answered as not run."""
    if store.expire_approvals(turn["id"]):
        messages = close_dangling(load_messages(turn["messages"]))
        store.finish_turn(
            turn["id"],
            status="failed",
            reply_text=turn["reply_text"],
            messages=messages,
            error=note or expired_note(ttl),
        )


def decide(
    store: Any, turn: dict, seq: int, approve: bool, ttl: float, *, latest: bool = True
) -> Decision:
    """Record the decision on call `seq` of `turn` (blocking: the store); say what follows.

    `latest` is False when the conversation has moved on past the turn: resuming it then would
    continue a branch the user has left, so its calls are not run.
    """
    if turn["status"] != AWAITING:
        return Decision("gone")
    rows = store.approvals(turn["id"])
    if not latest:
        expire(store, turn, ttl, SUPERSEDED)
        return Decision("expired")
    if expired(rows):
        expire(store, turn, ttl)
        return Decision("expired")
    if not store.decide_approval(turn["id"], seq, "approved" if approve else "denied"):
        return Decision("gone")
    rows = store.approvals(turn["id"])
    if any(r["decision"] is None for r in rows):
        return Decision("pending")
    # Only one decision (of one process) gets to resume the turn.
    if not store.claim_resume(turn["id"]):
        return Decision("gone")
    results = DeferredToolResults(
        approvals={
            r["tool_call_id"]: True if r["decision"] == "approved" else ToolDenied(DENIED)
            for r in rows
        }
    )
    resumed = {
        **turn,
        "status": "streaming",
        "resume": Resume(load_messages(turn["messages"]), results),
    }
    return Decision("resume", resumed)


def pending_views(rows: list[dict]) -> list[ToolView]:
    """The calls still waiting, as tool views marked as waiting for approval."""
    return [
        ToolView(id=r["tool_call_id"], name=r["tool_name"], args=r["args"], outcome="awaiting")
        for r in rows
        if r["decision"] is None
    ]


def decide_all(
    store: Any,
    turn: dict,
    answers: dict[str, bool],
    ttl: float,
    *,
    latest: bool = True,
) -> Decision:
    """Decide several calls at once by tool call id (a front end such as /api/chat, whose
    AI SDK `tool-approval-response` parts name calls by id); unknown ids are ignored."""
    seqs = {r["tool_call_id"]: r["seq"] for r in store.approvals(turn["id"])}
    decision = Decision("gone")
    for call_id, approve in answers.items():
        if call_id in seqs:
            decision = decide(store, turn, seqs[call_id], approve, ttl, latest=latest)
            if decision.state in ("expired", "resume"):
                break
    return decision
