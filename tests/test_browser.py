"""In a real browser: headless Chromium against `python main.py` and the fake upstream model.

What a user sees and does: typing, Enter and Shift+Enter, the reply streaming in formatted steps,
reloads (also mid-reply), Stop, a phone-sized screen, and hostile model output. Every test also
asserts that no Content-Security-Policy violation and no console error happened.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from playwright.sync_api import expect

from tests.browser_steps import assistant, message_box, send, wait_done
from tests.fake_openai import FakeOpenAI, Fault
from tests.live import (  # noqa: F401  (fixtures are used by name)
    ROOT,
    LiveApp,
    Watched,
    app_fixture,
    browser_fixture,
    fake_fixture,
    fake_server_fixture,
    open_context,
    replies,
    running_app,
    title_reply,
    wait_streams_closed,
    web_fixture,
)

FORMATTED = """Here is **the plan** for today.

- first step
- second step
- third step

```python
print("hello")
```

All done."""

# Records the last reply's HTML on every change, so a test can see the steps it went through.
RECORD_STEPS = """() => {
  window.__steps = [];
  const box = document.querySelector("#messages");
  new MutationObserver(() => {
    const all = box.querySelectorAll("[data-role=assistant]");
    const reply = all[all.length - 1];
    if (!reply) return;
    const html = reply.innerHTML;
    const last = window.__steps[window.__steps.length - 1];
    if (last && last.html === html) return;
    window.__steps.push({html, writing: !!reply.querySelector(".writing")});
  }).observe(box, {subtree: true, childList: true, characterData: true, attributes: true});
}"""


def stream_requests(w: Watched) -> list[str]:
    """Every SSE stream the page opened."""
    return [u for u in w.requests if u.endswith("/stream")]


def test_reply_streams_in_visibly_in_formatted_steps(web: Watched, fake: FakeOpenAI):
    page = web.page
    fake.configure(FORMATTED, delay=0.04)
    page.goto("/")
    page.evaluate(RECORD_STEPS)

    send(page, "What is the plan?")

    reply = wait_done(page, 1)
    expect(reply.locator("strong")).to_have_text("the plan")
    expect(reply.locator("li")).to_have_text(["first step", "second step", "third step"])
    expect(reply.locator("pre")).to_contain_text('print("hello")')
    expect(reply).to_contain_text("All done.")
    steps = page.evaluate("window.__steps")
    writing = [s["html"] for s in steps if s["writing"]]

    def first(tag: str) -> int:
        return next(i for i, html in enumerate(writing) if tag in html)

    # Formatting shows while the reply is still being written, one piece after another.
    assert first("<strong>") < first("<li") < first("<pre"), len(writing)
    assert "All done." not in writing[first("<pre")]
    assert len(writing) >= 5
    assert len(replies(fake)) == 1
    web.assert_clean()


def test_shift_enter_adds_a_line_and_enter_sends_then_clears_and_focuses(
    web: Watched, fake: FakeOpenAI
):
    page = web.page
    fake.configure("Two lines received.")
    page.goto("/")
    box = message_box(page)
    expect(box).to_be_focused()

    # Enter submits from its keydown handler, synchronously: once the keys are typed, a submit
    # would already have been counted (no wait for time needed to see that none happened).
    page.evaluate(
        "window.__submits = 0;document.addEventListener('submit', () => window.__submits++, true)"
    )
    box.type("line one")
    box.press("Shift+Enter")
    box.type("line two")
    assert page.evaluate("window.__submits") == 0
    expect(box).to_have_value("line one\nline two")
    expect(page.locator("[data-role=user]")).to_have_count(0)
    assert fake.requests == []

    box.press("Enter")
    expect(page.locator("[data-role=user]")).to_have_count(1)
    expect(page.locator("[data-role=user]")).to_contain_text("line one\nline two")
    expect(box).to_have_value("")
    expect(box).to_be_focused()
    expect(wait_done(page, 1)).to_contain_text("Two lines received.")
    # Forms send line breaks as CRLF (HTML's form encoding).
    assert [t.replace("\r\n", "\n") for t in replies(fake)[0].texts("user")] == [
        "line one\nline two"
    ]
    web.assert_clean()


def test_reload_keeps_both_messages_and_the_next_message_sends_history(
    web: Watched, fake: FakeOpenAI
):
    page = web.page
    fake.configure(lambda body: f"Answer {len(replies(fake))}: noted.")
    page.goto("/")
    send(page, "Remember the number 7")
    expect(wait_done(page, 1)).to_contain_text("Answer 1: noted.")
    expect(page).to_have_url(re.compile(r"/c/[\w-]+$"))

    page.reload()
    expect(page.locator("[data-role=user]")).to_have_count(1)
    expect(page.locator("[data-role=user]")).to_contain_text("Remember the number 7")
    expect(assistant(page, 1)).to_contain_text("Answer 1: noted.")

    send(page, "What number?")
    expect(wait_done(page, 2)).to_contain_text("Answer 2: noted.")
    first, second = replies(fake)
    assert second.texts("user") == ["Remember the number 7", "What number?"]
    assert second.texts("assistant") == ["Answer 1: noted."]
    # Quiet afterwards: every stream closed (nothing left to reconnect), no further model call.
    wait_streams_closed(page)
    assert len(replies(fake)) == 2
    assert len(stream_requests(web)) == 2
    web.assert_clean()


def test_nothing_more_happens_after_a_reply_has_finished(web: Watched, fake: FakeOpenAI):
    page = web.page
    fake.configure("Finished.")
    page.goto("/")
    send(page, "Just one reply")
    expect(wait_done(page, 1)).to_contain_text("Finished.")

    # The stream was closed by its "done" event: a closed source never reconnects.
    wait_streams_closed(page)

    assert len(replies(fake)) == 1
    assert len(stream_requests(web)) == 1
    expect(page.locator("[data-role=assistant]")).to_have_count(1)
    expect(assistant(page, 1)).to_contain_text("Finished.")
    assert assistant(page, 1).inner_text().count("Finished.") == 1
    web.assert_clean()


def test_reload_mid_reply_shows_the_reply_so_far_then_continues(web: Watched, fake: FakeOpenAI):
    page = web.page
    fake.configure("alpha bravo charlie delta echo foxtrot", hold_after=3)
    page.goto("/")
    send(page, "Spell it out")
    expect(assistant(page, 1)).to_contain_text("alpha bravo charlie")
    fake.wait_until_held()

    page.reload()

    reply = assistant(page, 1)
    expect(reply).to_contain_text("alpha bravo charlie")
    expect(reply.get_by_role("button", name="Stop")).to_be_visible()
    expect(reply).not_to_contain_text("delta")
    fake.release()
    reply = wait_done(page, 1)
    expect(reply).to_contain_text("alpha bravo charlie delta echo foxtrot")
    assert reply.inner_text().count("alpha") == 1
    assert len(replies(fake)) == 1
    web.assert_clean()


def test_stop_button_shows_while_streaming_and_stops_the_reply(web: Watched, fake: FakeOpenAI):
    page = web.page
    fake.configure("one two three four five six", hold_after=2)
    page.goto("/")
    send(page, "Count slowly")
    reply = assistant(page, 1)
    stop = reply.get_by_role("button", name="Stop")
    expect(stop).to_be_visible()
    expect(reply).to_contain_text("one two")
    held = fake.wait_until_held()

    stop.click()

    reply = wait_done(page, 1)
    expect(reply).to_contain_text("Stopped")
    expect(reply).to_contain_text("one two")
    expect(reply).not_to_contain_text("three")
    fake.wait_until_finished()
    assert held.disconnected and not held.completed
    expect(message_box(page)).to_be_editable()
    web.assert_clean()


def test_a_second_tab_follows_the_same_reply_without_a_second_model_call(
    web: Watched, fake: FakeOpenAI
):
    page = web.page
    fake.configure("shared reply for every tab", hold_after=2)
    page.goto("/")
    send(page, "Watch this in two tabs")
    expect(assistant(page, 1)).to_contain_text("shared reply")
    fake.wait_until_held()
    other = web.context.new_page()
    other.goto(page.url)
    expect(assistant(other, 1)).to_contain_text("shared reply")

    fake.release()

    for p in (page, other):
        expect(wait_done(p, 1)).to_contain_text("shared reply for every tab")
        assert assistant(p, 1).inner_text().count("shared reply") == 1
    assert len(replies(fake)) == 1
    web.assert_clean()


def test_upstream_failure_shows_an_alert_in_the_reply_and_keeps_the_message(
    web: Watched, fake: FakeOpenAI
):
    page = web.page
    fake.configure(fault=Fault.http(503))
    page.goto("/")
    send(page, "Is the service up?")

    reply = wait_done(page, 1)
    expect(reply.get_by_role("alert")).to_contain_text("HTTP 503")
    expect(page.locator("[data-role=user]")).to_contain_text("Is the service up?")
    page.reload()
    expect(assistant(page, 1).get_by_role("alert")).to_contain_text("HTTP 503")
    expect(page.locator("[data-role=user]")).to_contain_text("Is the service up?")
    web.assert_clean()


def test_a_message_the_box_accepts_is_not_refused_as_too_long(browser, tmp_path: Path):
    with FakeOpenAI("Fits.", side_reply=title_reply) as upstream, running_app(
        tmp_path / "app", OPENAI_BASE_URL=upstream.base_url, OPENAI_API_KEY="test",
        MAX_MESSAGE_CHARS="20",
    ) as small:  # fmt: skip
        w = open_context(browser, small.url)
        try:
            page = w.page
            page.goto("/")
            box = message_box(page)
            box.type("aaaa")
            for line in ("bbbb", "cccc", "dddd"):
                box.press("Shift+Enter")
                box.type(line)
            box.type("zzzz")  # 23: over the limit of 20, kept and explained (not cut silently)
            expect(page.locator("#msg-count")).to_contain_text("3 over the limit")
            for _ in range(3):
                box.press("Backspace")
            assert len(box.input_value()) == 20  # line breaks count once, here as on the server
            expect(page.locator("#msg-count")).to_have_text("20 / 20 characters")
            box.press("Enter")
            expect(page.locator("[data-role=user]")).to_have_count(1)
            expect(page.locator("#composer-error")).to_be_empty()
            expect(wait_done(page, 1)).to_contain_text("Fits.")
        finally:
            w.context.close()


HOSTILE = """Look: <script>window.__pwned = "script"</script>

<img src=x onerror="window.__pwned = 'img'">

<svg onload="window.__pwned = 'svg'"></svg>

<iframe src="javascript:window.__pwned = 'iframe'"></iframe>

<div hx-get="/health" hx-trigger="load">htmx</div>

[click me](javascript:window.__pwned='link') and <a href="javascript:window.__pwned='a'">raw</a>

![picture](javascript:window.__pwned='image')

[fine](https://example.com/ok "t")"""


# What in the message list could run: elements, handlers, javascript: URLs, htmx attributes.
RUNNABLE = """() => {
  const box = document.querySelector("#messages");
  const all = [...box.querySelectorAll("*")];
  return {
    tags: all.map(e => e.tagName.toLowerCase()).filter(
            t => ["script", "img", "svg", "iframe", "object", "embed"].includes(t)),
    handlers: all.flatMap(e => [...e.attributes].map(a => a.name))
                 .filter(n => n.startsWith("on")),
    js: [...box.querySelectorAll("[href], [src]")]
          .map(e => e.getAttribute("href") || e.getAttribute("src"))
          .filter(u => /^\\s*javascript:/i.test(u)),
    htmx: [...box.querySelectorAll(".chunk *")].flatMap(e => [...e.attributes])
             .map(a => a.name).filter(n => /^(hx-|data-hx-|sse-)/.test(n)),
  };
}"""


def test_hostile_model_output_and_message_run_nothing(web: Watched, fake: FakeOpenAI):
    page = web.page
    fake.configure(HOSTILE, delay=0.01)
    page.goto("/")
    send(page, "<img src=x onerror=\"window.__pwned = 'user'\"> <script>window.__pwned=1</script>")

    reply = wait_done(page, 1)
    expect(reply).to_contain_text("Look:")
    expect(reply.get_by_role("link", name="fine")).to_have_attribute(
        "href", "https://example.com/ok"
    )
    # Checked as streamed and as stored: nothing that could run reached the page, so nothing
    # asynchronous (an image's error handler) is left to wait for before looking at __pwned.
    found_live = page.evaluate(RUNNABLE)
    assert page.evaluate("window.__pwned") is None
    page.reload()
    wait_done(page, 1)

    assert page.evaluate("window.__pwned") is None
    found = page.evaluate(RUNNABLE)
    assert found_live == found
    assert found == {"tags": [], "handlers": [], "js": [], "htmx": []}
    # The markup is shown as text, not interpreted.
    expect(page.locator("[data-role=user]")).to_contain_text("<script>window.__pwned=1</script>")
    assert not [u for u in web.requests if u.endswith("/health") or "/x" in u]
    web.assert_clean()


def test_phone_sized_screen_is_usable_without_sideways_scrolling(
    browser, app: LiveApp, fake: FakeOpenAI
):
    fake.configure(
        "A long word: " + "Supercalifragilistic" * 8 + "\n\n```text\n" + "x" * 300 + "\n```\n\n"
        "| a | b | c | d |\n|---|---|---|---|\n| " + " | ".join(["wide cell text"] * 4) + " |"
    )
    w = open_context(browser, app.url, viewport={"width": 390, "height": 844}, is_mobile=True,
                     has_touch=True)  # fmt: skip
    try:
        page = w.page
        page.goto("/")
        box, send_button = message_box(page), page.get_by_role("button", name="Send")
        expect(box).to_be_visible()
        expect(send_button).to_be_visible()
        box.fill("Hello from a phone " + "y" * 120)
        send_button.tap()

        expect(wait_done(page, 1)).to_contain_text("A long word")
        expect(page.locator("[data-role=user]")).to_be_visible()
        width = page.evaluate("innerWidth")
        assert page.evaluate("document.scrollingElement.scrollWidth") <= width
        # Nor sideways scrolling inside the message list (wide code and tables scroll on their own).
        assert page.evaluate(
            "(m => m.scrollWidth <= m.clientWidth)(document.querySelector('#messages'))"
        )
        for el in (box, send_button, page.locator("[data-role=user]"), assistant(page, 1)):
            b = el.bounding_box()
            assert b["x"] >= 0 and b["x"] + b["width"] <= width, b
        b = send_button.bounding_box()
        assert b["y"] + b["height"] <= 844
        box.fill("Second from the phone")
        send_button.tap()
        expect(wait_done(page, 2)).to_contain_text("A long word")
        assert page.evaluate("document.scrollingElement.scrollWidth") <= width
        assert page.evaluate(
            "(m => m.scrollWidth <= m.clientWidth)(document.querySelector('#messages'))"
        )
        w.assert_clean()
    finally:
        w.context.close()


SCREENSHOT_REPLY = """You can do it with the standard library's `csv` module:

```python
import csv

with open("sales.csv", newline="") as f:
    total = sum(float(row["amount"]) for row in csv.DictReader(f))
print(f"Total: {total:.2f}")
```

A few things to watch for:

1. **Empty cells**: `float("")` raises, so skip or default them.
2. **Thousands separators** such as `1,200` need `.replace(",", "")` first.
3. For large files, this reads one row at a time, so memory stays flat.

If you already use *pandas*, `pd.read_csv("sales.csv")["amount"].sum()` does the same."""


def test_screenshot_of_a_finished_conversation(browser, tmp_path: Path):
    """docs/screenshot.png: written when UPDATE_SCREENSHOT=1, else only rendered and checked."""
    titles = {"How do I sum a column": "Summing a CSV column", "Tabs or spaces": "Tabs or spaces"}

    def title(body: dict) -> str | None:
        if not any("short title" in str(m.get("content")) for m in body["messages"]):
            return None
        text = str(body["messages"][-1]["content"])
        return next((t for k, t in titles.items() if k in text), "A conversation")

    def answer(body: dict) -> str:
        if "Tabs" in str(body["messages"][-1]["content"]):
            return "Spaces: **PEP 8** asks for four per level."
        return SCREENSHOT_REPLY

    with FakeOpenAI(answer, delay=0.002, side_reply=title) as upstream, running_app(
        tmp_path / "app", "openai-chat:llama3.2",
        OPENAI_BASE_URL=upstream.base_url, OPENAI_API_KEY="local",
    ) as shot_app:  # fmt: skip
        w = open_context(browser, shot_app.url, color_scheme="light")
        try:
            page = w.page
            page.goto("/")
            send(page, "Tabs or spaces?")
            wait_done(page, 1)
            page.get_by_role("link", name="New chat").click()
            send(page, "How do I sum a column of a CSV file in Python?")
            wait_done(page, 1)
            expect(page.locator("#chat-title")).to_have_text("Summing a CSV column")
            page.mouse.move(0, 0)
            page.locator("#msg").blur()
            out = tmp_path / "screenshot.png"
            page.screenshot(path=str(out))
            assert out.stat().st_size > 10_000
            w.assert_clean()
        finally:
            w.context.close()
    if os.environ.get("UPDATE_SCREENSHOT") == "1":
        (ROOT / "docs").mkdir(exist_ok=True)
        shutil.copy(out, ROOT / "docs" / "screenshot.png")


def test_escape_stops_a_streaming_reply(web: Watched, fake: FakeOpenAI):
    page = web.page
    fake.configure("first second third fourth", hold_after=1)
    page.goto("/")
    send(page, "Go on")
    expect(assistant(page, 1)).to_contain_text("first")
    fake.wait_until_held()

    page.keyboard.press("Escape")

    expect(wait_done(page, 1)).to_contain_text("Stopped")
    web.assert_clean()


def test_the_watch_would_catch_a_csp_violation(web: Watched):
    """The harness itself: CSP is enforced in these pages, and a violation is recorded."""
    page = web.page
    page.goto("/")
    with page.expect_console_message(lambda m: "Content Security Policy" in m.text):
        page.evaluate(
            """() => {
              const s = document.createElement("script");
              s.textContent = "window.__inline = 1";
              document.body.append(s);
            }"""
        )
    page.wait_for_function("() => window.__cspReported >= 1")  # the report reached the test
    assert page.evaluate("window.__inline") is None
    assert [v["directive"] for v in web.csp_violations] == ["script-src-elem"]
    assert any("Content Security Policy" in e for e in web.console_errors)
