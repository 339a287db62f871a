"""Ordered, named schema steps. A shipped step is never edited, only followed by a new one."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path

from sqlite_utils import Database

log = logging.getLogger("chat")
MIGRATIONS: list[Callable[[Database], None]] = []


def migration(fn: Callable[[Database], None]) -> Callable[[Database], None]:
    """Register `fn` as the next schema step."""
    MIGRATIONS.append(fn)
    return fn


@contextlib.contextmanager
def migration_lock(db_path: str | Path) -> Iterator[None]:
    """Hold an exclusive lock beside the database file while the schema is brought up to date.

    Workers started together (`WORKERS=N`, `uvicorn --workers`, several containers on one
    volume) each open the database and migrate it: without this, two of them could apply the
    same step at once, and the loser stopped on "table already exists" or "database is locked".
    A file lock waits for as long as the winner takes (SQLite's busy timeout would not), is
    released by the kernel if its holder dies, and leaves the database's own locking alone.
    """
    if str(db_path) == ":memory:":
        yield
        return
    lock = Path(f"{db_path}.migrate-lock")
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


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


@migration
def m005_account_hardening(db: Database) -> None:
    """Usernames ignore letter case; sessions can be ended; failed sign-ins are counted.

    Accounts whose names differ only in case (possible before this step) cannot all keep
    them: the oldest keeps its name, each later one is renamed `name-2`, `name-3`, ... (still a
    valid username), its sessions are ended, and the rename is logged as a warning so the
    operator can tell its owner. Nothing else about those accounts changes.
    """
    db["users"].add_column("session_version", int, not_null_default=0)
    rows = db.execute("select id, username from users order by created_at, id").fetchall()
    taken = {name.lower() for _, name in rows}
    kept: set[str] = set()
    for uid, name in rows:
        if name.lower() not in kept:
            kept.add(name.lower())
            continue
        n = 2
        while f"{name[:37]}-{n}".lower() in taken:
            n += 1
        renamed = f"{name[:37]}-{n}"
        taken.add(renamed.lower())
        db.execute(
            "update users set username = ?, session_version = session_version + 1 where id = ?",
            [renamed, uid],
        )
        log.warning(
            "usernames now ignore case: account %r (id %s) was renamed %r because an older "
            "account has the same name in another case; tell its owner",
            name,
            uid,
            renamed,
        )
    db.execute("drop index if exists idx_users_username")
    db.execute("create unique index idx_users_username_nocase on users (username collate nocase)")
    db["login_failures"].create({"key": str, "at": str}, not_null={"key", "at"})
    db["login_failures"].create_index(["key", "at"])


@migration
def m006_reply_feedback(db: Database) -> None:
    """A reply's thumbs up or down (`feedback`: 'up', 'down' or null), and side-by-side groups.

    `compare_group` is the id of the first turn of a comparison (one message sent to several
    models at once), on every turn of it, so a reloaded page shows the replies as columns again.
    """
    db["turns"].add_column("feedback", str)
    db["turns"].add_column("compare_group", int)
    db["turns"].create_index(["compare_group"])


@migration
def m007_attachments(db: Database) -> None:
    """Files sent with a message (chat/attachments.py): their bytes live here, not in turns.

    An attachment is uploaded before its message is sent: `turn_id` is null while it is
    pending in the composer, then the turn it was first sent with (deleting the turn deletes
    the bytes). `turns.attachments` lists a turn's files as JSON (id, name, media type, size),
    so pages show them without reading any bytes, and a regenerated or edited turn can list
    the same files again.
    """
    db.execute(
        "create table attachments ("
        "id text primary key, "
        "owner text not null, "
        "turn_id integer references turns(id) on delete cascade, "
        "name text not null, "
        "media_type text not null, "
        "size integer not null, "
        "data blob not null, "
        "created_at text not null)"
    )
    db["attachments"].create_index(["owner", "turn_id"])
    db["attachments"].create_index(["turn_id"])
    db["turns"].add_column("attachments", str)


@migration
def m008_tool_approvals(db: Database) -> None:
    """Tool calls waiting for the user's approval (chat/approvals.py).

    A turn whose reply paused on them has status 'awaiting_approval'; each call is a row here,
    numbered `seq` within its turn, until it is approved, denied or expired.
    """
    db["tool_approvals"].create(
        {
            "turn_id": int,
            "seq": int,
            "tool_call_id": str,
            "tool_name": str,
            "args": str,
            # null while waiting | approved | denied | expired
            "decision": str,
            "created_at": str,
            "expires_at": str,
            "decided_at": str,
        },
        pk=("turn_id", "seq"),
        not_null={"turn_id", "seq", "tool_call_id", "tool_name", "created_at", "expires_at"},
        foreign_keys=[("turn_id", "turns", "id")],
    )
