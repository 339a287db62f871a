"""MCP tools and tool approval in a real browser: the app as a process with MCP_CONFIG naming
tests/mcp_server.py, the fake OpenAI server calling its tools, Chromium clicking the buttons.

Every test ends with zero CSP violations and console errors; screenshots (desktop and phone,
light and dark) go to SHOTS_DIR (default /work/wt/shots/mcp).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import expect

from tests.browser_steps import send
from tests.fake_openai import FakeOpenAI, Fault
from tests.live import (  # noqa: F401  (fixtures are used by name)
    LiveApp,
    browser_fixture,
    is_title_request,
    open_context,
    running_app,
    title_reply,
    wait_settled,
    wait_streams_closed,
)

SERVER = Path(__file__).parent / "mcp_server.py"
SHOTS = Path(os.environ.get("SHOTS_DIR", "/work/wt/shots/mcp"))
PHONE = {"viewport": {"width": 390, "height": 844}, "is_mobile": True, "has_touch": True}


@pytest.fixture(name="fake", scope="module")
def fake_fixture() -> Iterator[FakeOpenAI]:
    """The fake model server for this module."""
    with FakeOpenAI(side_reply=title_reply) as fake:
        yield fake


@pytest.fixture(name="agent_app", scope="module")
def agent_app_fixture(fake: FakeOpenAI, tmp_path_factory) -> Iterator[LiveApp]:
    """The app with the test MCP server as `tools`, its write_note needing approval."""
    workdir = tmp_path_factory.mktemp("agent")
    config = workdir / "mcp.json"
    server = {
        "command": sys.executable,
        "args": [str(SERVER)],
        "env": {"MCP_TEST_CALLS": str(workdir / "calls.jsonl")},
        "approve": ["write_note"],
    }
    config.write_text(json.dumps({"mcpServers": {"tools": server}}))
    env = {"OPENAI_BASE_URL": fake.base_url, "OPENAI_API_KEY": "test", "MCP_CONFIG": str(config)}
    with running_app(workdir, **env) as app:
        app.calls = workdir / "calls.jsonl"
        yield app


def calls(app: LiveApp) -> list[dict]:
    """The calls the MCP server really ran."""
    if not app.calls.exists():
        return []
    return [json.loads(line) for line in app.calls.read_text().splitlines()]


def shoot(w, name: str) -> None:
    """Screenshots of the page as it is: desktop and phone sizes, light and dark."""
    SHOTS.mkdir(parents=True, exist_ok=True)
    page = w.page
    for size, viewport in (
        ("desktop", {"width": 1280, "height": 800}),
        ("phone", PHONE["viewport"]),
    ):
        page.set_viewport_size(viewport)
        wait_settled(page, ".sidebar")  # it slides away on a phone-sized screen
        for scheme in ("light", "dark"):
            page.emulate_media(color_scheme=scheme)
            page.screenshot(path=str(SHOTS / f"{name}-{size}-{scheme}.png"))
    page.set_viewport_size({"width": 1280, "height": 800})
    page.emulate_media(color_scheme="light")


def test_an_mcp_tool_call_shows_live_and_after_reload(browser, agent_app, fake):
    fake.reset()
    fake.configure(
        "The server waited.",
        script=[Fault.tool_calls(("mcp_1", "tools_slow", '{"seconds": 2}')), None],
    )
    w = open_context(browser, agent_app.url)
    try:
        page = w.page
        page.goto("/")
        send(page, "Wait two seconds, please")
        reply = page.locator("[data-role=assistant]").last
        tool = reply.locator("details.tool")
        expect(tool).to_contain_text("tools_slow")
        expect(tool).to_contain_text("Running")
        expect(tool).to_contain_text("Done", timeout=15_000)
        expect(reply).to_contain_text("The server waited.")
        wait_streams_closed(page)
        tool.locator("summary").click()
        expect(tool).to_contain_text("waited 2")
        shoot(w, "mcp-tool")
        page.reload()
        tool = page.locator("[data-role=assistant]").last.locator("details.tool")
        expect(tool).to_contain_text("tools_slow")
        expect(tool).to_contain_text("Done")
        w.assert_clean()
    finally:
        w.context.close()


@pytest.mark.parametrize("choice", ["Approve", "Deny"])
def test_approve_or_deny_a_tool_call_and_the_reply_continues(browser, agent_app, fake, choice):
    fake.reset()
    before = len(calls(agent_app))
    fake.configure(
        "All done.",
        script=[Fault.tool_calls(("mcp_2", "tools_write_note", '{"text": "buy milk"}')), None],
    )
    w = open_context(browser, agent_app.url)
    try:
        page = w.page
        page.goto("/")
        send(page, "Note that I need milk")
        reply = page.locator("[data-role=assistant]").last
        card = reply.get_by_role("group", name="Tool approval")
        expect(card).to_contain_text("tools_write_note")
        expect(card).to_contain_text("buy milk")
        expect(reply.locator("details.tool")).to_contain_text("Waiting for approval")
        assert len(calls(agent_app)) == before  # nothing ran yet
        if choice == "Approve":
            shoot(w, "approval-card")
        page.reload()  # the pause is stored: the card comes back
        reply = page.locator("[data-role=assistant]").last
        card = reply.get_by_role("group", name="Tool approval")
        card.get_by_role("button", name=f"{choice} tools_write_note").click()
        expect(reply).to_contain_text("All done.", timeout=15_000)
        expect(page.locator("[data-role=assistant]")).to_have_count(1)
        wait_streams_closed(page)
        expect(card).to_have_count(0)
        tool = reply.locator("details.tool")
        if choice == "Approve":
            expect(tool).to_contain_text("Done")
            assert calls(agent_app)[before:] == [
                {"tool": "write_note", "args": {"text": "buy milk"}}
            ]
            shoot(w, "approval-approved")
        else:
            expect(tool).to_contain_text("Denied")
            assert len(calls(agent_app)) == before
        # The model was told: the denial or the tool's answer is in its last request.
        last = [r for r in fake.requests if not is_title_request(r.body)][-1]
        said = json.dumps(last.body["messages"][-1])
        assert ("denied" in said) if choice == "Deny" else ("note written" in said)
        w.assert_clean()
    finally:
        w.context.close()
