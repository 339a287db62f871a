"""Messages: the user's (always escaped) and the assistant's (sanitized HTML), live or stored.

Why this module is long: every piece of a message (user, reply, footer, tool call, versions,
usage, compare columns) is a small component here, and they compose one another.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from fastcore.xml import FT, NotStr
from fasthtml.common import (
    A,
    Article,
    Button,
    Code,
    Details,
    Div,
    Footer,
    Form,
    Label,
    P,
    Pre,
    Span,
    Summary,
    Textarea,
    Time,
)

from components.approvals import ApprovalLoader
from components.attachments import MessageFiles

STATUS_NOTES = {
    "stopped": "Stopped. The reply above is what was generated before you stopped it.",
    "interrupted": "Interrupted: the server stopped before this reply finished.",
}


@dataclass(frozen=True)
class TurnLinks:
    """The URLs a turn's controls use; built by the routes, so components never make URLs."""

    stream: str
    stop: str
    regenerate: str
    edit_form: str
    edit: str
    user: str
    prev: str | None = None
    next: str | None = None
    version: int = 1
    versions: int = 1
    # The files sent with the turn's message, each with its URL (components/attachments.py).
    files: tuple = ()
    feedback: str | None = None
    source: str | None = None  # the reply's Markdown, which its Copy button copies
    approvals: str | None = None  # the card of a reply paused for tool approval


def SafeHTML(html: str, **kw) -> FT:
    """Sanitized model HTML, in a container htmx will not process. The only use of NotStr."""
    return Div(NotStr(html), cls="chunk", hx_disable=True, **kw)


def CopyButton(target: str, label: str = "Copy", url: str | None = None) -> FT:
    """Copies the text at `url` (a reply's Markdown) if given, else the text of element `target`."""
    return Button(label, type="button", cls="copy small", data_copy=target, data_copy_url=url)


def Stamp(iso) -> FT | None:
    """When a message was sent or a reply written; app.js shows it relative ("2 min ago")."""
    if not iso:
        return None
    if not isinstance(iso, str):  # a store that hands back datetimes rather than ISO text
        iso = iso.isoformat(timespec="milliseconds")
    exact = iso[:16].replace("T", " ") + " UTC"  # until app.js puts it in the reader's time
    return Time(exact, datetime=iso, title=exact, cls="stamp")


def VersionNav(links: TurnLinks) -> FT | None:
    """‹ 2/3 ›: flip between the versions of an exchange made by editing or regenerating."""
    if links.versions < 2:
        return None

    def step(label: str, url: str | None, name: str) -> FT:
        return Button(
            label,
            type="button",
            cls="small",
            aria_label=name,
            disabled=url is None,
            hx_post=url,
            hx_target="#messages",
            hx_swap="innerHTML",
        )

    return Div(
        step("‹", links.prev, "Previous version"),
        Span(f"{links.version}/{links.versions}", aria_label="Version"),
        step("›", links.next, "Next version"),
        cls="versions",
        role="group",
        aria_label=f"Version {links.version} of {links.versions}",
    )


def UserMessage(turn: dict, links: TurnLinks | None = None) -> FT:
    """A message the user sent; its text is escaped, never interpreted."""
    tid = turn["id"]
    tools = ()
    if links:
        tools = (
            Stamp(turn.get("created_at")),
            VersionNav(links),
            CopyButton(f"text-{tid}"),
            Button(
                "Edit",
                type="button",
                cls="small",
                hx_get=links.edit_form,
                hx_target=f"#turn-{tid}",
                hx_swap="outerHTML",
            ),
        )
    return Article(
        Div(
            MessageFiles(links.files) if links else None,
            P(turn["user_text"], cls="text", id=f"text-{tid}"),
            cls="bubble",
        ),
        Div(*tools, cls="msg-tools") if links else None,
        cls="msg user",
        data_role="user",
        id=f"turn-{tid}",
    )


def EditForm(turn: dict, links: TurnLinks, *, max_chars: int) -> FT:
    """Edit a sent message in place; sending it starts a new version of the exchange."""
    tid = turn["id"]
    return Article(
        Form(
            MessageFiles(links.files),  # an edit is sent with the same files
            Label("Edit message", fr=f"edit-{tid}", cls="visually-hidden"),
            Textarea(
                turn["user_text"],
                id=f"edit-{tid}",
                name="msg",
                rows=3,
                required=True,
                autofocus=True,
                data_max_chars=max_chars,  # counted by app.js rather than cut by maxlength
                aria_describedby=f"edit-count-{tid}",
            ),
            Div(id=f"edit-count-{tid}", cls="msg-count", aria_live="polite"),
            Div(
                Button("Cancel", type="button", hx_get=links.user, hx_target=f"#turn-{tid}",
                       hx_swap="outerHTML"),
                Button("Send edit", type="submit", cls="send"),
                cls="edit-actions",
            ),
            hx_post=links.edit,
            hx_target="#messages",
            hx_swap="innerHTML",
            cls="edit-form",
        ),
        cls="msg user editing",
        data_role="user",
        id=f"turn-{tid}",
    )  # fmt: skip


def Usage(usage: dict | None, model: str | None) -> FT | None:
    """A quiet line: model, tokens in and out, time to first token, tokens per second."""
    if not usage and not model:
        return None
    bits = [model] if model else []
    if usage:
        bits.append(_tokens(usage))
        if usage.get("first_token_seconds") is not None:
            bits.append(f"first token {usage['first_token_seconds']:.2f} s")
        if usage.get("tokens_per_second"):
            bits.append(f"{usage['tokens_per_second']:.0f} tok/s")
        if usage.get("seconds") is not None:
            bits.append(f"{usage['seconds']:.1f} s")
    return Span(" · ".join(b for b in bits if b), cls="usage", data_usage="")


def _tokens(usage: dict) -> str:
    """'N in · N out', or a plain note when the model server did not count them (None)."""
    tokens_in, tokens_out = usage.get("input_tokens"), usage.get("output_tokens")
    if tokens_in is None and tokens_out is None:
        return "tokens not reported"
    return f"{tokens_in or 0:,} in · {tokens_out or 0:,} out"


def ConversationUsage(total: dict | None, *, oob: bool = False) -> FT:
    """The running token total of a conversation, shown in the header."""
    text, title = "", "Tokens used in this conversation"
    # Replies from a server that counts no tokens add nothing; a total made only of them would
    # read "0 in · 0 out", so it is left out, and a partial one says what it leaves out.
    counted = (total or {}).get("reported", (total or {}).get("replies", 0))
    if total and counted:
        text = f"Tokens: {total['input_tokens']:,} in · {total['output_tokens']:,} out"
        if (missing := total["replies"] - counted) > 0:
            text += f" (+{missing} not counted)"
            title += f"; {missing} repl{'y' if missing == 1 else 'ies'} came without token counts"
    return Span(
        text,
        id="conv-usage",
        cls="conv-usage",
        title=title,
        hx_swap_oob="true" if oob else None,
    )


def CompareColumns(columns: list[tuple[str, FT, str | None]]) -> FT:
    """Replies from several models side by side; 'Keep' continues the chat from that one.

    A column without a keep URL is the one the conversation continues from: marked 'Kept'.
    """
    return Div(
        *(
            Div(
                Div(
                    Span(model, cls="badge"),
                    Button("Keep this reply", type="button", cls="small", hx_post=keep,
                           hx_target="#messages", hx_swap="innerHTML")
                    if keep else Span("Kept", cls="kept"),
                    cls="compare-head",
                ),
                reply,
                cls="compare-col",
            )
            for model, reply, keep in columns
        ),
        cls="compare",
        role="group",
        aria_label="Replies from several models",
    )  # fmt: skip


def _thumb_icon(turned: bool) -> FT:
    # Drawn by CSS from static/thumb.svg (a mask): no inline SVG in the message list, where
    # only text and sanitized markup belong.
    return Span(cls="thumb-icon down" if turned else "thumb-icon", aria_hidden="true")


def Feedback(url: str, value: str | None) -> FT:
    """Thumbs up and down on a reply: pressed state shown, pressing again takes it back."""

    def thumb(kind: str, label: str) -> FT:
        pressed = value == kind
        return Button(
            _thumb_icon(kind == "down"),
            type="button",
            cls="small icon thumb",
            aria_label=label,
            aria_pressed="true" if pressed else "false",
            hx_post=url,
            hx_vals=json.dumps({"value": "" if pressed else kind}),
            hx_target="closest .feedback",
            hx_swap="outerHTML",
        )

    return Div(
        thumb("up", "Good reply"),
        thumb("down", "Bad reply"),
        cls="feedback",
        role="group",
        aria_label="Rate this reply",
    )


def ReplyFooter(
    turn_id: int,
    status: str,
    *,
    links: TurnLinks | None = None,
    error: str | None = None,
    usage: dict | None = None,
    model: str | None = None,
    last: bool = False,
    copy: bool = True,
    extra: FT | None = None,
    feedback: str | None = None,
    when: str | None = None,
) -> tuple:
    """What sits under a reply: 'Writing…' and Stop while streaming, then its outcome."""
    if status == "streaming":
        return (
            Span("Writing…", cls="writing", role="status"),
            Button(
                "Stop",
                type="button",
                cls="stop small",
                hx_post=links.stop if links else None,
                hx_swap="none",
                aria_keyshortcuts="Escape",
            ),
        )
    parts: list = []
    if status == "awaiting_approval" and links and links.approvals:
        # Tool approval (components/approvals.py): the card with the waiting calls.
        parts.append(ApprovalLoader(links.approvals))
    if error:
        parts.append(
            Div(
                Span(error),
                # Only the last reply is answered again: retrying an earlier one would branch
                # and hide the exchanges after it (editing that message is the way there).
                Button("Retry", type="button", cls="small regenerate", hx_post=links.regenerate,
                       hx_target="#messages", hx_swap="innerHTML") if links and last else None,
                cls="error",
                role="alert",
            )
        )  # fmt: skip
    elif status in STATUS_NOTES:
        parts.append(P(STATUS_NOTES[status], cls="note"))
    parts.append(Stamp(when))
    if links and copy:
        parts.append(CopyButton(f"md-{turn_id}", url=links.source))
        if last and not error:
            parts.append(
                Button("Regenerate", type="button", cls="small regenerate",
                       hx_post=links.regenerate, hx_target="#messages", hx_swap="innerHTML")
            )  # fmt: skip
        if links.feedback:
            parts.append(Feedback(links.feedback, feedback))
    parts.append(Usage(usage, model))
    parts.append(extra)
    return tuple(p for p in parts if p is not None)


def AssistantMessage(
    turn_id: int,
    *,
    body: tuple = (),
    status: str = "complete",
    links: TurnLinks | None = None,
    live: bool = False,
    error: str | None = None,
    usage: dict | None = None,
    model: str | None = None,
    last: bool = False,
    feedback: str | None = None,
    when: str | None = None,
) -> FT:
    """The assistant's reply. `live` makes it a placeholder that its stream fills in."""
    sse = {"hx_ext": "sse", "sse_connect": links.stream, "sse_close": "done"} if live else {}
    return Article(
        Div(
            *body,
            cls="md",
            id=f"md-{turn_id}",
            sse_swap="blocks" if live else None,
            hx_swap="beforeend" if live else None,
            aria_live="polite",
        ),
        Div(cls="md tail", sse_swap="tail", aria_hidden="true") if live else None,
        Footer(
            *ReplyFooter(
                turn_id,
                "streaming" if live else status,
                links=links,
                error=error,
                usage=usage,
                model=model,
                last=last,
                copy=bool(body),
                feedback=feedback,
                when=when,
            ),
            cls="reply-foot",
            sse_swap="end" if live else None,
        ),
        cls=f"msg assistant {'streaming' if live else status}",
        data_role="assistant",
        id=f"reply-{turn_id}",
        aria_busy="true" if live else None,
        **sse,
    )


TOOL_STATES = {
    None: ("running", "Running…"),
    "success": ("done", "Done"),
    "failed": ("failed", "Failed"),
    "retried": ("retried", "Error: the model was asked to retry"),
    "denied": ("failed", "Denied"),
    "interrupted": ("failed", "Interrupted"),
    "awaiting": ("awaiting", "Waiting for approval"),
}


def ToolCall(tool, *, oob: bool = False) -> FT:
    """A tool call inside a reply: name and state, then arguments and result when expanded."""
    state, label = TOOL_STATES.get(tool.outcome, ("done", tool.outcome or ""))
    return Details(
        Summary(
            Span("Tool", cls="tool-kind"),
            Code(tool.name),
            Span(label, cls=f"tool-state {state}", role="status" if state == "running" else None),
        ),
        Div(P("Arguments", cls="tool-label"), Pre(Code(tool.args or "{}")), cls="tool-args"),
        Div(P("Result", cls="tool-label"), Pre(Code(tool.result)), cls="tool-result")
        if tool.result is not None
        else None,
        cls=f"tool {state}",
        id=f"tool-{tool.id}",
        hx_swap_oob="true" if oob else None,
    )


def Segments(segments: list) -> tuple:
    """A stored reply: its markdown (as sanitized HTML) and its tool calls, in order."""
    return tuple(SafeHTML(s) if isinstance(s, str) else ToolCall(s) for s in segments)


def safe_html_markup(html: str) -> str:
    """`to_xml(SafeHTML(html))`, written out: a live reply sends it for every finished block."""
    return f'<div hx-disable class="chunk">{html}</div>\n'


def tail_markup(html: str) -> str:
    """The unfinished last block of a streaming reply, with the 'still writing' cursor.

    Written out rather than built as FT: a live reply sends it several times a second.
    """
    chunk = safe_html_markup(html) if html else ""
    return chunk + '<span aria-hidden="true" class="cursor"></span>'


def LoadEarlier(url: str) -> FT:
    """A link that loads the previous page of a long conversation in place."""
    return Div(
        A("Load earlier messages", href=url, hx_get=url, hx_target="#earlier", hx_swap="outerHTML"),
        id="earlier",
        cls="earlier",
    )


def LoadLater(url: str) -> FT:
    """A link that loads the next page of a conversation opened part-way (at a search hit)."""
    return Div(
        A("Load later messages", href=url, hx_get=url, hx_target="#later", hx_swap="outerHTML"),
        id="later",
        cls="earlier",
    )


def TitleRefresh(url: str) -> FT:
    """Fetches the conversation's new title once the model has written it (out-of-band swaps)."""
    return Span(hx_get=url, hx_trigger="load", hx_swap="outerHTML", cls="title-refresh")
