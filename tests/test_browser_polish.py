"""In a real browser: the finish people expect of a chat (issue 15's layout and controls).

A phone's screen belongs to the conversation (portrait and landscape), a touch keyboard's Enter
adds a line, a long paste is counted rather than cut, Copy gives a reply's Markdown, messages
carry their times, "jump to latest", keyboard shortcuts and their dialog, and the small things:
the header's model badge, a renamed conversation's highlight, "Load earlier" keeping the
reader's place, focus after Esc. Headless Chromium against `python main.py` and the fake model;
every test ends with no Content-Security-Policy violation and no console error.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from playwright.sync_api import Page, expect
from pydantic_ai.messages import (
    ModelMessagesTypeAdapter,
    ModelRequest,
    ModelResponse,
    TextPart,
    UserPromptPart,
)

from tests.browser_steps import assistant, message_box, send, wait_done
from tests.fake_openai import FakeOpenAI
from tests.live import (  # noqa: F401  (fixtures are used by name)
    TITLE,
    LiveApp,
    Watched,
    browser_fixture,
    fake_fixture,
    fake_server_fixture,
    open_context,
    replies,
    running_app,
    web_fixture,
)

MAX_CHARS = 300
OTHER_MODEL = "openai-chat:other-model"
PHONE = {"viewport": {"width": 390, "height": 844}, "is_mobile": True, "has_touch": True}
LANDSCAPE = {"viewport": {"width": 844, "height": 390}, "is_mobile": True, "has_touch": True}


@pytest.fixture(name="app", scope="module")
def app_fixture(fake_server: FakeOpenAI, tmp_path_factory) -> Iterator[LiveApp]:
    """The app with two models to pick from (so the pickers show) and a short message limit."""
    with running_app(
        tmp_path_factory.mktemp("polish"),
        OPENAI_BASE_URL=fake_server.base_url,
        OPENAI_API_KEY="test",
        MODELS=f"openai-chat:fake-model,{OTHER_MODEL}",
        MAX_MESSAGE_CHARS=str(MAX_CHARS),
    ) as a:
        yield a


@contextlib.contextmanager
def browsing(browser, app: LiveApp, **kw) -> Iterator[Watched]:
    """A watched page in a fresh browser profile, closed afterwards."""
    w = open_context(browser, app.url, **kw)
    try:
        yield w
    finally:
        w.context.close()


def start_conversation(page: Page, text: str) -> str:
    """Open a new chat, send `text`, wait for the reply and the title; return the id."""
    page.goto("/")
    send(page, text)
    wait_done(page, 1)
    expect(page.locator("#chat-title")).to_have_text(TITLE)
    expect(page).to_have_url(re.compile(r"/c/[\w-]+$"))
    return re.search(r"/c/([\w-]+)", page.url).group(1)


def box_of(page: Page, selector: str) -> dict:
    """An element's bounding box on the screen."""
    box = page.locator(selector).bounding_box()
    assert box is not None, selector
    return box


def messages_area(page: Page) -> dict:
    """Where the message list scrolls: its height, scroll position and size."""
    return page.evaluate(
        "(m => ({top: m.scrollTop, height: m.scrollHeight, client: m.clientHeight}))"
        "(document.querySelector('#messages'))"
    )


def at_bottom(page: Page) -> bool:
    """The message list is scrolled to its end."""
    m = messages_area(page)
    return m["height"] - m["top"] - m["client"] < 4


def import_long_conversation(page: Page, turns: int, name: str = "long") -> None:
    """Import a conversation of `turns` exchanges through the sidebar's form and open it."""
    history = []
    for i in range(1, turns + 1):
        history.append(ModelRequest(parts=[UserPromptPart(content=f"Question {i}")]))
        history.append(ModelResponse(parts=[TextPart(content=f"Answer {i}.\n\nMore about {i}.")]))
    data = ModelMessagesTypeAdapter.dump_json(history)
    page.get_by_label("Import a conversation (.json)").set_input_files(
        files=[{"name": f"{name}.json", "mimeType": "application/json", "buffer": data}]
    )
    page.get_by_role("button", name="Import", exact=True).click()
    expect(page.locator("#chat-title")).to_have_text(f"Imported: {name}")
    expect(page.locator("[data-role=user] .text").last).to_have_text(f"Question {turns}")


def turn_row(app: LiveApp, tid: int) -> dict:
    """A row of the turns table."""
    return next(t for t in app.turns() if t["id"] == tid)


# 1. The phone's screen belongs to the conversation -------------------------------------------


@pytest.mark.parametrize(
    ("size", "header_max", "composer_max", "messages_min"),
    [
        # Upright: one header row, a composer of a couple of lines, the rest for the messages.
        (PHONE, 56, 120, 0.75),
        # On its side (390 px tall): the messages still get most of the height.
        (LANDSCAPE, 56, 110, 0.6),
    ],
    ids=["portrait", "landscape"],
)
def test_on_a_phone_the_conversation_owns_the_screen(
    browser, app: LiveApp, fake: FakeOpenAI, size, header_max, composer_max, messages_min
):
    fake.configure("A short answer.")
    with browsing(browser, app, **size) as w:
        page = w.page
        page.goto("/")
        details = page.get_by_role("button", name="Conversation details")
        expect(details).to_be_hidden()  # a new chat has no total or downloads yet
        message_box(page).fill("Hello from a phone")
        page.get_by_role("button", name="Send").tap()
        wait_done(page, 1)
        expect(page.locator("#chat-title")).to_have_text(TITLE)
        page.reload()  # (the header's token total is filled in when the page is drawn)
        height, width = size["viewport"]["height"], size["viewport"]["width"]

        header, composer = box_of(page, "header.topbar"), box_of(page, "#composer")
        messages = box_of(page, "#messages")
        assert header["height"] <= header_max, header
        assert composer["height"] <= composer_max, composer
        assert messages["height"] >= messages_min * height, (header, messages, composer)
        # One row: the menu, the title, the badge and the controls share a line.
        tops = [box_of(page, s)["y"] for s in (".menu", "#chat-title", "#model-badge", ".theme")]
        assert max(tops) - min(tops) < 12, tops
        assert composer["y"] + composer["height"] <= height + 1
        assert page.evaluate("document.scrollingElement.scrollWidth") <= width
        # The model and persona pickers stay usable, on one line above the box.
        expect(page.get_by_label("Model", exact=True)).to_be_visible()
        expect(page.get_by_label("Persona", exact=True)).to_be_visible()

        # The token total and the downloads are one tap away, in a panel under the header.
        markdown = page.get_by_role("link", name="Markdown")
        expect(markdown).to_be_hidden()
        details.tap()
        expect(details).to_have_attribute("aria-expanded", "true")
        expect(markdown).to_be_visible()
        expect(page.get_by_role("link", name="JSON")).to_be_visible()
        expect(page.locator("#conv-usage")).to_contain_text("Tokens")
        page.locator("#chat-title").tap()  # a tap elsewhere closes the panel
        expect(markdown).to_be_hidden()

        # The sidebar is a panel behind the menu in both orientations.
        expect(page.get_by_role("link", name="New chat")).to_be_hidden()
        page.get_by_role("button", name="Conversations").tap()
        expect(page.get_by_role("link", name="New chat")).to_be_visible()
        w.assert_clean()


# 2. Enter on a touch keyboard ----------------------------------------------------------------


def test_on_a_touch_keyboard_enter_adds_a_line_and_send_sends(
    browser, app: LiveApp, fake: FakeOpenAI
):
    fake.configure("Got both lines.")
    with browsing(browser, app, **PHONE) as w:
        page = w.page
        page.goto("/")
        page.evaluate(
            "window.__submits = 0;"
            "document.addEventListener('submit', () => window.__submits++, true)"
        )
        box = message_box(page)
        box.type("first line")
        box.press("Enter")
        box.type("second line")
        expect(box).to_have_value("first line\nsecond line")
        assert page.evaluate("window.__submits") == 0
        assert replies(fake) == []

        page.get_by_role("button", name="Send").tap()
        wait_done(page, 1)
        expect(page.locator("[data-role=user] .text")).to_have_text("first line\nsecond line")
        expect(box).to_have_value("")
        # A tablet's hardware keyboard can still send without the screen: Ctrl+Enter.
        box.type("from a keyboard")
        box.press("Control+Enter")
        wait_done(page, 2)
        expect(page.locator("[data-role=user] .text").nth(1)).to_have_text("from a keyboard")
        w.assert_clean()

    # A desktop keyboard: Enter sends, as before.
    with browsing(browser, app) as w:
        page = w.page
        page.goto("/")
        message_box(page).type("sent by Enter")
        message_box(page).press("Enter")
        wait_done(page, 1)
        expect(page.locator("[data-role=user] .text")).to_have_text("sent by Enter")
        w.assert_clean()


# 3. The message limit: counted, explained, never cut -------------------------------------------


def test_a_paste_over_the_limit_is_kept_counted_and_explained_and_not_sent(
    web: Watched, app: LiveApp, fake: FakeOpenAI
):
    page = web.page
    web.context.grant_permissions(["clipboard-read", "clipboard-write"], origin=app.url)
    fake.configure("Received.")
    page.goto("/")
    box, counter = message_box(page), page.locator("#msg-count")
    expect(counter).to_be_hidden()

    box.fill("a" * (MAX_CHARS - 20))  # near the limit: a counter
    expect(counter).to_be_visible()
    expect(counter).to_have_text(f"{MAX_CHARS - 20} / {MAX_CHARS} characters")

    box.fill("")
    pasted = "word " * 80  # 400 characters
    page.evaluate("t => navigator.clipboard.writeText(t)", pasted)
    box.focus()
    page.keyboard.press("Control+V")
    expect(box).to_have_value(pasted)  # nothing cut
    over = len(pasted) - MAX_CHARS
    expect(counter).to_contain_text(f"{len(pasted)} / {MAX_CHARS} characters")
    expect(counter).to_contain_text(f"{over} over the limit")
    expect(counter).to_contain_text("Shorten the message to send it.")
    expect(box).to_have_attribute("aria-invalid", "true")

    box.press("Enter")
    page.get_by_role("button", name="Send").click()
    expect(box).to_be_focused()
    expect(box).to_have_value(pasted)
    assert not [u for u in web.requests if u.endswith("/send")]
    assert replies(fake) == []

    fits = pasted[: MAX_CHARS - 1] + "!"  # exactly at the limit is fine
    box.fill(fits)
    expect(counter).not_to_contain_text("over")
    expect(box).not_to_have_attribute("aria-invalid", "true")
    box.press("Enter")
    wait_done(page, 1)
    assert app.turns()[-1]["user_text"] == fits
    expect(counter).to_be_hidden()

    # Editing a sent message: the same counter and message, and nothing sent while over.
    page.locator("[data-role=user]").get_by_role("button", name="Edit").click()
    edit = page.get_by_role("textbox", name="Edit message")
    edit_counter = page.locator(".editing .msg-count")
    expect(edit_counter).to_have_text(f"{MAX_CHARS} / {MAX_CHARS} characters")  # at once
    edit.fill(pasted)
    expect(edit).to_have_value(pasted)
    expect(edit_counter).to_contain_text(f"{over} over the limit")
    posts: list[str] = []
    page.on("request", lambda r: posts.append(r.url) if r.method == "POST" else None)
    page.get_by_role("button", name="Send edit").click()
    expect(edit).to_be_focused()
    expect(edit).to_have_value(pasted)
    assert posts == []
    assert len(replies(fake)) == 1
    web.assert_clean()


# 4. Copy gives the Markdown ------------------------------------------------------------------

TABLE_REPLY = """Here is the **summary**:

| Name | Score |
|:-----|------:|
| Ada  |    10 |
| Bob  |     7 |

```python
print("kept")
```

- done"""


def test_copying_a_reply_copies_its_markdown_with_tables_and_fences(
    web: Watched, app: LiveApp, fake: FakeOpenAI
):
    page = web.page
    web.context.grant_permissions(["clipboard-read", "clipboard-write"], origin=app.url)
    fake.configure(TABLE_REPLY)
    start_conversation(page, "Summarise, please")
    for _ in ("live", "reloaded"):
        reply = wait_done(page, 1)
        expect(reply.locator("table")).to_be_visible()
        page.evaluate("navigator.clipboard.writeText('')")
        copy = reply.locator(".reply-foot").get_by_role("button", name="Copy", exact=True)
        copy.click()
        expect(reply.locator(".reply-foot .copy")).to_have_text("Copied")
        assert page.evaluate("navigator.clipboard.readText()") == TABLE_REPLY
        page.reload()
    web.assert_clean()


# 5. Timestamps -------------------------------------------------------------------------------


def set_created_at(app: LiveApp, tid: int, when: datetime) -> None:
    """Make a turn look sent (and answered) at `when` (written beside the running app)."""
    stamp = when.isoformat(timespec="milliseconds")
    conn = app.connect()
    try:
        with conn:
            conn.execute(
                "update turns set created_at = ?, finished_at = ? where id = ?", [stamp, stamp, tid]
            )
    finally:
        conn.close()


def test_messages_show_when_they_were_sent_relative_with_the_exact_time_on_hover(
    web: Watched, app: LiveApp, fake: FakeOpenAI
):
    page = web.page
    fake.configure("Timely.")
    web.context.clock.install()  # time flows as usual, and a test can move it on
    start_conversation(page, "What time is it?")
    tid = app.turns()[-1]["id"]
    row = turn_row(app, tid)
    sent = page.locator("[data-role=user] time")
    written = page.locator("[data-role=assistant] time")
    expect(sent).to_have_attribute("datetime", row["created_at"])
    expect(written).to_have_text("just now")  # the live reply's footer has one too
    expect(sent).to_have_text("just now")
    # The exact time on hover, in the reader's own time zone and words.
    title = sent.get_attribute("title")
    assert re.search(r"\d{4}", title) and re.search(r"\d{1,2}:\d{2}", title), title

    # The page keeps them current while it stays open.
    page.clock.fast_forward("05:00")
    expect(sent).to_have_text("5 min ago")

    set_created_at(app, tid, datetime.now(UTC) - timedelta(hours=3))
    page.reload()
    expect(sent).to_have_attribute("datetime", turn_row(app, tid)["created_at"])
    expect(sent).to_have_text("3 hours ago")
    expect(written).to_have_text("3 hours ago")
    web.assert_clean()


# 6. Jump to latest ---------------------------------------------------------------------------


def test_jump_to_latest_shows_when_scrolled_up_and_while_a_reply_grows_below(
    web: Watched, fake: FakeOpenAI
):
    page = web.page
    page.goto("/")
    import_long_conversation(page, 30, "jump")
    jump = page.get_by_role("button", name="Jump to latest message")
    page.wait_for_function(
        "(m => m.scrollHeight > 3 * m.clientHeight)(document.querySelector('#messages'))"
    )
    expect(jump).to_be_hidden()  # opened at the newest message
    page.locator("#messages").evaluate("m => m.scrollTop = 0")
    expect(jump).to_be_visible()
    # It floats over the foot of the message list, just above the message box.
    button, composer = jump.bounding_box(), box_of(page, "#composer")
    assert composer["y"] - 40 <= button["y"] + button["height"] <= composer["y"], button
    jump.click()
    expect(jump).to_be_hidden()
    assert at_bottom(page)

    # A long reply streams while the reader scrolls up to read: it does not pull them down,
    # and the button takes them back to the end.
    long = "\n\n".join(f"Paragraph {i} of a long answer." for i in range(60))
    fake.configure(long, hold_after=150)
    send(page, "Tell me a lot")
    fake.wait_until_held(timeout=20)
    reply = assistant(page, 31)
    expect(reply).to_contain_text("Paragraph 15", timeout=15_000)
    expect(reply.get_by_text("Writing…")).to_be_visible()
    page.locator("#messages").evaluate("m => m.scrollTop = 0")
    expect(jump).to_be_visible()
    fake.release()
    wait_done(page, 31)
    expect(reply).to_contain_text("Paragraph 59")
    assert messages_area(page)["top"] < 50  # stayed where the reader went
    expect(jump).to_be_visible()
    jump.click()
    expect(jump).to_be_hidden()
    assert at_bottom(page)
    web.assert_clean()


# 7. Keyboard shortcuts -----------------------------------------------------------------------


def test_keyboard_shortcuts_and_their_dialog(web: Watched, fake: FakeOpenAI):
    page = web.page
    fake.configure("Shortcut reply.")
    start_conversation(page, "Keys, please")
    search = page.get_by_role("searchbox", name="Search messages")

    page.keyboard.press("Control+k")
    expect(search).to_be_focused()
    page.locator("#chat-title").click()
    page.keyboard.press("/")
    expect(search).to_be_focused()
    expect(search).to_have_value("")  # the slash was not typed

    # ? opens the dialog; focus stays inside it; Esc closes it and focus comes back.
    opener = page.get_by_role("button", name="Keyboard shortcuts")
    opener.focus()
    page.keyboard.press("Shift+?")
    dialog = page.get_by_role("dialog", name="Keyboard shortcuts")
    expect(dialog).to_be_visible()
    for text in ("New chat", "Search messages", "Stop the reply being written"):
        expect(dialog).to_contain_text(text)
    for _ in range(4):
        page.keyboard.press("Tab")
        assert page.evaluate("!!document.activeElement.closest('dialog')"), "focus left the dialog"
    page.keyboard.press("Escape")
    expect(dialog).to_be_hidden()
    expect(opener).to_be_focused()

    # Ctrl+/ opens it from the message box too; its Close button closes it.
    message_box(page).focus()
    page.keyboard.press("Control+/")
    expect(dialog).to_be_visible()
    dialog.get_by_role("button", name="Close").click()
    expect(dialog).to_be_hidden()
    expect(message_box(page)).to_be_focused()
    expect(message_box(page)).to_have_value("")

    # Esc stops the reply being written; Esc in the search box only clears the search.
    fake.configure("word " * 400, delay=0.05)
    send(page, "A long one")
    reply = assistant(page, 2)
    expect(reply).to_contain_text("word word")
    page.evaluate(
        "window.__stops = 0; document.addEventListener('htmx:beforeRequest', e => {"
        " if (e.detail.requestConfig.path.endsWith('/stop')) window.__stops++ })"
    )
    search.fill("words")
    search.press("Escape")
    assert page.evaluate("window.__stops") == 0  # (the Stop request starts within the keypress)
    expect(reply.get_by_role("button", name="Stop")).to_be_visible()
    message_box(page).focus()
    page.keyboard.press("Escape")
    expect(reply).to_contain_text("Stopped", timeout=10_000)

    # Ctrl+Shift+O: a new chat.
    page.keyboard.press("Control+Shift+O")
    expect(page).to_have_url(re.compile(r"/$"))
    expect(page.locator("#chat-title")).to_have_text("New chat")
    web.assert_clean()


# 8. The smaller things -----------------------------------------------------------------------


def test_the_header_badge_follows_the_model_picker(web: Watched, fake: FakeOpenAI):
    page = web.page
    page.goto("/")
    badge = page.locator("#model-badge")
    expect(badge).to_have_text("openai-chat:fake-model")
    page.get_by_label("Model", exact=True).select_option(OTHER_MODEL)
    expect(badge).to_have_text(OTHER_MODEL)
    web.assert_clean()


def test_a_renamed_conversation_keeps_its_highlight(web: Watched, fake: FakeOpenAI):
    page = web.page
    fake.configure("Named.")
    cid = start_conversation(page, "Rename me")
    item = page.locator(f"#conv-{cid}")
    expect(item.locator("a[aria-current=page]")).to_have_count(1)
    item.hover()
    item.get_by_role("button", name=f"Rename {TITLE}").click()
    field = page.get_by_role("textbox", name="Conversation title")
    expect(field).to_be_focused()  # (htmx has taken the form in hand)
    field.fill("Kept in view")
    field.press("Enter")
    link = item.get_by_role("link", name="Kept in view")
    expect(link).to_have_attribute("aria-current", "page")
    # Cancelling a rename keeps it too.
    item.hover()
    item.get_by_role("button", name="Rename Kept in view").click()
    expect(field).to_be_focused()
    field.press("Escape")
    expect(link).to_have_attribute("aria-current", "page")
    web.assert_clean()


def test_load_earlier_keeps_the_message_the_reader_was_on_in_place(web: Watched):
    page = web.page
    page.goto("/")
    import_long_conversation(page, 70, "earlier")
    users = page.locator("[data-role=user] .text")
    expect(users).to_have_count(50)  # one page of the conversation
    page.locator("#messages").evaluate("m => m.scrollTop = 0")
    load = page.get_by_role("link", name="Load earlier messages")
    expect(load).to_be_visible()
    first = page.get_by_text("Question 21", exact=True)
    before = first.bounding_box()["y"]
    load.click()
    expect(users).to_have_count(70)
    expect(users.first).to_have_text("Question 1")
    after = first.bounding_box()["y"]
    assert abs(after - before) < 3, (before, after)
    web.assert_clean()


def test_esc_out_of_an_edit_or_a_rename_gives_focus_back_to_its_button(
    web: Watched, fake: FakeOpenAI
):
    page = web.page
    fake.configure("Editable.")
    cid = start_conversation(page, "Edit me")
    user = page.locator("[data-role=user]")
    user.get_by_role("button", name="Edit").click()
    field = page.get_by_role("textbox", name="Edit message")
    expect(field).to_be_focused()
    field.press("Escape")
    expect(field).to_have_count(0)
    expect(user.get_by_role("button", name="Edit")).to_be_focused()

    item = page.locator(f"#conv-{cid}")
    item.hover()
    item.get_by_role("button", name=f"Rename {TITLE}").click()
    title = page.get_by_role("textbox", name="Conversation title")
    expect(title).to_be_focused()
    title.press("Escape")
    expect(title).to_have_count(0)
    expect(item.get_by_role("button", name=f"Rename {TITLE}")).to_be_focused()
    web.assert_clean()
