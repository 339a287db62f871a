"""In a real browser: what replies look like and what the chat keeps, as a user sees them.

Code boxes while they stream and after, their header bar at phone and desktop sizes, math and
table alignment, comparisons, deleting the open conversation, regenerate, search, sidebar
groups, thumbs up/down, the demo model's first reply and replies without token counts. Headless
Chromium against `python main.py` and the fake upstream model; every test ends with no CSP
violation and no console error. Screenshots go to $SHOTS_DIR (default: a temporary folder).
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from playwright.sync_api import Locator, Page, expect

from tests.browser_steps import assistant, send, wait_done
from tests.fake_openai import FakeOpenAI
from tests.live import (  # noqa: F401  (fixtures are used by name)
    FAKE_MODEL,
    TITLE,
    LiveApp,
    Watched,
    browser_fixture,
    demo_app_fixture,
    fake_fixture,
    fake_server_fixture,
    is_title_request,
    open_context,
    running_app,
)

SECOND_MODEL = "openai-chat:fake-b"
PHONE = {"viewport": {"width": 390, "height": 844}, "is_mobile": True, "has_touch": True}
SIZES: dict[str, dict] = {"desktop": {}, "phone": PHONE}


@pytest.fixture(name="app", scope="module")
def app_fixture(fake_server: FakeOpenAI, tmp_path_factory) -> Iterator[LiveApp]:
    """The real app offering two models (so Compare shows), both answered by the fake."""
    env = {
        "OPENAI_BASE_URL": fake_server.base_url,
        "OPENAI_API_KEY": "test",
        "MODELS": f"{FAKE_MODEL},{SECOND_MODEL}",
    }
    with running_app(tmp_path_factory.mktemp("content"), **env) as a:
        yield a


@contextlib.contextmanager
def browsing(browser, app: LiveApp, size: str = "desktop", **kw) -> Iterator[Watched]:
    """A watched page in a fresh browser profile, closed afterwards."""
    w = open_context(browser, app.url, **{**SIZES[size], **kw})
    w.phone = size == "phone"
    try:
        yield w
    finally:
        w.context.close()


@pytest.fixture(name="web")
def web_fixture(browser, app: LiveApp, fake: FakeOpenAI) -> Iterator[Watched]:
    with browsing(browser, app) as w:
        yield w


def shots_dir() -> Path:
    path = Path(os.environ.get("SHOTS_DIR") or "/tmp/shots-content")
    path.mkdir(parents=True, exist_ok=True)
    return path


def conv_id(page: Page) -> str:
    found = re.search(r"/c/([\w-]+)", page.url)
    assert found, page.url
    return found.group(1)


def reply_requests(fake: FakeOpenAI) -> list:
    return [r for r in fake.requests if not is_title_request(r.body)]


def box(locator: Locator) -> dict:
    found = locator.bounding_box()
    assert found is not None
    return found


def overlaps(a: dict, b: dict) -> bool:
    return (
        a["x"] < b["x"] + b["width"]
        and b["x"] < a["x"] + a["width"]
        and a["y"] < b["y"] + b["height"]
        and b["y"] < a["y"] + a["height"]
    )


# How a code box looks in the page: one box (a pre drawn as one rectangle, not stacked
# inline strips), highlighted, its header above the code.
CODE_SHAPE = """el => {
  const boxes = el.querySelectorAll(".code-block");
  return Array.from(boxes).map(b => {
    const pre = b.querySelector("pre");
    return {
      display: getComputedStyle(b).display,
      preDisplay: getComputedStyle(pre).display,
      preRects: pre.getClientRects().length,
      pres: b.querySelectorAll("pre").length,
      colours: pre.querySelectorAll("span[class^=hl-]:not(.hl-w)").length,
      head: !!b.querySelector(".code-head .copy-code"),
      lang: (b.querySelector(".code-lang") || {}).textContent,
      clipped: pre.scrollHeight > pre.clientHeight + 2,
    };
  });
}"""

LONG_CODE = (
    "Here is the script:\n\n```python\n"
    + "".join(f"def step_{i}(value):\n    return value * {i}  # step {i}\n" for i in range(30))
    + "```\n\nThat is the whole script."
)


# 1. Streaming code blocks ---------------------------------------------------------------------


def test_a_streaming_code_block_is_one_highlighted_box_like_the_finished_one(
    web: Watched, fake: FakeOpenAI
):
    page = web.page
    fake.configure(LONG_CODE, hold_after=120)
    page.goto("/")
    send(web, "Write me a long script")
    reply = assistant(page, 1)
    fake.wait_until_held()
    expect(reply.locator(".code-block")).to_have_count(1)
    expect(reply).to_contain_text("step_10")
    live = reply.evaluate(CODE_SHAPE)
    assert len(live) == 1, live
    (shape,) = live
    assert shape["display"] == "block" and shape["preDisplay"] == "block"
    assert shape["preRects"] == 1 and shape["pres"] == 1, shape
    assert shape["colours"] > 20 and shape["head"] and shape["lang"] == "python"
    assert not shape["clipped"]
    page.screenshot(path=shots_dir() / "streaming-code-desktop-light.png")

    fake.release()
    reply = wait_done(page, 1)
    expect(reply).to_contain_text("That is the whole script.")
    (done,) = reply.evaluate(CODE_SHAPE)
    assert {k: done[k] for k in ("display", "preDisplay", "preRects", "pres", "head", "lang")} == {
        k: shape[k] for k in ("display", "preDisplay", "preRects", "pres", "head", "lang")
    }
    assert done["colours"] >= shape["colours"]
    web.assert_clean()


# 2. The code header bar ---------------------------------------------------------------------


@pytest.mark.parametrize("size", ["desktop", "phone"])
def test_the_copy_button_sits_in_the_code_header_never_over_the_code(
    browser, app: LiveApp, fake: FakeOpenAI, size: str
):
    fake.configure(LONG_CODE)
    with browsing(browser, app, size) as w:
        page = w.page
        w.context.grant_permissions(["clipboard-read", "clipboard-write"], origin=app.url)
        page.goto("/")
        send(w, "Show me code")
        reply = wait_done(page, 1)
        code_box = reply.locator(".code-block")
        button = code_box.get_by_role("button", name="Copy code")
        expect(button).to_be_visible()
        expect(code_box.locator(".code-lang")).to_have_text("python")
        assert not overlaps(box(button), box(code_box.locator("pre")))
        assert not overlaps(box(button), box(code_box.locator("pre code")))
        # Header above the code, both inside the one box.
        assert box(button)["y"] + box(button)["height"] <= box(code_box.locator("pre"))["y"] + 1
        code_box.locator(".code-head").scroll_into_view_if_needed()
        page.screenshot(path=shots_dir() / f"code-header-{size}-light.png")
        button.click()
        expect(code_box.locator(".copy-code")).to_have_text("Copied")
        copied = page.evaluate("navigator.clipboard.readText()")
        assert copied.startswith("def step_0(value):") and "Copy code" not in copied
        assert "python" not in copied.splitlines()[0]
        w.assert_clean()


# 3, 4. Math and table alignment ----------------------------------------------------------------


RICH = r"""The identity $e^{i\pi} + 1 = 0$ costs $5 and $10 to print.

$$
\sum_{k=1}^{n} k = \frac{n(n+1)}{2}
$$

| Item | Kind | Price |
|:-----|:----:|------:|
| tea | drink | 3.50 |
| bread | food | 12.00 |
"""


def test_math_is_mathml_and_table_columns_keep_their_alignment(web: Watched, fake: FakeOpenAI):
    page = web.page
    fake.configure(RICH)
    page.goto("/")
    send(web, "Show me math and a table")
    reply = wait_done(page, 1)
    maths = reply.locator("math")
    expect(maths).to_have_count(2)
    expect(maths.nth(0)).to_have_attribute("display", "inline")
    expect(maths.nth(1)).to_have_attribute("display", "block")
    assert box(maths.nth(1))["height"] > box(maths.nth(0))["height"]  # typeset, not text
    expect(reply.locator("mfrac")).to_have_count(1)
    # Prices in prose stay text.
    expect(reply.locator("p").first).to_contain_text("costs $5 and $10 to print.")

    aligns = (
        reply.locator("tbody tr")
        .first.locator("td")
        .evaluate_all("cells => cells.map(c => getComputedStyle(c).textAlign)")
    )
    assert aligns == ["left", "center", "right"]
    head = reply.locator("thead th").evaluate_all(
        "cells => cells.map(c => getComputedStyle(c).textAlign)"
    )
    assert head == ["left", "center", "right"]
    web.assert_clean()


# 5. Compare --------------------------------------------------------------------------------


def test_compare_is_one_message_and_a_comparison_stays_columns_after_reload(
    web: Watched, fake: FakeOpenAI
):
    page = web.page
    fake.configure(lambda body: f"Answer from {body['model']}.")
    page.goto("/")
    page.get_by_text("Compare", exact=True).click()
    picks = page.locator("#composer input[name=compare]")
    picks.nth(0).check()
    expect(page.locator("#compare-state")).to_contain_text("tick one more")
    picks.nth(1).check()
    expect(page.locator("#compare-state")).to_contain_text("on: next message to 2 models")
    send(web, "Who are you?")
    columns = page.locator(".compare .compare-col")
    expect(columns).to_have_count(2)
    wait_done(page, 2)
    expect(columns.nth(0)).to_contain_text("Answer from fake-model.")
    expect(columns.nth(1)).to_contain_text("Answer from fake-b.")
    # Comparing is off again, and says so.
    expect(picks.nth(0)).not_to_be_checked()
    expect(picks.nth(1)).not_to_be_checked()
    expect(page.locator("#compare-state")).to_have_text("")
    assert len(reply_requests(fake)) == 2

    columns.nth(1).get_by_role("button", name="Keep this reply").click()
    expect(columns.nth(1).locator(".kept")).to_have_text("Kept")
    expect(columns).to_have_count(2)
    page.screenshot(path=shots_dir() / "compare-desktop-light.png")

    page.reload()
    expect(page.locator(".compare .compare-col")).to_have_count(2)
    expect(page.locator(".compare-col").nth(1).locator(".kept")).to_have_text("Kept")
    expect(page.locator("[data-role=user]").first.locator(".versions")).to_be_visible()

    send(web, "And one more")
    wait_done(page, 3)
    assert len(reply_requests(fake)) == 3  # one model, not both
    later = reply_requests(fake)[-1].body
    assert later["model"] == "fake-model"
    assert "Answer from fake-b." in str(later["messages"])  # it follows the kept reply
    web.assert_clean()


# 6. Deleting the open conversation -------------------------------------------------------------


def test_deleting_the_open_conversation_goes_to_a_new_chat(web: Watched, fake: FakeOpenAI):
    page = web.page
    page.goto("/")
    send(web, "Soon deleted")
    wait_done(page, 1)
    expect(page.locator("#chat-title")).to_have_text(TITLE)
    cid = conv_id(page)
    item = page.locator(f"#conv-{cid}")
    item.hover()
    item.get_by_role("button", name=f"Delete {TITLE}").click()
    expect(page).to_have_url(re.compile(r"/$"))
    expect(page.locator("#chat-title")).to_have_text("New chat")
    expect(page).to_have_title(re.compile("^New chat"))
    expect(page.locator("[data-role]")).to_have_count(0)
    expect(item.get_by_role("button", name="Undo")).to_be_visible()

    send(web, "A fresh start")
    wait_done(page, 1)
    expect(page).to_have_url(re.compile(r"/c/[\w-]+$"))
    assert conv_id(page) != cid
    expect(page.locator("[data-role=assistant] [role=alert]")).to_have_count(0)
    web.assert_clean()


# 7. Regenerate ----------------------------------------------------------------------------


def test_regenerate_is_offered_on_the_last_reply_only(web: Watched, fake: FakeOpenAI):
    page = web.page
    page.goto("/")
    send(web, "First question")
    first = wait_done(page, 1)
    expect(first.get_by_role("button", name="Regenerate")).to_be_visible()
    send(web, "Second question")
    wait_done(page, 2)
    # Without a reload: the first reply no longer offers it, the new last one does.
    for _ in range(2):
        replies = page.locator("[data-role=assistant]")
        expect(replies.nth(0).get_by_role("button", name="Regenerate")).to_have_count(0)
        expect(replies.nth(1).get_by_role("button", name="Regenerate")).to_be_visible()
        page.reload()
    page.locator("[data-role=assistant]").nth(1).get_by_role("button", name="Regenerate").click()
    wait_done(page, 2)
    expect(page.locator("[data-role=user]")).to_have_count(2)
    expect(page.locator("[data-role=user]").nth(1).locator(".versions")).to_contain_text("2/2")
    web.assert_clean()


# 8. Search --------------------------------------------------------------------------------


def test_search_finds_word_prefixes_and_titles(web: Watched, fake: FakeOpenAI):
    page = web.page
    page.goto("/")
    send(web, "Tell me about pythonic idioms")
    wait_done(page, 1)
    expect(page.locator("#chat-title")).to_have_text(TITLE)
    search = page.get_by_role("searchbox", name="Search messages")
    search.fill("pyth")
    results = page.locator("#search-results")
    expect(results.locator("mark").first).to_have_text("pythonic")
    search.fill("fake tit")
    expect(results.get_by_role("link").first).to_contain_text(TITLE)
    expect(results.locator("mark").first).to_have_text("Fake")
    results.get_by_role("link").first.click()
    expect(page).to_have_url(re.compile(rf"/c/{conv_id(page)}$"))
    web.assert_clean()


# 9. Sidebar groups ---------------------------------------------------------------------------


def set_updated_at(app: LiveApp, cid: str, when: datetime) -> None:
    conn = app.connect()
    try:
        with conn:
            conn.execute(
                "update conversations set updated_at = ? where id = ?",
                [when.isoformat(timespec="milliseconds"), cid],
            )
    finally:
        conn.close()


def test_the_sidebar_groups_by_age_then_by_month(web: Watched, app: LiveApp, fake: FakeOpenAI):
    page = web.page
    ids = []
    for text in ("today", "three days ago", "twenty days ago", "ninety days ago"):
        page.goto("/")
        send(web, f"A chat from {text}")
        wait_done(page, 1)
        expect(page.locator("#chat-title")).to_have_text(TITLE)
        ids.append(conv_id(page))
    app.wait_idle()
    now = datetime.now(UTC)
    old = now - timedelta(days=90)
    for cid, days in zip(ids[1:], (3, 20, 90), strict=True):
        set_updated_at(app, cid, now - timedelta(days=days))
    page.reload()
    month = old.strftime("%B %Y")
    nav = page.get_by_role("navigation", name="Conversations")
    expect(nav.locator("h2")).to_have_text(["Today", "Previous 7 days", "Previous 30 days", month])
    web.assert_clean()


# 10. Thumbs up and down -----------------------------------------------------------------------


def test_thumbs_show_pressed_toggle_and_survive_a_reload(web: Watched, app: LiveApp, fake):
    page = web.page
    page.goto("/")
    send(web, "Rate this")
    reply = wait_done(page, 1)
    good = reply.get_by_role("button", name="Good reply")
    bad = reply.get_by_role("button", name="Bad reply")
    expect(good).to_have_attribute("aria-pressed", "false")
    good.click()
    expect(reply.get_by_role("button", name="Good reply")).to_have_attribute("aria-pressed", "true")
    page.reload()
    reply = assistant(page, 1)
    expect(reply.get_by_role("button", name="Good reply")).to_have_attribute("aria-pressed", "true")
    reply.get_by_role("button", name="Bad reply").click()
    expect(reply.get_by_role("button", name="Bad reply")).to_have_attribute("aria-pressed", "true")
    expect(reply.get_by_role("button", name="Good reply")).to_have_attribute(
        "aria-pressed", "false"
    )
    assert app.turns()[-1]["feedback"] == "down"
    reply.get_by_role("button", name="Bad reply").click()
    expect(reply.get_by_role("button", name="Bad reply")).to_have_attribute("aria-pressed", "false")
    assert bad is not None and app.turns()[-1]["feedback"] is None
    web.assert_clean()


# 11. The demo model -------------------------------------------------------------------------


def test_the_demo_models_first_reply_says_what_to_try_and_it_works(browser, demo_app: LiveApp):
    with browsing(browser, demo_app) as w:
        page = w.page
        page.goto("/")
        send(w, "hello")
        reply = wait_done(page, 1, timeout=30_000)
        expect(reply.get_by_role("heading", name="Things to try")).to_be_visible()
        phrase = reply.locator("li code").first
        expect(phrase).to_have_text("calculate 12 * (3 + 4)")
        send(w, phrase.inner_text())
        reply = wait_done(page, 2, timeout=30_000)
        expect(reply.locator("details.tool")).to_contain_text("calculate")
        expect(reply).to_contain_text("84")
        w.assert_clean()


# 12. No token counts -------------------------------------------------------------------------


def test_a_model_that_counts_no_tokens_shows_no_zero_counts(web: Watched, fake: FakeOpenAI):
    page = web.page
    fake.report_usage = False
    page.goto("/")
    send(web, "Count nothing")
    reply = wait_done(page, 1)
    expect(reply.locator("[data-usage]")).to_contain_text("tokens not reported")
    expect(reply).not_to_contain_text("0 in")
    expect(page.locator("#conv-usage")).to_have_text("")
    page.reload()
    expect(assistant(page, 1)).not_to_contain_text("0 in")
    web.assert_clean()


# 13. Screenshots ----------------------------------------------------------------------------


SHOWCASE = LONG_CODE.split("\n\n")[0] + "\n\n```python\nprint('hello')\n```\n\n" + RICH


@pytest.mark.parametrize("scheme", ["light", "dark"])
@pytest.mark.parametrize("size", ["desktop", "phone"])
def test_screenshots_of_rich_replies(browser, app: LiveApp, fake: FakeOpenAI, size, scheme):
    fake.configure(SHOWCASE)
    with browsing(browser, app, size, color_scheme=scheme) as w:
        page = w.page
        page.goto("/")
        send(w, "Show me everything")
        reply = wait_done(page, 1)
        reply.get_by_role("button", name="Good reply").click()
        expect(reply.get_by_role("button", name="Good reply")).to_have_attribute(
            "aria-pressed", "true"
        )
        page.evaluate("document.querySelector('#messages').scrollTop = 0")
        page.screenshot(path=shots_dir() / f"reply-{size}-{scheme}.png")
        page.evaluate("document.querySelector('#messages').scrollTop = 1e6")
        page.screenshot(path=shots_dir() / f"reply-end-{size}-{scheme}.png")
        w.assert_clean()
