"""What a user does in the chat page, and waits for, as the browser tests say it (Playwright)."""

from __future__ import annotations

from playwright.sync_api import Locator, Page, expect

from tests.live import Watched


def message_box(page: Page) -> Locator:
    """The composer's textarea, found the way assistive technology finds it."""
    return page.get_by_role("textbox", name="Message")


def send(target: Page | Watched, text: str, w: Watched | None = None) -> None:
    """Type a message and press Enter; on a phone (`w.phone`, or a watched page's own) tap Send,
    since a touch keyboard's Enter adds a line."""
    if isinstance(target, Watched):
        page, w = target.page, w or target
    else:
        page = target
    box = message_box(page)
    box.fill(text)
    if w is not None and getattr(w, "phone", False):
        page.get_by_role("button", name="Send").tap()
    else:
        box.press("Enter")


def assistant(page: Page, n: int) -> Locator:
    """The n-th reply (1-based), waiting until it exists."""
    all_ = page.locator("[data-role=assistant]")
    expect(all_).to_have_count(n, timeout=15_000)
    return all_.nth(n - 1)


def wait_done(page: Page, n: int, timeout: float = 20_000) -> Locator:
    """Wait until the n-th reply has finished streaming; return it."""
    reply = assistant(page, n)
    expect(reply.get_by_text("Writing…")).to_have_count(0, timeout=timeout)
    expect(reply.get_by_role("button", name="Stop")).to_have_count(0)
    expect(reply).not_to_have_attribute("aria-busy", "true")
    return reply
