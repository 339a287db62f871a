"""Message history from outside (imported files, `/api/chat` clients) rebuilt as plain data.

Anything a client writes into a pydantic-ai message is a claim, and several kinds of part make
the server act on the claim: a file URL is fetched (by us or by the provider, private addresses
included), an uploaded-file id or a provider response id reads from the operator's provider
account, a system prompt or `instructions` speaks with the operator's voice, and provider
details, model ids, workspace refs or metadata steer pydantic-ai itself. pydantic-ai's own
`sanitize_messages` strips a list of known dangers; this module is stricter, a whitelist: every
message is rebuilt from scratch out of the few fields we keep, so a field or part type added to
pydantic-ai later is left out until someone decides it is safe.

Kept:
- user text (`UserPromptPart` strings and text items);
- assistant text (`TextPart` content);
- tool calls with their returns, as plain data (name, JSON arguments, text result), only when
  both halves are present in order: history is never executed, and an unanswered call or an
  orphan return would make the provider refuse every later request of the conversation.

Converted: an attachment in a user prompt (file URL, inline bytes, uploaded file) becomes a short
bracketed note, so the model knows something was there without anything being fetched. Only an
import (`max_file_bytes` set) keeps inline bytes: each file is sniffed again, must be what its
media type claims, and is held to the same limits as an upload (chat/attachments.py); one that
fails becomes a note too. A URL is
never fetched, whoever wrote it.

Dropped: system prompts, instructions, retry prompts, thinking, native (provider-run) tools,
files the model produced, compaction parts, and every id, detail or metadata field.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence

from pydantic_ai.messages import (
    BinaryContent,
    ModelMessage,
    ModelRequest,
    ModelResponse,
    TextContent,
    TextPart,
    ToolCallPart,
    ToolReturnPart,
    UserPromptPart,
)
from pydantic_core import to_json

from chat import attachments

# What OpenAI and Anthropic accept as a tool name; anything else makes them refuse the request.
_TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
_CALL_ID = re.compile(r"[A-Za-z0-9_.:-]{1,128}")


def attachment_note(kind: str) -> str:
    """The text that stands in for an attachment that was left out."""
    return f"[an attachment ({kind}) was left out: this history came from outside the server]"


def clean(
    messages: Sequence[ModelMessage], *, max_file_bytes: int | None = None, max_files: int = 0
) -> list[ModelMessage]:
    """`messages` rebuilt from their user text, assistant text and paired tool calls only;
    with `max_file_bytes`, also the inline files of user prompts that pass an upload's checks
    (at most `max_files` a prompt), as `BinaryContent` whose identifier is the file's name."""
    paired = _paired_calls(messages)
    files = (max_file_bytes, max_files) if max_file_bytes else None
    out: list[ModelMessage] = []
    for i, message in enumerate(messages):
        keep = paired.get(i, set())
        if isinstance(message, ModelRequest):
            parts = [p for part in message.parts if (p := _request_part(part, keep, files))]
            if parts:
                out.append(ModelRequest(parts=parts, timestamp=message.timestamp))
        elif isinstance(message, ModelResponse):
            parts = [p for part in message.parts if (p := _response_part(part, keep))]
            if parts:
                out.append(ModelResponse(parts=parts, timestamp=message.timestamp))
    return out


def _request_part(part, keep: set[str], files=None) -> UserPromptPart | ToolReturnPart | None:
    if type(part) is UserPromptPart:
        if files is not None and not isinstance(part.content, str):
            content = _user_content(part.content, *files)
        else:
            content = _user_text(part.content)
        return UserPromptPart(content=content, timestamp=part.timestamp)
    if type(part) is ToolReturnPart and part.tool_call_id in keep:
        keep.discard(part.tool_call_id)  # one return per call
        return ToolReturnPart(
            tool_name=part.tool_name,
            content=_plain(part.content),
            tool_call_id=part.tool_call_id,
            outcome=part.outcome,
            timestamp=part.timestamp,
        )
    return None


def _response_part(part, keep: set[str]) -> TextPart | ToolCallPart | None:
    if type(part) is TextPart:
        return TextPart(content=part.content) if part.content else None
    if type(part) is ToolCallPart and part.tool_call_id in keep:
        keep.discard(part.tool_call_id)  # one call per id
        return ToolCallPart(
            tool_name=part.tool_name, args=part.args_as_dict(), tool_call_id=part.tool_call_id
        )
    return None


def _user_text(content) -> str:
    if isinstance(content, str):
        return content
    texts = []
    for item in content:
        if isinstance(item, str):
            texts.append(item)
        elif isinstance(item, TextContent):
            texts.append(item.content)
        elif kind := getattr(item, "kind", None):  # a cache point has none: nothing to say
            texts.append(attachment_note(str(kind)[:40]))
    return "\n\n".join(texts)


# The note an export writes before each file (chat/attachments.py `note`): it names the file.
_NOTE = re.compile(r"\[Attached file: (.+) \([^()]*\)\]")


def _user_content(content, max_bytes: int, max_files: int) -> str | list:
    """A user prompt's text, then its inline files that pass an upload's checks."""
    texts: list[str] = []
    files: list[BinaryContent] = []
    label = ""
    for item in content:
        if isinstance(item, str | TextContent):
            text = item if isinstance(item, str) else item.content
            if note := _NOTE.fullmatch(text):
                label = note.group(1)  # names the file that follows; a fresh note replaces it
            else:
                texts.append(text)
            continue
        if isinstance(item, BinaryContent) and len(files) < max_files:
            try:
                name, media_type = attachments.check(item.data, label, max_bytes)
                # The file's claim must match its bytes (text may say plain or Markdown).
                if media_type != item.media_type and not (
                    media_type in attachments.TEXT_TYPES
                    and item.media_type in attachments.TEXT_TYPES
                ):
                    raise attachments.AttachmentError("its bytes are not what it claims")
            except attachments.AttachmentError:
                texts.append(attachment_note("a file this site does not accept"))
            else:
                files.append(BinaryContent(item.data, media_type=media_type, identifier=name))
        elif kind := getattr(item, "kind", None):
            texts.append(attachment_note(str(kind)[:40]))
        label = ""
    text = "\n\n".join(texts)
    return [text, *files] if files else text


def _plain(content) -> str:
    """A tool result as text: nested file parts become inert JSON, never fetched."""
    if isinstance(content, str):
        return content
    try:
        return to_json(content, fallback=str).decode()
    except Exception:  # a value pydantic cannot dump: its text is enough for the model
        return str(content)


def _valid_call(part: ToolCallPart) -> bool:
    if not (_TOOL_NAME.fullmatch(part.tool_name) and _CALL_ID.fullmatch(part.tool_call_id)):
        return False
    try:
        args = part.args_as_dict()
    except (ValueError, TypeError):
        return False
    return isinstance(args, dict) and _jsonable(args)


def _jsonable(value: object) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


def _paired_calls(messages: Sequence[ModelMessage]) -> dict[int, set[str]]:
    """For each message's index, the ids of its tool calls (or returns) to keep: well-formed
    calls answered by a return in the very next request, and those returns."""
    paired: dict[int, set[str]] = {}
    for i in range(len(messages) - 1):
        message, following = messages[i], messages[i + 1]
        if not (isinstance(message, ModelResponse) and isinstance(following, ModelRequest)):
            continue
        calls = {
            p.tool_call_id for p in message.parts if type(p) is ToolCallPart and _valid_call(p)
        }
        returns = {p.tool_call_id for p in following.parts if type(p) is ToolReturnPart}
        if both := calls & returns:
            paired[i] = set(both)
            paired[i + 1] = set(both)
    return paired
