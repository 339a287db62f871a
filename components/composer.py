"""The message form with its model and persona pickers, and the header's model badge."""

from __future__ import annotations

from fastcore.xml import FT
from fasthtml.common import (
    Button,
    Details,
    Div,
    Fieldset,
    Form,
    Input,
    Label,
    Legend,
    Option,
    Select,
    Span,
    Summary,
    Textarea,
)

from components.attachments import AttachmentTray


def PersonaPicker(personas: dict[str, str], current: str | None) -> FT | None:
    """Choose the persona (instruction set) for this conversation."""
    if len(personas) < 2:
        return None
    return (
        Label("Persona", fr="persona", cls="picker-label"),
        Select(
            *(Option(name, value=key, selected=key == current) for key, name in personas.items()),
            id="persona",
            name="persona",
        ),
    )


def ModelPicker(
    choices: tuple[str, ...],
    current: str,
    personas: dict[str, str] | None = None,
    persona: str | None = None,
) -> FT | None:
    """Choose model and persona for this conversation, and optionally compare several models."""
    people = PersonaPicker(personas or {}, persona)
    if len(choices) < 2:
        return Div(*people, cls="picker") if people else None
    return Div(
        *(people or ()),
        Label("Model", fr="model", cls="picker-label"),
        Select(
            *(Option(m, value=m, selected=m == current) for m in choices),
            id="model",
            name="model",
        ),
        Details(
            # app.js says here whether the next message goes to several models (and turns
            # comparing off once it has): a comparison is one message, not a mode.
            Summary("Compare", Span(id="compare-state", cls="compare-state", aria_live="polite")),
            Fieldset(
                Legend("Send the next message to several models"),
                *(
                    Label(Input(type="checkbox", name="compare", value=m), m, cls="check")
                    for m in choices
                ),
            ),
            cls="compare-pick",
        ),
        cls="picker",
    )


def Composer(
    send_url: str,
    cid: str | None,
    *,
    max_chars: int,
    choices: tuple[str, ...] = (),
    model: str = "demo",
    personas: dict[str, str] | None = None,
    persona: str | None = None,
    attach: FT | None = None,
) -> FT:
    """The message form: Enter sends, Shift+Enter adds a line (touch keyboards: Enter adds a line).

    No `maxlength`: it would cut a long paste without a word. app.js counts near the limit and
    explains when over it; the server refuses an over-long message with a message of its own.
    `attach` is the attach button (components/attachments.py); its files wait in the tray above
    the box.
    """
    return Form(
        ModelPicker(choices, model, personas, persona),
        Div(id="composer-error", cls="composer-error", role="alert"),
        AttachmentTray() if attach else None,
        Div(
            attach,
            Label("Message", fr="msg", cls="visually-hidden"),
            Textarea(
                id="msg",
                name="msg",
                rows=1,
                required=True,
                autofocus=True,
                placeholder="Send a message (Enter to send, Shift+Enter for a new line)",
                aria_keyshortcuts="Enter",
                aria_describedby="msg-count",
                data_max_chars=max_chars,
            ),
            Button("Send", type="submit", cls="send"),
            cls="composer-row",
        ),
        Div(id="msg-count", cls="msg-count", aria_live="polite"),
        Input(type="hidden", name="cid", value=cid or "", id="cid"),
        id="composer",
        action=send_url,
        method="post",
        hx_post=send_url,
        hx_target="#messages",
        hx_swap="beforeend",
        hx_disabled_elt="find button.send",
    )


def ModelBadge(model: str | None) -> FT:
    """Which model answers; the offline demo says so plainly."""
    if not model or model == "demo":
        return Span(
            "Demo model (offline): set MODEL to use a real one",
            cls="badge demo",
            id="model-badge",
            title="No MODEL is configured. Replies come from a built-in offline demo model.",
        )
    # app.js keeps it in step with the model picker.
    return Span(model, cls="badge", id="model-badge", title=model)
