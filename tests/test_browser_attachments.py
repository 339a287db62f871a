"""Attachments in a real browser: attach by button, by drop and by paste; the chip, its removal,
the thumbnail in the sent message and after a reload, the full-size view, and what the model
received. Headless Chromium against `python main.py` and the fake OpenAI-compatible model; each
test ends with no CSP violation and no console error.

Screenshots (desktop and phone, light and dark) go to $SHOTS_DIR when it is set.
"""

from __future__ import annotations

import base64
import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Page, expect

from tests.live import (  # noqa: F401  (fixtures are used by name)
    LiveApp,
    Watched,
    app_fixture,
    browser_fixture,
    fake_fixture,
    fake_server_fixture,
    open_context,
    replies,
    wait_for_replies,
)
from tests.test_attachments import PDF, png

PHONE = {"viewport": {"width": 390, "height": 844}, "is_mobile": True, "has_touch": True}
IMAGE = png(48, 32, (40, 120, 220))


@contextlib.contextmanager
def browsing(browser, app: LiveApp, **kw) -> Iterator[Watched]:
    """A watched page in a fresh browser profile (a new user), closed afterwards."""
    w = open_context(browser, app.url, **kw)
    try:
        w.page.goto("/")
        yield w
    finally:
        w.context.close()


def chips(page: Page):
    """The composer's attachment chips."""
    return page.locator("#att-tray .att-chip:not(.uploading)")


def attach_by_button(page: Page, name: str, data: bytes, mime: str) -> None:
    """Choose a file with the attach button's file input, as the file picker does."""
    page.locator("#att-input").set_input_files(
        files=[{"name": name, "mimeType": mime, "buffer": data}]
    )


_FILE_JS = """([name, mime, b64]) => {
  const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
  const dt = new DataTransfer();
  dt.items.add(new File([bytes], name, {type: mime}));
  return dt;
}"""


def drop(page: Page, name: str, data: bytes, mime: str) -> None:
    """Drag a file from the desktop and drop it on the conversation."""
    dt = page.evaluate_handle(_FILE_JS, [name, mime, base64.b64encode(data).decode()])
    target = page.locator("#messages")
    target.dispatch_event("dragenter", {"dataTransfer": dt})
    target.dispatch_event("dragover", {"dataTransfer": dt})
    expect(page.locator("body.dropping")).to_have_count(1)
    target.dispatch_event("drop", {"dataTransfer": dt})


def paste(page: Page, name: str, data: bytes, mime: str) -> None:
    """Paste a file (a screenshot from the clipboard) into the message box."""
    page.evaluate(
        """([name, mime, b64]) => {
          const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
          const dt = new DataTransfer();
          dt.items.add(new File([bytes], name, {type: mime}));
          const box = document.getElementById("msg");
          box.focus();
          const init = {clipboardData: dt, bubbles: true, cancelable: true};
          box.dispatchEvent(new ClipboardEvent("paste", init));
        }""",
        [name, mime, base64.b64encode(data).decode()],
    )


def image_drawn(locator) -> bool:
    """True once an <img> has loaded and has pixels (not a broken-image icon)."""
    return locator.evaluate("img => img.complete && img.naturalWidth > 0")


def send_text(page: Page, text: str) -> None:
    """Type a message and send it with the Send button (on a touch screen Enter adds a line)."""
    page.get_by_role("textbox", name="Message").fill(text)
    page.get_by_role("button", name="Send").click()


def wait_reply_done(page: Page, n: int = 1) -> None:
    replies_ = page.locator("[data-role=assistant]")
    expect(replies_).to_have_count(n, timeout=15_000)
    expect(replies_.nth(n - 1).get_by_text("Writing…")).to_have_count(0, timeout=20_000)


def sent_parts(fake) -> list[dict]:
    """The content parts of the user's last message in the last reply request."""
    body = replies(fake)[-1].body
    user = [m for m in body["messages"] if m.get("role") == "user"][-1]
    return user["content"] if isinstance(user["content"], list) else [user["content"]]


def shoot(page: Page, name: str) -> None:
    if out := os.environ.get("SHOTS_DIR"):
        Path(out).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(out) / f"{name}.png"))


# Tests --------------------------------------------------------------------------------------


def test_attach_by_button_send_and_see_it_after_reload(browser, app, fake):
    with browsing(browser, app) as w:
        page = w.page
        attach_by_button(page, "blue.png", IMAGE, "image/png")
        expect(chips(page)).to_have_count(1)
        thumb = chips(page).first.locator("img.att-thumb")
        expect(thumb).to_be_visible()
        page.wait_for_function("() => document.querySelector('.att-thumb').naturalWidth > 0")
        expect(chips(page).first).to_contain_text("blue.png")

        send_text(page, "What colour is this?")
        user = page.locator("[data-role=user]").first
        expect(user.locator("img.msg-thumb")).to_be_visible()
        expect(chips(page)).to_have_count(0)  # the tray empties with the box
        wait_reply_done(page)
        wait_for_replies(fake, 1)
        parts = sent_parts(fake)
        assert parts[0] == {"type": "text", "text": "What colour is this?"}
        images = [p for p in parts if p.get("type") == "image_url"]
        assert images and images[0]["image_url"]["url"] == (
            "data:image/png;base64," + base64.b64encode(IMAGE).decode()
        )

        page.reload()
        thumb = page.locator("[data-role=user] img.msg-thumb").first
        expect(thumb).to_be_visible()
        page.wait_for_function("() => document.querySelector('.msg-thumb').naturalWidth > 0")

        # Opens full size over the page; Esc closes it.
        thumb.click()
        expect(page.locator("dialog.lightbox img")).to_be_visible()
        page.keyboard.press("Escape")
        expect(page.locator("dialog.lightbox")).to_have_count(0)
        w.assert_clean()


def test_attach_by_drop_and_a_text_file_reaches_the_model_as_text(browser, app, fake):
    with browsing(browser, app) as w:
        page = w.page
        drop(page, "notes.md", b"# Plan\n\n- write tests\n", "text/markdown")
        expect(chips(page)).to_have_count(1)
        expect(chips(page).first).to_contain_text("notes.md")
        expect(page.locator("body.dropping")).to_have_count(0)
        send_text(page, "Summarize the notes")
        expect(page.locator("[data-role=user] .file-chip")).to_contain_text("notes.md")
        wait_reply_done(page)
        wait_for_replies(fake, 1)
        text = " ".join(p.get("text", "") for p in sent_parts(fake))
        assert '<file name="notes.md">' in text and "- write tests" in text
        w.assert_clean()


def test_attach_by_paste(browser, app, fake):
    with browsing(browser, app) as w:
        page = w.page
        paste(page, "image.png", IMAGE, "image/png")
        expect(chips(page)).to_have_count(1)
        page.wait_for_function("() => document.querySelector('.att-thumb').naturalWidth > 0")
        box = page.get_by_role("textbox", name="Message")
        expect(box).to_have_value("")
        # Files alone are a message: Enter in the empty box sends the screenshot.
        box.press("Enter")
        expect(page.locator("[data-role=user] img.msg-thumb")).to_be_visible()
        expect(chips(page)).to_have_count(0)
        wait_reply_done(page)
        wait_for_replies(fake, 1)
        assert [p["type"] for p in sent_parts(fake)] == ["text", "image_url"]  # note, image
        w.assert_clean()


def test_removing_a_chip_removes_the_file(browser, app, fake):
    with browsing(browser, app) as w:
        page = w.page
        attach_by_button(page, "one.png", IMAGE, "image/png")
        attach_by_button(page, "two.pdf", PDF, "application/pdf")
        expect(chips(page)).to_have_count(2)
        src = chips(page).first.locator("img").get_attribute("src")
        page.get_by_role("button", name="Remove one.png").click()
        expect(chips(page)).to_have_count(1)
        expect(chips(page).first).to_contain_text("two.pdf")
        expect(page.get_by_role("textbox", name="Message")).to_be_focused()
        assert page.request.get(src).status == 404
        w.assert_clean()


def test_a_refused_file_says_why_in_the_composer(browser, app, fake):
    with browsing(browser, app) as w:
        page = w.page
        svg = b'<svg xmlns="http://www.w3.org/2000/svg" onload="alert(1)"></svg>'
        attach_by_button(page, "logo.png", svg, "image/png")
        expect(page.locator("#composer-error")).to_contain_text("SVG images are not accepted")
        expect(chips(page)).to_have_count(0)
        # Refusals are answers, not failures: the console stays clean.
        w.console_errors = [e for e in w.console_errors if "415" not in e]
        w.assert_clean()


@pytest.mark.parametrize("size", ["desktop", "phone"])
@pytest.mark.parametrize("scheme", ["light", "dark"])
def test_screenshots_of_attachments(browser, app, fake, size, scheme):
    kw = {**(PHONE if size == "phone" else {}), "color_scheme": scheme}
    with browsing(browser, app, **kw) as w:
        page = w.page
        attach_by_button(page, "diagram.png", png(320, 200, (60, 160, 90)), "image/png")
        attach_by_button(page, "quarterly report.pdf", PDF, "application/pdf")
        expect(chips(page)).to_have_count(2)
        send_text(page, "Here is the diagram and the report. What stands out?")
        wait_reply_done(page)
        attach_by_button(page, "notes.md", b"# Notes\n", "text/markdown")
        expect(chips(page)).to_have_count(1)
        page.wait_for_function("() => document.querySelector('.msg-thumb').naturalWidth > 0")
        shoot(page, f"attachments-{size}-{scheme}")
        page.locator("[data-role=user] img.msg-thumb").first.click()
        expect(page.locator("dialog.lightbox img")).to_be_visible()
        shoot(page, f"attachments-full-size-{size}-{scheme}")
        page.keyboard.press("Escape")
        attach_by_button(page, "logo.svg", b"<svg></svg>", "image/svg+xml")
        expect(page.locator("#composer-error")).to_contain_text("SVG images are not accepted")
        shoot(page, f"attachments-refused-{size}-{scheme}")
        w.console_errors = [e for e in w.console_errors if "415" not in e]
        w.assert_clean()
