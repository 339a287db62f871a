"""MCP servers as tools: MCP_CONFIG, tools offered and shown, a server that fails or dies, a
slow tool's timeout, Stop during a call, and which personas may use which toolsets.

The server is tests/mcp_server.py, started by the app over stdio through MCP_CONFIG.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path

import pytest
from pydantic_ai.messages import ModelRequest, RetryPromptPart, ToolReturnPart
from pydantic_ai.models.function import AgentInfo, DeltaToolCall, FunctionModel

from chat.agent import INSTRUCTIONS
from chat.mcp_config import ConfigError, load_config
from chat.personas import Persona
from tests.conftest import HX, parse_html, send, stream

SERVER = Path(__file__).parent / "mcp_server.py"
# Tests that start the MCP server as a process are in the slow layer (README, Testing).
starts_server = pytest.mark.slow


def write_config(tmp_path: Path, servers: dict | None = None, **entry) -> Path:
    """An MCP_CONFIG file with the test server as `tools` (plus `servers`)."""
    calls = tmp_path / "calls.jsonl"
    test = {
        "command": sys.executable,
        "args": [str(SERVER)],
        "env": {"MCP_TEST_CALLS": str(calls)},
        **entry,
    }
    path = tmp_path / "mcp.json"
    path.write_text(json.dumps({"mcpServers": {"tools": test, **(servers or {})}}))
    return path


def calls_made(tmp_path: Path) -> list[dict]:
    """The calls the test server really ran."""
    path = tmp_path / "calls.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


class ToolModel:
    """Calls `tool` with `args` once, then answers with what it returned; records what it saw."""

    def __init__(self, tool: str | None, args: dict | None = None):
        self.tool, self.args = tool, args or {}
        self.tools_seen: list[list[str]] = []
        self.results: list = []
        self.model = FunctionModel(stream_function=self._stream, model_name="tool-model")

    async def _stream(self, messages, info: AgentInfo):
        if INSTRUCTIONS not in (info.instructions or ""):
            yield "Title"
            return
        self.tools_seen.append(sorted(t.name for t in info.function_tools))
        last = messages[-1]
        results = [
            p for p in getattr(last, "parts", []) if isinstance(p, ToolReturnPart | RetryPromptPart)
        ]
        if isinstance(last, ModelRequest) and results:
            self.results.extend(results)
            first = results[0]
            said = first.model_response() if isinstance(first, RetryPromptPart) else first.content
            yield f"The tool said: {said}"
            return
        if self.tool is None:
            yield "No tool needed."
            return
        yield {0: DeltaToolCall(name=self.tool, json_args=json.dumps(self.args), tool_call_id="m1")}


def reply_of(html: str):
    return parse_html(html).find("article", data_role="assistant")


# The config file -----------------------------------------------------------------------------


def test_config_reads_stdio_and_http_servers_with_env_expansion(tmp_path):
    path = tmp_path / "mcp.json"
    path.write_text(
        json.dumps(
            {
                "mcpServers": {
                    "files": {"command": "npx", "args": ["-y", "x"], "env": {"K": "${KEY}"}},
                    "web": {
                        "url": "https://tools.example/mcp",
                        "headers": {"Authorization": "Bearer ${TOKEN:-none}"},
                        "approve": ["send"],
                        "timeout": 5,
                    },
                    "off": {"command": "x", "disabled": True},
                    "nokey": {"command": "y", "env": {"A": "${MISSING}"}},
                }
            }
        )
    )
    files, web, nokey = load_config(path, {"KEY": "k1"})
    assert (files.command, files.args, dict(files.env)) == ("npx", ("-y", "x"), {"K": "k1"})
    assert web.url == "https://tools.example/mcp" and web.headers["Authorization"] == "Bearer none"
    assert web.approve == {"send"} and web.timeout == 5
    # A missing variable takes only that server out (reported as down), not the app.
    assert nokey.problem == "the environment variable MISSING is not set"


@pytest.mark.parametrize(
    "text",
    [
        "not json",
        json.dumps({"servers": {}}),
        json.dumps({"mcpServers": {"bad name!": {"command": "x"}}}),
        json.dumps({"mcpServers": {"builtin": {"command": "x"}}}),
        json.dumps({"mcpServers": {"a": {"args": ["x"]}}}),
        json.dumps({"mcpServers": {"a": {"url": "file:///etc/passwd"}}}),
        json.dumps({"mcpServers": {"a": {"command": "x", "args": "not a list"}}}),
        json.dumps({"mcpServers": {"a": {"command": "x", "timeout": -1}}}),
    ],
)
def test_a_malformed_config_is_a_clear_error(tmp_path, text):
    path = tmp_path / "mcp.json"
    path.write_text(text)
    with pytest.raises(ConfigError, match="MCP_CONFIG"):
        load_config(path, {})


# Tools offered, called, shown ------------------------------------------------------------------


@starts_server
def test_mcp_tools_reach_the_model_run_and_show_live_and_after_reload(make_client, tmp_path):
    model = ToolModel("tools_shout", {"text": "hello"})
    client = make_client(model.model, mcp_config=write_config(tmp_path))
    r = send(client, "shout hello")
    events = stream(client, r.text)
    # Offered next to the built-in tools, named after their server.
    assert "tools_shout" in model.tools_seen[0] and "calculate" in model.tools_seen[0]
    assert {"tools_slow", "tools_write_note"} <= set(model.tools_seen[0])
    shown = [e.data for e in events if e.name == "blocks" and "tool-m1" in e.data]
    assert "tools_shout" in shown[0] and "Running" in shown[0]
    assert "HELLO!" in shown[-1]
    assert calls_made(tmp_path) == [{"tool": "shout", "args": {"text": "hello"}}]
    page = parse_html(client.get(r.headers.get("HX-Push-Url") or "/").text)
    reply = page.find("article", data_role="assistant")
    tool = reply.find("details", id="tool-m1")
    assert "tools_shout" in tool.text and "HELLO!" in tool.text and "Done" in tool.text
    assert "The tool said: HELLO!" in reply.text


@starts_server
def test_a_server_that_fails_to_start_is_noted_and_the_app_works(make_client, tmp_path, caplog):
    broken = {"command": sys.executable, "args": [str(SERVER)], "env": {"MCP_TEST_FAIL_START": "1"}}
    missing = {"command": str(tmp_path / "no-such-program")}
    config = write_config(tmp_path, {"broken": broken, "missing": missing})
    model = ToolModel("calculate", {"expression": "2+3"})
    caplog.set_level("WARNING", logger="chat.mcp")
    client = make_client(model.model, mcp_config=config)
    r = send(client, "add")
    events = stream(client, r.text)
    logged = " ".join(r.getMessage() for r in caplog.records)
    assert "'broken' is not available" in logged and "'missing' is not available" in logged
    text = " ".join(e.data for e in events)
    assert "MCP server “broken” are not available" in text
    assert "MCP server “missing” are not available" in text
    # The working server and the built-in tools are offered; the reply completes.
    assert "tools_shout" in model.tools_seen[0] and "calculate" in model.tools_seen[0]
    assert not any(t.startswith(("broken_", "missing_")) for t in model.tools_seen[0])
    assert events[-1].data == "complete" and "2+3 = 5" in text
    assert client.get("/health").status_code == 200


@starts_server
def test_a_server_that_dies_fails_the_call_and_is_noted_next_time(
    make_client, tmp_path, monkeypatch
):
    model = ToolModel("tools_crash")
    client = make_client(model.model, mcp_config=write_config(tmp_path))
    events = stream(client, send(client, "crash").text)
    assert events[-1].data == "complete"
    tool = [e.data for e in events if "tool-m1" in e.data][-1]
    assert "Failed" in tool and "tools" in tool
    model.tool = None
    events = stream(client, send(client, "again").text)
    text = " ".join(e.data for e in events)
    assert "MCP server “tools” are not available" in text and "No tool needed." in text
    assert "tools_shout" not in model.tools_seen[-1] and "calculate" in model.tools_seen[-1]
    # It is started again in the background; a later reply has its tools back.
    monkeypatch.setattr("chat.mcp.RESTART_AFTER", 0.0)
    deadline = time.monotonic() + 30
    while "tools_shout" not in model.tools_seen[-1] and time.monotonic() < deadline:
        stream(client, send(client, "and now?").text)
        time.sleep(0.5)
    assert "tools_shout" in model.tools_seen[-1]


@starts_server
def test_a_hanging_tool_call_ends_with_a_timeout_error(make_client, tmp_path):
    model = ToolModel("tools_slow", {"seconds": 30})
    client = make_client(model.model, mcp_config=write_config(tmp_path), mcp_tool_timeout=1.0)
    started = time.monotonic()
    events = stream(client, send(client, "wait").text)
    assert time.monotonic() - started < 15
    tool = [e.data for e in events if "tool-m1" in e.data][-1]
    assert "Failed" in tool and "did not answer within 1 seconds" in tool
    assert events[-1].data == "complete"
    assert "did not answer within 1 seconds" in str(model.results[0].content)
    # The server is still up for the next call.
    model.tool, model.args = "tools_shout", {"text": "still here"}
    events = stream(client, send(client, "shout").text)
    assert "STILL HERE!" in " ".join(e.data for e in events)


@starts_server
def test_stop_cancels_a_tool_call_in_flight(make_client, tmp_path):
    model = ToolModel("tools_slow", {"seconds": 30})
    client = make_client(model.model, mcp_config=write_config(tmp_path))
    r = send(client, "wait")
    reply = reply_of(r.text)
    url = reply.attrs["sse-connect"]
    stop = url.replace("/stream", "/stop")
    deadline = time.monotonic() + 15
    while not calls_made(tmp_path) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert calls_made(tmp_path), "the tool call never started"
    started = time.monotonic()
    assert client.post(stop, headers=HX).status_code == 204
    with client.stream("GET", url) as s:
        body = b"".join(s.iter_bytes()).decode()
    assert time.monotonic() - started < 10
    assert "event: done\ndata: stopped" in body.replace("\r\n", "\n")


# Personas choose toolsets ----------------------------------------------------------------------


@starts_server
def test_a_persona_only_gets_the_toolsets_it_lists(make_client, tmp_path):
    model = ToolModel(None)
    client = make_client(model.model, mcp_config=write_config(tmp_path))
    manager = client.app.state.runs
    manager.personas = {
        "plain": Persona("plain", "Plain", "Be plain.", frozenset()),
        "builtin": Persona("builtin", "Built-in only", "Be brief.", frozenset({"builtin"})),
        "mcp": Persona("mcp", "MCP only", "Be brief.", frozenset({"tools"})),
        "all": Persona("all", "Everything", "Be brief."),
    }
    for key in manager.personas:
        stream(client, send(client, "hi", persona=key).text)
    plain, builtin, mcp, every = model.tools_seen
    assert plain == []
    assert "calculate" in builtin and not any(t.startswith("tools_") for t in builtin)
    assert "tools_shout" in mcp and "calculate" not in mcp
    assert "tools_shout" in every and "calculate" in every


def test_personas_file_reads_toolsets(tmp_path):
    from chat.personas import load_personas

    path = tmp_path / "personas.toml"
    path.write_text('[a]\nname = "A"\ninstructions = "x"\ntoolsets = ["builtin", "files"]\n')
    assert load_personas(path)["a"].toolsets == {"builtin", "files"}
    path.write_text('[a]\nname = "A"\ninstructions = "x"\ntoolsets = "builtin"\n')
    with pytest.raises(ValueError, match="toolsets"):
        load_personas(path)


def test_no_mcp_config_changes_nothing(make_client):
    model = ToolModel(None)
    client = make_client(model.model)
    stream(client, send(client, "hi").text)
    assert model.tools_seen[0] == ["calculate", "current_time", "search_my_messages"]
    assert asyncio.iscoroutinefunction(client.app.state.runs.mcp.start)
