"""Two app processes on one PostgreSQL and one Redis: the many-machines mode of issue 17.

A and B share nothing but `DATABASE_URL`, `REDIS_URL` and `SECRET_KEY`, as two replicas behind
a balancer would. A reply sent through A reads live and finished through B, Stop pressed on B
ends A's model call, search and both exports through B find A's reply, one browser cookie is
one identity on both (another identity sees nothing of it), every message costs one model
call, and what is stored is read back through `open_store` with the same URL. Two processes
starting together on an empty database migrate it once, without error.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from bs4 import BeautifulSoup
from pydantic_ai.messages import ModelMessagesTypeAdapter, ModelRequest, ModelResponse

from chat.config import Settings
from chat.pg_migrations import MIGRATIONS
from chat.stores import open_store
from tests.fake_openai import FakeOpenAI
from tests.live import (  # noqa: F401  (fixtures are used by name)
    PARAGRAPHS,
    SHARED_SECRET,
    HtmxClient,
    SharedApp,
    clients_fixture,
    fake_server_fixture,
    own_redis_db,
    pair_fake_fixture,
    replies,
    reply_html,
    shared_app,
    start_app,
    stop_app,
    text_of,
)
from tests.postgres_server import fresh_database_url
from tests.redis_server import redis_server_fixture  # noqa: F401  (used by name)

pytestmark = pytest.mark.slow


@contextlib.contextmanager
def opened(database_url: str) -> Iterator:
    """The store the processes write, opened as they open it (`open_store`, same URL)."""
    store = open_store(
        Settings.from_env({"DATABASE_URL": database_url, "SECRET_KEY": SHARED_SECRET})
    )
    try:
        yield store
    finally:
        store.close()


def stored(database_url: str, cid: str) -> tuple[dict, list[dict]]:
    """The conversation `cid` as stored (whoever owns it) and its shown branch, oldest first."""
    with opened(database_url) as store:
        conv = next(c for c in store.all_conversations() if c["id"] == cid)
        return conv, store.branch(conv["head_turn_id"])


@pytest.fixture(name="database_url", scope="module")
def database_url_fixture(postgres_server: str) -> str:
    """An empty database (schema) on the test run's PostgreSQL server for this module's pair."""
    return fresh_database_url(postgres_server)


@pytest.fixture(name="pair", scope="module")
def pair_fixture(fake_server: FakeOpenAI, redis_server: str, database_url: str, tmp_path_factory):
    """Two app processes, A and B, on one Postgres database and one Redis."""
    root = tmp_path_factory.mktemp("pgpair")
    # DB_PATH names a file neither process may create: with DATABASE_URL, nothing is in SQLite.
    unused = root / "unused.db"
    a = start_app(root / "a", unused, fake_server, redis_server, DATABASE_URL=database_url)
    try:
        b = start_app(root / "b", unused, fake_server, redis_server, DATABASE_URL=database_url)
    except BaseException:
        stop_app(a)
        raise
    yield a, b
    stop_app(b)
    stop_app(a)
    assert not unused.exists()


def stop_url(sent) -> str:
    """Where the Stop button of a just-sent reply posts."""
    return sent.soup.find("button", string="Stop")["hx-post"]


def htmx_get(client: HtmxClient, path: str):
    """GET `path` as htmx does (a fragment, not a whole page)."""
    return client.http.get(path, headers={"HX-Request": "true"})


def finish(client: HtmxClient, sent) -> None:
    """Read the reply's stream to its end and check it completed."""
    assert client.follow(sent.stream_url)[-1].data == "complete"


def test_a_reply_sent_through_a_reads_live_and_finished_through_b(fake, clients, database_url):
    on_a, on_b = clients
    fake.configure(PARAGRAPHS, hold_after=6)
    sent = on_a.send("Four paragraphs, please")
    fake.wait_until_held()
    # The model is held: what B shows now is live, not a replay of a finished reply.
    before = on_b.wait_for_text(sent.stream_url, "Second paragraph.")
    assert "done" not in [e.name for e in before]
    page = on_b.open(f"/c/{sent.cid}")
    assert page.find(attrs={"data-role": "assistant"}).get("sse-connect") == sent.stream_url
    fake.release()
    events = on_b.follow(sent.stream_url)
    assert events[-1].data == "complete"
    want = text_of(PARAGRAPHS.replace("\n", " "))
    assert text_of(reply_html(events)) == want

    # Finished, B's page shows the stored reply (no stream left to connect to).
    page = on_b.open(f"/c/{sent.cid}")
    reply = page.find_all(attrs={"data-role": "assistant"})[-1]
    assert text_of(str(reply.select_one("div.md"))) == want and reply.get("sse-connect") is None
    fake.wait_until_finished()
    assert len(replies(fake)) == 1
    _, turns = stored(database_url, sent.cid)
    assert [(t["user_text"], t["status"]) for t in turns] == [
        ("Four paragraphs, please", "complete")
    ]
    assert text_of(turns[0]["reply_text"]) == want


def test_stop_pressed_on_b_ends_the_model_call_on_a_and_is_stored(fake, clients, database_url):
    on_a, on_b = clients
    fake.configure("one two three four five", hold_after=2)
    sent = on_a.send("Start on A, stop on B")
    held = fake.wait_until_held()
    on_b.wait_for_text(sent.stream_url, "one two")
    r = on_b.http.post(stop_url(sent), headers={"HX-Request": "true", "Origin": on_b.base_url})
    assert r.status_code in (200, 204)
    events = on_b.follow(sent.stream_url)
    assert events[-1].data == "stopped"
    assert text_of(reply_html(events)) == "one two"
    fake.wait_until_finished()
    # The upstream connection was closed by A, which ran the reply: the model saw it go.
    assert held.disconnected and not held.completed
    assert len(replies(fake)) == 1
    _, turns = stored(database_url, sent.cid)
    assert turns[-1]["status"] == "stopped" and text_of(turns[-1]["reply_text"]) == "one two"
    page = on_b.open(f"/c/{sent.cid}")
    reply = page.find_all(attrs={"data-role": "assistant"})[-1]
    assert text_of(str(reply.select_one("div.md"))) == "one two" and "stopped" in reply["class"]


def test_search_and_exports_through_b_find_a_s_reply(fake, clients, database_url):
    on_a, on_b = clients
    fake.configure("The quokka sleeps by day on Rottnest Island.")
    on_a.open("/")  # a new conversation
    sent = on_a.send("Where do small marsupials sleep?")
    finish(on_b, sent)

    # A word of the reply, and a word prefix, each found with its hit highlighted.
    for query in ("quokka", "Rottn"):
        r = htmx_get(on_b, f"/search?q={query}")
        assert r.status_code == 200
        hits = BeautifulSoup(r.text, "html.parser").select("ul.results a")
        hit = next(a for a in hits if a["href"].startswith(f"/c/{sent.cid}"))
        marks = [m.get_text().lower() for m in hit.find_all("mark")]
        assert any(m.startswith(query.lower()) for m in marks), r.text

    md = on_b.http.get(f"/c/{sent.cid}/export.md")
    assert md.status_code == 200 and md.headers["content-type"].startswith("text/markdown")
    assert "attachment" in md.headers["content-disposition"]
    assert "Where do small marsupials sleep?" in md.text
    assert "The quokka sleeps by day on Rottnest Island." in md.text

    exported = on_b.http.get(f"/c/{sent.cid}/export.json")
    assert exported.status_code == 200
    messages = ModelMessagesTypeAdapter.validate_json(exported.content)
    asked = [p.content for m in messages if isinstance(m, ModelRequest) for p in m.parts]
    answered = [m.text for m in messages if isinstance(m, ModelResponse)]
    assert "Where do small marsupials sleep?" in asked
    assert answered == ["The quokka sleeps by day on Rottnest Island."]
    assert len(replies(fake)) == 1


def test_one_cookie_is_one_identity_on_both_and_another_sees_nothing(fake, clients, pair):
    on_a, on_b = clients
    _, b = pair
    fake.configure("Kept for one visitor only: the wombat.")
    on_a.open("/")
    sent = on_a.send("A private question")
    finish(on_a, sent)

    # The same cookie on B: the same anonymous identity (the session is signed with the one
    # SECRET_KEY), so B's sidebar lists A's conversation and B opens it.
    sidebar = on_b.open("/").find_all("a", href=f"/c/{sent.cid}")
    assert sidebar, "B's sidebar does not list the conversation started on A"
    assert on_b.http.get(f"/c/{sent.cid}").status_code == 200

    # A second identity (a new browser) on B sees none of it.
    with HtmxClient(b.url) as stranger:
        page = stranger.open("/")
        assert page.find_all("a", href=f"/c/{sent.cid}") == []
        for path in (f"/c/{sent.cid}", f"/c/{sent.cid}/export.md", f"/c/{sent.cid}/export.json"):
            assert stranger.http.get(path).status_code == 404, path
        r = htmx_get(stranger, "/search?q=wombat")
        assert r.status_code == 200 and "No messages match" in r.text
        assert f"/c/{sent.cid}" not in r.text
    assert len(replies(fake)) == 1


# Start-up: two processes, one empty database ---------------------------------------------------


def start_together(apps: list[SharedApp]) -> list[BaseException]:
    """Start every app at the same moment (threads behind a barrier); return what failed."""
    barrier = threading.Barrier(len(apps))
    errors: list[BaseException] = []

    def start(app: SharedApp) -> None:
        barrier.wait(10)
        try:
            app.start()
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)

    threads = [threading.Thread(target=start, args=(app,), daemon=True) for app in apps]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return errors


@pytest.mark.parametrize("attempt", range(3))
def test_two_processes_starting_together_migrate_an_empty_database_once(
    attempt, fake_server: FakeOpenAI, redis_server: str, postgres_server: str, tmp_path: Path
):
    fake = fake_server
    fake.reset()
    database_url = fresh_database_url(postgres_server)
    # Its own Redis database: turn ids restart at 1 in each database, so the module's pair
    # must not see this test's leases.
    redis_url = own_redis_db(redis_server, 3 + attempt)
    unused = tmp_path / "unused.db"
    apps = [
        shared_app(tmp_path / name, unused, fake, redis_url, DATABASE_URL=database_url)
        for name in ("a", "b")
    ]
    try:
        errors = start_together(apps)
        assert errors == [], [str(e) for e in errors]
        for app in apps:
            assert app.health()["status"] == "ok"
            assert "Traceback" not in app.log() and "ERROR" not in app.log(), app.log()
        # One of them applied the schema while the other waited, then found it done.
        migrated = [app for app in apps if "postgres schema: applied" in app.log()]
        assert len(migrated) == 1, [app.log() for app in apps]
        with psycopg.connect(database_url) as conn:
            recorded = [name for (name,) in conn.execute("select name from _migrations")]
        assert sorted(recorded) == sorted(fn.__name__ for fn in MIGRATIONS)

        # The schema is whole: a message sent through one is read through the other.
        fake.configure("Both of us are ready.")
        with HtmxClient(apps[0].url) as on_a, HtmxClient(apps[1].url) as on_b:
            on_a.open()
            on_b.http.cookies = on_a.http.cookies
            sent = on_a.send("Are you both up?")
            finish(on_b, sent)
        _, turns = stored(database_url, sent.cid)
        assert [t["status"] for t in turns] == ["complete"]
        assert len(replies(fake)) == 1
    finally:
        fake.release()
        for app in apps:
            stop_app(app)
