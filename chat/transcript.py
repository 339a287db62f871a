"""Conversations as files: Markdown for people, pydantic-ai message JSON for programs.

Attachments: the Markdown lists each message's files by name, type and size; the JSON carries
them whole, each as `BinaryContent` (base64) after its note, so a history exported here can be
fed to pydantic-ai as it is and imported here again (re-sniffed and held to the upload limits).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import replace

from pydantic import ValidationError
from pydantic_ai.messages import (
    BinaryContent,
    ModelMessage,
    ModelMessagesTypeAdapter,
    ModelRequest,
    ModelResponse,
    UserPromptPart,
)

from chat import attachments, untrusted
from chat.store import load_messages, new_id

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
                replace(messages[i], metadata=meta),
                *messages[i + 1 :],
            ]
    return messages


# Reads the bytes of attachments by id (the owner's only): `ChatStore.attachment_data`, bound.
FileReader = Callable[[list[str]], dict[str, bytes]]


def to_json(turns: list[dict], files: FileReader | None = None) -> bytes:
    """The branch as pydantic-ai message JSON (ModelMessagesTypeAdapter); with `files`, each
    attachment's bytes follow its note. A reply's feedback rides in its response's `metadata`
    (`{"feedback": "up"}`)."""
    messages: list[ModelMessage] = []
    for turn in turns:
        messages.extend(_with_feedback(load_messages(turn["messages"]), turn.get("feedback")))
    if files is not None:
        messages = _with_files(messages, files)
    return ModelMessagesTypeAdapter.dump_json(messages, indent=2)


def _with_files(messages: list[ModelMessage], files: FileReader) -> list[ModelMessage]:
    refs = [r for m in messages for r in _notes(m)]
    data = files([r["id"] for r in refs]) if refs else {}
    if not data:
        return messages
    out = []
    for message in messages:
        if isinstance(message, ModelRequest) and _notes(message):
            parts = []
            for part in message.parts:
                if isinstance(part, UserPromptPart) and not isinstance(part.content, str):
                    content = []
                    for item in part.content:
                        content.append(item)
                        ref = attachments.ref_of(item)
                        if ref and ref["id"] in data:
                            content.append(
                                BinaryContent(data[ref["id"]], media_type=ref["media_type"])
                            )
                    part = replace(part, content=content)
                parts.append(part)
            message = replace(message, parts=parts)
        out.append(message)
    return out


def _notes(message: ModelMessage) -> list[dict]:
    if not isinstance(message, ModelRequest):
        return []
    return [
        ref
        for part in message.parts
        if isinstance(part, UserPromptPart) and not isinstance(part.content, str)
        for item in part.content
        if (ref := attachments.ref_of(item))
    ]


def to_markdown(title: str, turns: list[dict]) -> str:
    """The branch as a Markdown transcript."""
    lines = [f"# {title or 'Conversation'}", ""]
    for turn in turns:
        lines += ["## User", "", turn["user_text"], ""]
        if files := attachments.refs(turn):
            for f in files:
                size = attachments.human_size(f["size"]) if f.get("size") else ""
                lines.append(
                    f"- Attached: {f['name']} ({f['media_type']}{', ' + size if size else ''})"
                )
            lines.append("")
        lines += ["## Assistant", ""]
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
    prompted = False
    for part in message.parts:
        if isinstance(part, UserPromptPart):
            prompted = True
            if isinstance(part.content, str):
                texts.append(part.content)
            else:
                texts.extend(c for c in part.content if isinstance(c, str))
    # A prompt of files alone (attachments) starts a turn too, with no text.
    return "\n\n".join(texts) if texts or prompted else None


def split_turns(
    raw: bytes,
    max_turns: int = MAX_IMPORT_TURNS,
    *,
    max_file_bytes: int = 10_000_000,
    max_files: int = 5,
) -> list[dict]:
    """Validate an exported JSON file, keep only what is safe to hold (see chat/untrusted.py),
    and cut it into turns, each starting at a user prompt. A turn's files (held to the upload
    limits) are in its `files`, with ids; its messages keep their notes."""
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
    turns = turns_of(messages, max_turns, max_file_bytes=max_file_bytes, max_files=max_files)
    if len(feedback) == len(turns):  # the same exchanges as before cleaning: keep the ratings
        for turn, value in zip(turns, feedback, strict=True):
            turn["feedback"] = value
    return turns


def turns_of(
    messages: list[ModelMessage],
    max_turns: int = MAX_IMPORT_TURNS,
    *,
    max_file_bytes: int = 10_000_000,
    max_files: int = 5,
) -> list[dict]:
    """Outside history (a file, an API client's) cleaned and cut into turns, each starting at
    a user prompt. A turn's files (held to the upload limits) are in its `files`, with ids."""
    # It is someone's claim about a conversation: it keeps text and paired tool calls,
    # nothing that would make the server fetch, reference or obey anything.
    messages = untrusted.clean(messages, max_file_bytes=max_file_bytes, max_files=max_files)
    turns: list[dict] = []
    for message in messages:
        prompt = _prompt_text(message)
        if prompt is not None:
            if len(turns) == max_turns:
                raise ImportError_(
                    f"The conversation has more than {max_turns:,} exchanges, the most "
                    "this site imports. Split it, or ask the operator to raise MAX_IMPORT_TURNS."
                )
            turns.append({"user_text": prompt, "messages": [], "reply_text": "", "files": []})
        if not turns:
            raise ImportError_("The history must start with a user message.")
        message = _take_files(message, turns[-1]["files"])
        turns[-1]["messages"].append(message)
        if isinstance(message, ModelResponse):
            if text := message.text:
                sep = "\n\n" if turns[-1]["reply_text"] else ""
                turns[-1]["reply_text"] += sep + text
    if not turns:
        raise ImportError_("The file holds no messages.")
    return turns


def _take_files(message: ModelMessage, files: list[dict]) -> ModelMessage:
    """`message` with each file of its user prompts moved to `files` and replaced by its note."""
    if not isinstance(message, ModelRequest):
        return message
    parts = []
    for part in message.parts:
        if isinstance(part, UserPromptPart) and not isinstance(part.content, str):
            content = []
            for item in part.content:
                if isinstance(item, BinaryContent):
                    file = {
                        "id": new_id(),
                        "name": item.identifier,
                        "media_type": item.media_type,
                        "size": len(item.data),
                    }
                    files.append({**file, "data": item.data})
                    item = attachments.note(file)
                content.append(item)
            part = replace(part, content=content)
        parts.append(part)
    return replace(message, parts=parts)


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


def json_chunks(pages: Iterable[list[dict]], files: FileReader | None = None) -> Iterator[bytes]:
    """`to_json` a page of turns at a time: the same JSON array, written in pieces."""
    yield b"["
    first = True
    for turns in pages:
        body = to_json(turns, files)  # "[\n  {...},\n  {...}\n]" or "[]"
        if body.strip() == b"[]":
            continue
        yield (b"\n" if first else b",\n") + body[1:-1].strip(b"\n")
        first = False
    yield b"\n]" if not first else b"]"
