"""Settings: the one place that reads the environment."""

from __future__ import annotations

import ipaddress
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
    # Failed sign-ins allowed per username in 15 minutes (a client address gets 5 times this).
    login_attempts: int = 10
    # Host header values the app answers to; ("*",) means any. Empty: worked out from `host`.
    allowed_hosts: tuple[str, ...] = ()
    # Seconds a client may take to send a request's headers (slow clients hold connections).
    header_timeout: float = 10.0
    # Replies: how often coalesced updates may go out, and when a partial reply is flushed to disk.
    stream_tick: float = 0.015
    flush_every: float = 2.0
    # A reply whose final save fails (disk full, database locked) is kept in memory and its
    # save retried for this many seconds.
    save_retry_for: float = 300.0
    heartbeat: float = 15.0
    max_message_chars: int = 32_000
    # Per reply: pydantic-ai UsageLimits, SDK retries before the first token, how long the
    # model may go silent before the reply is ended with an error, and how long it may take to
    # start (a local model on a CPU reads a long prompt for minutes before its first token).
    output_tokens_limit: int | None = 8_000
    request_limit: int | None = 10
    model_retries: int = 2
    stall_timeout: float = 120.0
    first_token_timeout: float = 600.0
    history_page: int = 50
    messages_per_minute: int = 20
    concurrent_runs: int = 3
    open_streams: int = 12
    # The same per-minute count per client address, so fresh cookies do not escape it (a NAT or
    # office shares one address, hence a higher default), and the addresses of reverse proxies
    # whose X-Forwarded-For is believed.
    address_messages_per_minute: int = 60
    trusted_proxies: tuple[str, ...] = ()
    # Replies being written at once, over everyone: beyond it a clear 503, not a slow queue.
    max_running_replies: int = 100
    # What a reply's model is given of the conversation before it (0/None: everything).
    history_max_messages: int | None = 400
    history_max_chars: int | None = 200_000
    max_import_turns: int = 500
    provider_keys: tuple[str, ...] = field(default_factory=tuple)
    # OPENAI_FAST_PATHS=0 keeps the OpenAI SDK's own stream reading and request building.
    openai_fast_paths: bool = True
    # Attachments (chat/attachments.py): the largest file accepted, and files per message.
    max_attachment_bytes: int = 10_000_000
    max_attachments: int = 5
    # Scale out (issue 14): a Redis shared by every process (empty: everything in this one),
    # worker processes to serve with (more than 1 needs REDIS_URL), and how long a stopping
    # worker lets its running replies finish before it interrupts them.
    redis_url: str = ""
    workers: int = 1
    drain_grace: float = 25.0
    # MCP servers and tool approval (chat/mcp.py, chat/approvals.py): the `mcpServers` JSON file,
    # how long one MCP tool call may take, and how long a call waits for Approve / Deny.
    mcp_config: Path | None = None
    mcp_tool_timeout: float = 60.0
    tool_approval_ttl: float = 3600.0
    # Run leases (chat/cluster.py): a running reply's lease lasts `lease_seconds`, renewed every
    # `lease_refresh` seconds by the process writing it; once it lapses (that process died)
    # another one ends the reply.
    lease_seconds: float = 15.0
    lease_refresh: float = 5.0
    # Postgres (issue 17, chat/pgstore.py): DATABASE_URL=postgresql://... stores everything there
    # instead of the SQLite file at DB_PATH, so any number of replicas share it; SECRET_KEY is then
    # required. DATABASE_POOL_SIZE caps each process's connections (0: as many as its threads).
    database_url: str = ""
    database_pool_size: int = 0
    # Redis key namespace (chat/cluster.py, chat/redislog.py, chat/redis_limits.py): every key
    # and channel starts with it, so two deployments sharing one Redis database stay apart.
    redis_prefix: str = "chat:"

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
            login_attempts=int(env.get("LOGIN_ATTEMPTS") or 10),
            allowed_hosts=tuple(
                h.strip().lower() for h in (env.get("ALLOWED_HOSTS") or "").split(",") if h.strip()
            ),
            header_timeout=float(env.get("HEADER_TIMEOUT") or 10),
            max_message_chars=int(env.get("MAX_MESSAGE_CHARS") or 32_000),
            output_tokens_limit=_opt_int(env.get("MAX_OUTPUT_TOKENS"), 8_000),
            request_limit=_opt_int(env.get("MAX_MODEL_REQUESTS"), 10),
            model_retries=int(env.get("MODEL_RETRIES") or 2),
            messages_per_minute=int(env.get("MESSAGES_PER_MINUTE") or 20),
            concurrent_runs=int(env.get("CONCURRENT_RUNS") or 3),
            open_streams=int(env.get("OPEN_STREAMS") or 12),
            address_messages_per_minute=int(env.get("ADDRESS_MESSAGES_PER_MINUTE") or 60),
            trusted_proxies=tuple(
                p.strip() for p in (env.get("TRUSTED_PROXIES") or "").split(",") if p.strip()
            ),
            max_running_replies=int(env.get("MAX_RUNNING_REPLIES") or 100),
            history_max_messages=_opt_int(env.get("HISTORY_MAX_MESSAGES"), 400),
            history_max_chars=_opt_int(env.get("HISTORY_MAX_CHARS"), 200_000),
            max_import_turns=int(env.get("MAX_IMPORT_TURNS") or 500),
            stall_timeout=float(env.get("STALL_TIMEOUT") or 120),
            first_token_timeout=float(env.get("FIRST_TOKEN_TIMEOUT") or 600),
            save_retry_for=float(env.get("SAVE_RETRY_SECONDS") or 300),
            provider_keys=tuple(k for k in PROVIDER_KEYS if env.get(k)),
            openai_fast_paths=(env.get("OPENAI_FAST_PATHS") or "1").lower()
            not in ("0", "false", "no", "off"),
            max_attachment_bytes=int(env.get("MAX_ATTACHMENT_BYTES") or 10_000_000),
            max_attachments=int(env.get("MAX_ATTACHMENTS") or 5),
            redis_url=(env.get("REDIS_URL") or "").strip(),
            workers=int(env.get("WORKERS") or 1),
            drain_grace=float(env.get("DRAIN_GRACE") or 25),
            mcp_config=Path(env["MCP_CONFIG"]) if env.get("MCP_CONFIG") else None,
            mcp_tool_timeout=float(env.get("MCP_TOOL_TIMEOUT") or 60),
            tool_approval_ttl=float(env.get("TOOL_APPROVAL_TTL") or 3600),
            lease_seconds=float(env.get("LEASE_SECONDS") or 15),
            lease_refresh=float(env.get("LEASE_REFRESH_SECONDS") or 5),
            database_url=database_url_from_env(env),
            database_pool_size=int(env.get("DATABASE_POOL_SIZE") or 0),
            redis_prefix=(env.get("REDIS_PREFIX") or "").strip() or "chat:",
        )
        values.update(overrides)
        # MODEL (from the environment or --model) is always among the models offered.
        if values["model"] and values["model"] not in values["models"]:
            values["models"] = (values["model"], *values["models"])
        if not values["allowed_hosts"]:
            values["allowed_hosts"] = default_allowed_hosts(values["host"])
        if not 0 < values["lease_refresh"] < values["lease_seconds"]:
            raise ValueError(
                "LEASE_REFRESH_SECONDS must be above 0 and below LEASE_SECONDS, so a reply's "
                "lease is renewed before it lapses."
            )
        if values["database_url"] and not values["secret_key"]:
            raise ValueError(POSTGRES_NEEDS_SIGNING_KEY)
        settings = cls(**values)
        if not settings.secret_key:
            settings = cls(**{**values, "secret_key": load_or_create_secret(settings.db_path)})
        return settings

    def host_allowed(self, host: str) -> bool:
        """True if a request's Host header (with or without a port) names this site."""
        if "*" in self.allowed_hosts:
            return True
        name = host.strip().lower()
        if name.startswith("["):  # an IPv6 literal: "[::1]:5001"
            name = name[1 : name.find("]")] if "]" in name else ""
        elif name.count(":") == 1:
            name = name.rsplit(":", 1)[0]
        name = name.rstrip(".")
        return any(
            name == allowed or (allowed.startswith(".") and name.endswith(allowed))
            for allowed in self.allowed_hosts
        )


LOCAL_NAMES = ("localhost", "127.0.0.1", "::1")


def default_allowed_hosts(host: str) -> tuple[str, ...]:
    """The Host names answered when ALLOWED_HOSTS is unset.

    Serving on a loopback address or a host name: the local names (and that name), so a page
    on another site cannot reach the app through a DNS name rebound to 127.0.0.1. Serving on
    any other address (0.0.0.0 in the container, usually behind a proxy): every name, as
    before; set ALLOWED_HOSTS to the site's names to restrict it.
    """
    host = host.strip().lower()
    try:
        address = ipaddress.ip_address(host)
    except ValueError:  # a name, such as localhost or chat.internal
        return tuple(dict.fromkeys((*LOCAL_NAMES, host)))
    if address.is_loopback:
        return tuple(dict.fromkeys((*LOCAL_NAMES, str(address))))
    return ("*",)


def read_env() -> dict[str, str]:
    """The environment: values from a `.env` file, overridden by real environment variables."""
    return {**{k: v for k, v in dotenv_values(".env").items() if v is not None}, **os.environ}


def db_path_from_env() -> Path:
    """Just DB_PATH, for tools that need the database but not the rest of the settings."""
    return Path(read_env().get("DB_PATH") or "data/chat.db")


# Postgres mode (issue 17) ------------------------------------------------------------------
POSTGRES_NEEDS_SIGNING_KEY = (
    "DATABASE_URL is set, so SECRET_KEY must be set too: with Postgres, replicas share the "
    "conversations but not the key file kept beside a SQLite database, and every replica must "
    "sign sessions with the same key (or anonymous visitors lose their conversations when "
    "another replica answers). Set SECRET_KEY to a long random string, the same on every replica."
)


def database_url_from_env(env: Mapping[str, str] | None = None) -> str:
    """DATABASE_URL (a postgresql:// URL), or "" for the SQLite file at DB_PATH."""
    url = ((read_env() if env is None else env).get("DATABASE_URL") or "").strip()
    if url and not url.startswith(("postgresql://", "postgres://")):
        raise ValueError(
            "DATABASE_URL must be a postgresql:// URL (unset it to use the SQLite file at DB_PATH)"
        )
    return url


def _opt_int(raw: str | None, default: int) -> int | None:
    """An integer setting where 0 or 'none' means no limit."""
    if raw is None or raw == "":
        return default
    if raw.lower() in ("0", "none", "off"):
        return None
    return int(raw)


class SecretKeyError(RuntimeError):
    """The session-signing key file exists but cannot be used."""


def load_or_create_secret(db_path: Path) -> str:
    """Return the session-signing key kept beside the database, creating it on first use."""
    if str(db_path) == ":memory:":
        return secrets.token_urlsafe(32)
    path = Path(db_path).parent / ".secret_key"
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        key = path.read_text().strip()
        if not key:
            # A truncated file (full disk, a bad copy) must not silently sign with no key.
            raise SecretKeyError(
                f"The session key file {path} is empty. Restore it from a backup, or delete it "
                "to have a new key made (everyone will have to sign in again), or set SECRET_KEY."
            )
        return key
    key = secrets.token_urlsafe(32)
    # Owner-only: the key lets anyone forge any browser's identity. Written whole to a file of
    # its own, then linked into place: workers starting together must neither read a half-written
    # key nor both win (a link fails if the name exists, and the loser reads the winner's key).
    tmp = path.with_name(f".secret_key.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(key)
        os.link(tmp, path)
    except FileExistsError:
        return path.read_text().strip()
    finally:
        tmp.unlink(missing_ok=True)
    return key
