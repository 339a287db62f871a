"""Settings: the one place that reads the environment."""

from __future__ import annotations

import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from dotenv import dotenv_values

# Keys the provider SDKs read; their presence only changes what the demo model tells the user.
PROVIDER_KEYS = ("OPENAI_API_KEY", "ANTHROPIC_API_KEY", "GOOGLE_API_KEY", "GROQ_API_KEY")


@dataclass(frozen=True)
class Settings:
    """Everything the app needs to know about its environment, read once at start-up."""

    model: str | None = None
    models: tuple[str, ...] = ()
    host: str = "127.0.0.1"
    port: int = 5001
    db_path: Path = Path("data/chat.db")
    secret_key: str = ""
    # Mark the session cookie Secure; set HTTPS=1 when the site is served over HTTPS.
    https_only: bool = False
    # AUTH=password turns on accounts; SIGNUP=closed stops new ones (use manage.py adduser).
    auth: str = "none"
    signup_open: bool = True
    # Replies: how often coalesced updates may go out, and when a partial reply is flushed to disk.
    stream_tick: float = 0.015
    flush_every: float = 2.0
    # A reply whose final save fails (disk full, database locked) is kept in memory and its
    # save retried for this many seconds.
    save_retry_for: float = 300.0
    heartbeat: float = 15.0
    max_message_chars: int = 32_000
    # Per reply: pydantic-ai UsageLimits, SDK retries before the first token, and how long the
    # model may go silent before the reply is ended with an error.
    output_tokens_limit: int | None = 8_000
    request_limit: int | None = 10
    model_retries: int = 2
    stall_timeout: float = 120.0
    history_page: int = 50
    messages_per_minute: int = 20
    concurrent_runs: int = 3
    open_streams: int = 12
    provider_keys: tuple[str, ...] = field(default_factory=tuple)

    @property
    def demo(self) -> bool:
        """True when no model is configured and the offline demo model answers."""
        return not self.model and not self.models

    @property
    def default_model(self) -> str:
        """The model new conversations use: MODEL, else the first of MODELS, else the demo."""
        return self.model or (self.models[0] if self.models else "demo")

    @property
    def choices(self) -> tuple[str, ...]:
        """The models offered in the picker (just the demo when none is configured)."""
        return self.models or ("demo",)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides) -> Settings:
        """Build settings from `env` (default: `.env` file values overlaid by `os.environ`)."""
        if env is None:
            env = read_env()
        model = (env.get("MODEL") or "").strip() or None
        models = tuple(m.strip() for m in (env.get("MODELS") or "").split(",") if m.strip())
        db_path = Path(env.get("DB_PATH") or "data/chat.db")
        values = dict(
            model=model,
            models=models,
            host=env.get("HOST") or "127.0.0.1",
            port=int(env.get("PORT") or 5001),
            db_path=db_path,
            secret_key=env.get("SECRET_KEY") or "",
            https_only=(env.get("HTTPS") or "").lower() in ("1", "true", "yes"),
            auth="password" if (env.get("AUTH") or "").lower() == "password" else "none",
            signup_open=(env.get("SIGNUP") or "open").lower() != "closed",
            max_message_chars=int(env.get("MAX_MESSAGE_CHARS") or 32_000),
            output_tokens_limit=_opt_int(env.get("MAX_OUTPUT_TOKENS"), 8_000),
            request_limit=_opt_int(env.get("MAX_MODEL_REQUESTS"), 10),
            model_retries=int(env.get("MODEL_RETRIES") or 2),
            messages_per_minute=int(env.get("MESSAGES_PER_MINUTE") or 20),
            concurrent_runs=int(env.get("CONCURRENT_RUNS") or 3),
            open_streams=int(env.get("OPEN_STREAMS") or 12),
            stall_timeout=float(env.get("STALL_TIMEOUT") or 120),
            save_retry_for=float(env.get("SAVE_RETRY_SECONDS") or 300),
            provider_keys=tuple(k for k in PROVIDER_KEYS if env.get(k)),
        )
        values.update(overrides)
        # MODEL (from the environment or --model) is always among the models offered.
        if values["model"] and values["model"] not in values["models"]:
            values["models"] = (values["model"], *values["models"])
        settings = cls(**values)
        if not settings.secret_key:
            settings = cls(**{**values, "secret_key": load_or_create_secret(settings.db_path)})
        return settings


def read_env() -> dict[str, str]:
    """The environment: values from a `.env` file, overridden by real environment variables."""
    return {**{k: v for k, v in dotenv_values(".env").items() if v is not None}, **os.environ}


def db_path_from_env() -> Path:
    """Just DB_PATH, for tools that need the database but not the rest of the settings."""
    return Path(read_env().get("DB_PATH") or "data/chat.db")


def _opt_int(raw: str | None, default: int) -> int | None:
    """An integer setting where 0 or 'none' means no limit."""
    if raw is None or raw == "":
        return default
    if raw.lower() in ("0", "none", "off"):
        return None
    return int(raw)


def load_or_create_secret(db_path: Path) -> str:
    """Return the session-signing key kept beside the database, creating it on first use."""
    if str(db_path) == ":memory:":
        return secrets.token_urlsafe(32)
    path = Path(db_path).parent / ".secret_key"
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        return path.read_text().strip()
    key = secrets.token_urlsafe(32)
    # Owner-only: the key lets anyone forge any browser's identity.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key)
    return key
