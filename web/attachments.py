"""Attachments over HTTP: upload a file (pending), remove a pending one, serve one to its owner.

A file is served with the type sniffed from its bytes, `nosniff`, a CSP that allows nothing
(`default-src 'none'`), and `Content-Disposition: inline` only for raster images: anything
else downloads. Nothing uploaded is ever rendered as a page or run.
"""

from __future__ import annotations

from urllib.parse import quote

from fasthtml.common import APIRouter, Response
from starlette.datastructures import UploadFile
from starlette.requests import Request

from chat.attachments import (
    PENDING_PER_SLOT,
    AttachmentError,
    check,
    human_size,
    is_image,
    stale_before,
)
from components.attachments import AttachmentChip
from web import links
from web.request import missing, off_loop, settings, store, uid
from web.responses import error_fragment, html

ar = APIRouter()

# The multipart envelope around a file: boundaries, headers, the file name.
_ENVELOPE = 16_384
FILE_CSP = "default-src 'none'; sandbox"


@ar(links.ATTACHMENTS, methods=["post"])
async def upload(req: Request):
    """Keep one uploaded file as a pending attachment; answer its composer chip.

    A refused file (too big, a type not accepted, too many waiting) changes nothing and the
    answer says why, in the composer's error line.
    """
    cfg = settings(req)
    limit = cfg.max_attachment_bytes
    # FastHTML has parsed the form before this handler runs (python-multipart spools a file
    # over 1 MB to disk, so memory stays bounded): close it on every path.
    form = await req.form()
    try:
        length = req.headers.get("content-length") or "0"
        if not length.isdigit() or int(length) > limit + _ENVELOPE:
            return error_fragment(
                f"That file is larger than the limit of {human_size(limit)}.", 413
            )
        file = form.get("file")
        if not isinstance(file, UploadFile):
            return error_fragment("Choose a file to attach.", 422)
        data = await file.read(limit + 1)
        name = file.filename
    finally:
        await form.close()
    try:
        name, media_type = await off_loop(check, data, name, limit)
    except AttachmentError as exc:
        return error_fragment(str(exc), exc.status)
    row = await off_loop(
        store(req).add_attachment,
        uid(req),
        name,
        media_type,
        data,
        max_pending=cfg.max_attachments * PENDING_PER_SLOT,
        stale_before=stale_before(),
    )
    if row is None:
        return error_fragment(
            "Too many files are waiting to be sent. Send or remove some first.", 429
        )
    return html(_chip(row), 201)


def _chip(row: dict):
    return AttachmentChip(
        row,
        url=links.url(links.ATTACHMENT, aid=row["id"]),
        remove_url=links.url(links.ATTACHMENT_REMOVE, aid=row["id"]),
    )


@ar(links.ATTACHMENT_REMOVE, methods=["post"])
def remove(req: Request, aid: str):
    """Remove a file from the composer (it was not sent): its bytes are dropped."""
    if not store(req).remove_attachment(aid, uid(req)):
        raise missing()
    return html("")


@ar(links.ATTACHMENT, methods=["get"])
def serve(req: Request, aid: str):
    """A file, to its owner only (404 for anyone else), with headers that never run it."""
    row = store(req).attachment(aid, uid(req))
    if row is None:
        raise missing()
    media_type = row["media_type"]
    disposition = "inline" if is_image(media_type) else "attachment"
    ascii_name = row["name"].encode("ascii", "replace").decode().replace('"', "'")
    return Response(
        row["data"],
        media_type=media_type + ("; charset=utf-8" if media_type.startswith("text/") else ""),
        headers={
            "Content-Disposition": f'{disposition}; filename="{ascii_name}"; '
            f"filename*=UTF-8''{quote(row['name'])}",
            "X-Content-Type-Options": "nosniff",
            "Content-Security-Policy": FILE_CSP,
            # Private to the signed-in browser; ids never change their bytes.
            "Cache-Control": "private, max-age=86400, immutable",
            "Cross-Origin-Resource-Policy": "same-origin",
        },
    )
