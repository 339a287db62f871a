"""Every URL the app links to, built from path templates defined once, here.

The route modules register their routes at these paths, and everything that renders a link
builds it here: no module needs another's handlers to know a URL, so the routes never import
each other. `tests/test_layout.py` checks that each template here is a route the app serves.
"""

from __future__ import annotations

from fastcore.xml import FT
from fasthtml.core import qp

from chat.attachments import refs
from components.layout import ExportLinks
from components.messages import TurnLinks
from components.sidebar import ConvLinks

# Pages and the conversation list (web/pages.py)
INDEX = "/"
CONVERSATION = "/c/{cid}"
OLDER = "/c/{cid}/older"
NEWER = "/c/{cid}/newer"
SEARCH = "/search"
ITEM = "/c/{cid}/item"
RENAME = "/c/{cid}/rename"
DELETE = "/c/{cid}/delete"
RESTORE = "/c/{cid}/restore"
TITLE = "/c/{cid}/title"
EXPORT_MD = "/c/{cid}/export.md"
EXPORT_JSON = "/c/{cid}/export.json"
IMPORT = "/import"
HEALTH = "/health"
READY = "/ready"

# Sending and streaming (web/chat.py)
SEND = "/send"
STREAM = "/c/{cid}/turns/{tid}/stream"
STOP = "/c/{cid}/turns/{tid}/stop"
REGENERATE = "/c/{cid}/turns/{tid}/regenerate"
EDIT = "/c/{cid}/turns/{tid}/edit"
USER_MESSAGE = "/c/{cid}/turns/{tid}/user"
SHOW = "/c/{cid}/turns/{tid}/show"
FEEDBACK = "/c/{cid}/turns/{tid}/feedback"

# Attachments (web/attachments.py): upload, serve, remove a pending one
ATTACHMENTS = "/attachments"
ATTACHMENT = "/attachments/{aid}"
ATTACHMENT_REMOVE = "/attachments/{aid}/remove"
SOURCE = "/c/{cid}/turns/{tid}/source"  # (web/pages.py) a reply's Markdown, for Copy

# Tool approval (web/approvals.py): a paused reply's card, and the decision on its call `seq`
APPROVALS = "/c/{cid}/turns/{tid}/approvals"
APPROVE = "/c/{cid}/turns/{tid}/approvals/{seq}/approve"
DENY = "/c/{cid}/turns/{tid}/approvals/{seq}/deny"

# Accounts (web/auth.py)
LOGIN = "/login"
SIGNUP = "/signup"
LOGOUT = "/logout"


def url(template: str, **params) -> str:
    """`template` with its `{name}` parts filled from `params`; the other params as a query."""
    return qp(template, **params)


def conversation(cid: str, at: int | None = None) -> str:
    """A conversation's page; with `at`, the page of the branch holding that turn."""
    return url(CONVERSATION, cid=cid, at=at) if at is not None else url(CONVERSATION, cid=cid)


def turn_links(turn: dict, siblings: dict[int | None, list[int]]) -> TurnLinks:
    """Every URL a turn's controls need, with its place among its versions."""
    cid, tid = turn["conversation_id"], turn["id"]
    group = siblings.get(turn["parent_id"]) or [tid]
    i = group.index(tid) if tid in group else 0
    return TurnLinks(
        stream=url(STREAM, cid=cid, tid=tid),
        stop=url(STOP, cid=cid, tid=tid),
        regenerate=url(REGENERATE, cid=cid, tid=tid),
        edit_form=url(EDIT, cid=cid, tid=tid),
        edit=url(EDIT, cid=cid, tid=tid),
        user=url(USER_MESSAGE, cid=cid, tid=tid),
        prev=url(SHOW, cid=cid, tid=group[i - 1]) if i > 0 else None,
        next=url(SHOW, cid=cid, tid=group[i + 1]) if i + 1 < len(group) else None,
        version=i + 1,
        versions=len(group),
        files=tuple((f, url(ATTACHMENT, aid=f["id"])) for f in refs(turn)),
        feedback=url(FEEDBACK, cid=cid, tid=tid),
        source=url(SOURCE, cid=cid, tid=tid),
        approvals=url(APPROVALS, cid=cid, tid=tid),
    )


def conv_links(cid: str) -> ConvLinks:
    """Every URL a conversation's sidebar controls need."""
    return ConvLinks(
        open=url(CONVERSATION, cid=cid),
        rename_form=url(RENAME, cid=cid),
        rename=url(RENAME, cid=cid),
        delete=url(DELETE, cid=cid),
        restore=url(RESTORE, cid=cid),
        item=url(ITEM, cid=cid),
    )


def export_links(cid: str) -> FT:
    """The conversation's Markdown and JSON download links."""
    return ExportLinks(url(EXPORT_MD, cid=cid), url(EXPORT_JSON, cid=cid))
