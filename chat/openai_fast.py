"""The fence around the OpenAI fast paths, the only code that uses other libraries' private names.

chat/openai_stream.py (a stream read a network read at a time) and chat/openai_params.py (no
per-message type walk before a request) reach into private modules of the OpenAI SDK and
pydantic-ai, which any release may rename. They are loaded only from here, and only if
OPENAI_FAST_PATHS is on: if a name they need is gone, the model keeps the SDK's own path (same
request, same reply, only more CPU) and one warning says what was missing. Start-up never fails
for it and no request changes.
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

log = logging.getLogger(__name__)

# What each fast path is called in the warning, and the module that implements it.
_PATHS = {"stream reads": "chat.openai_stream", "request parameters": "chat.openai_params"}


@dataclass
class FastPaths:
    """Which fast paths are in use in this process, and why any is not."""

    stream: ModuleType | None = None
    params: bool = False
    missing: dict[str, str] = field(default_factory=dict)


_state: FastPaths | None = None


def _installed() -> FastPaths:
    """Import and install the fast paths once per process; warn once about any that is off."""
    global _state
    if _state is not None:
        return _state
    state = FastPaths()
    for label, name in _PATHS.items():
        try:
            module = importlib.import_module(name)
            if name == "chat.openai_params":
                state.params = module.install()
                if not state.params:
                    state.missing[label] = "the SDK's parameter types now rename or format a field"
            else:
                state.stream = module
        except (ImportError, AttributeError, TypeError) as exc:
            state.missing[label] = f"{type(exc).__name__}: {exc}"
    if state.missing:
        import openai

        log.warning(
            "OpenAI fast paths partly off, the SDK's own path is used instead (openai %s): %s",
            getattr(openai, "__version__", "?"),
            "; ".join(f"{label}: {why}" for label, why in state.missing.items()),
        )
    _state = state
    return state


def status() -> FastPaths | None:
    """The fast paths in use, or None if no OpenAI model has been set up yet."""
    return _state


def fast(model: Any, *, enabled: bool = True) -> Any:
    """`model` (an OpenAI chat model) with every fast path this SDK release allows.

    With `enabled` false nothing private is imported and the SDK is left exactly as it is.
    """
    if not enabled:
        return model
    state = _installed()
    if state.stream is not None:
        model = state.stream.batched(model)
    return model


def describe() -> str:
    """One line for operators and CI: which fast paths this SDK release allows, or why not."""
    import openai

    state = _installed()
    used = [label for label in _PATHS if label not in state.missing]
    version = getattr(openai, "__version__", "?")
    if not state.missing:
        return f"openai {version}: fast paths in use ({', '.join(used)})"
    why = "; ".join(f"{label}: {reason}" for label, reason in state.missing.items())
    return f"openai {version}: FELL BACK to the SDK's own path for {why}"
