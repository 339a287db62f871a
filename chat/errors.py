"""What can end a reply badly, and what the user is told: plain words, never a traceback."""

from __future__ import annotations

import logging

from pydantic_ai.exceptions import (
    ModelAPIError,
    ModelHTTPError,
    UnexpectedModelBehavior,
    UsageLimitExceeded,
)

from chat.agent import ModelUnavailable

log = logging.getLogger("chat")

UNSAVED = (
    "This reply could not be saved yet (the database is not writable). It is kept and will be "
    "saved as soon as the database can be written again."
)
# After `save_retry_for` the retries stop; the reply stays shown (from memory) with this note,
# and one last save is tried at shutdown.
NOT_SAVED = (
    "This reply could not be saved: the database was not writable. It is shown here until the "
    "server restarts; copy what you need from it."
)
# Said to the person chatting, who cannot change the site's settings; the operator's knob
# (MAX_OUTPUT_TOKENS, MAX_MODEL_REQUESTS) is in the README and the log.
OUTPUT_LIMIT = (
    "This reply reached the longest reply this site allows, so it was stopped there. The text "
    "above is kept: ask the model to continue, or for a shorter answer."
)


class StalledError(Exception):
    """The model sent nothing for longer than the stall timeout."""


class FirstTokenTimeout(StalledError):
    """The model did not start its reply within the first-token timeout."""


class InvalidOutput(Exception):
    """The model sent text that is not valid Unicode (e.g. a lone UTF-16 surrogate)."""


class OutputLimitReached(Exception):
    """The reply grew past MAX_OUTPUT_TOKENS although the request asked the model to stop."""


def expected(exc: Exception) -> bool:
    """True for failures that are the model's or the network's, logged without a traceback."""
    return isinstance(
        exc, ModelAPIError | UsageLimitExceeded | ModelUnavailable | StalledError | InvalidOutput
    )


_OVERFLOW_MARKS = ("context_length_exceeded", "maximum context length", "context window")


def _context_overflow(exc: Exception) -> bool:
    """An HTTP 400 that says the prompt does not fit the model's context window (OpenAI, vLLM,
    llama.cpp and others word it in one of a few ways)."""
    if not isinstance(exc, ModelHTTPError) or exc.status_code != 400:
        return False
    said = f"{exc.message} {exc.body}".lower()
    return any(mark in said for mark in _OVERFLOW_MARKS)


def describe_error(exc: Exception) -> str:
    """A message for the user: what went wrong and what to do, never a traceback or a key."""
    if isinstance(exc, ModelUnavailable) and getattr(exc, "for_users", False):
        return str(exc)  # written for the user (a file the model cannot read, say)
    if isinstance(exc, ModelUnavailable):
        # The reason (a missing API key, an unknown provider) is for the operator: the log.
        log.warning("%s", exc)
        name = f"“{exc.model}” " if exc.model else ""
        return (
            f"The model {name}could not be started: this site is not fully set up for it yet. "
            "Pick another model if the list offers one, or let the site's operator know."
        )
    if isinstance(exc, FirstTokenTimeout):
        return (
            "The model did not start its reply in time (FIRST_TOKEN_TIMEOUT), so it was ended. "
            "Try again, or try a shorter conversation."
        )
    if isinstance(exc, StalledError):
        return "The model stopped sending the reply, so it was ended. Try again."
    if isinstance(exc, InvalidOutput):
        return "The model sent text that is not valid Unicode, so the reply was ended. Try again."
    if isinstance(exc, UsageLimitExceeded):
        log.info("usage limit per reply (MAX_OUTPUT_TOKENS / MAX_MODEL_REQUESTS): %s", exc)
        return (
            "This reply reached this site's usage limit for one reply, so it was stopped. "
            "Ask the model to continue, or for a shorter answer."
        )
    if _context_overflow(exc):
        return (
            "The conversation is too long for this model's context window. Start a new "
            "conversation, or give the model server a larger context (llama.cpp: --n_ctx)."
        )
    if isinstance(exc, ModelHTTPError):
        code = exc.status_code
        if code in (401, 403):
            log.warning("the model service refused the API key (HTTP %s)", code)
            return (
                f"The model service refused this site's API key (HTTP {code}). This needs the "
                "site's operator; try again later."
            )
        if code == 404:
            log.warning("the model service does not know the model (HTTP 404): check MODEL")
            return (
                "The model service does not offer the model this site asked for (HTTP 404). "
                "Pick another model if the list offers one, or let the site's operator know."
            )
        if code == 429:
            return "The model service is rate limiting requests (HTTP 429). Try again shortly."
        return f"The model service answered with an error (HTTP {code}). Try again."
    if isinstance(exc, ModelAPIError):
        return "The model service could not be reached or broke off the reply. Try again."
    if isinstance(exc, UnexpectedModelBehavior) and "without content" in str(exc):
        # llama.cpp's server answers a prompt longer than its context with an empty stream.
        return (
            "The model ended its reply without sending anything. A local model server does "
            "this when the conversation is longer than its context window (llama.cpp: --n_ctx): "
            "start a new conversation, or give the server a larger context."
        )
    if isinstance(exc, UnexpectedModelBehavior):
        return "The model sent a reply that could not be understood. Try again."
    return "Something went wrong while generating this reply. Try again."
