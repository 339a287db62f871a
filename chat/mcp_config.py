"""MCP_CONFIG: the `mcpServers` JSON file (the format Claude Desktop, Cursor and others share).

Each server is a stdio `command` (with `args`, `env`, `cwd`) or a streamable-HTTP `url` (with
`headers`); `${VAR}` and `${VAR:-default}` are read from the environment. Two keys are ours:
`approve`, the server's tool names that need the user's approval, and `timeout`, seconds one
tool call may take (default MCP_TOOL_TIMEOUT). `disabled: true` skips a server.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# The name persona lists use for the tools in chat/tools.py.
BUILTIN = "builtin"
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,39}$")
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class ConfigError(ValueError):
    """MCP_CONFIG (or one server in it) cannot be used; the message says why."""


@dataclass(frozen=True)
class ServerSpec:
    """One entry of `mcpServers`: how to reach the server, which tools need approval."""

    name: str
    command: str | None = None
    args: tuple[str, ...] = ()
    env: Mapping[str, str] | None = None
    cwd: str | None = None
    url: str | None = None
    headers: Mapping[str, str] | None = None
    approve: frozenset[str] = frozenset()
    timeout: float | None = None
    # Set when the entry could not be read (an undefined ${VAR}): the server is reported down.
    problem: str | None = None


def expand(value: Any, env: Mapping[str, str]) -> Any:
    """`${VAR}` and `${VAR:-default}` replaced from `env`, in strings, lists and dicts."""
    if isinstance(value, str):

        def sub(m: re.Match) -> str:
            if m.group(1) in env:
                return env[m.group(1)]
            if m.group(2) is not None:
                return m.group(2)
            raise ConfigError(f"the environment variable {m.group(1)} is not set")

        return _VAR.sub(sub, value)
    if isinstance(value, list):
        return [expand(v, env) for v in value]
    if isinstance(value, dict):
        return {k: expand(v, env) for k, v in value.items()}
    return value


def _strings(value: Any, what: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{what} must be a list of strings")
    return tuple(value)


def _mapping(value: Any, what: str) -> dict[str, str] | None:
    if value is None:
        return None
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise ConfigError(f"{what} must be an object of strings")
    return dict(value)


def _spec(name: str, entry: Any, env: Mapping[str, str]) -> ServerSpec:
    if not isinstance(entry, dict):
        raise ConfigError(f"server {name!r} must be an object")
    approve = frozenset(_strings(entry.get("approve"), f"{name}.approve"))
    timeout = entry.get("timeout")
    if timeout is not None and (not isinstance(timeout, int | float) or timeout <= 0):
        raise ConfigError(f"{name}.timeout must be a positive number of seconds")
    try:
        entry = expand(entry, env)
    except ConfigError as exc:
        return ServerSpec(name, approve=approve, problem=str(exc))
    if isinstance(entry.get("command"), str) and entry["command"]:
        return ServerSpec(
            name,
            command=entry["command"],
            args=_strings(entry.get("args"), f"{name}.args"),
            env=_mapping(entry.get("env"), f"{name}.env"),
            cwd=entry.get("cwd") if isinstance(entry.get("cwd"), str) else None,
            approve=approve,
            timeout=timeout,
        )
    if isinstance(entry.get("url"), str) and entry["url"].startswith(("http://", "https://")):
        return ServerSpec(
            name,
            url=entry["url"],
            headers=_mapping(entry.get("headers"), f"{name}.headers"),
            approve=approve,
            timeout=timeout,
        )
    raise ConfigError(f"server {name!r} needs a `command` or an http(s) `url`")


def load_config(path: str | Path, env: Mapping[str, str] | None = None) -> list[ServerSpec]:
    """The servers of an `mcpServers` JSON file, in file order; `disabled` ones are skipped.

    Raises ConfigError when the file cannot be read or is not in that shape.
    """
    env = os.environ if env is None else env
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"MCP_CONFIG {path}: {exc}") from exc
    servers = data.get("mcpServers") if isinstance(data, dict) else None
    if not isinstance(servers, dict):
        raise ConfigError(f"MCP_CONFIG {path}: expected an object with `mcpServers`")
    specs = []
    for name, entry in servers.items():
        if not _NAME.match(name):
            raise ConfigError(
                f"MCP_CONFIG {path}: server name {name!r} must be a letter, then letters, "
                "digits, - or _ (it prefixes the server's tool names)"
            )
        if name == BUILTIN:
            raise ConfigError(f"MCP_CONFIG {path}: {BUILTIN!r} names the built-in tools")
        if isinstance(entry, dict) and entry.get("disabled") is True:
            continue
        try:
            specs.append(_spec(name, entry, env))
        except ConfigError as exc:
            raise ConfigError(f"MCP_CONFIG {path}: {exc}") from exc
    return specs
