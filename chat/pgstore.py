"""PostgresStore: the `Store` interface (chat/storage.py) on PostgreSQL, for many replicas.

Chosen by chat/stores.py when DATABASE_URL is set. Every method answers exactly as `ChatStore`
(chat/store.py) does: the same dict keys in the same order, the same values (timestamps and
messages as the same text, integers as int, file bytes as bytes) and the same ordering, so no
route, run or test above the store can tell which one it talks to; tests/test_store_parity.py
holds the two to that. The pure helpers (timestamps, message JSON, ids) are ChatStore's own,
read from chat.store at call time so a test's fixed clock reaches both stores.

Why synchronous psycopg 3 with a `psycopg_pool.ConnectionPool`, not the async driver: the
Store interface is synchronous and every caller already runs it in a worker thread
(`asyncio.to_thread`, `off_loop`), so neither store ever blocks the event loop. An async store
would need a second interface at every caller, and the point of this store is that nothing
above it changes. The pool holds at most `pool_size` connections (DATABASE_POOL_SIZE); by
default as many as asyncio's default thread pool has threads, since those threads are what
run store calls at once: more connections would sit idle, fewer would make threads queue.

Why this module is long: like chat/store.py, it is the one module that runs this store's SQL,
so every question the app asks of the database is a method here.

Errors keep the interface's contract, which callers already rely on: a taken id or username
raises `IntegrityError`, a database that cannot answer now (connection lost, pool exhausted,
lock timeout, read-only standby) raises `Unavailable`. They subclass sqlite3's
IntegrityError and OperationalError, the exceptions the interface has always raised, so
`except sqlite3.OperationalError` (the "busy, try again" page) still catches them; the psycopg
error is their `__cause__`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import secrets
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import psycopg
from psycopg.types.string import StrDumperUnknown
from psycopg_pool import ConnectionPool
from pydantic_ai.messages import ModelMessage

import chat.store as base
from chat.pg_migrations import migrate
from chat.storage import BackupElsewhere
from chat.store import FINISHED, INTERRUPTED, SQLITE_INT, _with_reply, dump_messages, load_messages

log = logging.getLogger(__name__)

# Columns in SQLite's order; `select *` is never used, so hidden columns (conversations.seq,
# turns.search) never reach a row dict.
CONV_COLS = "id, owner, title, model, persona, head_turn_id, created_at, updated_at, deleted_at"
TURN_COLS = (
    "id, conversation_id, parent_id, user_text, reply_text, messages, status, error, model, "
    "usage, created_at, finished_at, reply_html, reply_html_version, feedback, compare_group, "
    "attachments"
)
USER_COLS = "id, username, password_hash, created_at, session_version"
APPROVAL_COLS = (
    "turn_id, seq, tool_call_id, tool_name, args, decision, created_at, expires_at, decided_at"
)
ATTACHMENT_META = "id, owner, turn_id, name, media_type, size, created_at"

# The text search configuration made by chat/pg_migrations.py (stemming, no stop words).
TS_CONFIG = "chat_english"
# ts_headline options that come closest to SQLite's `snippet(..., '…', 12)`: about 12 words
# around the hits, every word kept (ShortWord=0), one fragment; the '…' is added in Python. A
# text of at most 12 tokens (as SQLite counts them: runs of letters and digits) is shown whole,
# as SQLite shows it, whatever ts_headline would count.
SNIPPET_TOKENS = 12
WHOLE_HEADLINE = "StartSel=\x02, StopSel=\x03, HighlightAll=true"
HEADLINE = "StartSel=\x02, StopSel=\x03, MaxWords=12, MinWords=6, ShortWord=0, MaxFragments=1"
# A lexeme in tsquery text: quoted, with quotes inside doubled.
_LEXEME = re.compile(r"'((?:[^']|'')*)'")
_WORD = re.compile(r"\w")
# How long a store call waits for a free connection, and start-up for the database to answer.
POOL_WAIT = 10.0
START_WAIT = 30.0
# How long `cache_html` waits for a row lock before it gives the write up.
CACHE_LOCK_TIMEOUT = "50ms"


def default_pool_size() -> int:
    """As many connections as asyncio's default thread pool has threads (see the module doc)."""
    return min(32, (os.cpu_count() or 1) + 4)


class IntegrityError(sqlite3.IntegrityError):
    """A row with this key exists already (a taken conversation id or username)."""


class Unavailable(sqlite3.OperationalError):
    """The database cannot answer now (unreachable, busy, read-only); try again later."""


class StoreError(sqlite3.DatabaseError):
    """Any other database error, so `except sqlite3.Error` around a store call still works."""


BACKUP_HINT = (
    "The conversations are in Postgres (DATABASE_URL): back them up with pg_dump, which takes "
    "a consistent copy while the app serves: "
    'pg_dump --format=custom --file=chat.dump "$DATABASE_URL" '
    '(restore into an empty database with: pg_restore --dbname="$DATABASE_URL" chat.dump)'
)


@contextlib.contextmanager
def _translated() -> Iterator[None]:
    """Raise psycopg's errors as the interface's (see the module docstring)."""
    try:
        yield
    except psycopg.IntegrityError as exc:
        raise IntegrityError(str(exc).strip()) from exc
    except (psycopg.OperationalError, psycopg.errors.ReadOnlySqlTransaction) as exc:
        raise Unavailable(str(exc).strip()) from exc
    except psycopg.Error as exc:
        raise StoreError(str(exc).strip()) from exc


class _NulFreeText(StrDumperUnknown):
    """Text parameters with NUL characters replaced by U+FFFD: Postgres text cannot hold NUL
    (SQLite's can), and a message, title or search typed with one must be stored or searched,
    not fail. The only place the two stores may store different text."""

    def dump(self, obj: str) -> bytes:
        return super().dump(obj.replace("\x00", "\ufffd") if "\x00" in obj else obj)


def _configure(conn: psycopg.Connection) -> None:
    """Set up each new connection: NUL-free text, and SQLite's busy timeout as lock_timeout."""
    conn.adapters.register_dumper(str, _NulFreeText)
    # A write waits this long for another's lock (BUSY_TIMEOUT_MS, as SQLite's writes do), then
    # fails as Unavailable: the user is told the server is busy instead of waiting forever.
    conn.execute(f"set lock_timeout = {int(base.BUSY_TIMEOUT_MS)}")


def _rows(cur: psycopg.Cursor) -> list[dict]:
    names = [c.name for c in cur.description]
    return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]


class PostgresStore:
    """Owns the Postgres database: a pool of connections, the schema, and every query."""

    def __init__(self, url: str, *, pool_size: int | None = None):
        self.url = url
        self._size = max(pool_size or default_pool_size(), 1)
        self._pool_lock = threading.Lock()
        self._pool = self._open_pool()
        with self._conn() as conn:
            if applied := migrate(conn):
                log.info("postgres schema: applied %s", ", ".join(applied))

    def _open_pool(self) -> ConnectionPool:
        # Autocommit: a read is one round trip; every write opens its own transaction (`_tx`).
        # Each connection is checked as it is taken from the pool, so after a database restart
        # or a failover the store reconnects instead of failing one request per old connection.
        pool = ConnectionPool(
            self.url,
            min_size=1,
            max_size=self._size,
            kwargs={"autocommit": True},
            check=ConnectionPool.check_connection,
            configure=_configure,
            open=False,
            name="chat",
            timeout=POOL_WAIT,
        )
        try:
            pool.open(wait=True, timeout=START_WAIT)
        except psycopg.OperationalError as exc:  # PoolTimeout: no connection could be made
            pool.close()
            raise Unavailable(
                f"the Postgres database at DATABASE_URL did not answer within {START_WAIT:.0f} s "
                "(is it running and reachable, and are the user, password and database right?)"
            ) from exc
        return pool

    def _current_pool(self) -> ConnectionPool:
        # As ChatStore's connections do, a closed store opens again when it is next used.
        if self._pool.closed:
            with self._pool_lock:
                if self._pool.closed:
                    self._pool = self._open_pool()
        return self._pool

    # Connections --------------------------------------------------------------------------

    @contextlib.contextmanager
    def _conn(self) -> Iterator[psycopg.Connection]:
        """A pooled connection in autocommit mode, for reads."""
        pool = self._current_pool()
        with _translated(), pool.connection() as conn:
            yield conn

    @contextlib.contextmanager
    def _tx(self) -> Iterator[psycopg.Connection]:
        """A pooled connection inside a transaction, committed when the block ends."""
        pool = self._current_pool()
        with _translated(), pool.connection() as conn, conn.transaction():
            yield conn

    def _all(self, sql: str, args: Sequence | dict = ()) -> list[dict]:
        with self._conn() as conn:
            return _rows(conn.execute(sql, args))

    def _one(self, sql: str, args: Sequence | dict = ()) -> dict | None:
        rows = self._all(sql, args)
        return rows[0] if rows else None

    def _write(self, sql: str, args: Sequence | dict = ()) -> int:
        """Run one statement in its own transaction; return the rows it changed."""
        with self._tx() as conn:
            return conn.execute(sql, args).rowcount

    def close(self) -> None:
        """Close every connection (the store opens new ones if it is used again)."""
        with self._pool_lock:
            self._pool.close()

    # Administration -----------------------------------------------------------------------

    def backup(self, target: str | Path) -> Path:
        """Not done by the app on Postgres: raises, saying how to run pg_dump instead."""
        raise BackupElsewhere(BACKUP_HINT)

    def integrity(self) -> str:
        """'ok' when every reference between rows holds, else what does not (one per line)."""
        with self._conn() as conn:
            problems = [
                f"{count} {what}"
                for what, sql in _CONSISTENCY
                if (count := conn.execute(sql).fetchone()[0])
            ]
        return "\n".join(problems) or "ok"

    def all_conversations(self, owner: str | None = None) -> list[dict]:
        """Every conversation (of `owner`, if given), newest first, for administration."""
        # Ties in the order SQLite gives them: its owner index is read backwards (newest row
        # first), a whole-table scan forwards.
        if owner:
            return self._all(
                f"select {CONV_COLS} from conversations where owner = %s "  # noqa: S608
                "order by updated_at desc, seq desc",
                [owner],
            )
        return self._all(
            f"select {CONV_COLS} from conversations order by updated_at desc, seq"  # noqa: S608
        )

    def erase(self, cid: str) -> bool:
        """Delete a conversation and its turns for good (administration)."""
        with self._tx() as conn:
            conn.execute("delete from turns where conversation_id = %s", [cid])
            return conn.execute("delete from conversations where id = %s", [cid]).rowcount == 1

    # Conversations ------------------------------------------------------------------------

    def create_conversation(
        self,
        owner: str,
        *,
        model: str | None = None,
        persona: str | None = None,
        cid: str | None = None,
    ) -> dict:
        """Create an empty conversation owned by `owner` (with id `cid`, else a new one)."""
        stamp = base.now()
        row = {
            "id": cid or base.new_id(),
            "owner": owner,
            "title": "",
            "model": model,
            "persona": persona,
            "head_turn_id": None,
            "created_at": stamp,
            "updated_at": stamp,
        }
        self._write(
            "insert into conversations (id, owner, title, model, persona, head_turn_id, "
            "created_at, updated_at) values (%s, %s, %s, %s, %s, %s, %s, %s)",
            list(row.values()),
        )
        return row

    def claim_conversation(
        self, cid: str, owner: str, *, model: str | None = None, persona: str | None = None
    ) -> dict | None:
        """Create the empty conversation `cid` for `owner`; None if that id is taken already
        (by anyone, deleted or not), so a thread id never reaches someone else's conversation."""
        try:
            return self.create_conversation(owner, model=model, persona=persona, cid=cid)
        except IntegrityError:
            return None

    def conversation(self, cid: str, owner: str) -> dict | None:
        """The conversation `cid` if `owner` owns it, else None."""
        return self._one(
            f"select {CONV_COLS} from conversations "  # noqa: S608
            "where id = %s and owner = %s and deleted_at is null",
            [cid, owner],
        )

    def conversations(self, owner: str, limit: int = 200) -> list[dict]:
        """The owner's conversations, most recently active first (ties: the newest made)."""
        return self._all(
            f"select {CONV_COLS} from conversations "  # noqa: S608
            "where owner = %s and deleted_at is null "
            "order by updated_at desc, seq desc limit %s",
            [owner, limit],
        )

    def set_title(self, cid: str, title: str) -> None:
        """Set a conversation's title."""
        self._write("update conversations set title = %s where id = %s", [title, cid])

    def rename(self, cid: str, owner: str, title: str) -> bool:
        """Rename the owner's conversation; False if it is not theirs."""
        return (
            self._write(
                "update conversations set title = %s where id = %s and owner = %s "
                "and deleted_at is null",
                [title, cid, owner],
            )
            == 1
        )

    def delete(self, cid: str, owner: str) -> bool:
        """Soft-delete the owner's conversation, so it can be restored; False if not theirs."""
        return (
            self._write(
                "update conversations set deleted_at = %s where id = %s and owner = %s "
                "and deleted_at is null",
                [base.now(), cid, owner],
            )
            == 1
        )

    def restore(self, cid: str, owner: str) -> bool:
        """Undo a deletion; False if there is nothing of the owner's to restore."""
        return (
            self._write(
                "update conversations set deleted_at = null where id = %s and owner = %s "
                "and deleted_at is not null",
                [cid, owner],
            )
            == 1
        )

    def purge_deleted(self, before: str) -> int:
        """Erase conversations deleted before `before` (ISO time), with their turns."""
        with self._tx() as conn:
            ids = [
                r[0]
                for r in conn.execute(
                    "select id from conversations where deleted_at is not null "
                    "and deleted_at < %s for update",
                    [before],
                )
            ]
            if ids:
                conn.execute("delete from turns where conversation_id = any(%s)", [ids])
                conn.execute("delete from conversations where id = any(%s)", [ids])
        return len(ids)

    def set_persona(self, cid: str, persona: str | None) -> None:
        """Set the persona (instruction set) a conversation's next turns use."""
        self._write("update conversations set persona = %s where id = %s", [persona, cid])

    def set_model(self, cid: str, model: str | None) -> None:
        """Set the model a conversation's next turns use."""
        self._write("update conversations set model = %s where id = %s", [model, cid])

    # Accounts -----------------------------------------------------------------------------

    def create_user(self, username: str, password_hash: str) -> dict | None:
        """Add an account; None if the username is taken (in any letter case)."""
        row = {
            "id": secrets.token_urlsafe(12),
            "username": username,
            "password_hash": password_hash,
            "created_at": base.now(),
            "session_version": 0,
        }
        try:
            self._write(
                f"insert into users ({USER_COLS}) values (%s, %s, %s, %s, %s)",  # noqa: S608
                list(row.values()),
            )
        except IntegrityError:
            return None
        return row

    def user_by_name(self, username: str) -> dict | None:
        """The account with this username, in any letter case (ASCII, as SQLite), if any."""
        return self._one(
            f"select {USER_COLS} from users "  # noqa: S608
            'where lower(username collate "C") = lower(%s collate "C")',
            [username],
        )

    def user(self, user_id: str) -> dict | None:
        """The account with this id, if it still exists."""
        return self._one(f"select {USER_COLS} from users where id = %s", [user_id])  # noqa: S608

    def set_password_hash(
        self, user_id: str, password_hash: str, *, end_sessions: bool = False
    ) -> None:
        """Store a password hash; with `end_sessions`, every existing session stops working."""
        self._write(
            "update users set password_hash = %s, session_version = session_version + %s "
            "where id = %s",
            [password_hash, 1 if end_sessions else 0, user_id],
        )

    def end_sessions(self, user_id: str) -> None:
        """Make every session cookie issued so far for this account stop working."""
        self._write(
            "update users set session_version = session_version + 1 where id = %s", [user_id]
        )

    def delete_user(self, user_id: str) -> bool:
        """Remove an account (its conversations are erased separately)."""
        return self._write("delete from users where id = %s", [user_id]) == 1

    def login_failures(self, keys: Sequence[str], since: str) -> dict[str, tuple[int, str]]:
        """For each key with failed sign-ins after `since`: (how many, the oldest's time)."""
        with self._conn() as conn:
            rows = conn.execute(
                "select key, count(*), min(at) from login_failures "
                "where key = any(%s) and at > %s group by key",
                [list(keys), since],
            ).fetchall()
        return {key: (count, oldest) for key, count, oldest in rows}

    def record_login_failure(self, keys: Sequence[str], before: str) -> None:
        """Count a failed sign-in against each key; forget failures older than `before`."""
        stamp = base.now()
        with self._tx() as conn:
            conn.execute("delete from login_failures where at <= %s", [before])
            with conn.cursor() as cur:
                cur.executemany(
                    "insert into login_failures (key, at) values (%s, %s)",
                    [(k, stamp) for k in keys],
                )

    def clear_login_failures(self, key: str) -> None:
        """Forget the failed sign-ins counted against `key` (after a successful one)."""
        self._write("delete from login_failures where key = %s", [key])

    # Turns --------------------------------------------------------------------------------

    def add_turn(
        self,
        cid: str,
        user_text: str,
        messages: Sequence[ModelMessage],
        *,
        model: str | None,
        parent_id: int | None | str = "head",
    ) -> dict:
        """Commit the user's message as a new turn, before any model call, and make it the head.

        By default the turn follows the current head; pass `parent_id` to branch (edit and
        regenerate add a sibling of an earlier turn).
        """
        stamp = base.now()
        with self._tx() as conn:
            # The conversation's row is locked until commit, so two messages sent at once to
            # one conversation follow each other, as SQLite's single writer makes them.
            head = conn.execute(
                "select head_turn_id from conversations where id = %s for update", [cid]
            ).fetchone()
            if parent_id == "head":
                parent_id = head[0] if head else None
            turn = {
                "conversation_id": cid,
                "parent_id": parent_id,
                "user_text": user_text,
                "reply_text": "",
                "messages": dump_messages(messages),
                "status": "streaming",
                "error": None,
                "model": model,
                "usage": None,
                "created_at": stamp,
                "finished_at": None,
            }
            tid = conn.execute(
                f"insert into turns ({', '.join(turn)}) "  # noqa: S608
                f"values ({', '.join(['%s'] * len(turn))}) returning id",
                list(turn.values()),
            ).fetchone()[0]
            conn.execute(
                "update conversations set head_turn_id = %s, updated_at = %s where id = %s",
                [tid, stamp, cid],
            )
        return {"id": tid, **turn}

    def turn(self, tid: int, owner: str) -> dict | None:
        """The turn `tid` if its conversation belongs to `owner`, else None."""
        if tid not in SQLITE_INT:  # the same bigint range
            return None
        return self._one(
            f"select {_qualified('turns', TURN_COLS)} from turns "  # noqa: S608
            "join conversations c on c.id = turns.conversation_id "
            "where turns.id = %s and c.owner = %s",
            [tid, owner],
        )

    def save_partial(
        self, tid: int, reply_text: str, messages: Sequence[ModelMessage] | None = None
    ) -> None:
        """Flush a streaming reply's text so far (and, given, its messages), so a crash loses
        at most a few seconds and the next turn's history still holds what the user saw."""
        if messages is None:
            self._write(
                "update turns set reply_text = %s where id = %s and status = 'streaming'",
                [reply_text, tid],
            )
        else:
            self._write(
                "update turns set reply_text = %s, messages = %s "
                "where id = %s and status = 'streaming'",
                [reply_text, dump_messages(messages), tid],
            )

    def finish_turn(
        self,
        tid: int,
        *,
        status: str,
        reply_text: str,
        messages: Sequence[ModelMessage],
        error: str | None = None,
        usage: dict | None = None,
    ) -> None:
        """Record how a reply ended, with the turn's full pydantic-ai messages."""
        assert status in FINISHED, status
        self._write(
            "update turns set status = %s, reply_text = %s, messages = %s, error = %s, "
            "usage = %s, finished_at = %s, reply_html = null, reply_html_version = null "
            "where id = %s",
            [
                status,
                reply_text,
                dump_messages(messages),
                error,
                json.dumps(usage) if usage else None,
                base.now(),
                tid,
            ],
        )

    def cache_html(self, rendered: Sequence[tuple[int, str]], version: int) -> None:
        """Keep finished replies' rendered HTML (turn id, html), made by renderer `version`.

        A cache, written while a page is read: it never waits. Rows another transaction has
        locked are skipped (SKIP LOCKED), any other lock is given up after a few milliseconds
        (SET LOCAL lock_timeout), and a database that refuses the write (a read-only standby)
        only costs the cache; the replies are rendered again next time.
        """
        if not rendered:
            return
        ids = [tid for tid, _ in rendered]
        try:
            with self._tx() as conn:
                conn.execute(f"set local lock_timeout = '{CACHE_LOCK_TIMEOUT}'")
                conn.execute(
                    "update turns set reply_html = r.html, reply_html_version = %s "
                    "from unnest(%s::bigint[], %s::text[]) as r(id, html) "
                    "where turns.id = r.id and turns.status != 'streaming' and turns.id in "
                    "(select id from turns where id = any(%s::bigint[]) for update skip locked)",
                    [version, ids, [html for _, html in rendered], ids],
                )
        except (Unavailable, StoreError) as exc:
            log.info("rendered HTML not cached: %s", exc)

    def mark_interrupted(self, only: Sequence[int] | None = None) -> int:
        """Mark replies left 'streaming' by a crash as interrupted (with `only`, just those
        turns); return how many.

        A reply's saved text becomes a model response in its messages if it is not one yet,
        so the next turn's history has it. Rows are locked while they are read, so two
        replicas sweeping at once mark each reply once.
        """
        stamp = base.now()
        sql = "select id, reply_text, messages from turns where status = 'streaming'"
        with self._tx() as conn:
            if only is None:
                rows = conn.execute(sql + " order by id for update").fetchall()
            else:
                ids = [int(t) for t in only]
                rows = (
                    conn.execute(sql + " and id = any(%s) order by id for update", [ids]).fetchall()
                    if ids
                    else []
                )
            for tid, text, raw in rows:
                conn.execute(
                    "update turns set status = 'interrupted', finished_at = %s, error = %s, "
                    "messages = %s where id = %s",
                    [stamp, INTERRUPTED, _with_reply(raw, text), tid],
                )
        return len(rows)

    def streaming_turns(self, before: str) -> list[int]:
        """Ids of replies still marked 'streaming' whose turn was created before `before`."""
        with self._conn() as conn:
            rows = conn.execute(
                "select id from turns where status = 'streaming' and created_at < %s order by id",
                [before],
            ).fetchall()
        return [r[0] for r in rows]

    def branch(self, head: int | None, *, limit: int | None = None) -> list[dict]:
        """Turns from the root to `head`, oldest first; with `limit`, only the newest `limit`."""
        if head is None:
            return []
        # The bound stops the walk itself, so a page of a long branch costs a page, not the branch.
        bound = "and c.depth + 1 < %(limit)s" if limit else ""
        sql = _chain(_qualified("turns", TURN_COLS), "asc", bound)
        return self._all(sql, {"head": head, "limit": limit})[::-1]

    def later(self, tid: int, *, limit: int) -> list[dict]:
        """Up to `limit` turns after `tid`, oldest first, always following the newest reply."""
        return self._all(
            "with recursive down(id, n) as ("  # noqa: S608  (constant columns)
            "select (select max(t.id) from turns t where t.parent_id = %(tid)s), 1 union all "
            "select (select max(t.id) from turns t where t.parent_id = down.id), n + 1 "
            "from down where down.id is not null and n < %(limit)s) "
            f"select {_qualified('turns', TURN_COLS)} from down "
            "join turns on turns.id = down.id order by down.n",
            {"tid": tid, "limit": limit},
        )

    def branch_pages(self, head: int | None, size: int = 200) -> Iterator[list[dict]]:
        """Turns from the root to `head`, oldest first, `size` at a time (for exports).

        Only the turn ids of the branch are held at once; each page is read when it is asked
        for, so a long conversation streams out without being loaded whole.
        """
        if head is None:
            return
        with self._conn() as conn:
            ids = [r[0] for r in conn.execute(_chain("turns.id", "desc", ""), {"head": head})]
        for i in range(0, len(ids), size):
            page = ids[i : i + size]
            rows = self._all(
                f"select {TURN_COLS} from turns where id = any(%s)",  # noqa: S608
                [page],
            )
            by_id = {d["id"]: d for d in rows}
            yield [by_id[t] for t in page if t in by_id]

    def usage_total(self, cid: str) -> dict:
        """Tokens spent in a conversation so far, over every reply and version."""
        with self._conn() as conn:
            row = conn.execute(
                "select count(usage), "
                "coalesce(sum((usage::jsonb ->> 'input_tokens')::numeric), 0)::bigint, "
                "coalesce(sum((usage::jsonb ->> 'output_tokens')::numeric), 0)::bigint, "
                "count(usage::jsonb ->> 'input_tokens') "
                "from turns where conversation_id = %s",
                [cid],
            ).fetchone()
        # `reported`: replies whose model server counted tokens (some local ones do not).
        return {
            "replies": row[0],
            "input_tokens": row[1],
            "output_tokens": row[2],
            "reported": row[3],
        }

    def set_head(self, cid: str, tid: int) -> None:
        """Show the branch ending at `tid`."""
        self._write("update conversations set head_turn_id = %s where id = %s", [tid, cid])

    def newest_leaf(self, tid: int) -> int:
        """The newest turn reached from `tid` by always following the newest reply to it."""
        with self._conn() as conn:
            rows = conn.execute(
                "with recursive down(id) as (select %(tid)s::bigint union all "
                "select (select max(t.id) from turns t where t.parent_id = down.id) from down "
                "where down.id is not null) select id from down where id is not null",
                {"tid": tid},
            ).fetchall()
        return rows[-1][0]

    def siblings(
        self, cid: str, parents: Iterable[int | None] | None = None
    ) -> dict[int | None, list[int]]:
        """For each parent turn (None for the first), the ids of its alternative replies.

        With `parents`, only for those: a page asks about the turns it shows, not the whole
        conversation.
        """
        sql, args = "select id, parent_id from turns where conversation_id = %s", [cid]
        if parents is not None:
            wanted = set(parents)
            ids = sorted(p for p in wanted if p is not None)
            terms = ["parent_id = any(%s::bigint[])"] if ids else []
            if None in wanted:
                terms.append("parent_id is null")
            if not terms:
                return {}
            sql += f" and ({' or '.join(terms)})"
            if ids:
                args.append(ids)
        out: dict[int | None, list[int]] = {}
        with self._conn() as conn:
            for tid, parent in conn.execute(sql + " order by id", args):
                out.setdefault(parent, []).append(tid)
        return out

    # Search -------------------------------------------------------------------------------

    def search(self, owner: str, query: str, limit: int = 30) -> list[dict]:
        """Search the owner's conversation titles and messages, each word as a word prefix
        ("pyth" finds "Python"). Title hits come first (`turn_id` None); message snippets mark
        hits with \x02 and \x03.

        As in SQLite, every word must match, each is a phrase of its tokens whose last one is a
        prefix, and stemming applies ("running" finds "runs"). Each word goes through
        `websearch_to_tsquery`, which never rejects its input, so no text a user types can
        inject tsquery syntax or cause an error; its lexemes are then marked as prefixes.
        """
        words = query.split()
        if not words:
            return []
        titles = self._search_titles(owner, words, min(limit, 10))
        with self._conn() as conn:
            queries = _tsqueries(conn, words)
            if queries is None:  # no word has a searchable token ("!!!"): nothing matches
                return titles
            # The hits first, then each one's snippet: ts_headline reads the whole text, so it
            # runs on the page of hits only, from the column where the words are (SQLite's
            # snippet picks its column the same way).
            rows = conn.execute(
                "select id, conversation_id, title, created_at, text, "
                "ts_headline(%(cfg)s::regconfig, text, %(marks)s::tsquery, "
                "case when (select count(*) from regexp_matches(text, '[[:alnum:]]+', 'g')) "
                "<= %(words)s then %(whole)s else %(opts)s end) "
                "from (select t.id, t.conversation_id, c.title, t.created_at, "
                "case when ts_rank(to_tsvector(%(cfg)s::regconfig, t.user_text), "
                "%(some)s::tsquery) >= ts_rank(to_tsvector(%(cfg)s::regconfig, "
                "coalesce(t.reply_text, '')), %(some)s::tsquery) "
                "then t.user_text else coalesce(t.reply_text, '') end as text, "
                "ts_rank(t.search, %(every)s::tsquery, 1) as rank "
                "from turns t join conversations c on c.id = t.conversation_id "
                "where t.search @@ %(every)s::tsquery and c.owner = %(owner)s "
                "and c.deleted_at is null "
                "order by rank desc, t.id limit %(limit)s) hits "
                "order by rank desc, id",
                {
                    "cfg": TS_CONFIG,
                    "opts": HEADLINE,
                    "whole": WHOLE_HEADLINE,
                    "words": SNIPPET_TOKENS,
                    "owner": owner,
                    "limit": max(limit - len(titles), 0),
                    **queries,
                },
            ).fetchall()
        keys = ("turn_id", "conversation_id", "title", "created_at")
        hits = [
            {**dict(zip(keys, row[:4], strict=True)), "snippet": _snippet(row[5], row[4])}
            for row in rows
        ]
        return titles + hits

    def _search_titles(self, owner: str, words: list[str], limit: int) -> list[dict]:
        """The owner's conversations whose title has a word starting with each of `words`."""
        like = " and ".join(
            ["(' ' || lower(title collate \"C\")) like %s escape '\\'"] * len(words)
        )
        args = [
            "% " + w.lower().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
            for w in words
        ]
        with self._conn() as conn:
            rows = conn.execute(
                "select id, title, updated_at from conversations "  # noqa: S608  (only %s terms)
                f"where owner = %s and deleted_at is null and {like} "
                "order by updated_at desc, seq desc limit %s",
                [owner, *args, limit],
            ).fetchall()
        return [
            {"turn_id": None, "conversation_id": cid, "title": title, "created_at": stamp,
             "snippet": ""}
            for cid, title, stamp in rows
        ]  # fmt: skip

    # Feedback and comparisons -------------------------------------------------------------

    def set_feedback(self, tid: int, owner: str, value: str | None) -> bool:
        """Record the owner's thumbs up or down ('up', 'down', or None to clear) on a reply."""
        assert value in ("up", "down", None), value
        return (
            self._write(
                "update turns set feedback = %s where id = %s and conversation_id in "
                "(select id from conversations where owner = %s and deleted_at is null)",
                [value, tid, owner],
            )
            == 1
        )

    def mark_comparison(self, tids: Sequence[int]) -> None:
        """Record that the turns `tids` answer one message side by side (the first names it)."""
        self._write(
            "update turns set compare_group = %s where id = any(%s::bigint[])",
            [tids[0], list(tids)],
        )

    def comparisons(self, groups: Iterable[int]) -> dict[int, list[dict]]:
        """For each comparison group id, its turns, oldest first."""
        ids = sorted(set(groups))
        if not ids:
            return {}
        out: dict[int, list[dict]] = {}
        for turn in self._all(
            f"select {TURN_COLS} from turns where compare_group = any(%s::bigint[]) "  # noqa: S608
            "order by id",
            [ids],
        ):
            out.setdefault(turn["compare_group"], []).append(turn)
        return out

    def has_later_turns(self, tid: int) -> bool:
        """True when some exchange follows turn `tid` (a reply to it exists)."""
        return (
            self._one("select 1 as one from turns where parent_id = %s limit 1", [tid]) is not None
        )

    def import_conversation(
        self, owner: str, title: str, turns: list[dict], *, cid: str | None = None
    ) -> dict:
        """Create a conversation from finished turns (user_text, reply_text, messages)."""
        conv = self.create_conversation(owner, cid=cid)
        self.set_title(conv["id"], title)
        parent = None
        with self._tx() as conn:
            for t in turns:
                stamp = base.now()
                parent = conn.execute(
                    "insert into turns (conversation_id, parent_id, user_text, reply_text, "
                    "messages, status, model, created_at, finished_at, feedback) "
                    "values (%s, %s, %s, %s, %s, 'complete', %s, %s, %s, %s) returning id",
                    [
                        conv["id"],
                        parent,
                        t["user_text"],
                        t["reply_text"],
                        dump_messages(t["messages"]),
                        t.get("model"),
                        stamp,
                        stamp,
                        t.get("feedback") if t.get("feedback") in ("up", "down") else None,
                    ],
                ).fetchone()[0]
            conn.execute(
                "update conversations set head_turn_id = %s where id = %s", [parent, conv["id"]]
            )
        conv.update(title=title, head_turn_id=parent)
        return conv

    def history(self, turn: dict) -> list[ModelMessage]:
        """The pydantic-ai messages of every turn before `turn` on its branch: its model history."""
        if turn["parent_id"] is None:
            return []
        messages: list[ModelMessage] = []
        with self._conn() as conn:
            for (raw,) in conn.execute(
                _chain("turns.messages", "desc", ""), {"head": turn["parent_id"]}
            ):
                messages.extend(load_messages(raw))
        return messages

    # Tool approvals (chat/approvals.py) ---------------------------------------------------

    def add_approvals(self, tid: int, calls: Sequence[dict], expires_at: str) -> None:
        """Record the tool calls (tool_call_id, tool_name, args) a reply waits on."""
        stamp = base.now()
        with self._tx() as conn:
            conn.execute("delete from tool_approvals where turn_id = %s", [tid])
            with conn.cursor() as cur:
                cur.executemany(
                    "insert into tool_approvals (turn_id, seq, tool_call_id, tool_name, args, "
                    "created_at, expires_at) values (%s, %s, %s, %s, %s, %s, %s)",
                    [
                        (tid, seq, c["tool_call_id"], c["tool_name"], c["args"], stamp, expires_at)
                        for seq, c in enumerate(calls)
                    ],
                )

    def approvals(self, tid: int) -> list[dict]:
        """The tool calls of turn `tid` that waited (or wait) for approval, in order."""
        return self._all(
            f"select {APPROVAL_COLS} from tool_approvals where turn_id = %s order by seq",  # noqa: S608
            [tid],
        )

    def decide_approval(self, tid: int, seq: int, decision: str) -> bool:
        """Approve or deny a waiting call; False if it is not waiting (decided, or no such call)."""
        if seq not in SQLITE_INT:
            return False
        return (
            self._write(
                "update tool_approvals set decision = %s, decided_at = %s "
                "where turn_id = %s and seq = %s and decision is null",
                [decision, base.now(), tid, seq],
            )
            == 1
        )

    def claim_resume(self, tid: int) -> bool:
        """Mark a paused reply as streaming again; True for the one caller that may resume it."""
        return (
            self._write(
                "update turns set status = 'streaming' "
                "where id = %s and status = 'awaiting_approval'",
                [tid],
            )
            == 1
        )

    def expire_approvals(self, tid: int) -> bool:
        """Mark a paused reply's waiting calls expired; True for the one caller that did."""
        return (
            self._write(
                "update tool_approvals set decision = 'expired', decided_at = %s "
                "where turn_id = %s and decision is null",
                [base.now(), tid],
            )
            > 0
        )

    # Attachments (chat/attachments.py) ----------------------------------------------------

    def add_attachment(
        self,
        owner: str,
        name: str,
        media_type: str,
        data: bytes,
        *,
        max_pending: int,
        stale_before: str,
    ) -> dict | None:
        """Keep an uploaded file as `owner`'s pending attachment; None if `max_pending` wait.

        Pending files uploaded before `stale_before` (ISO time) were never sent: they go first.
        """
        row = {
            "id": base.new_id(),
            "owner": owner,
            "turn_id": None,
            "name": name,
            "media_type": media_type,
            "size": len(data),
            "created_at": base.now(),
        }
        with self._tx() as conn:
            # One owner's uploads are counted one at a time, on any replica, as SQLite's single
            # writer counts them, so `max_pending` holds however many arrive at once.
            conn.execute(
                "select pg_advisory_xact_lock(hashtext('chat attachments:' || %s))", [owner]
            )
            conn.execute(
                "delete from attachments where owner = %s and turn_id is null and created_at < %s",
                [owner, stale_before],
            )
            waiting = conn.execute(
                "select count(*) from attachments where owner = %s and turn_id is null", [owner]
            ).fetchone()[0]
            if waiting >= max_pending:
                return None
            conn.execute(
                "insert into attachments (id, owner, turn_id, name, media_type, size, data, "
                "created_at) values (%s, %s, %s, %s, %s, %s, %s, %s)",
                [*list(row.values())[:6], data, row["created_at"]],
            )
        return row

    def attachment(self, aid: str, owner: str) -> dict | None:
        """The attachment `aid` with its bytes (`data`) if `owner` uploaded it, else None."""
        return self._one(
            f"select {ATTACHMENT_META}, data from attachments "  # noqa: S608
            "where id = %s and owner = %s",
            [aid, owner],
        )

    def pending_attachments(self, owner: str, ids: Sequence[str]) -> list[dict]:
        """Those of `ids` that are `owner`'s and not sent yet (without bytes), in `ids` order."""
        if not ids:
            return []
        rows = self._all(
            f"select {ATTACHMENT_META} from attachments "  # noqa: S608
            "where owner = %s and turn_id is null and id = any(%s)",
            [owner, list(ids)],
        )
        found = {r["id"]: r for r in rows}
        return [found[i] for i in dict.fromkeys(ids) if i in found]

    def remove_attachment(self, aid: str, owner: str) -> bool:
        """Drop `owner`'s pending attachment (removed from the composer); False if none."""
        return (
            self._write(
                "delete from attachments where id = %s and owner = %s and turn_id is null",
                [aid, owner],
            )
            == 1
        )

    def bind_attachments(self, tid: int, owner: str, files: Sequence[dict]) -> None:
        """List `files` (id, name, media_type, size) as turn `tid`'s; those still pending are
        bound to it, so its conversation's deletion deletes them."""
        ids = [f["id"] for f in files]
        with self._tx() as conn:
            if ids:
                conn.execute(
                    "update attachments set turn_id = %s where owner = %s and turn_id is null "
                    "and id = any(%s)",
                    [tid, owner, ids],
                )
            conn.execute(
                "update turns set attachments = %s where id = %s",
                [json.dumps(list(files)) if files else None, tid],
            )

    def add_turn_attachments(self, tid: int, owner: str, files: Sequence[dict]) -> None:
        """Store files that arrive with their turn (an import): each dict has `data` and the
        fields `bind_attachments` lists; the turn lists them."""
        stamp = base.now()
        with self._tx() as conn:
            with conn.cursor() as cur:
                cur.executemany(
                    "insert into attachments (id, owner, turn_id, name, media_type, size, data, "
                    "created_at) values (%s, %s, %s, %s, %s, %s, %s, %s)",
                    [
                        (
                            f["id"],
                            owner,
                            tid,
                            f["name"],
                            f["media_type"],
                            len(f["data"]),
                            f["data"],
                            stamp,
                        )
                        for f in files
                    ],
                )
            refs = [{k: f[k] for k in ("id", "name", "media_type", "size")} for f in files]
            conn.execute("update turns set attachments = %s where id = %s", [json.dumps(refs), tid])

    def purge_pending_attachments(self, before: str) -> int:
        """Drop every pending (never sent) attachment uploaded before `before` (ISO time)."""
        return self._write(
            "delete from attachments where turn_id is null and created_at < %s", [before]
        )

    def attachment_data(self, owner: str, ids: Sequence[str]) -> dict[str, bytes]:
        """The bytes of those of `ids` that `owner` uploaded, by id."""
        if not ids:
            return {}
        with self._conn() as conn:
            rows = conn.execute(
                "select id, data from attachments where owner = %s and id = any(%s)",
                [owner, list(ids)],
            ).fetchall()
        return {aid: bytes(data) for aid, data in rows}


# Helpers ------------------------------------------------------------------------------------


def _qualified(table: str, cols: str) -> str:
    return ", ".join(f"{table}.{c}" for c in cols.split(", "))


def _chain(cols: str, order: str, bound: str) -> str:
    """The turns from %(head)s up to the root (SQLite's `_CHAIN`), nearest first for 'asc'."""
    return (
        "with recursive chain(id, depth) as ("  # noqa: S608  (no user input in the pieces)
        "select id, 0 from turns where id = %(head)s "
        "union all "
        "select t.parent_id, c.depth + 1 from turns t join chain c on t.id = c.id "
        f"where t.parent_id is not null {bound}) "
        f"select {cols} from chain join turns on turns.id = chain.id "
        f"order by chain.depth {order}"
    )


def _tsqueries(conn: psycopg.Connection, words: list[str]) -> dict[str, str] | None:
    """The tsquery texts for `words` (None if no word has a searchable token): `every` (what a
    hit must match: every word), `some` (any word: to choose a snippet's column) and `marks`
    (what ts_headline marks).

    Each word is quoted for `websearch_to_tsquery` (its own quotes dropped), so it is read as a
    phrase of its tokens, never as an operator (`or`, `-`), just as SQLite's search quotes it.
    In `marks`, a phrase's last token is no prefix: ts_headline marks matching tokens wherever
    they are, and "don't" would otherwise mark every word starting with "t".
    """
    phrases = ['"' + w.replace('"', " ") + '"' for w in words]
    rows = conn.execute(
        "select websearch_to_tsquery(%s::regconfig, w)::text from unnest(%s::text[]) as w",
        [TS_CONFIG, phrases],
    ).fetchall()
    parsed = [text for (text,) in rows if text]
    if not parsed:
        return None
    prefixed = [_last_as_prefix(p) for p in parsed]
    marked = [_last_as_prefix(p) if len(_LEXEME.findall(p)) == 1 else p for p in parsed]
    return {
        "every": " & ".join(f"( {p} )" for p in prefixed),
        "some": " | ".join(f"( {p} )" for p in prefixed),
        "marks": " | ".join(f"( {p} )" for p in marked),
    }


def _last_as_prefix(tsquery: str) -> str:
    """`'a' <-> 'b'` -> `'a' <-> 'b':*`: the last token of a phrase matches as a prefix, as
    FTS5's `"a b"*` does."""
    lexemes = list(_LEXEME.finditer(tsquery))
    end = lexemes[-1].end()
    return tsquery[:end] + ":*" + tsquery[end:]


def _snippet(headline: str, text: str) -> str:
    """`ts_headline`'s fragment of `text`, marked as SQLite's `snippet` marks one.

    A word that SQLite reads as a phrase of tokens (well-known, O'Neil) is one marked span
    there; ts_headline marks each token, so marks split only by punctuation are joined. The
    fragment runs to the text's start or end when only punctuation or spaces are left out
    there (ts_headline drops them, SQLite keeps them), else '…' shows the text goes on.
    """
    headline = re.sub(r"\x03([^\s\w\x02\x03]+)\x02", r"\1", headline)
    plain = headline.replace("\x02", "").replace("\x03", "")
    start = text.find(plain)
    if not plain or start < 0:
        return headline
    head, tail = text[:start], text[start + len(plain) :]
    head = "…" if _WORD.search(head) else head
    tail = "…" if _WORD.search(tail) else tail
    return head + headline + tail


# integrity(): every reference between rows that the app relies on, with what it means.
_CONSISTENCY = (
    (
        "turns whose conversation is missing",
        "select count(*) from turns t where not exists "
        "(select 1 from conversations c where c.id = t.conversation_id)",
    ),
    (
        "conversations whose head is a missing turn or another conversation's",
        "select count(*) from conversations c where c.head_turn_id is not null and not exists "
        "(select 1 from turns t where t.id = c.head_turn_id and t.conversation_id = c.id)",
    ),
    (
        "turns whose parent is a missing turn or another conversation's",
        "select count(*) from turns t where t.parent_id is not null and not exists "
        "(select 1 from turns p where p.id = t.parent_id "
        "and p.conversation_id = t.conversation_id)",
    ),
    (
        "attachments bound to a missing turn",
        "select count(*) from attachments a where a.turn_id is not null and not exists "
        "(select 1 from turns t where t.id = a.turn_id)",
    ),
    (
        "tool approvals of a missing turn",
        "select count(*) from tool_approvals a where not exists "
        "(select 1 from turns t where t.id = a.turn_id)",
    ),
    (
        "turns in a comparison whose first turn is missing",
        "select count(*) from turns t where t.compare_group is not null and not exists "
        "(select 1 from turns g where g.id = t.compare_group)",
    ),
    (
        "turns with an unknown status",
        "select count(*) from turns where status not in "
        "('streaming', 'complete', 'stopped', 'failed', 'interrupted', 'awaiting_approval')",
    ),
)
