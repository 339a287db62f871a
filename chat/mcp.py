"""MCP servers as tools: the MCP_CONFIG file, one guarded toolset per server, and their health.

Each server's connection is owned by one long-lived task (so it is opened and closed in the same
task, as anyio requires) and shared by every run. A server that fails to start, or dies, is
logged and marked down: its tools are left out of the runs that follow (which say so in the
reply, see `notes`), a restart is tried at most every `RESTART_AFTER` seconds, and the app goes
on without it. A tool call is bounded by the server's timeout and ends with a tool error.

Why this module is long: a server's life (start, the holding task, failure, restart, guarded
listing and calls) is one small state machine, and the set of servers the app runs sits beside
it; the config file's reading is chat/mcp_config.py.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass
from typing import Any

from pydantic_ai import RunContext
from pydantic_ai.exceptions import ApprovalRequired, CallDeferred, ModelRetry, ToolFailed
from pydantic_ai.toolsets import AbstractToolset, WrapperToolset
from pydantic_ai.toolsets.abstract import ToolsetTool

from chat.mcp_config import BUILTIN, ServerSpec, load_config

__all__ = ["BUILTIN", "McpServers", "Server", "allowed"]

log = logging.getLogger(__name__)

# A server that is down is tried again on a run that starts this long after the last attempt.
RESTART_AFTER = 30.0
# How long a server may take to start and answer MCP's handshake (a stdio server is a new
# process: a Python or Node one on a busy machine, or fetched by npx/uvx, takes seconds).
START_TIMEOUT = 30.0


def _connect(spec: ServerSpec) -> AbstractToolset:
    """The pydantic-ai toolset for a server (not connected yet)."""
    from fastmcp.client.transports import StdioTransport
    from pydantic_ai.mcp import MCPToolset

    common: dict[str, Any] = {
        "id": spec.name,
        "init_timeout": START_TIMEOUT,
        # A server's own tool errors are shown to the model as failed calls, not retried.
        "tool_error_behavior": "failed",
    }
    if spec.command:
        env = {**os.environ, **spec.env} if spec.env is not None else None
        transport = StdioTransport(spec.command, list(spec.args), env=env, cwd=spec.cwd)
        return MCPToolset(transport, **common)
    return MCPToolset(spec.url, headers=dict(spec.headers) if spec.headers else None, **common)


def allowed(ctx: RunContext[Any], name: str) -> bool:
    """True if the run's persona may use toolset `name` (deps.toolsets None: every toolset)."""
    chosen = getattr(ctx.deps, "toolsets", None)
    return chosen is None or name in chosen


@dataclass
class Server(WrapperToolset):
    """One MCP server's tools, guarded: failures mark it down instead of breaking the run."""

    spec: ServerSpec
    timeout: float = 60.0
    down: str | None = None
    _holder: asyncio.Task | None = None
    _closing: asyncio.Event | None = None
    _tried: float = -RESTART_AFTER
    _listed: tuple | None = None  # (run id, tools) of the last listing
    _restart: asyncio.Task | None = None

    @property
    def name(self) -> str:
        """The server's name in MCP_CONFIG."""
        return self.spec.name

    async def start(self) -> bool:
        """Connect (or reconnect) in a task of its own; False, marked down, if it fails."""
        self._tried = time.monotonic()
        if self.spec.problem:
            self._mark_down(self.spec.problem)
            return False
        await self.close()
        ready: asyncio.Future = asyncio.get_running_loop().create_future()
        self._closing = asyncio.Event()
        self.wrapped = _connect(self.spec)
        self._holder = asyncio.create_task(
            self._hold(ready, self._closing), name=f"mcp-{self.name}"
        )
        try:
            await asyncio.wait_for(asyncio.shield(ready), START_TIMEOUT + 5)
        except Exception as exc:
            self._mark_down(_reason(exc))
            await self.close()
            return False
        self.down = None
        log.info("MCP server %r started", self.name)
        return True

    async def _hold(self, ready: asyncio.Future, closing: asyncio.Event) -> None:
        try:
            async with self.wrapped:
                ready.set_result(None)
                await closing.wait()
        except BaseException as exc:
            if not ready.done():
                ready.set_exception(exc if isinstance(exc, Exception) else RuntimeError(str(exc)))
            elif not closing.is_set() and isinstance(exc, Exception):
                self._mark_down(_reason(exc))
            if not isinstance(exc, Exception):
                raise

    async def close(self) -> None:
        """Disconnect (ends a stdio server's process)."""
        holder, self._holder = self._holder, None
        if self._closing is not None:
            self._closing.set()
        if holder is not None and not holder.done():
            try:
                await asyncio.wait_for(holder, 5)
            except (Exception, asyncio.CancelledError):
                log.info("MCP server %r did not close cleanly", self.name)

    def _mark_down(self, reason: str) -> None:
        if self.down is None:
            log.warning("MCP server %r is not available: %s", self.name, reason)
        self.down = reason

    def revive(self) -> None:
        """Try a server that is down again in the background, if its last attempt is old
        enough: a reply never waits for a server that may take seconds to fail again."""
        if self.down is None or time.monotonic() - self._tried < RESTART_AFTER:
            return
        if self._restart is None or self._restart.done():
            self._tried = time.monotonic()
            self._restart = asyncio.create_task(self.start(), name=f"mcp-restart-{self.name}")

    # The run enters and leaves the toolset; the connection is the holder task's, not the run's.
    async def __aenter__(self):
        return self

    async def __aexit__(self, *args: Any) -> bool | None:
        return None

    def visit_and_replace(self, visitor):
        # A leaf to pydantic-ai: a copy would not share the connection its holder task owns.
        return visitor(self)

    async def for_run(self, ctx: RunContext) -> AbstractToolset:
        return self

    async def for_run_step(self, ctx: RunContext) -> AbstractToolset:
        return self

    async def get_tools(self, ctx: RunContext) -> dict[str, ToolsetTool]:
        run_id = getattr(ctx, "run_id", None)
        # A server that goes down during a run keeps its tools until the run ends, so a call
        # the model already made fails with the reason, not as an unknown tool.
        same_run = self._listed[1] if self._listed and self._listed[0] == run_id else {}
        if self.down is not None or self._holder is None:
            return same_run
        try:
            tools = await asyncio.wait_for(self.wrapped.get_tools(ctx), self.timeout)
        except Exception as exc:
            self._mark_down(_reason(exc))
            return same_run
        self._listed = (run_id, tools)
        return tools

    async def call_tool(
        self, name: str, tool_args: dict[str, Any], ctx: RunContext, tool: ToolsetTool
    ) -> Any:
        if self.down is not None:
            raise ToolFailed(f"The MCP server {self.name!r} is not available: {self.down}")
        try:
            async with asyncio.timeout(self.timeout):
                return await self.wrapped.call_tool(name, tool_args, ctx, tool)
        except (ApprovalRequired, CallDeferred):
            raise
        except (ModelRetry, ToolFailed) as exc:
            # The server's answer, or the client's report that the connection closed.
            if await self._alive():
                raise
            raise ToolFailed(f"The MCP server {self.name!r} stopped: {_reason(exc)}") from None
        except TimeoutError:
            raise ToolFailed(
                f"The tool {name!r} of the MCP server {self.name!r} did not answer within "
                f"{self.timeout:g} seconds, so the call was abandoned."
            ) from None
        except Exception as exc:
            await self._alive()
            raise ToolFailed(f"The MCP server {self.name!r} failed: {_reason(exc)}") from None

    async def _alive(self) -> bool:
        """After a failed call: does the server still answer? If not, it is marked down."""
        client = getattr(self.wrapped, "client", None)
        try:
            # Checked before pinging: a client that is not connected would reconnect to ping.
            if self._holder is None or self._holder.done() or not _connected(client):
                raise ConnectionError("the connection is closed")
            await asyncio.wait_for(client.ping(), 2)
        except Exception as exc:
            self._mark_down(_reason(exc))
            return False
        return True


def _connected(client: Any) -> bool:
    is_connected = getattr(client, "is_connected", None)
    return bool(is_connected()) if callable(is_connected) else client is not None


def _reason(exc: BaseException) -> str:
    """A one-line, bounded description of why a server failed."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:300]


class McpServers:
    """The servers of MCP_CONFIG: their toolsets for the agent, started and stopped with the app."""

    def __init__(self, specs: list[ServerSpec], *, timeout: float = 60.0):
        self.servers = [
            Server(wrapped=_Unconnected(), spec=s, timeout=s.timeout or timeout) for s in specs
        ]
        self._starting: asyncio.Task | None = None

    @classmethod
    def from_settings(cls, settings: Any) -> McpServers:
        """The servers named by MCP_CONFIG (none when it is unset)."""
        path = getattr(settings, "mcp_config", None)
        specs = load_config(path) if path else []
        return cls(specs, timeout=getattr(settings, "mcp_tool_timeout", 60.0))

    def toolsets(self) -> list[AbstractToolset]:
        """One toolset per server for the agent: prefixed names, approvals, persona filter."""
        out = []
        for server in self.servers:
            spec = server.spec
            ts: AbstractToolset = server
            if spec.approve:
                ts = ts.approval_required(
                    lambda ctx, tool_def, args, names=spec.approve: tool_def.name in names
                )
            ts = ts.prefixed(spec.name).filtered(
                lambda ctx, tool_def, name=spec.name: allowed(ctx, name)
            )
            out.append(ts)
        return out

    async def start(self) -> None:
        """Start every server at once, in the background: the app answers meanwhile, and the
        first reply waits for them (see `notes`). Those that fail are logged and left down."""
        if self.servers:
            self._starting = asyncio.create_task(self._start_all(), name="mcp-start")

    async def _start_all(self) -> None:
        await asyncio.gather(*(s.start() for s in self.servers))

    async def started(self) -> None:
        """Wait until the servers' first start has ended, however it ended."""
        if self._starting is not None and not self._starting.done():
            await asyncio.wait([self._starting], timeout=START_TIMEOUT + 10)

    async def stop(self) -> None:
        """Disconnect every server (and end starts and restarts under way)."""
        if self._starting is not None and not self._starting.done():
            self._starting.cancel()
            await asyncio.wait([self._starting], timeout=5)
        for server in self.servers:
            if server._restart is not None and not server._restart.done():
                server._restart.cancel()
        await asyncio.gather(*(s.close() for s in self.servers))

    async def notes(self, toolsets: frozenset[str] | None) -> list[str]:
        """For a run that may use `toolsets` (None: all): what is missing, as notes for the reply.

        Servers that are down are tried again meanwhile (at most every RESTART_AFTER seconds).
        """
        await self.started()
        wanted = [s for s in self.servers if toolsets is None or s.name in toolsets]
        for server in wanted:
            server.revive()
        return [
            f"The tools of the MCP server “{s.name}” are not available for this reply "
            f"(the server is down: {s.down})."
            for s in wanted
            if s.down is not None
        ]

    def status(self) -> dict[str, str]:
        """Each server's state: 'up', or 'down: why' (for /health and logs)."""
        return {s.name: "up" if s.down is None else f"down: {s.down}" for s in self.servers}


class _Unconnected(AbstractToolset):
    """Stands in for a server's toolset until it is first started."""

    @property
    def id(self) -> str | None:
        return None

    async def get_tools(self, ctx: RunContext) -> dict[str, ToolsetTool]:
        return {}

    async def call_tool(self, name, tool_args, ctx, tool) -> Any:
        raise ToolFailed("The MCP server has not started.")
