"""Two app processes on one SQLite database and one real Redis: any process serves any reply.

A reply started on A streams live on B, stops from B (the model's connection closes), resumes on
B from an event id A sent, and costs one model call; when A is killed mid-reply, B ends that
reply as interrupted with its partial text once A's lease lapses; a process that starts never
ends the replies of a live one.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.fake_openai import FakeOpenAI
from tests.live import (  # noqa: F401  (fixtures are used by name)
    HtmxClient,
    LiveApp,
    fake_server_fixture,
    replies,
    reply_html,
    text_of,
)
from tests.redis_server import redis_server_fixture  # noqa: F401  (used by name)

pytestmark = pytest.mark.slow

# Short leases, so a dead process's replies end within seconds here.
LEASE_SECONDS, LEASE_REFRESH = 3, 1
PARAGRAPHS = "First paragraph.\n\nSecond paragraph.\n\nThird paragraph.\n\nFourth paragraph."


@dataclass
class SharedApp(LiveApp):
    """The app in its own directory (its own log), on a database shared with other processes."""

    shared_db: Path | None = None

    @property
    def db_path(self) -> Path:
        """The shared SQLite file."""
        return self.shared_db


def start_app(workdir: Path, db: Path, fake: FakeOpenAI, redis_url: str) -> SharedApp:
    env = {
        "REDIS_URL": redis_url,
        "LEASE_SECONDS": str(LEASE_SECONDS),
        "LEASE_REFRESH_SECONDS": str(LEASE_REFRESH),
        "OPENAI_BASE_URL": fake.base_url,
        "OPENAI_API_KEY": "test",
        "SECRET_KEY": "scale-test-key",  # one browser identity on every process
    }
    return SharedApp(workdir, env=env, shared_db=db).start()


def stop_app(app: SharedApp) -> None:
    app.stop()
    if "Traceback" in app.log():
        print(f"--- app log ({app.log_path}) ---\n{app.log()}")


@pytest.fixture(name="pair", scope="module")
def pair_fixture(fake_server: FakeOpenAI, redis_server: str, tmp_path_factory):
    """Two app processes, A and B, on one database and one Redis."""
    root = tmp_path_factory.mktemp("pair")
    a = start_app(root / "a", root / "chat.db", fake_server, redis_server)
    try:
        b = start_app(root / "b", root / "chat.db", fake_server, redis_server)
    except BaseException:
        stop_app(a)
        raise
    yield a, b
    stop_app(b)
    stop_app(a)


@pytest.fixture(name="fake")
def fake_fixture(fake_server: FakeOpenAI, pair) -> Iterator[FakeOpenAI]:
    """The fake model, reset for this test; afterwards, waits until both processes are idle."""
    fake_server.reset()
    yield fake_server
    fake_server.release()
    for app in pair:
        app.wait_idle()
    time.sleep(0.2)  # a title request may follow a finished reply
    fake_server.wait_until_finished()


@pytest.fixture(name="clients")
def clients_fixture(pair) -> Iterator[tuple[HtmxClient, HtmxClient]]:
    """One browser identity, talking to A and to B."""
    a, b = pair
    with HtmxClient(a.url) as on_a, HtmxClient(b.url) as on_b:
        on_a.open()
        on_b.http.cookies = on_a.http.cookies
        yield on_a, on_b


def test_a_reply_started_on_a_streams_live_on_b_with_one_model_call(fake, clients):
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
    assert text_of(reply_html(events)) == text_of(PARAGRAPHS.replace("\n", " "))
    fake.wait_until_finished()
    assert len(replies(fake)) == 1


def test_stop_pressed_on_b_ends_the_model_call_on_a(fake, clients):
    on_a, on_b = clients
    fake.configure("one two three four five", hold_after=2)
    sent = on_a.send("Start on A, stop on B")
    held = fake.wait_until_held()
    on_b.wait_for_text(sent.stream_url, "one two")
    stop_url = sent.soup.find("button", string="Stop")["hx-post"]
    r = on_b.http.post(stop_url, headers={"HX-Request": "true", "Origin": on_b.base_url})
    assert r.status_code in (200, 204)
    events = on_b.follow(sent.stream_url)
    assert events[-1].data == "stopped"
    assert text_of(reply_html(events)) == "one two"
    fake.wait_until_finished()
    assert held.disconnected and not held.completed
    assert len(replies(fake)) == 1


def test_last_event_id_from_a_resumes_on_b_without_repeating(fake, clients):
    on_a, on_b = clients
    fake.configure(PARAGRAPHS, hold_after=6)
    sent = on_a.send("Four paragraphs, resumed elsewhere")
    fake.wait_until_held()
    before = on_a.wait_for_text(sent.stream_url, "Second paragraph.")
    blocks = [e for e in before if e.name == "blocks"]
    assert blocks and blocks[-1].id, before
    # A's connection dropped; the browser reconnects through the balancer and lands on B.
    with on_b.events(sent.stream_url, {"Last-Event-ID": blocks[-1].id}) as events:
        fake.release()
        after = []
        for ev in events:
            after.append(ev)
            if ev.name == "done":
                break
    assert after[-1].data == "complete"
    assert text_of(reply_html(blocks) + reply_html(after)) == text_of(PARAGRAPHS.replace("\n", " "))
    assert len(replies(fake)) == 1


def wait_until(check, timeout: float = 15.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while not (result := check()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.05)
    return result


def test_a_killed_process_s_reply_ends_interrupted_on_b_and_a_starting_one_spares_it(
    fake_server: FakeOpenAI, redis_server: str, tmp_path
):
    fake = fake_server
    fake.reset()
    fake.configure("alpha beta gamma delta epsilon", hold_after=3)
    db = tmp_path / "chat.db"
    a = start_app(tmp_path / "a", db, fake, redis_server)
    b = None
    try:
        with HtmxClient(a.url) as on_a:
            sent = on_a.send("Remember this, then crash")
            fake.wait_until_held()
            wait_until(lambda: "alpha" in (a.turns()[-1]["reply_text"] or ""), what="flush")
            # Older than a lease by the time B starts: only A's live lease keeps it streaming.
            time.sleep(LEASE_SECONDS + 0.5)
            b = start_app(tmp_path / "b", db, fake, redis_server)
            assert b.turns()[-1]["status"] == "streaming"
            with HtmxClient(b.url) as on_b:
                on_b.http.cookies = on_a.http.cookies
                on_b.wait_for_text(sent.stream_url, "alpha")
                # B follows the reply while A dies mid-reply (SIGKILL: no shutdown code runs).
                seen: list = []
                reader = threading.Thread(
                    target=lambda: seen.extend(on_b.follow(sent.stream_url)), daemon=True
                )
                reader.start()
                time.sleep(0.3)
                a.proc.kill()
                a.proc.wait(10)
                a.proc = None
                killed = time.monotonic()
                reader.join(LEASE_SECONDS + 3 * LEASE_REFRESH + 10)
                ended_after = time.monotonic() - killed
                assert seen and seen[-1].data == "interrupted", [e.name for e in seen]
                assert ended_after < LEASE_SECONDS + 3 * LEASE_REFRESH + 2, ended_after
                row = b.turns()[-1]
                assert row["status"] == "interrupted" and "alpha" in row["reply_text"]
                page = on_b.open(f"/c/{sent.cid}")
                reply = page.find(attrs={"data-role": "assistant"})
                assert "alpha" in reply.get_text() and reply.find(attrs={"role": "alert"})
                assert reply.get("sse-connect") is None
    finally:
        fake.release()
        for app in (a, b):
            if app is not None:
                stop_app(app)
