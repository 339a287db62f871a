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


def load_personas(path: Path = PERSONAS_FILE) -> dict[str, Persona]:
    """Personas in file order (the first is the default); a clear error if the file is wrong."""
    with open(path, "rb") as f:
        data = tomllib.load(f)
    personas = {}
    for key, entry in data.items():
        if not isinstance(entry, dict) or not entry.get("name") or not entry.get("instructions"):
            raise ValueError(f"{path}: [{key}] needs a name and instructions")
        personas[key] = Persona(key, str(entry["name"]), str(entry["instructions"]).strip())
    if not personas:
        raise ValueError(f"{path}: define at least one persona")
    return personas
