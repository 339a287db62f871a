"""Durability and faults against the real server: SIGKILL mid-reply, backup and restore, a
client that stops reading, a refused upstream connection, and a good turn after a failed one."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys

import pytest
from pydantic_ai.messages import ModelMessagesTypeAdapter

from tests.fake_openai import FakeOpenAI, Fault
from tests.live import (  # noqa: F401  (fixtures are used by name)
    ROOT,
    HtmxClient,
    LiveApp,
    app_fixture,
    fake_fixture,
    fake_server_fixture,
    free_port,
    replies,
    running_app,
    wait_for_replies,
    wait_until,
)

KEY = {"SECRET_KEY": "durability-test-key"}  # the same browser identity across restarts


def test_sigkill_mid_reply_loses_nothing_typed(fake: FakeOpenAI, tmp_path):
    fake.configure("alpha beta gamma delta epsilon", hold_after=3)
    workdir = tmp_path / "killed"
    with running_app(workdir, OPENAI_BASE_URL=fake.base_url, OPENAI_API_KEY="t", **KEY) as app:
        with HtmxClient(app.url) as client:
            sent = client.send("Please remember this sentence.")
            fake.wait_until_held()
            # The partial reply is flushed to disk within a few seconds, with no new tokens.
            wait_until(lambda: "alpha" in (app.turns()[-1]["reply_text"] or ""), what="flush")
            cookies = client.http.cookies
            app.proc.kill()  # SIGKILL: no shutdown code runs
            app.proc.wait(10)
            app.proc = None
    fake.release()
    assert app.integrity() == "ok"
    with running_app(workdir, OPENAI_BASE_URL=fake.base_url, OPENAI_API_KEY="t", **KEY) as app:
        turn = app.turns()[-1]
        assert turn["user_text"] == "Please remember this sentence."
        assert turn["status"] == "interrupted" and "alpha" in turn["reply_text"]
        ModelMessagesTypeAdapter.validate_json(turn["messages"])
        with HtmxClient(app.url) as client:
            client.http.cookies = cookies
            page = client.open(f"/c/{sent.cid}")
            assert "Please remember this sentence." in page.get_text()
            reply = page.find(attrs={"data-role": "assistant"})
            assert "alpha" in reply.get_text() and reply.find(attrs={"role": "alert"})
            # The conversation goes on: the next turn's history is valid and carries the first.
            fake.configure("Continuing.")
            follow = client.send("And now?")
            events = client.follow(follow.stream_url)
            assert events[-1].data == "complete"
            sent_history = replies(fake)[-1].body["messages"]
            assert any("Please remember this sentence." in str(m) for m in sent_history)


@pytest.mark.sqlite_only(
    "backs up the SQLite file with manage.py backup (VACUUM INTO); Postgres uses pg_dump"
)
def test_backup_of_the_live_database_restores(fake: FakeOpenAI, tmp_path):
    fake.configure("Stored safely.")
    workdir = tmp_path / "live"
    backup = tmp_path / "backup.db"
    with running_app(workdir, OPENAI_BASE_URL=fake.base_url, OPENAI_API_KEY="t", **KEY) as app:
        with HtmxClient(app.url) as client:
            sent = client.send("Back me up")
            client.follow(sent.stream_url)
            cookies = client.http.cookies
            # While the app is serving: the documented command.
            done = subprocess.run(
                [sys.executable, "manage.py", "--db", str(app.db_path), "backup", str(backup)],
                cwd=ROOT,
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert done.returncode == 0, done.stderr
    restored = tmp_path / "restored"
    restored.mkdir()
    shutil.copy(backup, restored / "chat.db")
    with running_app(restored, OPENAI_BASE_URL=fake.base_url, OPENAI_API_KEY="t", **KEY) as app:
        with HtmxClient(app.url) as client:
            client.http.cookies = cookies
            page = client.open(f"/c/{sent.cid}")
            assert "Back me up" in page.get_text()
            assert "Stored safely." in page.find(attrs={"data-role": "assistant"}).get_text()


def test_a_client_that_stops_reading_cannot_stall_the_server(app: LiveApp, fake: FakeOpenAI):
    fake.configure("word " * 40_000, tokens=None)  # ~200 KB of reply: more than socket buffers
    with HtmxClient(app.url) as stalled:
        sent = stalled.send("Flood me")
        cookie = "; ".join(f"{k}={v}" for k, v in stalled.http.cookies.items())
        sock = socket.create_connection(("127.0.0.1", app.port))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        request = (
            f"GET {sent.stream_url} HTTP/1.1\r\nHost: 127.0.0.1:{app.port}\r\n"
            f"Cookie: {cookie}\r\nAccept: text/event-stream\r\n\r\n"
        )
        sock.sendall(request.encode())  # ... and never read a byte
        try:
            fake.configure("I am still here.")
            with HtmxClient(app.url) as other:
                reply = other.send("Are you there?")
                events = other.follow(reply.stream_url)
                assert events[-1].data == "complete"
            # The flooded reply itself ended and was saved, unread or not: complete, or stopped
            # at MAX_OUTPUT_TOKENS (200 KB of text is past the default cap), never streaming.
            wait_until(
                lambda: (
                    [t for t in app.turns() if t["user_text"] == "Flood me"][-1]["status"]
                    in ("complete", "stopped")
                ),
                what="the unread reply to end",
            )
        finally:
            sock.close()


def test_refused_upstream_connection_ends_with_a_clear_error(tmp_path):
    closed = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens here
    env = {"OPENAI_BASE_URL": closed, "OPENAI_API_KEY": "t", "MODEL_RETRIES": "0"}
    with running_app(tmp_path / "refused", **env) as app, HtmxClient(app.url) as client:
        sent = client.send("Hello?")
        events = client.follow(sent.stream_url)
        assert events[-1].data == "failed"
        page = client.open(f"/c/{sent.cid}")
        alert = page.find(attrs={"data-role": "assistant"}).find(attrs={"role": "alert"})
        assert "could not be reached" in alert.get_text()
        assert "Traceback" not in page.get_text() and "sk-" not in page.get_text()
        assert "Hello?" in page.find(attrs={"data-role": "user"}).get_text()


@pytest.mark.parametrize(
    "faults",
    # A 500 is retried (MODEL_RETRIES=2) before the first token, so it must fail three times.
    [[Fault.http(500)] * 3, [Fault.cut(after=2)]],
    ids=["server-error", "cut-mid-reply"],
)
def test_after_a_failed_reply_the_next_turn_works_with_valid_history(
    app: LiveApp, fake: FakeOpenAI, faults
):
    fake.configure("one two three four", script=faults)
    with HtmxClient(app.url) as client:
        first = client.send("First question")
        assert client.follow(first.stream_url)[-1].data == "failed"
        fake.configure("Second answer.")
        second = client.send("Second question")
        assert client.follow(second.stream_url)[-1].data == "complete"
    history = wait_for_replies(fake, 2)[-1].body["messages"]
    users = [m["content"] for m in history if m["role"] == "user"]
    assert "First question" in str(users) and "Second question" in str(users)
