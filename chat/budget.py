"""The history a reply's model is given: the newest whole exchanges that fit a budget.

A conversation can outgrow the model's context window (the provider then refuses every reply)
and grows the cost of each request with its length. So the history is cut, oldest first, to at
most `max_messages` pydantic-ai messages and `max_chars` characters (a stand-in for tokens that
needs no tokenizer). An exchange (a user prompt and everything up to the next one: replies,
tool calls and their returns) is kept or left out whole, so a tool call is never separated
from its return. When anything is left out, `note` says so, for the user to see in the reply.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

from pydantic_ai.messages import (
    ModelMessage,
    ModelRequest,
    SystemPromptPart,
    ToolCallPart,
    UserPromptPart,
)


@dataclass(frozen=True)
class Budgeted:
    """The history to send, and how many of its exchanges it keeps of how many."""

    messages: list[ModelMessage]
    kept: int
    total: int

    @property
    def note(self) -> str | None:
        """What to tell the user when exchanges were left out (None when none were)."""
        if self.kept == self.total:
            return None
        return (
            "Earlier messages were left out: this conversation is longer than the model is "
            f"given ({self.kept} of {self.total} earlier exchanges were sent)."
        )


def exchanges(messages: Sequence[ModelMessage]) -> list[list[ModelMessage]]:
    """`messages` cut into exchanges, each starting at a request with a user prompt."""
    out: list[list[ModelMessage]] = []
    for message in messages:
        starts = isinstance(message, ModelRequest) and any(
            isinstance(p, UserPromptPart) for p in message.parts
        )
        if starts or not out:
            out.append([])
        out[-1].append(message)
    return out


def size(message: ModelMessage) -> int:
    """Characters of what the model reads in `message` (text, arguments, results)."""
    total = 0
    for part in message.parts:
        if isinstance(part, ToolCallPart):
            args = part.args
            total += len(args) if isinstance(args, str) else len(json.dumps(args or {}))
            continue
        content = getattr(part, "content", None)
        if isinstance(content, str):
            total += len(content)
        elif content is not None:
            total += len(json.dumps(content, default=str))
    return total


def fit(
    messages: Sequence[ModelMessage], *, max_messages: int | None, max_chars: int | None
) -> Budgeted:
    """The newest whole exchanges of `messages` within both budgets (None: no limit)."""
    groups = exchanges(messages)
    if max_messages is None and max_chars is None:
        return Budgeted(list(messages), len(groups), len(groups))
    kept: list[list[ModelMessage]] = []
    count = chars = 0
    for group in reversed(groups):
        count += len(group)
        chars += sum(size(m) for m in group)
        if (max_messages is not None and count > max_messages) or (
            max_chars is not None and chars > max_chars
        ):
            break
        kept.append(group)
    kept.reverse()
    out = [m for group in kept for m in group]
    if len(kept) < len(groups):
        # A system prompt at the start of the conversation is the operator's, not an exchange:
        # it stays when the exchange it came with is left out.
        first = groups[0][0]
        if isinstance(first, ModelRequest):
            if system := [p for p in first.parts if isinstance(p, SystemPromptPart)]:
                out.insert(0, ModelRequest(parts=system))
    return Budgeted(out, len(kept), len(groups))
