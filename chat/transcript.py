"""Conversations as files: Markdown for people, pydantic-ai message JSON for programs."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator

from pydantic import ValidationError
from pydantic_ai.messages import (
    ModelMessage,
    ModelMessagesTypeAdapter,
    ModelRequest,
    ModelResponse,
    UserPromptPart,
)

from chat import untrusted
from chat.store import load_messages

MAX_IMPORT_BYTES = 5_000_000
MAX_IMPORT_TURNS = 500


class ImportError_(ValueError):
    """The uploaded file is not a conversation we can import; the message says why."""


FEEDBACK = ("up", "down")
FEEDBACK_WORDS = {"up": "good", "down": "bad"}


def branch_messages(turns: list[dict]) -> list[ModelMessage]:
    """All pydantic-ai messages of a branch, oldest first: ready to use as `message_history`."""
    out: list[ModelMessage] = []
    for turn in turns:
        out.extend(load_messages(turn["messages"]))
    return out


def _with_feedback(messages: list[ModelMessage], feedback: str | None) -> list[ModelMessage]:
    """A turn's messages with its thumbs up/down in the last response's `metadata`."""
    if feedback not in FEEDBACK:
        return messages
    for i in range(len(messages) - 1, -1, -1):
        if isinstance(messages[i], ModelResponse):
            meta = {**(messages[i].metadata or {}), "feedback": feedback}
            return [
                *messages[:i],
                dataclasses.replace(messages[i], metadata=meta),
                *messages[i + 1 :],
            ]
    return messages


def to_json(turns: list[dict]) -> bytes:
    """The branch as pydantic-ai message JSON (ModelMessagesTypeAdapter); a reply's feedback
    rides in its response's `metadata` (`{"feedback": "up"}`)."""
    messages: list[ModelMessage] = []
    for turn in turns:
        messages.extend(_with_feedback(load_messages(turn["messages"]), turn.get("feedback")))
    return ModelMessagesTypeAdapter.dump_json(messages, indent=2)


def to_markdown(title: str, turns: list[dict]) -> str:
    """The branch as a Markdown transcript."""
    lines = [f"# {title or 'Conversation'}", ""]
    for turn in turns:
        lines += ["## User", "", turn["user_text"], "", "## Assistant", ""]
        lines.append(turn["reply_text"] or "_(no reply)_")
        if turn.get("feedback") in FEEDBACK:
            lines += ["", f"_(rated {FEEDBACK_WORDS[turn['feedback']]})_"]
        if turn["status"] != "complete":
            lines += [
                "",
                f"_(reply {turn['status']}{': ' + turn['error'] if turn['error'] else ''})_",
            ]
        lines.append("")
    return "\n".join(lines)


def _prompt_text(message: ModelMessage) -> str | None:
    if not isinstance(message, ModelRequest):
        return None
    texts = []
    for part in message.parts:
        if isinstance(part, UserPromptPart):
            if isinstance(part.content, str):
                texts.append(part.content)
            else:
                texts.extend(c for c in part.content if isinstance(c, str))
    return "\n\n".join(texts) if texts else None


def split_turns(raw: bytes, max_turns: int = MAX_IMPORT_TURNS) -> list[dict]:
    """Validate an exported JSON file, keep only what is safe to hold (see chat/untrusted.py),
    and cut it into turns, each starting at a user prompt."""
    if len(raw) > MAX_IMPORT_BYTES:
        raise ImportError_(f"The file is larger than {MAX_IMPORT_BYTES // 1_000_000} MB.")
    try:
        messages = ModelMessagesTypeAdapter.validate_json(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        raise ImportError_(
            "This is not a pydantic-ai message history (ModelMessagesTypeAdapter JSON): "
            f"{first.get('msg', 'invalid')}{' at ' + where if where else ''}."
        ) from None
    feedback = _feedback_per_turn(messages)
    # The file is someone's claim about a conversation: it keeps text and paired tool calls,
    # nothing that would make the server fetch, reference or obey anything.
    messages = untrusted.clean(messages)
    turns: list[dict] = []
    for message in messages:
        prompt = _prompt_text(message)
        if prompt is not None:
            if len(turns) == max_turns:
                raise ImportError_(
                    f"The conversation has more than {max_turns:,} exchanges, the most "
                    "this site imports. Split it, or ask the operator to raise MAX_IMPORT_TURNS."
                )
            turns.append({"user_text": prompt, "messages": [], "reply_text": ""})
        if not turns:
            raise ImportError_("The history must start with a user message.")
        turns[-1]["messages"].append(message)
        if isinstance(message, ModelResponse):
            if text := message.text:
                sep = "\n\n" if turns[-1]["reply_text"] else ""
                turns[-1]["reply_text"] += sep + text
    if not turns:
        raise ImportError_("The file holds no messages.")
    if len(feedback) == len(turns):  # the same exchanges as before cleaning: keep the ratings
        for turn, value in zip(turns, feedback, strict=True):
            turn["feedback"] = value
    return turns


def _feedback_per_turn(messages: list[ModelMessage]) -> list[str | None]:
    """For each exchange (a user prompt and what follows), the feedback its file records."""
    out: list[str | None] = []
    for message in messages:
        if _prompt_text(message) is not None:
            out.append(None)
        elif out and isinstance(message, ModelResponse) and message.metadata:
            value = message.metadata.get("feedback")
            if value in FEEDBACK:
                out[-1] = value
    return out


def markdown_chunks(title: str, pages: Iterable[list[dict]]) -> Iterator[str]:
    """`to_markdown` a page of turns at a time, for streaming a long branch out."""
    heading = f"# {title or 'Conversation'}\n"
    yield heading
    for turns in pages:
        if turns:
            # to_markdown's own heading, cut off: each page continues the same transcript.
            yield "\n" + to_markdown(title, turns)[len(heading) + 1 :]


def json_chunks(pages: Iterable[list[dict]]) -> Iterator[bytes]:
    """`to_json` a page of turns at a time: the same JSON array, written in pieces."""
    yield b"["
    first = True
    for turns in pages:
        body = to_json(turns)  # "[\n  {...},\n  {...}\n]" or "[]"
        if body.strip() == b"[]":
            continue
        yield (b"\n" if first else b",\n") + body[1:-1].strip(b"\n")
        first = False
    yield b"\n]" if not first else b"]"
