"""ChatStore: the one module that runs SQL. Conversations, turns and their pydantic-ai messages.

Why this module is long: it is the one module that runs SQL (STYLE rule 1), so every question
the app asks of the database is a method here; splitting it would spread the SQL again.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path

from pydantic_ai.messages import ModelMessage, ModelMessagesTypeAdapter, ModelResponse, TextPart
from sqlite_utils import Database

from chat.migrations import migrate, migration_lock

# SQLite integers are signed 64-bit; a larger id in a URL names nothing (and would not bind).
SQLITE_INT = range(-(2**63), 2**63)

log = logging.getLogger(__name__)

# How long a write waits for another connection's write to end. Writes run in worker threads,
# so this wait never holds up the event loop, only the request that writes.
BUSY_TIMEOUT_MS = 5000
FINISHED = ("complete", "stopped", "failed", "interrupted", "awaiting_approval")
INTERRUPTED = "Interrupted: the server stopped before this reply finished."


def now() -> str:
    """The current UTC time as ISO 8601, the format every timestamp column uses."""
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def dump_messages(messages: Sequence[ModelMessage]) -> str:
    """Serialize pydantic-ai messages to the JSON stored in `turns.messages`."""
    return ModelMessagesTypeAdapter.dump_json(list(messages)).decode()


def load_messages(raw: str) -> list[ModelMessage]:
    """Parse (and validate) the JSON stored in `turns.messages`."""
    return ModelMessagesTypeAdapter.validate_json(raw)


def new_id() -> str:
    """An unguessable conversation id, safe in URLs."""
    return secrets.token_urlsafe(12)


def _with_reply(raw: str, text: str) -> str:
    """Stored messages `raw`, with `text` added as a model response if they hold no reply text."""
    try:
        messages = load_messages(raw)
    except ValueError:  # unreadable: left as it is rather than failing start-up
        return raw
    if not text or any(isinstance(m, ModelResponse) and m.text for m in messages):
        return raw
    return dump_messages([*messages, ModelResponse(parts=[TextPart(content=text)])])


_CHAIN = """
with recursive chain(id, depth) as (
    select id, 0 from turns where id = :head
    union all
    select t.parent_id, c.depth + 1 from turns t join chain c on t.id = c.id
    where t.parent_id is not null {bound}
)
select {cols} from chain join turns on turns.id = chain.id
order by chain.depth {order}
"""


def create_private(path: str | Path) -> None:
    """Create the database file owner-only (0600) if it is new, before SQLite opens it.

    SQLite gives the -wal and -shm files it makes later the main file's permissions, so the
    conversations never sit in a world-readable file whatever the process umask is.
    """
    path = Path(path)
    if str(path) == ":memory:" or path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))


class ChatStore:
    """Owns the SQLite database: opens it, migrates it, and answers every question asked of it."""

    def __init__(self, path: str | Path):
        path = str(path)
        create_private(path)
        self.path = path
        self._local = threading.local()
        self._conns: list[sqlite3.Connection] = []
        self._conns_lock = threading.Lock()
        self._generation = 0
        # An in-memory database lives and dies with its one connection, so every thread shares
        # it (tests and one-off tools); a file gets one connection per thread, see `db`.
        self._shared = self._open() if path == ":memory:" else None
        # The first connection is opened under the lock too: it switches the file to WAL.
        with migration_lock(path):
            migrate(self.db)

    @property
    def db(self) -> Database:
        """This thread's connection to the database.

        Requests run the store in worker threads so a slow query or a held write lock never
        stalls the event loop; a sqlite3 connection must not be used by two threads at once,
        so each thread opens its own (WAL lets them read while one writes). Every write runs
        inside `with self.db.conn:` so it commits at once and no lock is held across calls.
        """
        if self._shared is not None:
            return self._shared
        opened = getattr(self._local, "opened", None)
        if opened is None or opened[0] != self._generation:
            # First use in this thread, or the store was closed since: (re)open.
            opened = self._local.opened = (self._generation, self._open())
        return opened[1]

    def _open(self) -> Database:
        conn = sqlite3.connect(self.path, check_same_thread=False)
        with self._conns_lock:
            self._conns.append(conn)
        db = Database(conn)
        db.execute(f"pragma busy_timeout = {BUSY_TIMEOUT_MS}")
        if self.path != ":memory:":
            db.enable_wal()
        db.execute("pragma synchronous = normal")
        db.execute("pragma foreign_keys = on")
        return db

    def backup(self, target: str | Path) -> Path:
        """Write a consistent copy of the live database to `target` (VACUUM INTO)."""
        target = Path(target)
        if target.exists():
            raise FileExistsError(f"{target} exists; choose a new file name")
        # VACUUM INTO fills an empty file: made owner-only first, as the database itself is.
        create_private(target)
        self.db.execute("vacuum into ?", [str(target)])
        return target

    def integrity(self) -> str:
        """SQLite's integrity check: 'ok' when the file is sound."""
        return self.db.execute("pragma integrity_check").fetchone()[0]

    def all_conversations(self, owner: str | None = None) -> list[dict]:
        """Every conversation (of `owner`, if given), newest first, for administration."""
        where, args = ("where owner = ?", [owner]) if owner else ("", [])
        rows = self.db.execute(
            f"select * from conversations {where} order by updated_at desc",  # noqa: S608
            args,
        ).fetchall()
        return self._dicts("conversations", rows)

    def erase(self, cid: str) -> bool:
        """Delete a conversation and its turns for good (administration)."""
        with self.db.conn:
            self._delete_turns(cid)
            cur = self.db.execute("delete from conversations where id = ?", [cid])
        return cur.rowcount == 1

    def _delete_turns(self, cid: str) -> None:
        """Delete a conversation's turns (in the caller's transaction) with their tool approvals,
        whose foreign key (m008) does not cascade; attachments cascade by themselves (m007)."""
        self.db.execute(
            "delete from tool_approvals where turn_id in "
            "(select id from turns where conversation_id = ?)",
            [cid],
        )
        self.db.execute("delete from turns where conversation_id = ?", [cid])

    def close(self) -> None:
        """Close every thread's connection."""
        with self._conns_lock:
            conns, self._conns = self._conns, []
            self._generation += 1
        for conn in conns:
            conn.close()

    # Conversations -------------------------------------------------------------------------

    def create_conversation(
        self,
        owner: str,
        *,
        model: str | None = None,
        persona: str | None = None,
        cid: str | None = None,
    ) -> dict:
        """Create an empty conversation owned by `owner` (with id `cid`, else a new one)."""
        stamp = now()
        row = {
            "id": cid or new_id(),
            "owner": owner,
            "title": "",
            "model": model,
            "persona": persona,
            "head_turn_id": None,
            "created_at": stamp,
            "updated_at": stamp,
        }
        with self.db.conn:
            self.db["conversations"].insert(row)
        return row

    # AG-UI threads (web/agui.py): a client-chosen thread id names the conversation.
    def claim_conversation(
        self, cid: str, owner: str, *, model: str | None = None, persona: str | None = None
    ) -> dict | None:
        """Create the empty conversation `cid` for `owner`; None if that id is taken already
        (by anyone, deleted or not), so a thread id never reaches someone else's conversation."""
        stamp = now()
        row = {
            "id": cid,
            "owner": owner,
            "title": "",
            "model": model,
            "persona": persona,
            "head_turn_id": None,
            "created_at": stamp,
            "updated_at": stamp,
        }
        try:
            with self.db.conn:
                self.db["conversations"].insert(row)
        except sqlite3.IntegrityError:
            return None
        return row

    def conversation(self, cid: str, owner: str) -> dict | None:
        """The conversation `cid` if `owner` owns it, else None."""
        rows = self.db.execute(
            "select * from conversations where id = ? and owner = ? and deleted_at is null",
            [cid, owner],
        ).fetchall()
        return self._dicts("conversations", rows)[0] if rows else None

    def conversations(self, owner: str, limit: int = 200) -> list[dict]:
        """The owner's conversations, most recently active first."""
        rows = self.db.execute(
            "select * from conversations where owner = ? and deleted_at is null "
            "order by updated_at desc, rowid desc limit ?",
            [owner, limit],
        ).fetchall()
        return self._dicts("conversations", rows)

    def set_title(self, cid: str, title: str) -> None:
        """Set a conversation's title."""
        with self.db.conn:
            self.db["conversations"].update(cid, {"title": title})

    def rename(self, cid: str, owner: str, title: str) -> bool:
        """Rename the owner's conversation; False if it is not theirs."""
        with self.db.conn:
            cur = self.db.execute(
                "update conversations set title = ? where id = ? and owner = ? "
                "and deleted_at is null",
                [title, cid, owner],
            )
        return cur.rowcount == 1

    def delete(self, cid: str, owner: str) -> bool:
        """Soft-delete the owner's conversation, so it can be restored; False if not theirs."""
        with self.db.conn:
            cur = self.db.execute(
                "update conversations set deleted_at = ? where id = ? and owner = ? "
                "and deleted_at is null",
                [now(), cid, owner],
            )
        return cur.rowcount == 1

    def restore(self, cid: str, owner: str) -> bool:
        """Undo a deletion; False if there is nothing of the owner's to restore."""
        with self.db.conn:
            cur = self.db.execute(
                "update conversations set deleted_at = null where id = ? and owner = ? "
                "and deleted_at is not null",
                [cid, owner],
            )
        return cur.rowcount == 1

    def purge_deleted(self, before: str) -> int:
        """Erase conversations deleted before `before` (ISO time), with their turns."""
        with self.db.conn:
            ids = [
                r[0]
                for r in self.db.execute(
                    "select id from conversations where deleted_at is not null and deleted_at < ?",
                    [before],
                ).fetchall()
            ]
            for cid in ids:
                self._delete_turns(cid)
                self.db.execute("delete from conversations where id = ?", [cid])
        return len(ids)

    def set_persona(self, cid: str, persona: str | None) -> None:
        """Set the persona (instruction set) a conversation's next turns use."""
        with self.db.conn:
            self.db["conversations"].update(cid, {"persona": persona})

    def set_model(self, cid: str, model: str | None) -> None:
        """Set the model a conversation's next turns use."""
        with self.db.conn:
            self.db["conversations"].update(cid, {"model": model})

    # Accounts -----------------------------------------------------------------------------

    def create_user(self, username: str, password_hash: str) -> dict | None:
        """Add an account; None if the username is taken (in any letter case)."""
        row = {
            "id": secrets.token_urlsafe(12),
            "username": username,
            "password_hash": password_hash,
            "created_at": now(),
            "session_version": 0,
        }
        try:
            with self.db.conn:
                self.db["users"].insert(row)
        except sqlite3.IntegrityError:
            return None
        return row

    def user_by_name(self, username: str) -> dict | None:
        """The account with this username, in any letter case, if any."""
        rows = self.db.execute(
            "select * from users where username = ? collate nocase", [username]
        ).fetchall()
        return self._dicts("users", rows)[0] if rows else None

    def user(self, user_id: str) -> dict | None:
        """The account with this id, if it still exists."""
        rows = self.db.execute("select * from users where id = ?", [user_id]).fetchall()
        return self._dicts("users", rows)[0] if rows else None

    def set_password_hash(
        self, user_id: str, password_hash: str, *, end_sessions: bool = False
    ) -> None:
        """Store a password hash; with `end_sessions`, every existing session stops working."""
        bump = 1 if end_sessions else 0
        with self.db.conn:
            self.db.execute(
                "update users set password_hash = ?, session_version = session_version + ? "
                "where id = ?",
                [password_hash, bump, user_id],
            )

    def end_sessions(self, user_id: str) -> None:
        """Make every session cookie issued so far for this account stop working."""
        with self.db.conn:
            self.db.execute(
                "update users set session_version = session_version + 1 where id = ?", [user_id]
            )

    def delete_user(self, user_id: str) -> bool:
        """Remove an account (its conversations are erased separately)."""
        with self.db.conn:
            cur = self.db.execute("delete from users where id = ?", [user_id])
        return cur.rowcount == 1

    def login_failures(self, keys: Sequence[str], since: str) -> dict[str, tuple[int, str]]:
        """For each key with failed sign-ins after `since`: (how many, the oldest's time)."""
        marks = ", ".join("?" for _ in keys)
        rows = self.db.execute(
            f"select key, count(*), min(at) from login_failures "  # noqa: S608
            f"where key in ({marks}) and at > ? group by key",
            [*keys, since],
        ).fetchall()
        return {key: (count, oldest) for key, count, oldest in rows}

    def record_login_failure(self, keys: Sequence[str], before: str) -> None:
        """Count a failed sign-in against each key; forget failures older than `before`."""
        stamp = now()
        with self.db.conn:
            self.db.execute("delete from login_failures where at <= ?", [before])
            self.db.conn.executemany(
                "insert into login_failures (key, at) values (?, ?)", [(k, stamp) for k in keys]
            )

    def clear_login_failures(self, key: str) -> None:
        """Forget the failed sign-ins counted against `key` (after a successful one)."""
        with self.db.conn:
            self.db.execute("delete from login_failures where key = ?", [key])

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
        stamp = now()
        with self.db.conn:
            if parent_id == "head":
                parent_id = self.db.execute(
                    "select head_turn_id from conversations where id = ?", [cid]
                ).fetchone()[0]
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
            cols = ", ".join(turn)
            tid = self.db.execute(
                f"insert into turns ({cols}) values ({', '.join('?' * len(turn))})",  # noqa: S608
                list(turn.values()),
            ).lastrowid
            self.db.execute(
                "update conversations set head_turn_id = ?, updated_at = ? where id = ?",
                [tid, stamp, cid],
            )
        return {"id": tid, **turn}

    def turn(self, tid: int, owner: str) -> dict | None:
        """The turn `tid` if its conversation belongs to `owner`, else None."""
        if tid not in SQLITE_INT:
            return None
        rows = self.db.execute(
            "select turns.* from turns join conversations c on c.id = turns.conversation_id "
            "where turns.id = ? and c.owner = ?",
            [tid, owner],
        ).fetchall()
        return self._dicts("turns", rows)[0] if rows else None

    def save_partial(
        self, tid: int, reply_text: str, messages: Sequence[ModelMessage] | None = None
    ) -> None:
        """Flush a streaming reply's text so far (and, given, its messages: the request and the
        text as a model response), so a crash loses at most a few seconds and the next turn's
        history still holds what the user saw."""
        with self.db.conn:
            if messages is None:
                self.db.execute(
                    "update turns set reply_text = ? where id = ? and status = 'streaming'",
                    [reply_text, tid],
                )
            else:
                self.db.execute(
                    "update turns set reply_text = ?, messages = ? "
                    "where id = ? and status = 'streaming'",
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
        with self.db.conn:
            self.db["turns"].update(
                tid,
                {
                    "status": status,
                    "reply_text": reply_text,
                    "messages": dump_messages(messages),
                    "error": error,
                    "usage": json.dumps(usage) if usage else None,
                    "finished_at": now(),
                    "reply_html": None,  # rendered (and cached) when first shown
                    "reply_html_version": None,
                },
            )

    def cache_html(self, rendered: Sequence[tuple[int, str]], version: int) -> None:
        """Keep finished replies' rendered HTML (turn id, html), made by renderer `version`.

        A cache, written while a page is read: when the database cannot take the write at once
        (another connection holds the write lock, or the file is read-only) it is skipped, and
        the replies are rendered again next time. Reading never waits for, or fails on, a write.
        """
        if not rendered:
            return
        db = self.db
        db.execute("pragma busy_timeout = 0")
        try:
            with db.conn:
                db.conn.executemany(
                    "update turns set reply_html = ?, reply_html_version = ? "
                    "where id = ? and status != 'streaming'",
                    [(html, version, tid) for tid, html in rendered],
                )
        except sqlite3.OperationalError as exc:  # "database is locked", "readonly database"
            log.info("rendered HTML not cached: %s", exc)
        finally:
            db.execute(f"pragma busy_timeout = {BUSY_TIMEOUT_MS}")

    def mark_interrupted(self, only: Sequence[int] | None = None) -> int:
        """Mark replies left 'streaming' by a crash as interrupted (with `only`, just those
        turns); return how many.

        A reply's saved text becomes a model response in its messages if it is not one yet
        (rows saved before partial saves kept messages), so the next turn's history has it.
        """
        stamp = now()
        sql = "select id, reply_text, messages from turns where status = 'streaming'"
        with self.db.conn:
            if only is None:
                rows = self.db.execute(sql).fetchall()
            else:
                ids = [int(t) for t in only]
                marks = ", ".join("?" * len(ids))
                rows = self.db.execute(f"{sql} and id in ({marks})", ids).fetchall() if ids else []
            for tid, text, raw in rows:
                self.db.execute(
                    "update turns set status = 'interrupted', finished_at = ?, error = ?, "
                    "messages = ? where id = ?",
                    [stamp, INTERRUPTED, _with_reply(raw, text), tid],
                )
        return len(rows)

    # Scale-out (REDIS_URL): the replies a start-up may find left by a process that is gone.
    def streaming_turns(self, before: str) -> list[int]:
        """Ids of replies still marked 'streaming' whose turn was created before `before`."""
        rows = self.db.execute(
            "select id from turns where status = 'streaming' and created_at < ?", [before]
        ).fetchall()
        return [r[0] for r in rows]

    def branch(self, head: int | None, *, limit: int | None = None) -> list[dict]:
        """Turns from the root to `head`, oldest first; with `limit`, only the newest `limit`."""
        if head is None:
            return []
        # The bound stops the walk itself, so a page of a long branch costs a page, not the branch.
        bound = "and c.depth + 1 < :limit" if limit else ""
        sql = _CHAIN.format(cols="turns.*", order="asc", bound=bound)
        rows = self.db.execute(sql, {"head": head, "limit": limit}).fetchall()
        return self._dicts("turns", rows)[::-1]

    def later(self, tid: int, *, limit: int) -> list[dict]:
        """Up to `limit` turns after `tid`, oldest first, always following the newest reply.

        That is the path `newest_leaf(tid)` takes, so these are the turns that follow `tid` on
        the branch shown for it, a page at a time.
        """
        rows = self.db.execute(
            "with recursive down(id, n) as ("
            "select (select max(t.id) from turns t where t.parent_id = :tid), 1 union all "
            "select (select max(t.id) from turns t where t.parent_id = down.id), n + 1 "
            "from down where down.id is not null and n < :limit) "
            "select turns.* from down join turns on turns.id = down.id order by down.n",
            {"tid": tid, "limit": limit},
        ).fetchall()
        return self._dicts("turns", rows)

    def branch_pages(self, head: int | None, size: int = 200) -> Iterator[list[dict]]:
        """Turns from the root to `head`, oldest first, `size` at a time (for exports).

        Only the turn ids of the branch are held at once; each page is read when it is asked
        for, so a long conversation streams out without being loaded whole.
        """
        if head is None:
            return
        sql = _CHAIN.format(cols="turns.id", order="desc", bound="")
        ids = [row[0] for row in self.db.execute(sql, {"head": head}).fetchall()]
        for i in range(0, len(ids), size):
            page = ids[i : i + size]
            rows = self.db.execute(
                f"select * from turns where id in ({', '.join('?' * len(page))})",  # noqa: S608
                page,
            ).fetchall()
            by_id = {d["id"]: d for d in self._dicts("turns", rows)}
            yield [by_id[t] for t in page if t in by_id]

    def usage_total(self, cid: str) -> dict:
        """Tokens spent in a conversation so far, over every reply and version."""
        row = self.db.execute(
            "select count(usage), coalesce(sum(json_extract(usage, '$.input_tokens')), 0), "
            "coalesce(sum(json_extract(usage, '$.output_tokens')), 0), "
            "count(json_extract(usage, '$.input_tokens')) "
            "from turns where conversation_id = ?",
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
        with self.db.conn:
            self.db.execute("update conversations set head_turn_id = ? where id = ?", [tid, cid])

    def newest_leaf(self, tid: int) -> int:
        """The newest turn reached from `tid` by always following the newest reply to it."""
        row = self.db.execute(
            "with recursive down(id) as (select :tid union all "
            "select (select max(t.id) from turns t where t.parent_id = down.id) from down "
            "where down.id is not null) select id from down where id is not null",
            {"tid": tid},
        ).fetchall()
        return row[-1][0]

    def siblings(
        self, cid: str, parents: Iterable[int | None] | None = None
    ) -> dict[int | None, list[int]]:
        """For each parent turn (None for the first), the ids of its alternative replies.

        With `parents`, only for those: a page asks about the turns it shows, not the whole
        conversation.
        """
        sql, args = "select id, parent_id from turns where conversation_id = ?", [cid]
        if parents is not None:
            wanted = set(parents)
            ids = sorted(p for p in wanted if p is not None)
            terms = [f"parent_id in ({', '.join('?' * len(ids))})"] if ids else []
            if None in wanted:
                terms.append("parent_id is null")
            if not terms:
                return {}
            sql += f" and ({' or '.join(terms)})"
            args += ids
        out: dict[int | None, list[int]] = {}
        for tid, parent in self.db.execute(sql + " order by id", args).fetchall():
            out.setdefault(parent, []).append(tid)
        return out

    def search(self, owner: str, query: str, limit: int = 30) -> list[dict]:
        """Search the owner's conversation titles and messages, each word as a word prefix
        ("pyth" finds "Python"). Title hits come first (`turn_id` None); message snippets mark
        hits with \x02 and \x03."""
        words = query.split()
        if not words:
            return []
        titles = self._search_titles(owner, words, min(limit, 10))
        # Each word quoted (so FTS5 syntax in it is text) and made a prefix query.
        terms = " ".join('"' + t.replace('"', '""') + '"*' for t in words)
        rows = self.db.execute(
            "select t.id, t.conversation_id, c.title, t.created_at, "
            "snippet(turns_fts, -1, char(2), char(3), '…', 12) "
            "from turns_fts join turns t on t.rowid = turns_fts.rowid "
            "join conversations c on c.id = t.conversation_id "
            "where turns_fts match ? and c.owner = ? and c.deleted_at is null "
            "order by rank limit ?",
            [terms, owner, max(limit - len(titles), 0)],
        ).fetchall()
        keys = ("turn_id", "conversation_id", "title", "created_at", "snippet")
        return titles + [dict(zip(keys, row, strict=True)) for row in rows]

    def _search_titles(self, owner: str, words: list[str], limit: int) -> list[dict]:
        """The owner's conversations whose title has a word starting with each of `words`."""
        like = [
            "(' ' || lower(title)) like ? escape '\\'" for _ in words
        ]  # a word start: after a space (or the start, given the leading space)
        args = [
            "% " + w.lower().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
            for w in words
        ]
        rows = self.db.execute(
            "select id, title, updated_at from conversations "  # noqa: S608  (only `?` terms)
            f"where owner = ? and deleted_at is null and {' and '.join(like)} "
            "order by updated_at desc limit ?",
            [owner, *args, limit],
        ).fetchall()
        return [
            {"turn_id": None, "conversation_id": cid, "title": title, "created_at": stamp,
             "snippet": ""}
            for cid, title, stamp in rows
        ]  # fmt: skip

    # Feedback and comparisons ------------------------------------------------------------

    def set_feedback(self, tid: int, owner: str, value: str | None) -> bool:
        """Record the owner's thumbs up or down ('up', 'down', or None to clear) on a reply."""
        assert value in ("up", "down", None), value
        with self.db.conn:
            cur = self.db.execute(
                "update turns set feedback = ? where id = ? and conversation_id in "
                "(select id from conversations where owner = ? and deleted_at is null)",
                [value, tid, owner],
            )
        return cur.rowcount == 1

    def mark_comparison(self, tids: Sequence[int]) -> None:
        """Record that the turns `tids` answer one message side by side (the first names it)."""
        with self.db.conn:
            self.db.conn.executemany(
                "update turns set compare_group = ? where id = ?", [(tids[0], t) for t in tids]
            )

    def comparisons(self, groups: Iterable[int]) -> dict[int, list[dict]]:
        """For each comparison group id, its turns, oldest first."""
        ids = sorted(set(groups))
        if not ids:
            return {}
        rows = self.db.execute(
            f"select * from turns where compare_group in ({', '.join('?' * len(ids))}) "  # noqa: S608
            "order by id",
            ids,
        ).fetchall()
        out: dict[int, list[dict]] = {}
        for turn in self._dicts("turns", rows):
            out.setdefault(turn["compare_group"], []).append(turn)
        return out

    def has_later_turns(self, tid: int) -> bool:
        """True when some exchange follows turn `tid` (a reply to it exists)."""
        row = self.db.execute("select 1 from turns where parent_id = ? limit 1", [tid]).fetchone()
        return row is not None

    def import_conversation(
        self, owner: str, title: str, turns: list[dict], *, cid: str | None = None
    ) -> dict:
        """Create a conversation from finished turns (user_text, reply_text, messages)."""
        conv = self.create_conversation(owner, cid=cid)
        self.set_title(conv["id"], title)
        parent = None
        with self.db.conn:
            for t in turns:
                stamp = now()
                parent = self.db.execute(
                    "insert into turns (conversation_id, parent_id, user_text, reply_text, "
                    "messages, status, model, created_at, finished_at, feedback) "
                    "values (?, ?, ?, ?, ?, 'complete', ?, ?, ?, ?)",
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
                ).lastrowid
            self.db.execute(
                "update conversations set head_turn_id = ? where id = ?", [parent, conv["id"]]
            )
        conv.update(title=title, head_turn_id=parent)
        return conv

    def history(self, turn: dict) -> list[ModelMessage]:
        """The pydantic-ai messages of every turn before `turn` on its branch: its model history."""
        if turn["parent_id"] is None:
            return []
        # Only the column needed: a turn's row also holds its text and cached HTML.
        sql = _CHAIN.format(cols="turns.messages", order="desc", bound="")
        messages: list[ModelMessage] = []
        for (raw,) in self.db.execute(sql, {"head": turn["parent_id"]}):
            messages.extend(load_messages(raw))
        return messages

    # Tool approvals (chat/approvals.py) -----------------------------------------------------

    def add_approvals(self, tid: int, calls: Sequence[dict], expires_at: str) -> None:
        """Record the tool calls (tool_call_id, tool_name, args) a reply waits on."""
        stamp = now()
        with self.db.conn:
            self.db.execute("delete from tool_approvals where turn_id = ?", [tid])
            self.db.conn.executemany(
                "insert into tool_approvals (turn_id, seq, tool_call_id, tool_name, args, "
                "created_at, expires_at) values (?, ?, ?, ?, ?, ?, ?)",
                [
                    (tid, seq, c["tool_call_id"], c["tool_name"], c["args"], stamp, expires_at)
                    for seq, c in enumerate(calls)
                ],
            )

    def approvals(self, tid: int) -> list[dict]:
        """The tool calls of turn `tid` that waited (or wait) for approval, in order."""
        rows = self.db.execute(
            "select * from tool_approvals where turn_id = ? order by seq", [tid]
        ).fetchall()
        return self._dicts("tool_approvals", rows)

    def decide_approval(self, tid: int, seq: int, decision: str) -> bool:
        """Approve or deny a waiting call; False if it is not waiting (decided, or no such call)."""
        if seq not in SQLITE_INT:
            return False
        with self.db.conn:
            cur = self.db.execute(
                "update tool_approvals set decision = ?, decided_at = ? "
                "where turn_id = ? and seq = ? and decision is null",
                [decision, now(), tid, seq],
            )
        return cur.rowcount == 1

    def claim_resume(self, tid: int) -> bool:
        """Mark a paused reply as streaming again; True for the one caller that may resume it."""
        with self.db.conn:
            cur = self.db.execute(
                "update turns set status = 'streaming' "
                "where id = ? and status = 'awaiting_approval'",
                [tid],
            )
        return cur.rowcount == 1

    def expire_approvals(self, tid: int) -> bool:
        """Mark a paused reply's waiting calls expired; True for the one caller that did."""
        with self.db.conn:
            cur = self.db.execute(
                "update tool_approvals set decision = 'expired', decided_at = ? "
                "where turn_id = ? and decision is null",
                [now(), tid],
            )
        return cur.rowcount > 0

    def _dicts(self, table: str, rows: list[tuple]) -> list[dict]:
        cols = [c.name for c in self.db[table].columns]
        return [dict(zip(cols, row, strict=True)) for row in rows]

    # Attachments (chat/attachments.py) ------------------------------------------------------
    # Files uploaded before their message is sent (pending, `turn_id` null), then bound to the
    # turn they were sent with. Rows hold the bytes; turns list them in `turns.attachments`.

    _ATTACHMENT_META = "id, owner, turn_id, name, media_type, size, created_at"

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
            "id": new_id(),
            "owner": owner,
            "turn_id": None,
            "name": name,
            "media_type": media_type,
            "size": len(data),
            "created_at": now(),
        }
        with self.db.conn:
            self.db.execute(
                "delete from attachments where owner = ? and turn_id is null and created_at < ?",
                [owner, stale_before],
            )
            waiting = self.db.execute(
                "select count(*) from attachments where owner = ? and turn_id is null", [owner]
            ).fetchone()[0]
            if waiting >= max_pending:
                return None
            self.db.execute(
                "insert into attachments (id, owner, turn_id, name, media_type, size, data, "
                "created_at) values (?, ?, ?, ?, ?, ?, ?, ?)",
                [*list(row.values())[:6], data, row["created_at"]],
            )
        return row

    def attachment(self, aid: str, owner: str) -> dict | None:
        """The attachment `aid` with its bytes (`data`) if `owner` uploaded it, else None."""
        row = self.db.execute(
            f"select {self._ATTACHMENT_META}, data from attachments "  # noqa: S608
            "where id = ? and owner = ?",
            [aid, owner],
        ).fetchone()
        if row is None:
            return None
        return dict(zip([*self._ATTACHMENT_META.split(", "), "data"], row, strict=True))

    def pending_attachments(self, owner: str, ids: Sequence[str]) -> list[dict]:
        """Those of `ids` that are `owner`'s and not sent yet (without bytes), in `ids` order."""
        if not ids:
            return []
        rows = self.db.execute(
            f"select {self._ATTACHMENT_META} from attachments "  # noqa: S608
            f"where owner = ? and turn_id is null and id in ({', '.join('?' * len(ids))})",
            [owner, *ids],
        ).fetchall()
        found = {r[0]: dict(zip(self._ATTACHMENT_META.split(", "), r, strict=True)) for r in rows}
        return [found[i] for i in dict.fromkeys(ids) if i in found]

    def remove_attachment(self, aid: str, owner: str) -> bool:
        """Drop `owner`'s pending attachment (removed from the composer); False if none."""
        with self.db.conn:
            cur = self.db.execute(
                "delete from attachments where id = ? and owner = ? and turn_id is null",
                [aid, owner],
            )
        return cur.rowcount == 1

    def bind_attachments(self, tid: int, owner: str, files: Sequence[dict]) -> None:
        """List `files` (id, name, media_type, size) as turn `tid`'s; those still pending are
        bound to it, so its conversation's deletion deletes them."""
        ids = [f["id"] for f in files]
        with self.db.conn:
            if ids:
                self.db.execute(
                    f"update attachments set turn_id = ? where owner = ? and turn_id is null "  # noqa: S608
                    f"and id in ({', '.join('?' * len(ids))})",
                    [tid, owner, *ids],
                )
            self.db.execute(
                "update turns set attachments = ? where id = ?",
                [json.dumps(list(files)) if files else None, tid],
            )

    def add_turn_attachments(self, tid: int, owner: str, files: Sequence[dict]) -> None:
        """Store files that arrive with their turn (an import): each dict has `data` and the
        fields `bind_attachments` lists; the turn lists them."""
        stamp = now()
        with self.db.conn:
            self.db.conn.executemany(
                "insert into attachments (id, owner, turn_id, name, media_type, size, data, "
                "created_at) values (?, ?, ?, ?, ?, ?, ?, ?)",
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
            self.db.execute(
                "update turns set attachments = ? where id = ?", [json.dumps(refs), tid]
            )

    def purge_pending_attachments(self, before: str) -> int:
        """Drop every pending (never sent) attachment uploaded before `before` (ISO time)."""
        with self.db.conn:
            cur = self.db.execute(
                "delete from attachments where turn_id is null and created_at < ?", [before]
            )
        return cur.rowcount

    def attachment_data(self, owner: str, ids: Sequence[str]) -> dict[str, bytes]:
        """The bytes of those of `ids` that `owner` uploaded, by id."""
        if not ids:
            return {}
        rows = self.db.execute(
            f"select id, data from attachments where owner = ? "  # noqa: S608
            f"and id in ({', '.join('?' * len(ids))})",
            [owner, *ids],
        ).fetchall()
        return {aid: bytes(data) for aid, data in rows}
