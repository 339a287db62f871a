"""Messages: the user's (always escaped) and the assistant's (sanitized HTML), live or stored."""

from __future__ import annotations

from fastcore.xml import FT, NotStr
from fasthtml.common import A, Article, Button, Div, Footer, P, Span

STATUS_NOTES = {
    "stopped": "Stopped. The reply above is what was generated before you stopped it.",
    "interrupted": "Interrupted: the server stopped before this reply finished.",
}


def SafeHTML(html: str, **kw) -> FT:
    """Sanitized model HTML, in a container htmx will not process. The only use of NotStr."""
    return Div(NotStr(html), cls="chunk", hx_disable=True, **kw)


def UserMessage(turn: dict) -> FT:
    """A message the user sent; its text is escaped, never interpreted."""
    return Article(
        Div(P(turn["user_text"], cls="text"), cls="bubble"),
        cls="msg user",
        data_role="user",
        id=f"turn-{turn['id']}",
    )


def Usage(usage: dict | None, model: str | None) -> FT | None:
    """A quiet line with the model name and token counts."""
    if not usage and not model:
        return None
    bits = [model] if model else []
    if usage:
        bits.append(f"{usage.get('input_tokens', 0)} in · {usage.get('output_tokens', 0)} out")
        if usage.get("seconds") is not None:
            bits.append(f"{usage['seconds']:.1f} s")
    return Span(" · ".join(b for b in bits if b), cls="usage")


def ReplyFooter(
    status: str,
    *,
    error: str | None = None,
    stop_url: str | None = None,
    usage: dict | None = None,
    model: str | None = None,
) -> tuple:
    """What sits under a reply: 'Writing…' and Stop while streaming, then its outcome."""
    if status == "streaming":
        return (
            Span("Writing…", cls="writing", role="status"),
            Button(
                "Stop",
                type="button",
                cls="stop",
                hx_post=stop_url,
                hx_swap="none",
                aria_keyshortcuts="Escape",
            ),
        )
    parts = []
    if error:
        parts.append(Div(error, cls="error", role="alert"))
    elif status in STATUS_NOTES:
        parts.append(P(STATUS_NOTES[status], cls="note"))
    parts.append(Usage(usage, model))
    return tuple(p for p in parts if p is not None)


def AssistantMessage(
    turn_id: int,
    *,
    html: str = "",
    status: str = "complete",
    error: str | None = None,
    stream_url: str | None = None,
    stop_url: str | None = None,
    usage: dict | None = None,
    model: str | None = None,
) -> FT:
    """The assistant's reply. With `stream_url` it is a live placeholder the stream fills in."""
    live = stream_url is not None
    sse = {"hx_ext": "sse", "sse_connect": stream_url, "sse_close": "done"} if live else {}
    return Article(
        Div(
            SafeHTML(html) if html else None,
            cls="md",
            id=f"md-{turn_id}",
            sse_swap="blocks" if live else None,
            hx_swap="beforeend" if live else None,
            aria_live="polite",
        ),
        Div(cls="md tail", sse_swap="tail", aria_hidden="true") if live else None,
        Footer(
            *ReplyFooter(status, error=error, stop_url=stop_url, usage=usage, model=model),
            cls="reply-foot",
            sse_swap="end" if live else None,
        ),
        cls=f"msg assistant {status}",
        data_role="assistant",
        id=f"reply-{turn_id}",
        aria_busy="true" if live else None,
        **sse,
    )


def Tail(html: str) -> FT:
    """The unfinished last block of a streaming reply, with the 'still writing' cursor."""
    return (SafeHTML(html) if html else "", Span(cls="cursor", aria_hidden="true"))


def LoadEarlier(url: str) -> FT:
    """A link that loads the previous page of a long conversation in place."""
    return Div(
        A("Load earlier messages", href=url, hx_get=url, hx_target="#earlier", hx_swap="outerHTML"),
        id="earlier",
        cls="earlier",
    )
