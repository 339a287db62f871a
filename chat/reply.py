"""A reply as what the page shows: markdown text and tool calls, in order.

Live runs build these as events arrive; stored replies are rebuilt from their pydantic-ai
messages, so a reloaded reply shows the same tool calls it showed while streaming.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from pydantic_ai.messages import (
    ModelMessage,
    ModelRequest,
    ModelResponse,
    RetryPromptPart,
    TextPart,
    ToolCallPart,
    ToolReturnPart,
)

RESULT_LIMIT = 4000


@dataclass
class ToolView:
    """One tool call as shown: name, arguments, then (once known) its result and outcome."""

    id: str
    name: str
    args: str
    result: str | None = None
    outcome: str | None = None  # success | failed | retried | denied | interrupted

    @classmethod
    def from_call(cls, part: ToolCallPart) -> ToolView:
        """A view of a tool call whose result is not known yet.

        The arguments come from the model: invalid JSON, huge or deeply nested values and text
        that is not valid Unicode are shown (shortened, repaired) rather than raised.
        """
        return cls(
            id=_text(str(part.tool_call_id))[:200],
            name=_text(str(part.tool_name))[:200],
            args=_cap(_text(_pretty_args(part.args))),
        )

    def settle(self, part: ToolReturnPart | RetryPromptPart) -> None:
        """Record the tool's result (or the retry it asked for)."""
        if isinstance(part, RetryPromptPart):
            self.outcome, content = "retried", part.model_response()
        else:
            self.outcome, content = part.outcome, part.content
        text = content if isinstance(content, str) else _json(content)
        self.result = _cap(_text(text))


def _json(value: object) -> str:
    try:
        return json.dumps(value, ensure_ascii=False, indent=1, default=str)
    except (TypeError, ValueError, RecursionError):
        return _cap(str(value)) if not isinstance(value, dict | list) else "(too deeply nested)"


def _pretty_args(args: str | dict | None) -> str:
    """Tool-call arguments as indented JSON, or as sent when they are not a JSON object."""
    if not args:
        return ""
    if isinstance(args, str):
        if len(args) > RESULT_LIMIT * 4:
            return args  # too long to be worth parsing just to be shown shortened
        try:
            args = json.loads(args)
        except (ValueError, RecursionError):
            return args
        if not args:
            return ""
    return _json(args)


def _cap(text: str) -> str:
    return text if len(text) <= RESULT_LIMIT else text[:RESULT_LIMIT] + " …"


def _text(text: str) -> str:
    """`text` with anything UTF-8 cannot encode (lone surrogates) replaced, so it can be shown."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    return text


def segments(messages: list[ModelMessage], fallback_text: str = "") -> list[str | ToolView]:
    """Markdown strings and ToolViews, in order, for a stored reply."""
    out: list[str | ToolView] = []
    tools: dict[str, ToolView] = {}
    for message in messages:
        if isinstance(message, ModelResponse):
            for part in message.parts:
                if isinstance(part, TextPart) and part.content:
                    if out and isinstance(out[-1], str):
                        out[-1] += "\n\n" + part.content
                    else:
                        out.append(part.content)
                elif isinstance(part, ToolCallPart):
                    view = ToolView.from_call(part)
                    tools[view.id] = view
                    out.append(view)
        elif isinstance(message, ModelRequest):
            for part in message.parts:
                if (
                    isinstance(part, ToolReturnPart | RetryPromptPart)
                    and part.tool_call_id in tools
                ):
                    tools[part.tool_call_id].settle(part)
    if not any(isinstance(s, str) for s in out) and fallback_text:
        out.append(fallback_text)  # e.g. a reply interrupted by a crash: only its text was saved
    return out
