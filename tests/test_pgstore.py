"""PostgresStore's own promises, beyond what both stores share (tests/test_store.py runs those on
both): replicas migrating together, many writers at once, a cache that never waits, errors in
the interface's terms, the consistency check, the pg_dump hint, and the SECRET_KEY rule."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psycopg
import pytest
from pydantic_ai.messages import ModelRequest, UserPromptPart

import manage
from chat.config import Settings
from chat.pg_migrations import MIGRATIONS
from chat.pgstore import PostgresStore, Unavailable
from chat.stores import BackupElsewhere, open_store
from tests.postgres_server import fresh_database_url

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def url(postgres_server) -> str:
    return fresh_database_url(postgres_server)


@pytest.fixture
def pg(url):
    store = PostgresStore(url)
    yield store
    store.close()


def ask(text: str) -> list[ModelRequest]:
    return [ModelRequest(parts=[UserPromptPart(content=text)])]


def sql(url: str, query: str, args=()) -> list[tuple]:
    with psycopg.connect(url, autocommit=True) as conn:
        cur = conn.execute(query, args)
        return cur.fetchall() if cur.description else []


def test_database_url_opens_the_postgres_store(url):
    store = open_store(Settings(database_url=url, secret_key="k"))
    try:
        assert isinstance(store, PostgresStore)
        store.create_conversation("alice", cid="c")
        assert sql(url, "select id, owner from conversations") == [("c", "alice")]
    finally:
        store.close()


def test_replicas_starting_together_migrate_once(url):
    barrier = threading.Barrier(4)

    def start(_):
        barrier.wait()
        store = PostgresStore(url, pool_size=1)
        store.close()

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(start, range(4)))  # none fails on "already exists"
    names = [name for (name,) in sql(url, "select name from _migrations order by name")]
    assert names == [fn.__name__ for fn in MIGRATIONS]


def test_a_message_is_seen_by_another_replica_as_soon_as_it_is_stored(url, pg):
    other = PostgresStore(url)
    try:
        cid = pg.create_conversation("alice")["id"]
        turn = pg.add_turn(cid, "hello", ask("hello"), model="m")
        seen = other.turn(turn["id"], "alice")
        assert (seen["user_text"], seen["status"]) == ("hello", "streaming")
        assert other.conversation(cid, "alice")["head_turn_id"] == turn["id"]
    finally:
        other.close()


def test_messages_sent_at_once_to_one_conversation_follow_each_other(url, pg):
    """Two replicas adding to one conversation never both follow the same head (which would
    make siblings of two messages the user sent one after the other)."""
    cid = pg.create_conversation("alice")["id"]
    stores = [pg, PostgresStore(url)]
    try:
        with ThreadPoolExecutor(8) as pool:
            turns = list(
                pool.map(
                    lambda i: stores[i % 2].add_turn(cid, f"m{i}", ask(f"m{i}"), model="m"),
                    range(24),
                )
            )
    finally:
        stores[1].close()
    parents = [t["parent_id"] for t in turns]
    assert len(set(parents)) == len(parents), "two messages followed the same head"
    head = pg.conversation(cid, "alice")["head_turn_id"]
    assert len(pg.branch(head)) == 24


def test_the_pending_file_limit_holds_for_uploads_at_once(url, pg):
    other = PostgresStore(url)
    try:
        stores = [pg, other]

        def upload(i):
            return stores[i % 2].add_attachment(
                "alice", f"{i}.txt", "text/plain", b"x", max_pending=3, stale_before="2000"
            )

        with ThreadPoolExecutor(8) as pool:
            kept = [r for r in pool.map(upload, range(16)) if r is not None]
    finally:
        other.close()
    assert len(kept) == 3
    assert sql(pg.url, "select count(*) from attachments") == [(3,)]


def test_caching_html_never_waits_for_a_locked_row(url, pg):
    cid = pg.create_conversation("alice")["id"]
    turn = pg.add_turn(cid, "q", ask("q"), model="m")
    pg.finish_turn(turn["id"], status="complete", reply_text="a", messages=ask("q"))
    with psycopg.connect(url) as holder:  # another replica, mid-write on that row
        holder.execute("update turns set feedback = 'up' where id = %s", [turn["id"]])
        t0 = time.monotonic()
        pg.cache_html([(turn["id"], "<p>a</p>")], 1)
        assert time.monotonic() - t0 < 1.0
        holder.rollback()
    assert pg.turn(turn["id"], "alice")["reply_html"] is None  # skipped, not waited for
    pg.cache_html([(turn["id"], "<p>a</p>")], 1)
    assert pg.turn(turn["id"], "alice")["reply_html"] == "<p>a</p>"


def test_a_restarted_database_costs_no_request(url, pg):
    pg.create_conversation("alice", cid="c")
    # Every connection the store holds is cut, as a database restart or failover cuts them.
    sql(
        url,
        "select pg_terminate_backend(pid) from pg_stat_activity "
        "where pid != pg_backend_pid() and datname = current_database() "
        "and application_name = '' and backend_type = 'client backend'",
    )
    assert pg.conversation("c", "alice")["id"] == "c"


def test_errors_are_the_interface_errors(url, pg):
    pg.create_conversation("alice", cid="c")
    with pytest.raises(sqlite3.IntegrityError):
        pg.create_conversation("bob", cid="c")
    assert pg.claim_conversation("c", "bob") is None
    assert pg.create_user("Zoë", "h") is not None and pg.create_user("ZOË", "h") is not None
    assert pg.create_user("zoë", "h") is None  # ASCII letters fold, as SQLite's nocase does
    with psycopg.connect(url) as holder:  # a write that cannot take its lock in time
        holder.execute("select 1 from conversations where id = 'c' for update")
        slow = PostgresStore(url.replace("options=", "options=-clock_timeout%3D100%20"))
        try:
            with pytest.raises(Unavailable) as caught:
                slow.set_title("c", "blocked")
            assert isinstance(caught.value, sqlite3.OperationalError)  # the app's "busy" page
        finally:
            slow.close()
        holder.rollback()


def test_the_consistency_check_names_what_is_wrong(url, pg):
    cid = pg.create_conversation("alice")["id"]
    other = pg.create_conversation("alice")["id"]
    a = pg.add_turn(cid, "a", ask("a"), model="m")
    b = pg.add_turn(other, "b", ask("b"), model="m")
    assert pg.integrity() == "ok"
    sql(url, "update turns set parent_id = %s where id = %s", [a["id"], b["id"]])
    sql(url, "update conversations set head_turn_id = 999 where id = %s", [cid])
    report = pg.integrity()
    assert "1 turns whose parent is a missing turn or another conversation's" in report
    assert "1 conversations whose head is a missing turn or another conversation's" in report
    assert len(report.splitlines()) == 2


def test_erasing_a_conversation_erases_its_approvals_and_files(pg):
    cid = pg.create_conversation("alice")["id"]
    turn = pg.add_turn(cid, "q", ask("q"), model="m")
    pg.add_approvals(turn["id"], [{"tool_call_id": "1", "tool_name": "t", "args": "{}"}], "z")
    pg.add_turn_attachments(
        turn["id"],
        "alice",
        [{"id": "f", "name": "f", "media_type": "text/plain", "size": 1, "data": b"x"}],
    )
    assert pg.erase(cid)
    assert pg.approvals(turn["id"]) == [] and pg.attachment_data("alice", ["f"]) == {}
    assert pg.integrity() == "ok"


def test_search_input_never_errors(pg):
    cid = pg.create_conversation("alice")["id"]
    turn = pg.add_turn(cid, "plain words here", ask("x"), model="m")
    pg.finish_turn(turn["id"], status="complete", reply_text="and a reply", messages=ask("x"))
    hostile = ("&", "|", "!", "<->", "<2>", ":*", "a:*b", "'", "''", "\\", "(((", ")", "::",
               "\x00", "plain & !words", "plain | x", "*", "\u200b", "😀", "a" * 5000)  # fmt: skip
    for query in hostile:
        assert isinstance(pg.search("alice", query), list)
    assert [h["turn_id"] for h in pg.search("alice", "plain:* &")] == [turn["id"]]


def test_text_with_nul_characters_is_stored_not_refused(pg):
    cid = pg.create_conversation("alice")["id"]
    pg.set_title(cid, "a\x00title")
    turn = pg.add_turn(cid, "nul\x00here", ask("nul\x00here"), model="m")
    assert pg.turn(turn["id"], "alice")["user_text"] == "nul\ufffdhere"
    assert pg.conversation(cid, "alice")["title"] == "a\ufffdtitle"
    assert [h["turn_id"] for h in pg.search("alice", "nul\x00here")] == [turn["id"]]


def test_backup_says_how_to_run_pg_dump(url, pg, capsys):
    with pytest.raises(BackupElsewhere, match="pg_dump"):
        pg.backup("copy.db")
    assert manage.main(["--database-url", url, "backup", "copy.db"]) == 2
    err = capsys.readouterr().err
    assert 'pg_dump --format=custom --file=chat.dump "$DATABASE_URL"' in err
    assert manage.main(["--database-url", url, "check"]) == 0
    assert capsys.readouterr().out.strip() == "ok"


def test_manage_says_when_postgres_cannot_be_reached(capsys, monkeypatch):
    monkeypatch.setattr("chat.pgstore.START_WAIT", 1.0)
    url = "postgresql://nobody@127.0.0.1:9/none?connect_timeout=1"
    assert manage.main(["--database-url", url, "list"]) == 2
    assert "Cannot open the database" in capsys.readouterr().err


def test_database_url_needs_secret_key(tmp_path):
    with pytest.raises(ValueError, match="SECRET_KEY"):
        Settings.from_env({"DATABASE_URL": "postgresql://x@127.0.0.1/db"})
    assert Settings.from_env(
        {"DATABASE_URL": "postgresql://x@127.0.0.1/db", "SECRET_KEY": "k"}
    ).database_url.startswith("postgresql://")
    with pytest.raises(ValueError, match="postgresql://"):
        Settings.from_env({"DATABASE_URL": "mysql://x/db", "SECRET_KEY": "k"})
    env = {k: v for k, v in os.environ.items() if k not in ("SECRET_KEY", "DB_PATH")}
    done = subprocess.run(
        [sys.executable, str(ROOT / "main.py")],
        cwd=tmp_path,
        env={**env, "DATABASE_URL": "postgresql://x@127.0.0.1:9/db"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "SECRET_KEY must be set" in done.stderr and "Traceback" not in done.stderr


def test_live_apps_run_on_postgres_in_the_postgres_run(tmp_path, postgres_server, monkeypatch):
    """TEST_DATABASE=postgres reaches the app processes tests/live.py starts: they store in a
    Postgres schema of their own, signed with a session key of their own, and no SQLite file."""
    from tests.live import HtmxClient, running_app

    monkeypatch.setenv("TEST_DATABASE", "postgres")
    monkeypatch.setenv("TEST_POSTGRES_URL", postgres_server)
    with running_app(tmp_path / "app", model=None) as app, HtmxClient(app.url) as browser:
        sent = browser.send("Hello over Postgres")
        browser.follow(sent.stream_url, sent.close_event)
        assert [t["user_text"] for t in app.turns()] == ["Hello over Postgres"]
    assert not app.db_path.exists() and not (tmp_path / "app" / ".secret_key").exists()


def test_two_processes_on_one_postgres_serve_one_browser(tmp_path, postgres_server):
    """Sent through one process, the conversation is found, shown and exported by another: no
    sticky sessions, because the database and the session key are shared, not the process."""
    from tests.live import HtmxClient, running_app

    env = {"DATABASE_URL": fresh_database_url(postgres_server), "SECRET_KEY": "one-key-for-all"}
    with (
        running_app(tmp_path / "a", model=None, **env) as a,
        running_app(tmp_path / "b", model=None, **env) as b,
        HtmxClient(a.url) as on_a,
        HtmxClient(b.url) as on_b,
    ):
        sent = on_a.send("Tell me about pelicans")
        on_a.follow(sent.stream_url, sent.close_event)
        on_b.http.cookies = on_a.http.cookies  # the same browser, now answered by B
        found = on_b.http.get("/search", params={"q": "pelic"})
        assert found.status_code == 200 and f"/c/{sent.cid}" in found.text
        page = on_b.http.get(f"/c/{sent.cid}")
        assert page.status_code == 200 and "Tell me about pelicans" in page.text
        export = on_b.http.get(f"/c/{sent.cid}/export.md")
        assert export.status_code == 200 and "Tell me about pelicans" in export.text
        stranger = HtmxClient(b.url)
        try:
            assert stranger.http.get(f"/c/{sent.cid}/export.md").status_code == 404
        finally:
            stranger.close()
