"""In a real browser, feature by feature: what a user sees when using each control of the chat.

Headless Chromium against `python main.py` and the fake upstream model (one app per module, the
fake reset per test). Each test drives the page as a user does (mouse, keyboard, touch on a
phone-sized screen), checks that the feature works without a full page reload (a marker set on
`window` before acting is still there after it), and ends with no Content-Security-Policy
violation and no console error.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from playwright.sync_api import Locator, Page, expect
from pydantic_ai.messages import (
    ModelMessagesTypeAdapter,
)

from tests.browser_steps import assistant, message_box, send, wait_done
from tests.conftest import reply_texts, user_prompts
from tests.fake_openai import FakeOpenAI, Fault
from tests.live import (  # noqa: F401  (fixtures are used by name)
    TITLE,
    LiveApp,
    Watched,
    app_fixture,
    browser_fixture,
    fake_fixture,
    fake_server_fixture,
    is_title_request,
    open_context,
    replies,
    wait_settled,
    web_fixture,
)

PHONE = {"viewport": {"width": 390, "height": 844}, "is_mobile": True, "has_touch": True}
SIZES: dict[str, dict] = {"desktop": {}, "phone": PHONE}


# Helpers ------------------------------------------------------------------------------------


@pytest.fixture(name="view")
def view_fixture(request, browser, app: LiveApp, fake: FakeOpenAI) -> Iterator[Watched]:
    """A watched page on a desktop or phone-sized screen (parametrize indirectly by size)."""
    size = getattr(request, "param", "desktop")
    w = open_context(browser, app.url, **SIZES[size])
    w.phone = size == "phone"
    try:
        yield w
    finally:
        w.context.close()


@contextlib.contextmanager
def browsing(browser, app: LiveApp, **kw) -> Iterator[Watched]:
    """A watched page in a fresh browser profile, closed afterwards."""
    w = open_context(browser, app.url, **kw)
    try:
        yield w
    finally:
        w.context.close()


def press(w: Watched, target: Locator) -> None:
    """Activate a control as the user of this screen would: a tap on a phone, else a click."""
    if getattr(w, "phone", False):
        target.tap()
    else:
        target.click()


def mark(page: Page) -> None:
    """Set a marker on `window`: it survives everything but a page load."""
    page.evaluate("window.__samePage = true")


def assert_same_page(page: Page) -> None:
    """The page was not reloaded (nor navigated) since `mark`."""
    assert page.evaluate("window.__samePage === true"), "the page was reloaded"


def last_user(body: dict) -> str:
    """The newest user message in a request the fake model received."""
    return next(
        str(m.get("content")) for m in reversed(body["messages"]) if m.get("role") == "user"
    )


def versions(page: Page, n: int = 1) -> Locator:
    """The version switcher ('‹ 1/2 ›') of the n-th user message."""
    return (
        page.locator("[data-role=user]")
        .nth(n - 1)
        .get_by_role("group", name=re.compile("^Version"))
    )


def sidebar(page: Page) -> Locator:
    """The conversation list."""
    return page.get_by_role("navigation", name="Conversations")


def conv_id(page: Page) -> str:
    """The id of the conversation the page shows (from its URL)."""
    found = re.search(r"/c/([\w-]+)", page.url)
    assert found, page.url
    return found.group(1)


def start_conversation(page: Page, text: str) -> str:
    """Open a new chat, send `text`, wait for the reply and the model's title; return the id."""
    page.goto("/")
    send(page, text)
    wait_done(page, 1)
    expect(page.locator("#chat-title")).to_have_text(TITLE)
    expect(page).to_have_url(re.compile(r"/c/[\w-]+$"))
    return conv_id(page)


def clipboard(page: Page) -> str:
    """What the clipboard holds now."""
    return page.evaluate("navigator.clipboard.readText()")


def luminance(css_color: str) -> float:
    """Relative brightness (0 black .. 1 white) of an `rgb(...)` computed colour."""
    r, g, b = (int(x) for x in re.findall(r"\d+", css_color)[:3])
    return (0.2126 * r + 0.7152 * g + 0.0722 * b) / 255


def background(page: Page) -> float:
    """How bright the page's background is."""
    return luminance(page.evaluate("getComputedStyle(document.body).backgroundColor"))


# 1. Stop --------------------------------------------------------------------------------------
# test_browser.py covers the Stop button on a desktop screen; here: Esc, and the phone.


@pytest.mark.parametrize(
    ("view", "how"),
    [("phone", "button"), ("phone", "escape"), ("desktop", "escape")],
    indirect=["view"],
)
def test_stop_keeps_the_partial_reply_and_hangs_up_on_the_model(
    view: Watched, fake: FakeOpenAI, how: str
):
    page = view.page
    fake.configure("one two three four five six", hold_after=2)
    page.goto("/")
    mark(page)
    send(page, "Count slowly", view)
    reply = assistant(page, 1)
    expect(reply).to_contain_text("one two")
    held = fake.wait_until_held()
    stop = reply.get_by_role("button", name="Stop")
    expect(stop).to_be_visible()
    expect(stop).to_have_attribute("aria-keyshortcuts", "Escape")

    if how == "escape":
        page.keyboard.press("Escape")
    else:
        press(view, stop)

    reply = wait_done(page, 1)
    expect(reply.locator(".note")).to_have_text(re.compile(r"^Stopped\."))
    expect(reply.locator(".md").first).to_contain_text("one two")
    expect(reply).not_to_contain_text("three")
    fake.wait_until_finished()
    assert held.disconnected and not held.completed
    assert held.tokens_sent == 2
    assert len(replies(fake)) == 1
    expect(page.locator("[data-role=user]")).to_contain_text("Count slowly")
    expect(message_box(page)).to_be_editable()
    assert_same_page(page)
    view.assert_clean()


# 2. Regenerate ----------------------------------------------------------------------------


@pytest.mark.parametrize("view", ["desktop", "phone"], indirect=True)
def test_regenerate_adds_a_version_and_the_history_follows_the_shown_one(
    view: Watched, fake: FakeOpenAI
):
    page = view.page
    fake.configure(lambda body: f"Answer {len(replies(fake))} to {last_user(body)}", delay=0.01)
    page.goto("/")
    mark(page)
    send(page, "Pick a colour", view)
    expect(wait_done(page, 1)).to_contain_text("Answer 1 to Pick a colour")
    expect(versions(page)).to_have_count(0)

    press(view, assistant(page, 1).get_by_role("button", name="Regenerate"))

    expect(assistant(page, 1)).to_contain_text("Answer 2 to Pick a colour")
    reply = wait_done(page, 1)
    expect(reply).not_to_contain_text("Answer 1")
    expect(page.locator("[data-role=user]")).to_have_count(1)
    expect(versions(page)).to_contain_text("2/2")
    expect(versions(page).get_by_role("button", name="Next version")).to_be_disabled()

    press(view, versions(page).get_by_role("button", name="Previous version"))

    expect(versions(page)).to_contain_text("1/2")
    expect(assistant(page, 1)).to_contain_text("Answer 1 to Pick a colour")
    expect(assistant(page, 1)).not_to_contain_text("Answer 2")
    expect(versions(page).get_by_role("button", name="Previous version")).to_be_disabled()

    send(page, "Why that one?", view)
    expect(wait_done(page, 2)).to_contain_text("Answer 3 to Why that one?")
    last = replies(fake)[-1]
    assert last.texts("user") == ["Pick a colour", "Why that one?"]
    assert last.texts("assistant") == ["Answer 1 to Pick a colour"]
    assert len(replies(fake)) == 3
    assert_same_page(page)
    view.assert_clean()


# 3. Edit ----------------------------------------------------------------------------------


@pytest.mark.parametrize("view", ["desktop", "phone"], indirect=True)
def test_edit_a_sent_message_makes_a_new_version_and_the_original_stays(
    view: Watched, fake: FakeOpenAI
):
    page = view.page
    fake.configure(lambda body: f"Reply to {last_user(body)}", delay=0.01)
    page.goto("/")
    mark(page)
    send(page, "Original question", view)
    expect(wait_done(page, 1)).to_contain_text("Reply to Original question")
    user = page.locator("[data-role=user]")

    press(view, user.get_by_role("button", name="Edit"))
    box = page.get_by_role("textbox", name="Edit message")
    expect(box).to_be_focused()
    expect(box).to_have_value("Original question")
    box.fill("Edited question")
    press(view, page.get_by_role("button", name="Send edit"))

    expect(assistant(page, 1)).to_contain_text("Reply to Edited question")
    wait_done(page, 1)
    expect(box).to_have_count(0)
    expect(user).to_have_count(1)
    expect(user.locator(".text")).to_have_text("Edited question")
    expect(versions(page)).to_contain_text("2/2")
    assert replies(fake)[-1].texts("user") == ["Edited question"]

    press(view, versions(page).get_by_role("button", name="Previous version"))

    expect(versions(page)).to_contain_text("1/2")
    expect(user.locator(".text")).to_have_text("Original question")
    expect(assistant(page, 1)).to_contain_text("Reply to Original question")
    expect(assistant(page, 1)).not_to_contain_text("Edited")

    press(view, versions(page).get_by_role("button", name="Next version"))

    expect(versions(page)).to_contain_text("2/2")
    expect(user.locator(".text")).to_have_text("Edited question")
    expect(assistant(page, 1)).to_contain_text("Reply to Edited question")
    assert len(replies(fake)) == 2
    assert_same_page(page)
    view.assert_clean()


# 4. Copy ----------------------------------------------------------------------------------

CODE_REPLY = """Run this:

```python
print("copied!")
```

That is all."""


def test_copy_a_message_a_reply_and_a_code_block(web: Watched, app: LiveApp, fake: FakeOpenAI):
    page = web.page
    web.context.grant_permissions(["clipboard-read", "clipboard-write"], origin=app.url)
    fake.configure(CODE_REPLY)
    page.goto("/")
    mark(page)
    send(page, "Please copy me")
    reply = wait_done(page, 1)
    expect(reply.locator("pre")).to_contain_text('print("copied!")')

    copy_reply = reply.locator(".reply-foot").get_by_role("button", name="Copy", exact=True)
    copy_reply.click()
    expect(reply.locator(".reply-foot .copy")).to_have_text("Copied")
    copied = clipboard(page)
    assert "Run this:" in copied and 'print("copied!")' in copied and "That is all." in copied
    assert "Copy code" not in copied

    code_button = reply.get_by_role("button", name="Copy code")
    code_button.click()
    expect(reply.locator(".code-block .copy-code")).to_have_text("Copied")
    assert clipboard(page).strip() == 'print("copied!")'

    user = page.locator("[data-role=user]")
    user.get_by_role("button", name="Copy", exact=True).click()
    expect(user.locator(".copy")).to_have_text("Copied")
    assert clipboard(page) == "Please copy me"
    # The label comes back.
    expect(user.locator(".copy")).to_have_text("Copy", timeout=5_000)
    assert_same_page(page)
    web.assert_clean()


# 5. Rename --------------------------------------------------------------------------------


def test_rename_a_conversation_from_the_sidebar_and_esc_cancels(web: Watched, fake: FakeOpenAI):
    page = web.page
    cid = start_conversation(page, "Name me something")
    mark(page)
    item = page.locator(f"#conv-{cid}")
    heading = page.locator("#chat-title")

    item.hover()
    item.get_by_role("button", name=f"Rename {TITLE}").click()
    field = page.get_by_role("textbox", name="Conversation title")
    expect(field).to_be_focused()
    expect(field).to_have_value(TITLE)
    field.fill("Holiday plans")
    field.press("Enter")

    link = sidebar(page).get_by_role("link", name="Holiday plans")
    expect(link).to_be_visible()
    expect(field).to_have_count(0)
    expect(heading).to_have_text("Holiday plans")

    # By keyboard: Tab from the link to its Rename button, Enter, type, then Esc cancels.
    link.focus()
    page.keyboard.press("Tab")
    rename = sidebar(page).get_by_role("button", name="Rename Holiday plans")
    expect(rename).to_be_focused()
    expect(rename).to_be_visible()
    page.keyboard.press("Enter")
    expect(field).to_be_focused()
    field.fill("Never saved")
    page.keyboard.press("Escape")

    expect(field).to_have_count(0)
    expect(link).to_be_visible()
    expect(heading).to_have_text("Holiday plans")
    expect(page.get_by_text("Never saved")).to_have_count(0)
    assert_same_page(page)

    page.reload()
    expect(heading).to_have_text("Holiday plans")
    expect(sidebar(page).get_by_role("link", name="Holiday plans")).to_be_visible()
    web.assert_clean()


# 6. Delete and undo -----------------------------------------------------------------------


def test_delete_offers_undo_and_a_deleted_conversation_is_gone_after_reload(
    web: Watched, fake: FakeOpenAI
):
    page = web.page
    keep = start_conversation(page, "Keep me around")
    drop = start_conversation(page, "Drop me please")
    page.goto("/")
    mark(page)
    kept, dropped = page.locator(f"#conv-{keep}"), page.locator(f"#conv-{drop}")
    expect(sidebar(page).locator("li")).to_have_count(2)

    kept.hover()
    kept.get_by_role("button", name=f"Delete {TITLE}").click()
    expect(kept).to_have_role("status")
    expect(kept).to_contain_text(f"Deleted “{TITLE}”")
    expect(kept.get_by_role("link")).to_have_count(0)
    kept.get_by_role("button", name="Undo").click()
    expect(kept.get_by_role("link", name=TITLE)).to_be_visible()
    expect(kept).not_to_contain_text("Deleted")

    dropped.hover()
    dropped.get_by_role("button", name=f"Delete {TITLE}").click()
    expect(dropped).to_contain_text(f"Deleted “{TITLE}”")
    expect(dropped.get_by_role("button", name="Undo")).to_be_visible()
    assert_same_page(page)

    page.reload()
    expect(page.locator(f"#conv-{drop}")).to_have_count(0)
    expect(page.locator(f"#conv-{keep}").get_by_role("link", name=TITLE)).to_be_visible()
    expect(sidebar(page).locator("li")).to_have_count(1)
    web.assert_clean()


# 7. Automatic title -----------------------------------------------------------------------


def test_the_model_titles_a_new_conversation_without_a_reload(web: Watched, fake: FakeOpenAI):
    page = web.page
    fake.configure("Lisbon it is.", hold_after=1)
    page.goto("/")
    mark(page)
    heading = page.locator("#chat-title")
    expect(heading).to_have_text("New chat")

    send(page, "Plan a weekend in Lisbon")
    fake.wait_until_held()
    # Until the first reply is done, the title is made from the message.
    expect(heading).to_contain_text("Lisbon")
    current = sidebar(page).locator("a[aria-current=page]")
    expect(current).to_contain_text("Lisbon")
    assert not [r for r in fake.requests if is_title_request(r.body)]

    fake.release()
    wait_done(page, 1)

    expect(heading).to_have_text(TITLE)
    expect(current).to_have_text(TITLE)
    expect(sidebar(page).get_by_role("link")).to_have_count(1)
    asked = [r for r in fake.requests if is_title_request(r.body)]
    assert len(asked) == 1 and "Plan a weekend in Lisbon" in str(asked[0].body)
    assert_same_page(page)
    web.assert_clean()


def test_the_browser_tab_title_follows_the_conversation_title(web: Watched, fake: FakeOpenAI):
    page = web.page
    page.goto("/")
    mark(page)
    expect(page).to_have_title("New chat · Agent chat")
    send(page, "Plan a weekend in Lisbon")
    wait_done(page, 1)
    expect(page.locator("#chat-title")).to_have_text(TITLE)
    assert_same_page(page)
    expect(page).to_have_title(f"{TITLE} · Agent chat", timeout=5_000)
    web.assert_clean()


# 8. Grouping by day -----------------------------------------------------------------------


def set_updated_at(app: LiveApp, cid: str, when: datetime) -> None:
    """Make a conversation look last active at `when` (written beside the running app)."""
    conn = app.connect()
    try:
        with conn:
            cur = conn.execute(
                "update conversations set updated_at = ? where id = ?",
                [when.isoformat(timespec="milliseconds"), cid],
            )
            assert cur.rowcount == 1
    finally:
        conn.close()


def test_the_sidebar_groups_conversations_by_day(web: Watched, app: LiveApp, fake: FakeOpenAI):
    page = web.page
    page.goto("/")
    mark(page)
    expect(sidebar(page)).to_contain_text("No conversations yet.")
    send(page, "A chat from today")
    wait_done(page, 1)
    expect(sidebar(page).locator("h2")).to_have_text(["Today"])
    today = conv_id(page)
    expect(page.locator(f"#conv-{today}")).to_be_visible()
    assert_same_page(page)

    yesterday = start_conversation(page, "A chat from yesterday")
    earlier = start_conversation(page, "A chat from last week")
    app.wait_idle()
    now = datetime.now(UTC)
    set_updated_at(app, yesterday, now - timedelta(days=1))
    set_updated_at(app, earlier, now - timedelta(days=10))
    page.reload()

    expect(sidebar(page).locator("h2")).to_have_text(["Today", "Yesterday", "Previous 30 days"])
    for label, cid in (("Today", today), ("Yesterday", yesterday), ("Previous 30 days", earlier)):
        group = sidebar(page).locator("div").filter(has=page.get_by_role("heading", name=label))
        expect(group.locator("li")).to_have_count(1)
        expect(group.locator(f"#conv-{cid}")).to_be_visible()
    web.assert_clean()


# 9. Search --------------------------------------------------------------------------------

# Whether the element with this id is (at least partly) inside the visible part of the list.
IN_VIEW = """(id) => {
  const m = document.querySelector("#messages").getBoundingClientRect();
  const e = document.getElementById(id).getBoundingClientRect();
  return e.bottom > m.top && e.top < m.bottom;
}"""
LONG_REPLY = "\n\n".join(f"Line {i} of a long answer." for i in range(1, 31))


def test_search_highlights_hits_and_opens_the_message(web: Watched, fake: FakeOpenAI):
    page = web.page
    fake.configure(LONG_REPLY)
    start_conversation(page, "Tell me about the zebra")
    for n, text in enumerate(("And the weather?", "And the sea?"), start=2):
        send(page, text)
        wait_done(page, n)
    page.goto("/")
    mark(page)

    search = page.get_by_role("searchbox", name="Search messages")
    search.press_sequentially("zebra", delay=20)

    results = page.locator("#search-results")
    expect(results.get_by_role("status")).to_have_text("1 result")
    hit = results.get_by_role("link")
    expect(hit).to_have_count(1)
    expect(hit.locator("mark")).to_have_text(["zebra"])
    expect(hit).to_contain_text("Tell me about the")
    expect(hit.locator("strong")).to_have_text(TITLE)
    assert_same_page(page)

    hit.click()

    expect(page).to_have_url(re.compile(r"/c/[\w-]+\?at=\d+#turn-\d+$"))
    anchor = page.url.rsplit("#", 1)[1]
    target = page.locator(f"#{anchor}")
    expect(target).to_contain_text("Tell me about the zebra")
    expect(page.locator("[data-role=user]")).to_have_count(3)
    # Scrolled to it: the message comes to rest inside the visible part of the message list.
    page.wait_for_function(IN_VIEW, arg=anchor, timeout=5_000)
    # Opened plainly, the list shows the newest messages instead (so the check can tell).
    page.goto(page.url.split("?")[0])
    expect(page.locator("[data-role=user]")).to_have_count(3)
    page.wait_for_function(f"() => !({IN_VIEW})({anchor!r})", timeout=5_000)
    web.assert_clean()


# 10. Export -------------------------------------------------------------------------------


def test_export_downloads_markdown_and_pydantic_ai_json(web: Watched, fake: FakeOpenAI):
    page = web.page
    fake.configure("Exported **reply** text.")
    cid = start_conversation(page, "Export this please")
    page.goto(f"/c/{cid}")  # a new chat offers export links once reopened: see the xfail below
    mark(page)
    exports = page.get_by_role("group", name="Export conversation")

    with page.expect_download(timeout=15_000) as md_download:
        exports.get_by_role("link", name="Markdown").click()
    md = md_download.value
    assert md.suggested_filename.endswith(".md")
    text = Path(md.path()).read_text()
    assert "Export this please" in text and "Exported **reply** text." in text
    assert text.index("Export this please") < text.index("Exported **reply** text.")

    with page.expect_download(timeout=15_000) as json_download:
        exports.get_by_role("link", name="JSON").click()
    js = json_download.value
    assert js.suggested_filename.endswith(".json")
    messages = ModelMessagesTypeAdapter.validate_json(Path(js.path()).read_bytes())
    assert user_prompts(messages) == ["Export this please"]
    assert reply_texts(messages) == ["Exported **reply** text."]
    assert_same_page(page)
    web.assert_clean()


def test_a_new_conversation_offers_export_without_a_reload(web: Watched, fake: FakeOpenAI):
    page = web.page
    page.goto("/")
    mark(page)
    send(page, "Export me straight away")
    wait_done(page, 1)
    exports = page.get_by_role("group", name="Export conversation")
    expect(exports.get_by_role("link", name="Markdown")).to_be_visible(timeout=5_000)
    expect(exports.get_by_role("link", name="JSON")).to_be_visible()
    assert_same_page(page)
    web.assert_clean()


# 11. Import -------------------------------------------------------------------------------

# What a failed (422) request leaves in the console: the browser's network error and htmx's
# report of the error response. Expected for a refused file, so filtered out of assert_clean.
_REFUSED = re.compile(r"status of 422|responseError|Response Status Error Code 422")


def count_conversations(app: LiveApp) -> int:
    """How many conversations the database holds (read beside the running app)."""
    conn = app.connect()
    try:
        return conn.execute("select count(*) from conversations").fetchone()[0]
    finally:
        conn.close()


def test_import_an_exported_file_and_a_bad_file_changes_nothing(
    web: Watched, app: LiveApp, fake: FakeOpenAI
):
    page = web.page
    fake.configure("An answer worth keeping.")
    cid = start_conversation(page, "Carry me over")
    page.goto(f"/c/{cid}")
    with page.expect_download(timeout=15_000) as download:
        page.get_by_role("link", name="JSON").click()
    exported = Path(download.value.path()).read_bytes()
    name = download.value.suggested_filename
    mark(page)
    file_input = page.get_by_label("Import a conversation (.json)")
    alert = page.locator("form.import").get_by_role("alert")
    items = sidebar(page).locator("li")
    expect(items).to_have_count(1)
    stored = count_conversations(app)

    for bad_name, content in (("bad.json", b'{"x": 1}'), ("broken.json", b"{not json")):
        file_input.set_input_files(
            files=[{"name": bad_name, "mimeType": "application/json", "buffer": content}]
        )
        page.get_by_role("button", name="Import", exact=True).click()
        expect(alert).to_contain_text(f"Could not import {bad_name}")
        expect(alert).to_contain_text("not a pydantic-ai message history")
        expect(items).to_have_count(1)
        assert count_conversations(app) == stored
        assert_same_page(page)

    file_input.set_input_files(
        files=[{"name": name, "mimeType": "application/json", "buffer": exported}]
    )
    before = page.url
    page.get_by_role("button", name="Import", exact=True).click()

    expect(page).not_to_have_url(before)
    expect(page).to_have_url(re.compile(r"/c/[\w-]+$"))
    title = "Imported: " + name.rsplit(".", 1)[0]
    expect(page.locator("#chat-title")).to_have_text(title)
    expect(page.locator("[data-role=user]")).to_have_text(re.compile("Carry me over"))
    expect(assistant(page, 1)).to_contain_text("An answer worth keeping.")
    expect(sidebar(page).locator("a[aria-current=page]")).to_have_text(title)
    expect(items).to_have_count(2)
    assert len(replies(fake)) == 1  # importing asks the model nothing
    assert web.csp_violations == []
    unexpected = [e for e in web.console_errors if not _REFUSED.search(e)]
    assert unexpected == [], unexpected
    assert len(web.console_errors) <= 4, web.console_errors


# 12. Errors -------------------------------------------------------------------------------


def test_an_upstream_failure_shows_an_alert_and_retry_streams_a_good_reply(
    web: Watched, fake: FakeOpenAI
):
    page = web.page
    fake.configure(script=[Fault.http(500)] * 3)
    page.goto("/")
    mark(page)
    send(page, "Will this work?")

    reply = wait_done(page, 1, timeout=30_000)
    alert = reply.get_by_role("alert")
    expect(alert).to_be_visible()
    expect(alert).to_contain_text("500")
    retry = alert.get_by_role("button", name="Retry")
    expect(retry).to_be_visible()
    expect(page.locator("[data-role=user]")).to_contain_text("Will this work?")
    assert len(replies(fake)) == 3  # the first try and two retries

    fake.configure("Now it works.", delay=0.02)
    retry.click()

    expect(assistant(page, 1)).to_contain_text("Now it works.")
    reply = wait_done(page, 1)
    expect(reply.get_by_role("alert")).to_have_count(0)
    expect(page.locator("[data-role=user]")).to_have_count(1)
    expect(page.locator("[data-role=user]")).to_contain_text("Will this work?")
    assert len(replies(fake)) == 4
    assert replies(fake)[-1].texts("user") == ["Will this work?"]
    assert_same_page(page)
    web.assert_clean()


# 13. Themes -------------------------------------------------------------------------------


def test_themes_follow_the_system_and_the_toggle_cycles_and_persists(
    browser, app: LiveApp, fake: FakeOpenAI
):
    with browsing(browser, app, color_scheme="dark") as w:
        page = w.page
        page.goto("/")
        mark(page)
        root = page.locator("html")
        assert background(page) < 0.2
        page.emulate_media(color_scheme="light")
        assert background(page) > 0.8
        page.emulate_media(color_scheme="dark")
        assert background(page) < 0.2

        toggle = page.get_by_role("button", name=re.compile("^Colour theme"))
        expect(toggle).to_have_accessible_name("Colour theme: system")
        expect(root).not_to_have_attribute("data-theme", re.compile(".*"))

        toggle.click()
        expect(toggle).to_have_accessible_name("Colour theme: light")
        expect(root).to_have_attribute("data-theme", "light")
        assert background(page) > 0.8  # chosen light beats the dark system setting
        assert page.evaluate("localStorage.getItem('theme')") == "light"

        toggle.focus()
        page.keyboard.press("Enter")
        expect(toggle).to_have_accessible_name("Colour theme: dark")
        expect(root).to_have_attribute("data-theme", "dark")
        assert page.evaluate("localStorage.getItem('theme')") == "dark"
        page.emulate_media(color_scheme="light")
        assert background(page) < 0.2  # chosen dark beats the light system setting
        assert_same_page(page)

        page.reload()
        expect(root).to_have_attribute("data-theme", "dark")
        expect(toggle).to_have_accessible_name("Colour theme: dark")
        assert background(page) < 0.2

        toggle.click()
        expect(toggle).to_have_accessible_name("Colour theme: system")
        expect(root).not_to_have_attribute("data-theme", re.compile(".*"))
        assert page.evaluate("localStorage.getItem('theme')") is None
        assert background(page) > 0.8  # the (light) system setting again
        page.emulate_media(color_scheme="dark")
        assert background(page) < 0.2
        w.assert_clean()


# 14. Access -------------------------------------------------------------------------------

FOCUSED = """() => {
  const e = document.activeElement;
  const s = getComputedStyle(e);
  return {
    tag: e.tagName.toLowerCase(), id: e.id, cls: String(e.className),
    name: e.getAttribute("aria-label") || (e.textContent || "").trim().slice(0, 40),
    inSidebar: !!e.closest("#conversations"), outline: s.outlineStyle,
    outlineWidth: parseFloat(s.outlineWidth), visible: e.matches(":focus-visible"),
  };
}"""


def test_keyboard_reaches_everything_with_a_visible_focus_and_replies_are_announced(
    web: Watched, fake: FakeOpenAI
):
    page = web.page
    start_conversation(page, "Hello there")
    mark(page)

    # Start where a keyboard user starts: the top of the page (Chromium resumes Tab from the
    # last focused element, so blurring would not do).
    page.get_by_role("link", name="New chat").focus()
    seen = []
    for _ in range(60):
        page.keyboard.press("Tab")
        seen.append(page.evaluate(FOCUSED))
        if seen[-1]["tag"] == "button" and seen[-1]["name"] == "Send":
            break
    where: dict[str, int] = {}
    for i, f in enumerate(seen):
        if (kind := _kind(f)) is not None:
            where.setdefault(kind, i)
    assert {"sidebar link", "message box", "send"} <= where.keys(), seen
    assert where["sidebar link"] < where["message box"] < where["send"], seen
    for f in seen:
        assert f["visible"], f
        if f["id"] == "msg":
            continue  # its focus ring is drawn on the whole composer row, checked below
        assert f["outline"] != "none" and f["outlineWidth"] >= 2, f
    row = page.locator(".composer-row")
    page.get_by_role("link", name="New chat").focus()
    resting_border = row.evaluate("e => getComputedStyle(e).borderTopColor")
    message_box(page).focus()
    assert row.evaluate("e => getComputedStyle(e).borderTopColor") != resting_border

    # A streaming reply: finished blocks are announced politely; the unfinished tail is not.
    fake.configure("Finished paragraph here.\n\nStill writing this", hold_after=5)
    send(page, "Say two things")
    reply = assistant(page, 2)
    fake.wait_until_held()
    finished, tail = reply.locator(".md:not(.tail)"), reply.locator(".md.tail")
    expect(finished).to_contain_text("Finished paragraph here.")
    expect(tail).to_contain_text("Still writing")
    expect(finished).not_to_contain_text("Still")
    expect(finished).to_have_attribute("aria-live", "polite")
    expect(tail).to_have_attribute("aria-hidden", "true")
    expect(reply).to_have_attribute("aria-busy", "true")
    expect(reply.get_by_role("status")).to_have_text("Writing…")

    fake.release()
    reply = wait_done(page, 2)
    expect(finished).to_contain_text("Finished paragraph here.")
    expect(finished).to_contain_text("Still writing this")
    expect(tail).to_have_text(re.compile(r"^\s*$"))
    assert_same_page(page)
    web.assert_clean()


def _kind(focused: dict) -> str | None:
    if focused["inSidebar"] and focused["tag"] == "a":
        return "sidebar link"
    if focused["id"] == "msg":
        return "message box"
    if focused["tag"] == "button" and focused["name"] == "Send":
        return "send"
    return None


ON_SCREEN = """() => {
  const e = document.activeElement;
  const r = e.getBoundingClientRect();
  return {
    tag: e.tagName.toLowerCase(), id: e.id,
    name: e.getAttribute("aria-label") || (e.textContent || "").trim().slice(0, 40),
    onScreen: r.width > 0 && r.height > 0 && r.right > 0 && r.bottom > 0
      && r.left < innerWidth && r.top < innerHeight,
  };
}"""


def test_on_a_phone_the_keyboard_never_focuses_the_closed_sidebar(
    browser, app: LiveApp, fake: FakeOpenAI
):
    with browsing(browser, app, **PHONE) as w:
        page = w.page
        page.goto("/")
        message_box(page).fill("Typing on a tablet keyboard")
        page.get_by_role("button", name="Send").tap()  # a touch keyboard's Enter adds a line
        wait_done(page, 1)
        mark(page)
        menu = page.get_by_role("button", name="Conversations")
        expect(menu).to_have_attribute("aria-expanded", "false")

        # The menu opens the list and moves focus into it; Esc closes it and returns focus.
        menu.focus()
        page.keyboard.press("Enter")
        expect(menu).to_have_attribute("aria-expanded", "true")
        expect(page.get_by_role("link", name="New chat")).to_be_focused()
        # Focus moves at once; the list slides in over 0.2 s. Judge where it comes to rest.
        wait_settled(page, "#sidebar")
        assert page.evaluate(ON_SCREEN)["onScreen"]
        page.keyboard.press("Escape")
        expect(menu).to_have_attribute("aria-expanded", "false")
        expect(menu).to_be_focused()

        # Closed (once it has slid away), it holds nothing Tab or Shift+Tab may reach.
        wait_settled(page, "#sidebar")
        assert page.evaluate(
            "document.querySelector('#sidebar').getBoundingClientRect().right <= 0"
        )
        message_box(page).focus()
        reached = []
        for _ in range(30):
            page.keyboard.press("Shift+Tab")
            reached.append(page.evaluate(ON_SCREEN))
            if reached[-1]["tag"] == "body" or reached[-1]["name"] == "New chat":
                break
        assert_same_page(page)
        hidden = [f for f in reached if not f["onScreen"] and f["tag"] != "body"]
        assert hidden == [], hidden
        w.assert_clean()
