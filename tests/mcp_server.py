"""A small MCP server for the tests (stdio): started by the app through MCP_CONFIG.

Each call is appended to the file named by MCP_TEST_CALLS (when set), so a test can tell how
many times a tool really ran. MCP_TEST_FAIL_START makes the process exit before serving.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys

from mcp.server.mcpserver import MCPServer

server = MCPServer("test-tools")


def _record(name: str, args: dict) -> None:
    if path := os.environ.get("MCP_TEST_CALLS"):
        with open(path, "a") as f:
            f.write(json.dumps({"tool": name, "args": args}) + "\n")


@server.tool()
def shout(text: str) -> str:
    """Repeat the text in capital letters."""
    _record("shout", {"text": text})
    return text.upper() + "!"


@server.tool()
async def slow(seconds: float) -> str:
    """Wait for some seconds, then answer."""
    _record("slow", {"seconds": seconds})
    await asyncio.sleep(seconds)
    return f"waited {seconds} s"


@server.tool()
def write_note(text: str) -> str:
    """Write a note (a tool with an effect, so the tests mark it as needing approval)."""
    _record("write_note", {"text": text})
    return f"note written: {text}"


@server.tool()
def crash() -> str:
    """End the server process abruptly, as a crashing server would."""
    _record("crash", {})
    os._exit(3)


if __name__ == "__main__":
    if os.environ.get("MCP_TEST_FAIL_START"):
        print("refusing to start", file=sys.stderr)
        sys.exit(2)
    server.run("stdio")
