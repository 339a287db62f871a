"""/api/chat driven by the Vercel AI SDK's own client (npm `ai`: AbstractChat, DefaultChatTransport)
against the real app on the fake OpenAI model: send, resume with `reconnectToStream`, stop, and
tool approval (`addToolApprovalResponse`) on a tool of the test MCP server that needs approval.

The Node project is tests/node (its package.json pins `ai`); `npm install` runs once, into
tests/node/node_modules. Without node and npm, or when npm cannot install, the tests are skipped
and say why.
"""

from __future__ import annotations

import json
import queue
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.fake_openai import FakeOpenAI, Fault
from tests.live import (  # noqa: F401  (fixtures are registered by import)
    LiveApp,
    fake_fixture,
    fake_server_fixture,
    is_title_request,
    replies,
    running_app,
)

NODE_DIR = Path(__file__).resolve().parent / "node"
MCP_SERVER = Path(__file__).resolve().parent / "mcp_server.py"
TIMEOUT = 30.0


@pytest.fixture(name="app", scope="module")
def app_fixture(fake_server: FakeOpenAI, tmp_path_factory) -> Iterator[LiveApp]:
    """The real app on the fake model, with the test MCP server as `tools`, whose write_note
    needs approval (MCP_CONFIG's `approve` list)."""
    workdir = tmp_path_factory.mktemp("app")
    server = {
        "command": sys.executable,
        "args": [str(MCP_SERVER)],
        "env": {"MCP_TEST_CALLS": str(workdir / "calls.jsonl")},
        "approve": ["write_note"],
    }
    config = workdir / "mcp.json"
    config.write_text(json.dumps({"mcpServers": {"tools": server}}))
    env = {"OPENAI_BASE_URL": fake_server.base_url, "OPENAI_API_KEY": "test"}
    with running_app(workdir, MCP_CONFIG=str(config), **env) as a:
        a.calls = workdir / "calls.jsonl"
        yield a


def tool_runs(app: LiveApp) -> list[dict]:
    """The calls the MCP server really ran."""
    if not app.calls.exists():
        return []
    return [json.loads(line) for line in app.calls.read_text().splitlines()]


@pytest.fixture(scope="module")
def node() -> str:
    """The `node` binary, with tests/node's packages installed (once)."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if not node or not npm:
        pytest.skip("the AI SDK client tests need node and npm (apt-get install nodejs npm)")
    if not (NODE_DIR / "node_modules" / "ai" / "package.json").exists():
        # No lock file: it would record registry addresses; package.json pins exact versions.
        done = subprocess.run(
            [npm, "install", "--no-audit", "--no-fund", "--ignore-scripts", "--no-package-lock"],
            cwd=NODE_DIR,
            capture_output=True,
            text=True,
            timeout=600,
        )
        if done.returncode != 0:
            pytest.skip(f"npm could not install tests/node's packages:\n{done.stderr[-2000:]}")
    return node


class Driver:
    """tests/node/driver.mjs: commands in on stdin, tagged JSON lines out on stdout."""

    def __init__(self, node: str, base_url: str, cookie: str):
        self.proc = subprocess.Popen(
            [node, str(NODE_DIR / "driver.mjs"), base_url, cookie],
            cwd=NODE_DIR,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: queue.Queue[dict] = queue.Queue()
        self.seen: list[dict] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(json.loads(line))

    def run(self, **command) -> None:
        """Start a command (it runs alongside any other in flight)."""
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()

    def wait(self, tag: str, *, done: bool) -> dict:
        """The next line for `tag`: its result (`done`), or its first-text progress line."""
        deadline = time.monotonic() + TIMEOUT
        while True:
            for line in self.seen:
                if line["tag"] == tag and bool(line.get("done")) == done:
                    self.seen.remove(line)
                    assert "failed" not in line, line["failed"]
                    return line
            try:
                self.seen.append(self.lines.get(timeout=max(0.0, deadline - time.monotonic())))
            except queue.Empty:
                what = "result" if done else "text"
                raise AssertionError(f"no {what} for {tag}: {self.seen}") from None

    def close(self) -> None:
        """End the driver (it exits once its commands are done)."""
        try:
            self.proc.stdin.close()
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        finally:
            self.proc.stdout.close()
            self.proc.stderr.close()


@pytest.fixture
def browser_session(app):
    """An identity on the app (its session cookie), as an httpx client and a Cookie header."""
    with httpx.Client(base_url=app.url, trust_env=False, timeout=TIMEOUT) as http:
        assert http.get("/").status_code == 200
        yield http, f"chat_session={http.cookies['chat_session']}"


@pytest.fixture
def driver(node, app, browser_session):
    d = Driver(node, app.url, browser_session[1])
    yield d
    d.close()


def turns(app, user_text: str) -> list[dict]:
    """The stored turns whose message was `user_text` (the app is shared by this module)."""
    return [t for t in app.turns() if t["user_text"] == user_text]


def user_texts(record) -> list[str]:
    return record.texts("user")


def test_the_sdk_client_chats_into_the_same_conversations_as_the_pages(
    driver, fake, app, browser_session
):
    http, _ = browser_session
    fake.configure(reply="Hello from the fake model, via the AI SDK.")
    driver.run(op="send", tag="first", chat="sdk-chat-1", text="Hi from Node")
    first = driver.wait("first", done=True)
    assert (first["status"], first["error"]) == ("ready", None)
    assert first["text"] == "Hello from the fake model, via the AI SDK."
    assert first["roles"] == ["user", "assistant"]
    driver.run(op="send", tag="second", chat="sdk-chat-1", text="And again")
    second = driver.wait("second", done=True)
    assert second["text"] == "Hello from the fake model, via the AI SDK."
    # One model call per message, each with the stored history.
    calls = replies(fake)
    assert [user_texts(r) for r in calls] == [["Hi from Node"], ["Hi from Node", "And again"]]
    # The same identity sees the conversation in the JSON API and in the page's sidebar.
    (conv,) = http.get("/api/conversations").json()["conversations"]
    assert f'href="/c/{conv["id"]}"' in http.get("/").text
    page = http.get(f"/c/{conv['id']}").text
    assert "Hi from Node" in page and "via the AI SDK" in page
    # Nothing is being written now: resuming finds nothing (204) and adds no message.
    driver.run(op="resume", tag="idle", chat="sdk-chat-1")
    idle = driver.wait("idle", done=True)
    assert (idle["status"], idle["roles"]) == ("ready", [])


def test_a_reply_goes_on_after_the_client_leaves_and_reconnect_resumes_it(driver, fake, app):
    full = "one two three four five six seven"
    fake.configure(reply=full, hold_after=2)
    driver.run(op="send", tag="away", chat="sdk-resume", text="Count", disconnectOnText=True)
    assert driver.wait("away", done=False)["text"]
    left = driver.wait("away", done=True)  # the client hung up part-way
    assert left["text"] != full
    fake.wait_until_held()  # ... and the reply is still being written on the server
    driver.run(op="resume", tag="back", chat="sdk-resume")
    assert driver.wait("back", done=False)["text"].startswith("one")  # replayed from the start
    fake.release()
    back = driver.wait("back", done=True)
    assert (back["status"], back["error"], back["text"]) == ("ready", None, full)
    app.wait_idle()
    (turn,) = turns(app, "Count")
    assert (turn["status"], turn["reply_text"]) == ("complete", full)
    assert len(replies(fake)) == 1  # leaving and coming back cost no second model call


def test_stop_ends_the_reply_and_its_upstream_call(driver, fake, app):
    fake.configure(reply="alpha beta gamma delta epsilon", hold_after=2)
    driver.run(op="send", tag="long", chat="sdk-stop", text="Go on")
    assert driver.wait("long", done=False)["text"]
    held = fake.wait_until_held()
    driver.run(op="stop", tag="stop", chat="sdk-stop")
    assert driver.wait("stop", done=True)["status"] == 204
    stopped = driver.wait("long", done=True)
    assert stopped["text"].startswith("alpha") and "epsilon" not in stopped["text"]
    # Stopped on the server, not by this client: it ends cleanly with what was written.
    assert (stopped["status"], stopped["error"]) == ("ready", None)
    assert [f["isError"] for f in stopped["finished"]] == [False]
    app.wait_idle()
    (turn,) = turns(app, "Go on")
    assert turn["status"] == "stopped" and turn["reply_text"].startswith("alpha")
    deadline = time.monotonic() + 10
    while not held.finished and time.monotonic() < deadline:
        time.sleep(0.05)
    assert held.disconnected  # the app hung up on the model: the upstream call ended
    assert len(replies(fake)) == 1


@pytest.mark.parametrize("approved", [True, False])
def test_tool_approval_with_the_sdks_approval_responses(driver, fake, app, approved):
    before = len(tool_runs(app))
    call = {"index": 0, "id": "mcp_9", "type": "function"}
    call["function"] = {"name": "tools_write_note", "arguments": '{"text": "buy milk"}'}
    ask = Fault.deltas({"content": "On it. "}, {"tool_calls": [call]}, finish="tool_calls")
    fake.configure("All done.", script=[ask, None])
    chat = f"sdk-approval-{approved}"
    driver.run(op="approve", tag="ask", chat=chat, text="Note milk", approved=approved)
    done = driver.wait("ask", done=True)
    # The reply paused and the SDK showed the call waiting for approval, with no error.
    (asked,) = done["asked"]
    assert asked["type"] == "tool-tools_write_note" and asked["input"] == {"text": "buy milk"}
    assert asked["approval"]["id"] == "mcp_9"
    assert [f["isError"] for f in done["finished"]] == [False, False]
    # The SDK sent the answer itself; the reply went on in the same message, shown once.
    assert (done["status"], done["error"]) == ("ready", None)
    assert done["roles"] == ["user", "assistant"]
    assert done["pausedText"] == "On it. "
    assert done["text"] == "On it. All done."
    (tool,) = done["tools"]
    assert tool["toolCallId"] == "mcp_9"
    assert tool["state"] == ("output-available" if approved else "output-denied"), tool
    runs = tool_runs(app)[before:]
    assert runs == ([{"tool": "write_note", "args": {"text": "buy milk"}}] if approved else [])
    last = [r for r in fake.requests if not is_title_request(r.body)][-1]
    said = json.dumps(last.body["messages"][-1])
    assert ("note written" in said) if approved else ("denied" in said)
    app.wait_idle()
    turn = turns(app, "Note milk")[-1]
    assert turn["status"] == "complete"
    assert (turn["reply_text"].count("On it."), turn["reply_text"].count("All done.")) == (1, 1)
