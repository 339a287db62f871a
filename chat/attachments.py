"""Attachments: files sent with a message, judged by their bytes, kept apart from the history.

The flow, as people know it from other chat sites: a file is uploaded at once and kept as the
user's *pending* attachment; the composer lists it; sending the message binds it to the new
turn. Nothing about a file is believed from the client: its type is sniffed from its first
bytes (PNG, JPEG, GIF, WebP, PDF) or it must be clean UTF-8 text; its name is only a label
(and picks Markdown over plain text); SVG is refused, since it can carry scripts.

What reaches the model: the turn's user prompt is the text, then for each file a short note
naming it, then the file: images and PDFs as `BinaryContent` with the sniffed media type, text
and Markdown files as text (inside a `<file name="...">` wrapper), which every model can read.
A model whose pydantic-ai profile says it cannot take an image or a PDF is refused before the
message is committed (the composer says so and keeps the text and files), and a reply that
still meets one (a regenerate after switching models) fails with that message.

What is stored: the bytes in the `attachments` table (migration m007); the turn lists its files
in `turns.attachments`; the turn's pydantic-ai messages keep only the note, a `TextContent`
whose `metadata` names the file. Reading a conversation's history for the next reply therefore
reads no file bytes. When a reply's request is built, the newest `HISTORY_FILES` earlier files
of the branch are read back and sent again (a model has no memory of an image it saw last
turn); older ones stay notes, so a long conversation with many images costs a bounded request.

Why this module is long: it is the one place that knows the whole path of a file (accepted,
claimed by a message, sent, stored, sent again); split, each half would need the other's rules.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta

from pydantic_ai.messages import (
    BinaryContent,
    ModelMessage,
    ModelRequest,
    TextContent,
    UserPromptPart,
)

from chat.agent import ModelUnavailable

IMAGE_TYPES = ("image/png", "image/jpeg", "image/gif", "image/webp")
PDF = "application/pdf"
TEXT_TYPES = ("text/plain", "text/markdown")
# Earlier files re-sent with each reply's request, newest first; older ones stay notes.
HISTORY_FILES = 4
# Pending (uploaded, not sent) files one user may hold, per file allowed in a message.
PENDING_PER_SLOT = 4
# A pending file not sent within this time is dropped at that user's next upload.
PENDING_FOR = timedelta(days=1)
ACCEPTED = "Attach images (PNG, JPEG, GIF, WebP), PDFs, or text and Markdown files."
_MARKDOWN_NAMES = (".md", ".markdown", ".mdown", ".mkd")
# C0 controls other than tab, line feed, form feed and carriage return, and DEL: not text.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0e-\x1f\x7f]")
_SVG = re.compile(rb"<svg[\s>]", re.IGNORECASE)


class AttachmentError(ValueError):
    """A file (or a set of files) that cannot be accepted; the message says why and what to do."""

    def __init__(self, message: str, status: int = 422):
        super().__init__(message)
        self.status = status


class FilesUnsupported(ModelUnavailable):
    """The reply's model cannot read a file of its prompt (shown as the reply's error)."""

    for_users = True  # its message says what to do; there is nothing for the operator in it


def sniff(data: bytes, name: str) -> str:
    """The media type of `data` judged by its bytes; AttachmentError if it is not accepted."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "image/gif"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    if data.startswith(b"%PDF-"):
        return PDF
    if name.lower().endswith((".svg", ".svgz")) or _SVG.search(data[:4096]):
        raise AttachmentError(
            "SVG images are not accepted (they can carry scripts). Send a PNG or JPEG.", 415
        )
    if _text(data) is None:
        raise AttachmentError(f"That kind of file is not accepted. {ACCEPTED}", 415)
    return "text/markdown" if name.lower().endswith(_MARKDOWN_NAMES) else "text/plain"


def _text(data: bytes) -> str | None:
    """`data` as text if it is UTF-8 without control characters (a byte order mark allowed)."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        return None
    return None if _CONTROL.search(text) else text


def clean_name(name: str | None, media_type: str = "") -> str:
    """A file name fit to show and to send: no folders, no control characters, not too long."""
    name = re.split(r"[/\\]", name or "")[-1]
    name = re.sub(r"[\x00-\x1f\x7f\u2028\u2029]", "", name).strip()
    if not name:
        ext = {"image/jpeg": "jpg", PDF: "pdf", "text/markdown": "md", "text/plain": "txt"}
        name = f"file.{ext.get(media_type, media_type.rpartition('/')[2] or 'bin')}"
    if len(name) > 120:
        stem, dot, ext = name.rpartition(".")
        name = f"{stem[: 110 - len(ext)]}…{dot}{ext}" if dot and len(ext) <= 8 else name[:120]
    return name


def check(data: bytes, name: str | None, max_bytes: int) -> tuple[str, str]:
    """(clean name, sniffed media type) of an acceptable file; AttachmentError otherwise."""
    if not data:
        raise AttachmentError("That file is empty.")
    if len(data) > max_bytes:
        size, limit = human_size(len(data)), human_size(max_bytes)
        if size == limit:  # "1 KB; the limit is 1 KB" would say nothing
            size, limit = f"{len(data):,} bytes", f"{max_bytes:,} bytes"
        raise AttachmentError(f"That file is {size}; the limit is {limit}.", 413)
    media_type = sniff(data, name or "")
    return clean_name(name, media_type), media_type


def human_size(size: int) -> str:
    """1 234 567 -> '1.2 MB': sizes as people read them."""
    if size < 1000:
        return f"{size} bytes"
    if size < 1_000_000:
        return f"{size / 1000:.0f} KB"
    return f"{size / 1_000_000:.1f} MB"


def is_image(media_type: str) -> bool:
    """True for the raster image types that are shown (and served) inline."""
    return media_type in IMAGE_TYPES


def ref(row: dict) -> dict:
    """What a turn lists of a file: id, name, media type and size (never its bytes)."""
    return {k: row[k] for k in ("id", "name", "media_type", "size")}


def refs(turn: dict) -> list[dict]:
    """The files listed with `turn` (its `attachments` column), oldest first."""
    raw = turn.get("attachments")
    if not raw:
        return []
    try:
        files = json.loads(raw)
    except ValueError:
        return []
    return [f for f in files if isinstance(f, dict) and {"id", "name", "media_type"} <= set(f)]


def stale_before() -> str:
    """The upload time before which a pending file is dropped (ISO, as the store writes it)."""
    return (datetime.now(UTC) - PENDING_FOR).isoformat(timespec="milliseconds")


# Sending -------------------------------------------------------------------------------------


def claim(store, runs, owner: str, ids: Sequence[str], models: Sequence[str], max_count: int):
    """The files `ids` for a message to `models`: each pending and `owner`'s, no more than
    `max_count`, and readable by every model. AttachmentError (changing nothing) otherwise."""
    ids = list(dict.fromkeys(i for i in ids if i))
    if not ids:
        return []
    if len(ids) > max_count:
        raise AttachmentError(f"A message can carry {max_count} files at most. Remove some.")
    files = store.pending_attachments(owner, ids)
    if len(files) != len(ids):
        raise AttachmentError(
            "A file of this message was already sent or removed. Remove it and attach it again.",
            409,
        )
    for name in models:
        try:
            profile = runs.model_for(name).profile
        except ModelUnavailable:
            continue  # the reply will say why the model cannot start
        if what := unsupported(files, profile):
            raise AttachmentError(_cannot(name, what))
    return [ref(f) for f in files]


def _cannot(model: str, what: str) -> str:
    who = "The offline demo model" if model == "demo" else f"The model {model}"
    return (
        f"{who} cannot read {what}. Choose a model that can, or remove those files "
        "(text and Markdown files work with every model)."
    )


def unsupported(files: Sequence[dict], profile) -> str | None:
    """What among `files` a model with `profile` cannot read ('images', 'PDFs'), or None."""
    kinds = {f["media_type"] for f in files}
    if any(is_image(k) for k in kinds) and not profile.get("supports_image_input", True):
        return "images"
    if PDF in kinds:
        documents = profile.get("supported_document_media_types")
        if not profile.get("supports_document_input", True) or (
            documents is not None and PDF not in documents
        ):
            return "PDFs"
    return None


def add_imported(store, owner: str, conv: dict, turns: list[dict]) -> None:
    """Store the files of an imported conversation (`turns` from transcript.split_turns) with
    the turns the store made of them."""
    if not any(t.get("files") for t in turns):
        return
    made = store.branch(conv["head_turn_id"])
    for row, turn in zip(made, turns, strict=True):
        if turn.get("files"):
            store.add_turn_attachments(row["id"], owner, turn["files"])


def bind(store, turn: dict, owner: str, files: Sequence[dict]) -> None:
    """List `files` as `turn`'s (binding those still pending to it), in the store and in `turn`."""
    store.bind_attachments(turn["id"], owner, files)
    turn["attachments"] = json.dumps(list(files)) if files else None


# The model's input ---------------------------------------------------------------------------


def note(file: dict) -> TextContent:
    """The stored stand-in for a file: a line the model reads, and the file's ref as metadata."""
    size = f", {human_size(file['size'])}" if file.get("size") else ""
    return TextContent(
        f"[Attached file: {file['name']} ({file['media_type']}{size})]",
        metadata={"attachment": ref({"size": 0, **file})},
    )


def ref_of(item) -> dict | None:
    """The file a note stands for (its metadata), if `item` is one of our notes."""
    if isinstance(item, TextContent) and isinstance(item.metadata, dict):
        file = item.metadata.get("attachment")
        if isinstance(file, dict) and {"id", "name", "media_type"} <= set(file):
            return file
    return None


def _content(file: dict, data: bytes) -> list:
    """A file as the model gets it: its note, then its bytes (or, for text, its text)."""
    if file["media_type"] in TEXT_TYPES:
        text = (_text(data) or "").replace("</file>", "<\\/file>")
        name = file["name"].replace('"', "'")
        wrapped = f'<file name="{name}">\n{text}\n</file>'
        return [TextContent(wrapped, metadata={"attachment": file, "inline": True})]
    return [note(file), BinaryContent(data, media_type=file["media_type"], identifier=file["id"])]


def prompt(store, turn: dict, owner: str, profile) -> str | list:
    """The user prompt of `turn`: its text, or its text and its files."""
    files = refs(turn)
    if not files:
        return turn["user_text"]
    if what := unsupported(files, profile):
        raise FilesUnsupported(_cannot(turn.get("model") or "demo", what))
    data = store.attachment_data(owner, [f["id"] for f in files])
    # Files sent without words: no empty text part (some providers refuse one).
    content: list = [turn["user_text"]] if turn["user_text"].strip() else []
    for file in files:
        if file["id"] in data:
            content += _content(file, data[file["id"]])
        else:  # its conversation was imported without it, or it was erased
            content.append(note(file))
    return content


def rehydrate(store, owner: str, history: list[ModelMessage], profile) -> list[ModelMessage]:
    """`history` with the newest `HISTORY_FILES` earlier files (that the model can read) put
    back after their notes; older files stay notes."""
    wanted: list[dict] = []
    for message in reversed(history):
        if len(wanted) >= HISTORY_FILES or not isinstance(message, ModelRequest):
            continue
        for part in message.parts:
            if isinstance(part, UserPromptPart) and not isinstance(part.content, str):
                for item in part.content:
                    if (file := ref_of(item)) and not unsupported([file], profile):
                        wanted.append(file)
    wanted = wanted[:HISTORY_FILES]
    if not wanted:
        return history
    data = store.attachment_data(owner, [f["id"] for f in wanted])
    ids = set(data)
    out = []
    for message in history:
        if isinstance(message, ModelRequest) and any(
            isinstance(p, UserPromptPart) and not isinstance(p.content, str) for p in message.parts
        ):
            message = replace(message, parts=[_expand(p, data, ids) for p in message.parts])
        out.append(message)
    return out


def _expand(part, data: dict[str, bytes], ids: set[str]):
    if not isinstance(part, UserPromptPart) or isinstance(part.content, str):
        return part
    content: list = []
    for item in part.content:
        file = ref_of(item)
        if file and file["id"] in ids:
            content += _content(file, data[file["id"]])
        else:
            content.append(item)
    return replace(part, content=content)


def model_input(store, turn: dict, owner: str, history: list[ModelMessage], profile):
    """(the user prompt, the history) for `turn`'s reply, with files read back from the store.

    Blocking (the store): the run calls it in a thread.
    """
    return prompt(store, turn, owner, profile), rehydrate(store, owner, history, profile)


def stored(messages: list[ModelMessage]) -> list[ModelMessage]:
    """`messages` as they are saved: each file in a user prompt becomes its note again, so the
    history holds no file bytes (see the module docstring)."""
    out = []
    for message in messages:
        if isinstance(message, ModelRequest):
            message = replace(message, parts=[_shrink(p) for p in message.parts])
        out.append(message)
    return out


def _shrink(part):
    if not isinstance(part, UserPromptPart) or isinstance(part.content, str):
        return part
    content = []
    for item in part.content:
        if isinstance(item, BinaryContent):
            continue  # its note, just before it, stays
        if (file := ref_of(item)) and item.metadata.get("inline"):
            item = note(file)
        content.append(item)
    return replace(part, content=content)
