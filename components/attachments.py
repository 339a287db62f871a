"""Attachments in the page: the composer's attach button and tray, its chips, and the files of
a sent message (thumbnails for images, chips for other files)."""

from __future__ import annotations

from fastcore.xml import FT
from fasthtml.common import A, Button, Div, Img, Input, Label, Span

IMAGE_TYPES = ("image/png", "image/jpeg", "image/gif", "image/webp")
ACCEPT = "image/png,image/jpeg,image/gif,image/webp,application/pdf,text/plain,text/markdown,.md"
_KIND = {"application/pdf": "PDF", "text/markdown": "MD", "text/plain": "TXT"}


def _size(size: int | None) -> str:
    if not size:
        return ""
    if size < 1000:
        return f"{size} bytes"
    if size < 1_000_000:
        return f"{size / 1000:.0f} KB"
    return f"{size / 1_000_000:.1f} MB"


def AttachButton(upload_url: str, *, max_bytes: int, max_count: int) -> FT:
    """The composer's attach button: a label for a hidden file input (see app.js)."""
    return Label(
        Span("+", aria_hidden="true", cls="att-plus"),
        Span("Attach files", cls="visually-hidden"),
        Input(
            type="file",
            id="att-input",
            multiple=True,
            accept=ACCEPT,
            cls="visually-hidden",
            data_upload=upload_url,
            data_max_bytes=str(max_bytes),
            data_max_count=str(max_count),
        ),
        cls="button att-button",
        title="Attach images, PDFs or text files (or drop or paste them)",
    )


def AttachmentTray() -> FT:
    """Where the composer lists the files waiting to be sent with the next message."""
    return Div(id="att-tray", cls="att-tray", aria_label="Attached files", role="list")


def AttachmentChip(file: dict, *, url: str, remove_url: str) -> FT:
    """A file waiting in the composer: thumbnail or kind, name, size, and a remove button.

    Its hidden input puts the file's id in the send form.
    """
    name = file["name"]
    return Div(
        _preview(file, url),
        Span(name, cls="att-name", title=name),
        Span(_size(file.get("size")), cls="att-size"),
        Input(type="hidden", name="att", value=file["id"]),
        Button(
            "×",
            type="button",
            cls="att-remove small",
            aria_label=f"Remove {name}",
            hx_post=remove_url,
            hx_target="closest .att-chip",
            hx_swap="outerHTML",
            hx_disabled_elt="this",  # not the form's "find button.send", inherited otherwise
        ),
        cls="att-chip",
        role="listitem",
        data_att=file["id"],
    )


def _preview(file: dict, url: str) -> FT:
    if file["media_type"] in IMAGE_TYPES:
        return Img(src=url, alt="", cls="att-thumb", loading="lazy")
    return Span(_KIND.get(file["media_type"], "FILE"), cls="att-kind", aria_hidden="true")


def MessageFiles(files: tuple[tuple[dict, str], ...]) -> FT | None:
    """The files sent with a message: images as thumbnails that open full size, other files
    as chips with name and size that download. `files` pairs each file with its URL."""
    if not files:
        return None
    return Div(*(_sent(file, url) for file, url in files), cls="msg-files")


def _sent(file: dict, url: str) -> FT:
    name = file["name"]
    if file["media_type"] in IMAGE_TYPES:
        return A(
            Img(src=url, alt=name, cls="msg-thumb", loading="lazy"),
            href=url,
            target="_blank",
            rel="noopener",
            cls="msg-image",
            title=f"{name}: open full size",
            data_lightbox="",
        )
    return A(
        Span(_KIND.get(file["media_type"], "FILE"), cls="att-kind", aria_hidden="true"),
        Span(name, cls="att-name"),
        Span(_size(file.get("size")), cls="att-size"),
        href=url,
        cls="att-chip file-chip",
        title=f"Download {name}",
        download=name,
    )
