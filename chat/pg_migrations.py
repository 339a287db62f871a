"""Ordered, named schema steps for the Postgres store (chat/pgstore.py).

The Postgres schema starts where SQLite's stands after m001..m008 (chat/migrations.py): one
first step makes the same tables, with the same columns in the same order and the same types
as the values SQLite hands back (timestamps and messages as text, integers as bigint, file bytes
as bytea), so a row reads the same from either store. A later schema change is a new step in
both lists. A shipped step is never edited.

What differs, and why:
- `conversations.seq`, a hidden identity column: SQLite breaks ties in the conversation list
  by `rowid`, which Postgres has no equivalent of. The store never returns it.
- `turns.search`, a stored generated `tsvector` with a GIN index, in place of SQLite's FTS5
  table and triggers. It uses `chat_english`, a text search configuration made here to read
  words as SQLite's `porter` tokenizer does: snowball's `porter` stemmer (the original Porter
  algorithm, which SQLite implements; snowball's `english` is Porter2 and stems some words
  differently: "generation" is `generat` there, `gener` in both of these), with no stop-word
  list, because SQLite drops no words ("the", "who" and "it" are found), and accents removed
  first by the `unaccent` extension, as SQLite's tokenizer removes diacritics ("ecole" finds
  "École"). `unaccent` ships with PostgreSQL and is a trusted extension (no superuser needed);
  where it cannot be created, accents are kept and a warning says so. Nothing here needs a
  superuser.
- Usernames are unique ignoring case with a unique index on `lower(username collate "C")`:
  ASCII-only case folding, exactly what SQLite's `collate nocase` does, whatever the
  database's own locale.
- `tool_approvals` rows go with their turn (`on delete cascade`), so erasing a conversation
  whose replies waited on tools erases their approvals too.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import psycopg

log = logging.getLogger("chat")
MIGRATIONS: list[Callable[[psycopg.Connection], None]] = []


def migration(fn: Callable[[psycopg.Connection], None]) -> Callable[[psycopg.Connection], None]:
    """Register `fn` as the next schema step."""
    MIGRATIONS.append(fn)
    return fn


def migrate(conn: psycopg.Connection) -> list[str]:
    """Apply every step not yet recorded in `_migrations`; return the names applied.

    Replicas that start together each call this: all of it runs in one transaction that first
    takes a transaction-scoped advisory lock, so one of them migrates while the others wait,
    then find every step recorded and apply none. The lock is released at commit or rollback,
    also when its holder's connection dies, and a failed step leaves nothing half-made
    (Postgres rolls back DDL too).
    """
    applied = []
    with conn.transaction():
        # However long the replica migrating first takes (the lock wait is not a busy write).
        conn.execute("set local lock_timeout = 0")
        # Keyed on the schema, so stores in different schemas of one database (the tests do
        # this) migrate side by side.
        conn.execute(
            "select pg_advisory_xact_lock(hashtext('chat migrations:' || current_schema()))"
        )
        conn.execute(
            "create table if not exists _migrations (name text primary key, applied_at text)"
        )
        done = {row[0] for row in conn.execute("select name from _migrations")}
        for fn in MIGRATIONS:
            if fn.__name__ in done:
                continue
            fn(conn)
            conn.execute(
                "insert into _migrations (name, applied_at) "
                "values (%s, to_char(now() at time zone 'utc', 'YYYY-MM-DD HH24:MI:SS'))",
                [fn.__name__],
            )
            applied.append(fn.__name__)
    return applied


@migration
def p001_schema_as_sqlite_m008(conn: psycopg.Connection) -> None:
    """The schema SQLite has after m001..m008: conversations, turns and their search,
    accounts and failed sign-ins, attachments, tool approvals."""
    _search_configuration(conn)
    for sql in _SCHEMA:
        conn.execute(sql)


def _search_configuration(conn: psycopg.Connection) -> None:
    """`chat_english`: Porter stemming, no stop words, accents removed (see the module doc)."""
    conn.execute(
        "create text search dictionary chat_english_stem (template = snowball, language = porter)"
    )
    conn.execute("create text search configuration chat_english (copy = english)")
    dictionaries = "chat_english_stem"
    if unaccent := _unaccent(conn):
        dictionaries = f"{unaccent}, chat_english_stem"
    else:
        log.warning(
            "the unaccent extension is not available: search in Postgres will not find "
            "'ecole' in 'École' (SQLite does); install PostgreSQL's contrib modules to fix it"
        )
    conn.execute(
        "alter text search configuration chat_english alter mapping for asciiword, asciihword, "
        f"hword_asciipart, word, hword, hword_part with {dictionaries}"
    )


def _unaccent(conn: psycopg.Connection) -> str | None:
    """The `unaccent` dictionary's qualified name, creating the extension if need be; None if
    this server lacks it or this role may not create it."""
    try:
        with conn.transaction():  # a savepoint: a refusal leaves the migration usable
            conn.execute("create extension if not exists unaccent")
    except psycopg.Error as exc:
        log.info("unaccent extension not created: %s", exc)
        return None
    # The extension lives in one schema per database (the first to create it chose it).
    row = conn.execute(
        "select quote_ident(n.nspname) from pg_extension e "
        "join pg_namespace n on n.oid = e.extnamespace where e.extname = 'unaccent'"
    ).fetchone()
    return f"{row[0]}.unaccent" if row else None


_SCHEMA = (
    """
    create table conversations (
        id text primary key,
        owner text not null,
        title text,
        model text,
        persona text,
        head_turn_id bigint,
        created_at text not null,
        updated_at text not null,
        deleted_at text,
        seq bigint generated always as identity unique
    )
    """,
    "create index conversations_owner_updated_at on conversations (owner, updated_at)",
    """
    create table turns (
        id bigint generated by default as identity primary key,
        conversation_id text not null references conversations (id),
        parent_id bigint,
        user_text text not null,
        reply_text text default '',
        messages text not null,
        status text not null default 'streaming',
        error text,
        model text,
        usage text,
        created_at text not null,
        finished_at text,
        reply_html text,
        reply_html_version bigint,
        feedback text,
        compare_group bigint,
        attachments text,
        search tsvector generated always as (
            to_tsvector('chat_english', user_text)
            || to_tsvector('chat_english', coalesce(reply_text, ''))
        ) stored
    )
    """,
    "create index turns_conversation_id_id on turns (conversation_id, id)",
    "create index turns_parent_id on turns (parent_id)",
    "create index turns_compare_group on turns (compare_group)",
    "create index turns_search on turns using gin (search)",
    # The start-up sweep for replies left 'streaming' reads only these few rows.
    "create index turns_streaming on turns (id) where status = 'streaming'",
    """
    create table users (
        id text primary key,
        username text not null,
        password_hash text not null,
        created_at text not null,
        session_version bigint not null default 0
    )
    """,
    'create unique index users_username_nocase on users (lower(username collate "C"))',
    "create table login_failures (key text not null, at text not null)",
    "create index login_failures_key_at on login_failures (key, at)",
    """
    create table attachments (
        id text primary key,
        owner text not null,
        turn_id bigint references turns (id) on delete cascade,
        name text not null,
        media_type text not null,
        size bigint not null,
        data bytea not null,
        created_at text not null
    )
    """,
    "create index attachments_owner_turn_id on attachments (owner, turn_id)",
    "create index attachments_turn_id on attachments (turn_id)",
    """
    create table tool_approvals (
        turn_id bigint not null references turns (id) on delete cascade,
        seq bigint not null,
        tool_call_id text not null,
        tool_name text not null,
        args text,
        decision text,
        created_at text not null,
        expires_at text not null,
        decided_at text,
        primary key (turn_id, seq)
    )
    """,
)
