"""Tool approval: the card under a paused reply with each waiting call and Approve / Deny."""

from __future__ import annotations

from fastcore.xml import FT
from fasthtml.common import Button, Code, Div, P, Pre, Span


def ApprovalCall(view, approve: str, deny: str, target: str) -> FT:
    """One call waiting for a decision: its tool, its arguments, and the two buttons."""

    def button(label: str, url: str, cls: str) -> FT:
        return Button(
            label,
            type="button",
            cls=f"small {cls}",
            hx_post=url,
            hx_target=target,
            hx_swap="outerHTML",
            hx_disabled_elt="closest .approval-actions button",
            aria_label=f"{label} {view.name}",
        )

    return Div(
        P(Span("Tool", cls="tool-kind"), Code(view.name), cls="approval-name"),
        Pre(Code(view.args or "{}"), cls="approval-args"),
        Div(
            button("Approve", approve, "approve"),
            button("Deny", deny, "deny"),
            cls="approval-actions",
            role="group",
        ),
        cls="approval-call",
    )


def ApprovalCard(calls: list[tuple], *, expires: str | None = None) -> FT:
    """Every call a paused reply waits on: (view, approve url, deny url, target) each."""
    return Div(
        P("The assistant wants to run a tool. Approve it to continue, or deny it.",
          cls="approval-lead"),
        *(ApprovalCall(*c) for c in calls),
        P(f"Waiting until {expires} (UTC), then it expires.", cls="note") if expires else None,
        cls="approval",
        role="group",
        aria_label="Tool approval",
    )  # fmt: skip


def ApprovalLoader(url: str) -> FT:
    """Fetches the approval card of a paused reply (the calls and buttons live in the store)."""
    return Div(
        Span("Waiting for your approval…", role="status"),
        hx_get=url,
        hx_trigger="load",
        hx_swap="outerHTML",
        cls="approval-loading",
    )


def ApprovalExpired(note: str) -> FT:
    """What replaces the card when the calls waited too long."""
    return Div(Span(note), cls="error", role="alert")
