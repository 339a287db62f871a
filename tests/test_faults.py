"""Faults injected for real into a reply's lifecycle (chat/runs.py): every step that can raise
or be cancelled, a database locked by another connection while the reply ends, and a SIGKILL
mid-reply. Whatever fails, the run is never left registered, the stored turn never stays
'streaming' while the database can be written, the user is told, and the conversation goes on."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from functools import partial

import pytest
from starlette.testclient import TestClient

import chat.runs
import chat.store
from chat.markdown import StreamRenderer
from chat.runs import Run, RunManager
from tests.conftest import ModelBroke, ScriptedModel, parse_html
from tests.live import (  # noqa: F401  (the fixture is used by name)
    HtmxClient,
    fake_server_fixture,
    replies,
    running_app,
    wait_until,
)
from tests.test_routes import conversation_url, open_stream, replay, rows, send, stream_url

# In-process waits are short: a shorter bound and a quicker poll than the live servers' default.
until = partial(wait_until, timeout=5.0, every=0.02)


class Injected(Exception):
    """A fault put into the code on purpose; its text must never reach the user."""


def fail_once(monkeypatch, owner, name: str, exc: BaseException | None = None, when=None) -> None:
    """Make `owner.name` raise once: on its first call, or the first call where `when(*args)`."""
    real = getattr(owner, name)
    fired = []

    def wrapper(*args, **kwargs):
        if not fired and (when is None or when(*args, **kwargs)):
            fired.append(True)
            raise exc if exc is not None else Injected("injected fault")
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, wrapper)


def manager_of(client: TestClient) -> RunManager:
    return client.app.state.runs


def cancel_task(client: TestClient, tid: int) -> None:
    """Cancel a reply's task from the app's event loop, as a dying server or a bug would."""

    def cancel() -> None:
        run = manager_of(client).runs.get(tid)
        if run is not None and run.task is not None:
            run.task.cancel()

    client.portal.call(cancel)


def last_turn(settings) -> tuple:
    return rows(settings, "select id, status, reply_text, error from turns order by id")[-1]


# 1. No exception path leaves a run registered -----------------------------------------------

# Each case: (setup, expected final status, whether the user must see an alert). `setup` gets
# (monkeypatch, client, model) before the message is sent and may return an action run after.


def _model_fails_first(mp, client, model):
    model.chunks, model.error = [], ModelBroke("secret upstream detail")


def _model_fails_midway(mp, client, model):
    model.chunks, model.error = ["Partial words. ", "More words. "], ModelBroke("secret detail")


def _renderer_feed(mp, client, model):
    fail_once(mp, StreamRenderer, "feed")


def _renderer_update(mp, client, model):
    fail_once(mp, StreamRenderer, "update")


def _renderer_final_update(mp, client, model):
    # The last render, in `_finish` itself.
    fail_once(mp, StreamRenderer, "update", when=lambda self, final=False: final)


def _history(mp, client, model):
    fail_once(mp, manager_of(client).store, "history")


def _save_partial(mp, client, model):
    fail_once(mp, manager_of(client).store, "save_partial", sqlite3.OperationalError("disk I/O"))


def _finish_turn_db(mp, client, model):
    fail_once(mp, manager_of(client).store, "finish_turn", sqlite3.OperationalError("locked"))


def _finish_turn_other(mp, client, model):
    fail_once(mp, manager_of(client).store, "finish_turn")


def _publish(mp, client, model):
    fail_once(mp, Run, "publish")


def _publish_at_end(mp, client, model):
    fail_once(mp, Run, "publish", when=lambda self: self.done)


def _start_title(mp, client, model):
    fail_once(mp, manager_of(client).titles, "start")


def _cancel_before_start(mp, client, model):
    manager = manager_of(client)
    real = manager.start

    def start(turn, owner):
        run = real(turn, owner)
        if run.turn_id == 1:
            run.task.cancel()  # before its first step: `_drive` never runs
        return run

    mp.setattr(manager, "start", start)


def _cancel_during_history(mp, client, model):
    store = manager_of(client).store
    real = store.history
    entered = []

    def slow_history(turn):
        entered.append(True)
        time.sleep(0.3)  # in its worker thread: the task waits at this await meanwhile
        return real(turn)

    mp.setattr(store, "history", slow_history)

    def act(tid):
        until(lambda: entered, what="the history read")
        cancel_task(client, tid)

    return act


def _cancel_mid_stream(mp, client, model):
    model.chunks, model.pause_after = ["First words. ", "Never sent."], 1

    def act(tid):
        client.portal.call(asyncio.wait_for, model.paused.wait(), 5)
        cancel_task(client, tid)

    return act


CASES = {
    "model-raises-before-text": (_model_fails_first, "failed", ("stream", "page")),
    "model-raises-after-text": (_model_fails_midway, "failed", ("stream", "page")),
    "renderer-feed": (_renderer_feed, "failed", ("stream", "page")),
    "renderer-update": (_renderer_update, "failed", ("stream", "page")),
    "renderer-final-update": (_renderer_final_update, "failed", ("stream", "page")),
    "history-read": (_history, "failed", ("stream", "page")),
    "save-partial": (_save_partial, "complete", ()),
    "finish-turn-sqlite": (_finish_turn_db, "complete", ("stream",)),
    "finish-turn-other": (_finish_turn_other, "failed", ("stream", "page")),
    "publish": (_publish, "failed", ("stream", "page")),
    "publish-at-end": (_publish_at_end, "complete", ()),
    "start-title": (_start_title, "complete", ()),
    "cancelled-before-start": (_cancel_before_start, "interrupted", ("stream", "page")),
    "cancelled-during-history": (_cancel_during_history, "interrupted", ("stream", "page")),
    "cancelled-mid-stream": (_cancel_mid_stream, "interrupted", ("stream", "page")),
}


@pytest.mark.parametrize("case", CASES)
def test_no_fault_leaves_a_run_registered_or_a_turn_streaming(
    make_client, scripted, settings, monkeypatch, case
):
    setup, status, alerted = CASES[case]
    model: ScriptedModel = scripted(["Hello ", "**there**.\n\n", "- one\n"])
    # A short heartbeat: a follower that missed its wake-up still ends promptly.
    client = make_client(model, heartbeat=0.3, stall_timeout=5, first_token_timeout=5)
    manager = manager_of(client)
    act = setup(monkeypatch, client, model)
    response = send(client, "First question")
    assert response.status_code == 200, response.text
    tid = until(lambda: last_turn(settings)[0])
    if act:
        act(tid)
    events = open_stream(client, stream_url(response))
    assert events[-1].name == "done" and events[-1].data.strip() == status, events[-3:]
    until(lambda: not manager.runs, what="the run to leave `runs`")
    # A reply waiting for a retried save is kept elsewhere; the database takes it shortly.
    until(lambda: last_turn(settings)[1] != "streaming", what="the turn to be saved")
    until(lambda: not manager.unsaved, what="the retried save")
    assert last_turn(settings)[1] == status
    if status == "complete" and case != "start-title":
        # `_finish` did not raise: what follows a complete first reply (its title) still ran.
        titled = [("Scripted title",)]
        until(lambda: rows(settings, "select title from conversations") == titled, what="title")
    # The user is told, in the stream and on the page, and never shown the fault's text.
    end = next(e for e in events if e.name == "end")
    page = client.get(conversation_url(response))
    reply = parse_html(page.text).find_all(data_role="assistant")[-1]
    for where, shown in (("stream", parse_html(end.data)), ("page", reply)):
        alerts = shown.find_all(role="alert")
        assert bool(alerts) == (where in alerted), (case, where, shown.text[:300])
        assert "secret" not in shown.text and "injected" not in shown.text
    # The conversation goes on.
    model.chunks, model.error, model.pause_after = ["Second answer."], None, None
    cid = conversation_url(response).rsplit("/", 1)[1]
    again = send(client, "Second question", cid)
    assert again.status_code == 200, again.text
    assert replay(client, stream_url(again))[-1].data.strip() == "complete"
    assert last_turn(settings)[1:3] == ("complete", "Second answer.")
    assert not manager.runs


# 2. A final save that fails is kept and retried ---------------------------------------------


def _locked_reply(make_client, scripted, settings, monkeypatch, **overrides):
    """A reply that ends while another connection holds the database's write lock (the
    store's writes wait 50 ms for it: SQLite's busy timeout, Postgres's lock_timeout).

    Returns (client, model, send response, the locking connection, the stream's events).
    """
    monkeypatch.setattr(chat.store, "BUSY_TIMEOUT_MS", 50)  # fail fast instead of waiting 5 s
    model = scripted(["Kept ", "reply text."], pause_after=1)
    client = make_client(model, concurrent_runs=1, **overrides)
    response = send(client, "Save me")
    assert response.status_code == 200, response.text
    client.portal.call(asyncio.wait_for, model.paused.wait(), 5)
    if settings.database_url:  # Postgres: a lock on the tables that lets reads through
        import psycopg

        lock = psycopg.connect(settings.database_url)
        lock.execute("lock table conversations, turns in exclusive mode")
    else:
        lock = sqlite3.connect(settings.db_path, isolation_level=None, timeout=0.05)
        lock.execute("begin exclusive")  # what a backup tool or a second writer may do
    client.portal.call(model.resume.set)
    events = open_stream(client, stream_url(response))
    return client, model, response, lock, events


def test_a_final_save_that_fails_is_kept_shown_and_retried(
    make_client, scripted, settings, monkeypatch
):
    # The first retry waits long enough for this test to act in between.
    monkeypatch.setattr(chat.runs, "_SAVE_RETRY_FIRST", 1.0)
    client, model, response, lock, events = _locked_reply(
        make_client, scripted, settings, monkeypatch, save_retry_for=30
    )
    try:
        manager = manager_of(client)
        assert events[-1].data.strip() == "complete"
        shown = " ".join(parse_html(e.data).text for e in events)
        assert "Kept reply text." in shown and "could not be saved yet" in shown
        # The slot is free while the reply waits for the database.
        assert not manager.runs and len(manager.unsaved) == 1
        tid = next(iter(manager.unsaved))
        # A reload attaches to the reply kept in memory, and shows it with the note.
        again = shown_stream(client, conversation_url(response))
        assert "could not be saved yet" in again and "Kept reply text." in again
    finally:
        lock.rollback()
        lock.close()
    # Another conversation may start at once (CONCURRENT_RUNS=1).
    model.chunks, model.pause_after = ["Other reply."], None
    other = send(client, "Elsewhere")
    assert other.status_code == 200, other.text
    assert replay(client, stream_url(other))[-1].data.strip() == "complete"
    # The retry stores the whole reply, complete, and the note goes.
    until(lambda: not manager.unsaved, timeout=10, what="the retried save")
    saved = rows(settings, f"select status, reply_text, error from turns where id = {tid}")
    assert saved == [("complete", "Kept reply text.", None)]
    page = client.get(conversation_url(response))
    assert "Kept reply text." in page.text and "could not be saved" not in page.text


def test_a_save_that_never_succeeds_tells_the_user(make_client, scripted, settings, monkeypatch):
    monkeypatch.setattr(chat.runs, "_SAVE_RETRY_FIRST", 0.1)
    client, _, response, lock, events = _locked_reply(
        make_client, scripted, settings, monkeypatch, save_retry_for=0.5
    )
    try:
        manager = manager_of(client)
        assert "could not be saved yet" in " ".join(parse_html(e.data).text for e in events)
        tid = next(iter(manager.unsaved))
        run = manager.unsaved[tid]
        until(lambda: "yet" not in (run.error or "yet"), timeout=5, what="the retries to stop")
        # Still shown from memory, with a note that says it is not stored, and no slot taken.
        again = shown_stream(client, conversation_url(response))
        assert "Kept reply text." in again
        assert "could not be saved: the database was not writable" in again
        assert "yet" not in again
        assert not manager.runs and tid in manager.unsaved
    finally:
        lock.rollback()
        lock.close()


def shown_stream(client: TestClient, page_url: str) -> str:
    """What a reload of the page shows of its last reply, including what its stream sends."""
    page = client.get(page_url)
    reply = parse_html(page.text).find_all(data_role="assistant")[-1]
    events = open_stream(client, reply.attrs["sse-connect"])
    return " ".join(parse_html(e.data).text for e in events)


# 3. After a crash the partial reply is in the next history ---------------------------------

KEY = {"SECRET_KEY": "faults-test-key"}  # the same browser identity across restarts


def _saved_reply(app) -> str:
    """The newest turn's saved reply text, read as another process would."""
    try:
        turns = app.turns()
    except Exception:  # not written yet (no file, no table): nothing saved
        return ""
    return (turns[-1]["reply_text"] or "") if turns else ""


def test_after_a_crash_the_partial_reply_reaches_the_next_request(fake_server, tmp_path):
    fake = fake_server
    fake.reset()
    fake.configure("alpha beta gamma delta epsilon zeta", hold_after=2)
    workdir = tmp_path / "crash"
    env = {"OPENAI_BASE_URL": fake.base_url, "OPENAI_API_KEY": "t", **KEY}
    with running_app(workdir, **env) as app:
        with HtmxClient(app.url) as client:
            sent = client.send("Tell me the Greek letters.")
            fake.wait_until_held()
            held_at = time.monotonic()
            # The first words reach the disk at once, not after FLUSH_EVERY (2 s).
            until(lambda: _saved_reply(app), timeout=1.0, what="the first save")
            assert time.monotonic() - held_at < 1.0
            partial = _saved_reply(app)
            assert "alpha" in partial and "zeta" not in partial
            cookies = client.http.cookies
            app.proc.kill()  # SIGKILL: no shutdown code runs
            app.proc.wait(10)
            app.proc = None
    fake.release()
    fake.wait_until_finished()
    with running_app(workdir, **env) as app, HtmxClient(app.url) as client:
        client.http.cookies = cookies
        page = client.open(f"/c/{sent.cid}")
        reply = page.find(attrs={"data-role": "assistant"})
        assert partial.strip() in reply.get_text() and reply.find(attrs={"role": "alert"})
        assert "interrupted" in reply.find(attrs={"role": "alert"}).get_text().lower()
        fake.configure("Continuing.")
        follow = client.send("And the rest?")
        assert client.follow(follow.stream_url)[-1].data == "complete"
        request = replies(fake)[-1]
        assert request.texts("user")[-2:] == ["Tell me the Greek letters.", "And the rest?"]
        assistant = request.texts("assistant")
        assert assistant and partial.strip() in assistant[-1]
