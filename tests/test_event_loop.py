"""No one user's work stalls everyone: blocking work runs off the event loop, reading a page
needs no write, and a long conversation is shown (and exported) a page at a time.

"Off the loop" is asserted on outcomes, not timings: while one request is held up (SQLite's
write lock taken by another connection, or a slow render), `/health` and other pages answer,
and the held-up request is still pending when they do.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator

import pytest
from pydantic_ai.messages import ModelRequest, ModelResponse, TextPart, UserPromptPart

from chat import markdown
from chat.stores import open_store
from chat.transcript import to_json, to_markdown
from tests.conftest import parse_html
from tests.test_routes import HTMX, chat, conversation_url, release, rows, send


def owner_of(settings) -> str:
    [(owner,)] = rows(settings, "select distinct owner from conversations")
    return owner


def imported(settings, owner: str, replies: list[str], title: str = "Big") -> dict:
    """A conversation of finished turns, put straight into the app's database."""
    turns = [
        {
            "user_text": f"question {i}",
            "reply_text": text,
            "messages": [
                ModelRequest(parts=[UserPromptPart(content=f"question {i}")]),
                ModelResponse(parts=[TextPart(content=text)]),
            ],
        }
        for i, text in enumerate(replies)
    ]
    store = open_store(settings)
    try:
        return store.import_conversation(owner, title, turns)
    finally:
        store.close()


class Pending:
    """A request made from another thread, so the test can act while it is in flight."""

    def __init__(self, fn, *args, **kwargs):
        self.response = None
        self.thread = threading.Thread(target=self._run, args=(fn, args, kwargs), daemon=True)
        self.thread.start()

    def _run(self, fn, args, kwargs) -> None:
        self.response = fn(*args, **kwargs)

    @property
    def pending(self) -> bool:
        return self.thread.is_alive()

    def result(self, timeout: float = 30):
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the request never finished"
        return self.response


@pytest.fixture
def write_lock(settings) -> Iterator[callable]:
    """`take()` holds the database's write lock from another connection until `release()` (or
    the end): SQLite's, or on Postgres a lock on the tables that lets reads through."""
    if settings.database_url:
        import psycopg

        pg = psycopg.connect(settings.database_url)

        class PgLock:
            def take(self) -> None:
                pg.execute("lock table conversations, turns in exclusive mode")

            def release(self) -> None:
                pg.rollback()

        lock = PgLock()
        yield lock
        lock.release()
        pg.close()
        return
    conn = sqlite3.connect(settings.db_path, isolation_level=None, check_same_thread=False)

    class Lock:
        def take(self) -> None:
            conn.execute("begin immediate")

        def release(self) -> None:
            if conn.in_transaction:
                conn.execute("rollback")

    lock = Lock()
    yield lock
    lock.release()
    conn.close()


def settled(pending: Pending, seconds: float = 0.5) -> None:
    """Give a request in flight time to reach what holds it up."""
    time.sleep(seconds)
    assert pending.pending, "the request was not held up: the test proves nothing"


# The event loop stays free ------------------------------------------------------------------


def test_health_and_pages_answer_while_a_send_waits_for_the_write_lock(
    client, settings, write_lock
):
    first, _ = chat(client, "Before the lock")
    cid = conversation_url(first).rsplit("/", 1)[1]

    write_lock.take()
    sending = Pending(send, client, "Sent while the database is locked", cid)
    settled(sending)
    health = client.get("/health")
    page = client.get(f"/c/{cid}")
    still_waiting = sending.pending
    write_lock.release()

    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert page.status_code == 200 and "Before the lock" in page.text
    assert still_waiting, "health and the page answered only after the send was done"
    # Once the lock is free, the send goes through: nothing typed is lost.
    assert sending.result().status_code == 200
    assert ("Sent while the database is locked",) in rows(settings, "select user_text from turns")


def test_a_send_blocked_past_the_busy_timeout_gets_a_clear_message(
    client, settings, write_lock, monkeypatch
):
    monkeypatch.setattr("chat.store.BUSY_TIMEOUT_MS", 200)
    store = client.app.state.store
    store.close()  # connections are reopened, per thread, with the short timeout
    first, _ = chat(client, "Before the lock")
    cid = conversation_url(first).rsplit("/", 1)[1]

    write_lock.take()
    response = send(client, "Refused while locked", cid)
    write_lock.release()

    assert response.status_code == 503
    assert "busy" in parse_html(response.text).text
    assert ("Refused while locked",) not in rows(settings, "select user_text from turns")


def test_any_write_blocked_past_the_busy_timeout_answers_503_and_changes_nothing(
    client, settings, write_lock, monkeypatch
):
    monkeypatch.setattr("chat.store.BUSY_TIMEOUT_MS", 200)
    client.app.state.store.close()
    first, _ = chat(client, "Keep my title")
    cid = conversation_url(first).rsplit("/", 1)[1]
    [(title,)] = rows(settings, "select title from conversations")

    write_lock.take()
    renamed = client.post(f"/c/{cid}/rename", data={"title": "New"}, headers=HTMX)
    deleted = client.post(f"/c/{cid}/delete")
    write_lock.release()

    assert renamed.status_code == 503 and "busy" in parse_html(renamed.text).text
    assert deleted.status_code == 503 and "busy" in parse_html(deleted.text).text
    assert rows(settings, "select title, deleted_at from conversations") == [(title, None)]


def test_two_sends_at_once_into_one_conversation_start_one_reply(
    make_client, scripted, settings, write_lock
):
    # The checks before a send (is a reply still being written here?) run on the loop, the
    # commit in a thread: without the per-user lock both sends would pass the checks.
    model = scripted(["Hello"], pause_after=1)  # each reply holds before it ends
    client = make_client(model)
    cid = conversation_url(send(client, "First")).rsplit("/", 1)[1]
    release(client, model)
    for _ in range(100):  # the first reply finishes
        if ("complete",) in rows(settings, "select status from turns"):
            break
        time.sleep(0.05)
    model.resume.clear()

    write_lock.take()  # both sends wait in the commit, side by side
    a = Pending(send, client, "Second, from one tab", cid)
    b = Pending(send, client, "Second, from another tab", cid)
    settled(a)
    write_lock.release()
    codes = sorted([a.result().status_code, b.result().status_code])
    release(client, model)

    assert codes == [200, 409]
    assert len(rows(settings, "select id from turns")) == 2


def test_health_answers_while_a_slow_reply_renders(client, settings, monkeypatch):
    # A budget far above the default keeps the render busy for seconds: long enough to see
    # whether anything else is served meanwhile.
    monkeypatch.setattr(markdown, "RENDER_BUDGET", 30.0)
    monkeypatch.setattr("web.views.RENDER_BUDGET", 30.0, raising=False)
    monkeypatch.setattr("web.views.PAGE_RENDER_BUDGET", 30.0, raising=False)
    chat(client, "hello")
    slow = "[" * 60_000 + "a" + "]" * 60_000  # seconds of markdown-it-py's link parsing
    conv = imported(settings, owner_of(settings), [slow])

    opening = Pending(client.get, f"/c/{conv['id']}")
    settled(opening)
    health = client.get("/health")
    still_rendering = opening.pending

    assert health.status_code == 200
    assert still_rendering, "/health waited for the render"
    assert opening.result().status_code == 200


# Reading needs no write -----------------------------------------------------------------------


def test_a_page_shows_while_the_database_is_write_locked(client, settings, write_lock):
    first, _ = chat(client, "Hi")
    url = conversation_url(first)
    write_lock.take()
    started = time.monotonic()
    page = client.get(url)
    took = time.monotonic() - started
    write_lock.release()

    assert page.status_code == 200
    assert "Hello there" in parse_html(page.text).find(data_role="assistant").text
    assert took < 4, "the page waited for the write lock (busy timeout is 5 s)"
    assert rows(settings, "select reply_html from turns") == [(None,)]  # not cached: no write
    client.get(url)
    assert rows(settings, "select reply_html is not null from turns") == [(1,)]


@pytest.mark.sqlite_only("patches ChatStore's connection opener to make SQLite read-only")
def test_a_page_shows_when_the_database_is_read_only(client, settings, monkeypatch):
    first, _ = chat(client, "Hi")
    store = client.app.state.store
    real = store._open

    def read_only():
        db = real()
        db.execute("pragma query_only = on")  # every write fails: "attempt to write a readonly"
        return db

    monkeypatch.setattr(store, "_open", read_only)
    store.close()  # every thread reopens, read-only
    page = client.get(conversation_url(first))
    assert page.status_code == 200
    assert "Hello there" in parse_html(page.text).find(data_role="assistant").text
    assert rows(settings, "select reply_html from turns") == [(None,)]


# Bounded pages of a long conversation ---------------------------------------------------------


def turn_ids(html: str) -> list[int]:
    doc = parse_html(html)
    return [int(n.attrs["id"].split("-")[-1]) for n in doc.find_all(data_role="user")]


def link(html: str, label: str) -> str | None:
    found = [a for a in parse_html(html).find_all("a") if label in a.text.lower()]
    return found[0].attrs["href"] if found else None


@pytest.fixture
def long_conversation(make_client, model, settings):
    client = make_client(model, history_page=10)
    chat(client, "hello")
    conv = imported(settings, owner_of(settings), [f"answer {i}" for i in range(95)])
    first = conv["head_turn_id"] - 94
    return client, conv, list(range(first, first + 95))


def test_a_search_link_to_the_first_turn_shows_a_page_not_the_whole_branch(long_conversation):
    client, conv, ids = long_conversation
    page = client.get(f"/c/{conv['id']}?at={ids[0]}")
    assert page.status_code == 200
    shown = turn_ids(page.text)
    assert shown[0] == ids[0] and len(shown) == 10
    assert link(page.text, "earlier") is None

    # "Load later" walks the rest of the branch, a page at a time, to its end.
    seen, later = list(shown), link(page.text, "later")
    while later:
        more = client.get(later, headers=HTMX)
        assert more.status_code == 200
        assert len(turn_ids(more.text)) <= 10
        seen += turn_ids(more.text)
        later = link(more.text, "later")
    assert seen == ids


def test_a_search_link_to_a_middle_turn_shows_it_with_both_directions(long_conversation):
    client, conv, ids = long_conversation
    page = client.get(f"/c/{conv['id']}?at={ids[50]}")
    shown = turn_ids(page.text)
    assert ids[50] in shown and len(shown) == 10
    assert shown == ids[shown and ids.index(shown[0]) : ids.index(shown[0]) + 10]
    earlier = client.get(link(page.text, "earlier"), headers=HTMX)
    assert turn_ids(earlier.text) == ids[ids.index(shown[0]) - 10 : ids.index(shown[0])]
    later = client.get(link(page.text, "later"), headers=HTMX)
    assert turn_ids(later.text)[0] == shown[-1] + 1


def test_later_of_someone_elses_turn_is_not_found(long_conversation, other_browser):
    client, conv, ids = long_conversation
    assert other_browser.get(f"/c/{conv['id']}/newer?after={ids[0]}").status_code == 404


def test_exports_of_a_long_branch_stream_the_whole_branch(long_conversation, settings):
    client, conv, ids = long_conversation
    store = open_store(settings)
    try:
        turns = store.branch(conv["head_turn_id"])
    finally:
        store.close()
    md = client.get(f"/c/{conv['id']}/export.md")
    assert md.status_code == 200 and md.text == to_markdown("Big", turns)
    js = client.get(f"/c/{conv['id']}/export.json")
    assert js.status_code == 200 and json.loads(js.content) == json.loads(to_json(turns))
