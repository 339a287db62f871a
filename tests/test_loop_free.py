"""A reply's own database writes never stall the other users of its process (chat/runs.py).

With WORKERS=N on one SQLite file another process can hold the write lock for up to the busy
timeout, and on Postgres a write waits for a round trip, a commit or a pooled connection. A
reply's partial and final saves wait for that in a thread: meanwhile `/health` and other pages
answer, and the reply's own stream keeps showing the words the model sends. Asserted on a live
server (a real event loop, a real SSE stream) against a lock held by another connection.
"""

from __future__ import annotations

import sqlite3
import threading
import time

import httpx

from tests.conftest import Event
from tests.live import (  # noqa: F401  (the fixture is used by name)
    HtmxClient,
    LiveApp,
    fake_server_fixture,
    postgres_env,
    running_app,
    wait_until,
)

KEY = {"SECRET_KEY": "loop-free-test-key"}
# The lock is held this long: shorter than the store's wait for it (5 s, BUSY_TIMEOUT_MS) so
# the blocked save succeeds once it is let go, and far longer than a free loop takes to answer.
HELD = 4.0
PROMPT = 1.0  # a free event loop answers well within this; a blocked one only after the lock
WORDS = [f"word{i}" for i in range(120)]  # streamed at 20 a second: past the lock's release


class WriteLock:
    """The app's database write lock, held by another connection (as another worker, a backup
    or a long export would): SQLite's file lock, or on Postgres an exclusive table lock that
    still lets reads through."""

    def __init__(self, app: LiveApp):
        url = {**postgres_env(app.db_path), **app.env}.get("DATABASE_URL")
        if url:
            import psycopg

            self.conn = psycopg.connect(url)
            self.conn.execute("lock table conversations, turns in exclusive mode")
        else:
            self.conn = sqlite3.connect(app.db_path, isolation_level=None, timeout=1)
            self.conn.execute("begin immediate")

    def release(self) -> None:
        """Let go of the lock (and the connection)."""
        self.conn.rollback()
        self.conn.close()


class Reader:
    """Reads a reply's stream in a thread, noting when each event arrived."""

    def __init__(self, client: HtmxClient, url: str):
        self.seen: list[tuple[float, Event]] = []
        self.thread = threading.Thread(target=self._read, args=(client, url), daemon=True)
        self.thread.start()

    def _read(self, client: HtmxClient, url: str) -> None:
        try:
            with client.events(url) as events:
                for ev in events:
                    self.seen.append((time.monotonic(), ev))
                    if ev.name == "done":
                        return
        except httpx.HTTPError:  # the test failed and closed the client: `seen` says enough
            return

    def between(self, start: float, end: float) -> list[Event]:
        """The events that arrived in [start, end]."""
        return [ev for at, ev in self.seen if start <= at <= end]


def timed_get(url: str, cookies: httpx.Cookies | None = None) -> tuple[int, float]:
    """GET `url`; its status and how long it took (bounded by the lock's duration and more)."""
    began = time.monotonic()
    with httpx.Client(trust_env=False, timeout=HELD + 10, cookies=cookies) as http:
        status = http.get(url).status_code
    return status, time.monotonic() - began


def test_a_reply_waiting_to_save_stalls_no_one_else(fake_server, tmp_path):
    fake = fake_server
    fake.reset()
    fake.configure(" ".join(WORDS), delay=0.05, hold_after=3)
    env = {"OPENAI_BASE_URL": fake.base_url, "OPENAI_API_KEY": "t", **KEY}
    with running_app(tmp_path / "app", **env) as app:
        with HtmxClient(app.url) as writer, HtmxClient(app.url) as watcher:
            sent = writer.send("Count for me, slowly.")
            fake.wait_until_held()
            # The first words are saved at once; the next partial save comes FLUSH_EVERY (2 s)
            # after it, with the lock taken below in the way.
            wait_until(lambda: app.turns()[-1]["reply_text"], timeout=5, what="the first save")
            watcher.http.cookies = writer.http.cookies
            lock = WriteLock(app)
            locked_at = time.monotonic()
            try:
                reader = Reader(watcher, sent.stream_url)
                fake.release()
                # By now the reply's next partial save has begun, and waits for the lock.
                time.sleep(2.5)
                assert app.turns()[-1]["status"] == "streaming"
                health, health_took = timed_get(f"{app.url}/health")
                # A page read by the same user (a reload, another tab) answers too.
                page, page_took = timed_get(f"{app.url}/c/{sent.cid}", writer.http.cookies)
                watched_at = time.monotonic()
                still_locked = watched_at < locked_at + HELD
                time.sleep(max(0.0, locked_at + HELD - time.monotonic()))
                # While the save waited, the reply's stream kept showing the model's words.
                during = reader.between(locked_at + 2.5, time.monotonic())
            finally:
                lock.release()
            assert health == 200 and health_took < PROMPT, health_took
            assert page == 200 and page_took < PROMPT, page_took
            assert still_locked, "the checks outlasted the lock: this test proves nothing"
            assert any(ev.name in ("blocks", "tail") for ev in during), [ev.name for ev in during]
            # Once the lock goes, the reply ends and is saved whole.
            reader.thread.join(30)
            assert not reader.thread.is_alive(), "the stream never ended"
            assert reader.seen[-1][1].data.strip() == "complete"
            turn = wait_until(
                lambda: (t := app.turns()[-1])["status"] != "streaming" and t,
                timeout=10,
                what="the final save",
            )
            assert turn["status"] == "complete"
            assert turn["reply_text"].split() == WORDS
