"""Ordered, named schema steps. A shipped step is never edited, only followed by a new one."""

from __future__ import annotations

from collections.abc import Callable

from sqlite_utils import Database

MIGRATIONS: list[Callable[[Database], None]] = []


def migration(fn: Callable[[Database], None]) -> Callable[[Database], None]:
    """Register `fn` as the next schema step."""
    MIGRATIONS.append(fn)
    return fn


def migrate(db: Database) -> list[str]:
    """Apply every step not yet recorded in `_migrations`; return the names applied."""
    db["_migrations"].create({"name": str, "applied_at": str}, pk="name", if_not_exists=True)
    done = {row["name"] for row in db["_migrations"].rows}
    applied = []
    for fn in MIGRATIONS:
        if fn.__name__ in done:
            continue
        # All of a step or none of it: a failed step leaves no half-made schema behind.
        with db.atomic():
            fn(db)
            db.execute(
                "insert into _migrations (name, applied_at) values (?, datetime('now'))",
                [fn.__name__],
            )
        applied.append(fn.__name__)
    return applied


@migration
def m001_conversations_and_turns(db: Database) -> None:
    """Conversations, and turns: one user message and its reply, as pydantic-ai messages."""
    db["conversations"].create(
        {
            "id": str,
            "owner": str,
            "title": str,
            "model": str,
            "persona": str,
            "head_turn_id": int,
            "created_at": str,
            "updated_at": str,
        },
        pk="id",
        not_null={"owner", "created_at", "updated_at"},
    )
    db["conversations"].create_index(["owner", "updated_at"])
    db["turns"].create(
        {
            "id": int,
            "conversation_id": str,
            "parent_id": int,
            "user_text": str,
            "reply_text": str,
            # JSON list of pydantic-ai ModelMessage (ModelMessagesTypeAdapter) for this turn.
            "messages": str,
            # streaming | complete | stopped | failed | interrupted
            "status": str,
            "error": str,
            "model": str,
            "usage": str,
            "created_at": str,
            "finished_at": str,
        },
        pk="id",
        not_null={"conversation_id", "user_text", "messages", "status", "created_at"},
        defaults={"reply_text": "", "status": "streaming"},
        foreign_keys=[("conversation_id", "conversations", "id")],
    )
    db["turns"].create_index(["conversation_id", "id"])
    db["turns"].create_index(["parent_id"])


@migration
def m002_soft_delete_and_search(db: Database) -> None:
    """Soft delete (so a deletion can be undone) and full-text search over every turn."""
    db["conversations"].add_column("deleted_at", str)
    db["turns"].enable_fts(["user_text", "reply_text"], create_triggers=True, tokenize="porter")


@migration
def m003_users(db: Database) -> None:
    """Optional accounts (AUTH=password): usernames with argon2 password hashes."""
    db["users"].create(
        {"id": str, "username": str, "password_hash": str, "created_at": str},
        pk="id",
        not_null={"username", "password_hash", "created_at"},
    )
    db["users"].create_index(["username"], unique=True)


@migration
def m004_rendered_replies(db: Database) -> None:
    """A cache of each finished reply's sanitized HTML, so long conversations open quickly.

    `reply_html_version` names the renderer that wrote it (chat.markdown.RENDER_VERSION); a
    reply rendered by another version is rendered again when next shown.
    """
    db["turns"].add_column("reply_html", str)
    db["turns"].add_column("reply_html_version", int)
