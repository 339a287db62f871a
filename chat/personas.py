"""Personas: named instruction sets from personas.toml, chosen per conversation."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path

PERSONAS_FILE = Path(__file__).parent.parent / "personas.toml"


@dataclass(frozen=True)
class Persona:
    """A named set of extra instructions."""

    key: str
    name: str
    instructions: str
    # Toolsets it may use: "builtin" (chat/tools.py) and MCP server names; None: every one.
    toolsets: frozenset[str] | None = None


def load_personas(path: Path = PERSONAS_FILE) -> dict[str, Persona]:
    """Personas in file order (the first is the default); a clear error if the file is wrong."""
    with open(path, "rb") as f:
        data = tomllib.load(f)
    personas = {}
    for key, entry in data.items():
        if not isinstance(entry, dict) or not entry.get("name") or not entry.get("instructions"):
            raise ValueError(f"{path}: [{key}] needs a name and instructions")
        toolsets = entry.get("toolsets")
        if toolsets is not None and (
            not isinstance(toolsets, list) or not all(isinstance(t, str) for t in toolsets)
        ):
            raise ValueError(f"{path}: [{key}] toolsets must be a list of names")
        personas[key] = Persona(
            key,
            str(entry["name"]),
            str(entry["instructions"]).strip(),
            frozenset(toolsets) if toolsets is not None else None,
        )
    if not personas:
        raise ValueError(f"{path}: define at least one persona")
    return personas
