"""Two app processes on one SQLite database and one real Redis: any process serves any reply.

A reply started on A streams live on B, stops from B (the model's connection closes), resumes on
B from an event id A sent, and costs one model call; when A is killed mid-reply, B ends that
reply as interrupted with its partial text once A's lease lapses; a process that starts never
ends the replies of a live one. A rolling restart (SIGTERM A, which drains; a new A; then B the
same way) while replies stream, some followed on the other process, loses none of them.
"""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import httpx
import pytest
import redis

from tests.fake_openai import FakeOpenAI
from tests.live import (  # noqa: F401  (fixtures are used by name)
    DRAIN_GRACE,
    LEASE_REFRESH,
    LEASE_SECONDS,
    PARAGRAPHS,
    STREAM_TIMEOUT,
    HtmxClient,
    Sent,
    SharedApp,
    check_resume_after_drop,
    clients_fixture,
    fake_server_fixture,
    own_redis_db,
    pair_fake_fixture,
    replies,
    reply_html,
    start_app,
    stop_app,
    text_of,
    wait_until,
)
from tests.redis_server import redis_server_fixture  # noqa: F401  (used by name)

pytestmark = pytest.mark.slow


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


def test_a_reply_started_on_a_streams_live_on_b_with_one_model_call(fake, clients, pair):
    on_a, on_b = clients
    fake.configure(PARAGRAPHS, hold_after=6)
    sent = on_a.send("Four paragraphs, please")
    fake.wait_until_held()
    # /health: `runs` is the process's own replies, `runs_everywhere` every process's.
    assert pair[0].health()["runs"] == 1
    assert pair[1].health()["runs"] == 0 and pair[1].health()["runs_everywhere"] == 1
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
    # A's connection dropped; the browser reconnects through the balancer and lands on B.
    check_resume_after_drop(on_a, on_b, fake, PARAGRAPHS, "Four paragraphs, resumed elsewhere")


def _post_message(client: HtmxClient, msg: str) -> httpx.Response:
    """The composer's submit, as `HtmxClient.send` makes it, whatever the answer."""
    return client.http.post(
        client.send_url,
        data={"msg": msg, "cid": client.cid},
        headers={"HX-Request": "true", "Origin": client.base_url, "Sec-Fetch-Site": "same-origin"},
    )


def _at_once(clients: dict[str, HtmxClient], msg: str) -> dict[str, httpx.Response]:
    """Each client submits `msg` at the same moment (released together by a barrier)."""
    barrier = threading.Barrier(len(clients))
    answers: dict[str, httpx.Response] = {}

    def send(name: str, client: HtmxClient) -> None:
        barrier.wait()
        answers[name] = _post_message(client, f"{msg} from {name}")

    threads = [threading.Thread(target=send, args=pair) for pair in clients.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join(STREAM_TIMEOUT)
    return answers


def test_simultaneous_sends_to_one_conversation_on_a_and_b_start_one_reply(
    fake, clients, pair, redis_server
):
    on_a, on_b = clients
    fake.configure("First answer.")
    first = on_a.send("Start a conversation")
    assert on_a.follow(first.stream_url)[-1].data == "complete"
    leases = redis.Redis.from_url(redis_server)
    # Its lease is given back just after its stream ended (once its log is all in Redis).
    wait_until(lambda: leases.zcard("chat:leases") == 0, what="the first reply's lease back")
    leases.close()
    on_b.cid, on_b.send_url = on_a.cid, on_a.send_url
    rounds = 4
    for n in range(rounds):
        fake.reset()
        fake.configure("Held answer, then the rest.", hold_after=1)
        answers = _at_once({"A": on_a, "B": on_b}, f"Round {n}")
        codes = sorted(r.status_code for r in answers.values())
        assert codes == [200, 409], (
            n,
            {k: (r.status_code, r.text[:200]) for k, r in answers.items()},
        )
        refused = next(r for r in answers.values() if r.status_code == 409)
        assert "Wait for the reply to finish" in refused.text
        fake.wait_until_held()
        time.sleep(0.3)  # a second reply, had one started, would have reached the model by now
        assert len(replies(fake)) == 1
        assert [t["status"] for t in pair[0].turns()].count("streaming") == 1
        fake.release()
        for app in pair:
            app.wait_idle()
    turns = [t for t in pair[0].turns() if t["conversation_id"] == on_a.cid]
    assert len(turns) == 1 + rounds and all(t["status"] == "complete" for t in turns)


def test_a_killed_process_s_reply_ends_interrupted_on_b_and_a_starting_one_spares_it(
    fake_server: FakeOpenAI, redis_server: str, tmp_path
):
    fake = fake_server
    redis_server = own_redis_db(redis_server, 1)
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


# Rolling restart ------------------------------------------------------------------------------

# Long enough for every reply to still be streaming when its process is told to stop, short
# enough for the drain to let it finish well within the grace period.
ROLL_WORDS, ROLL_DELAY = 24, 0.12


def rolling_reply(body: dict) -> str:
    """A reply naming the message it answers, so a mixed-up or repeated reply shows."""
    asked = next(m["content"] for m in reversed(body["messages"]) if m["role"] == "user")
    if isinstance(asked, list):
        asked = " ".join(p.get("text", "") for p in asked)
    words = " ".join(f"w{i}" for i in range(ROLL_WORDS))
    return f"Answer to {asked.strip()}: {words}."


class Rolling:
    """The replies of a rolling restart: who sent them where, and who followed them elsewhere."""

    def __init__(self, fake: FakeOpenAI):
        self.fake = fake
        self.sent: dict[str, Sent] = {}  # message text -> what its send returned
        self.followers: list[tuple[str, threading.Thread, list]] = []

    def send(self, on: SharedApp, msg: str, follow_on: SharedApp | None = None) -> None:
        """A new conversation on `on`; with `follow_on`, another client follows it there."""
        with HtmxClient(on.url) as client:
            client.open()
            self.sent[msg] = sent = client.send(msg)
            cookies = client.http.cookies
        if follow_on is not None:
            seen: list = []

            def follow() -> None:
                with HtmxClient(follow_on.url) as other:
                    other.http.cookies = cookies
                    seen.extend(other.follow(sent.stream_url))

            reader = threading.Thread(target=follow, daemon=True)
            reader.start()
            self.followers.append((msg, reader, seen))

    def wait_started(self) -> None:
        """Until the model has every message sent so far (so each reply is streaming)."""
        wait_until(lambda: len(replies(self.fake)) >= len(self.sent), what="every reply to start")

    def refused_while_draining(self, draining: SharedApp, other: SharedApp, msg: str) -> None:
        """A draining process is not ready and refuses a send; the same send works elsewhere."""
        with httpx.Client(trust_env=False, timeout=10) as http:
            assert http.get(f"{draining.url}/ready").status_code == 503
            assert http.get(f"{other.url}/ready").status_code == 200
        with HtmxClient(draining.url) as client:
            client.open()
            refused = client.send(msg, expect=503)
            assert "restarting" in refused.text.lower(), refused.text
            with HtmxClient(other.url) as elsewhere:
                elsewhere.http.cookies = client.http.cookies
                elsewhere.open()
                self.sent[msg] = elsewhere.send(msg)


def restart(app: SharedApp, workdir: Path, db: Path, fake: FakeOpenAI, redis_url: str) -> SharedApp:
    """After its SIGTERM, as an orchestrator does: wait for the process to end (it drains), then
    start a new one on the same port."""
    assert app.proc is not None
    # uvicorn re-raises the signal once it has shut down cleanly.
    assert app.proc.wait(DRAIN_GRACE + 15) in (0, -signal.SIGTERM), app.log()
    app.proc = None
    return start_app(workdir, db, fake, redis_url, port=app.port)


def test_a_rolling_restart_while_replies_stream_loses_none(
    fake_server: FakeOpenAI, redis_server: str, tmp_path
):
    fake = fake_server
    redis_server = own_redis_db(redis_server, 2)
    fake.reset()
    fake.configure(rolling_reply, delay=ROLL_DELAY)
    db = tmp_path / "chat.db"
    a = start_app(tmp_path / "a", db, fake, redis_server)
    b = start_app(tmp_path / "b", db, fake, redis_server)
    roll = Rolling(fake)
    try:
        # A restarts while three replies run on it (two followed on B) and two on B.
        roll.send(a, "a1", follow_on=b)
        roll.send(a, "a2", follow_on=b)
        roll.send(a, "a3")
        roll.send(b, "b1")
        roll.send(b, "b2")
        roll.wait_started()
        a.proc.send_signal(signal.SIGTERM)
        wait_until(lambda: "stopping: no new replies" in a.log(), what="A to drain")
        roll.refused_while_draining(a, b, "sent during A's drain")
        a = restart(a, tmp_path / "a2", db, fake, redis_server)
        # Then B, while replies run on it (two followed on the new A) and on the new A.
        roll.send(b, "b3", follow_on=a)
        roll.send(b, "b4", follow_on=a)
        roll.send(a, "a4")
        roll.wait_started()
        b.proc.send_signal(signal.SIGTERM)
        wait_until(lambda: "stopping: no new replies" in b.log(), what="B to drain")
        roll.refused_while_draining(b, a, "sent during B's drain")
        b = restart(b, tmp_path / "b2", db, fake, redis_server)
        for app in (a, b):
            app.wait_idle()
        for _, reader, _ in roll.followers:
            reader.join(STREAM_TIMEOUT)

        rows = {row["user_text"]: row for row in a.turns()}
        assert set(rows) == set(roll.sent)
        for msg, row in rows.items():
            assert (row["status"], row["reply_text"]) == ("complete", rolling_reply_for(msg))
        # One model call per message, whichever process ran it.
        asked = [r.messages[-1]["content"] for r in replies(fake)]
        assert sorted(asked) == sorted(roll.sent), asked
        for msg, reader, seen in roll.followers:
            assert not reader.is_alive(), f"the follower of {msg} never saw it end"
            assert seen and seen[-1].data == "complete", (msg, [e.name for e in seen])
            assert text_of(reply_html(seen)) == text_of(rolling_reply_for(msg))
    finally:
        fake.release()
        for app in (a, b):
            stop_app(app)


def rolling_reply_for(msg: str) -> str:
    """The reply the fake model gives to `msg`."""
    return rolling_reply({"messages": [{"role": "user", "content": msg}]})
