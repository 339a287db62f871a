"""RunManager: a reply as a server-owned task whose state streams can replay and follow."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import pytest
from pydantic_ai.exceptions import ModelAPIError, ModelHTTPError, UsageLimitExceeded
from pydantic_ai.messages import (
    ModelMessagesTypeAdapter,
    ModelRequest,
    ModelResponse,
    TextPart,
    UserPromptPart,
)

from chat.agent import build_agent
from chat.errors import describe_error
from chat.markdown import render
from chat.runlog import Entry
from chat.runs import Run, RunManager
from chat.store import ChatStore
from tests.conftest import ModelBroke, reply_texts, user_prompts


def new_turn(store: ChatStore, text: str = "Hi", cid: str | None = None) -> dict:
    """Commit a user message the way the send route does."""
    cid = cid or store.create_conversation("alice", model="scripted")["id"]
    request = ModelRequest(parts=[UserPromptPart(content=text)])
    return store.add_turn(cid, text, [request], model="scripted")


async def eventually(condition: Callable[[], bool], what: str = "condition") -> None:
    """Wait (bounded) until `condition()` holds."""
    for _ in range(1000):
        if condition():
            return
        await asyncio.sleep(0.005)
    raise TimeoutError(f"gave up waiting for {what}")


def as_events(entry: Entry | None) -> list[tuple[str, object]]:
    """A followed entry as what a stream sends: items (with the entry number), tail, end."""
    if entry is None:
        return [("ping", None)]
    out: list[tuple[str, object]] = []
    if entry.items:
        out.append(("items", (entry.items, entry.seq)))
    if entry.tail is not None and entry.end is None:
        out.append(("tail", entry.tail))
    if entry.end is not None:
        out.append(("end", entry.end))
    return out


async def events_of(follower: AsyncIterator[Entry | None]) -> AsyncIterator[tuple[str, object]]:
    """A follower's entries as stream events (see `as_events`)."""
    async for entry in follower:
        for event in as_events(entry):
            yield event


async def collect(run: Run, **kw) -> list[tuple[str, object]]:
    """Everything a follower receives, to the end."""
    return [e async for e in events_of(run.follow(**kw))]


def text_blocks(items: list) -> list[str]:
    """The HTML of the finished text blocks among a run's items (tool calls are left out)."""
    out = []
    for item in items:
        html = item if isinstance(item, str) else getattr(item, "html", None)
        if isinstance(html, str):
            out.append(html)
    return out


def blocks_html(events: list[tuple[str, object]]) -> str:
    """The reply's finished blocks as a follower received them, joined."""
    return "".join(
        "".join(text_blocks(data[0])) for kind, data in events if kind in ("blocks", "items")
    )


CHUNKS = ["# Title\n\n", "Some **bold", "** text.\n\n", "- one\n", "- two\n\n", "Done."]
TEXT = "".join(CHUNKS)


async def test_a_run_calls_the_model_once_and_saves_the_reply(manager, store, scripted):
    model = scripted(CHUNKS, delay=0.001)
    runs = manager(model)
    turn = new_turn(store, "Write something")
    run = runs.start(turn, "alice")
    assert runs.get(turn["id"]) is run
    await run.task

    assert len(model.calls) == 1
    assert model.prompts == [["Write something"]]
    assert run.status == "complete"
    assert runs.get(turn["id"]) is None
    row = store.turn(turn["id"], "alice")
    assert row["status"] == "complete"
    assert row["reply_text"] == TEXT
    assert row["error"] is None
    messages = ModelMessagesTypeAdapter.validate_json(row["messages"])
    assert user_prompts(messages) == ["Write something"]
    assert isinstance(messages[-1], ModelResponse)
    assert "".join(p.content for p in messages[-1].parts if isinstance(p, TextPart)) == TEXT
    assert "".join(text_blocks(run.items)) == render(TEXT)


async def test_the_model_receives_the_earlier_turns_as_history(manager, store, scripted):
    model = scripted(["First answer."])
    runs = manager(model)
    first = new_turn(store, "First question")
    await runs.start(first, "alice").task
    second = new_turn(store, "Second question", cid=first["conversation_id"])
    await runs.start(second, "alice").task

    assert model.prompts[1] == ["First question", "Second question"]
    assert reply_texts(model.calls[1]) == ["First answer."]


async def test_follow_replays_what_exists_then_follows_live(manager, store, scripted):
    model = scripted(["Para one.\n\n", "Para two", " goes on.\n\n", "Para three."], pause_after=2)
    runs = manager(model, stream_tick=0.0)
    run = runs.start(new_turn(store), "alice")
    await asyncio.wait_for(model.paused.wait(), 5)
    await eventually(lambda: "Para two" in run.tail, "the tail to show the text so far")

    follower = events_of(run.follow(heartbeat=5))
    first = await anext(follower)
    assert blocks_html([first]) == "<p>Para one.</p>\n"
    # The number of the last entry the follower now holds (its Last-Event-ID).
    assert first[1][1] == len(run.log.entries)
    kind, tail = await anext(follower)
    assert kind == "tail" and tail == "<p>Para two</p>\n"

    model.resume.set()
    rest = [e async for e in follower]
    assert rest[-1] == ("end", run.end_state())
    assert [k for k, _ in rest].count("end") == 1
    assert "<p>Para one.</p>\n" + blocks_html(rest) == render("".join(model.chunks))
    assert run.status == "complete"


async def test_a_follower_that_starts_midway_skips_blocks_it_already_has(manager, store, scripted):
    model = scripted(["A.\n\n", "B.\n\n", "C.\n\n", "D."], pause_after=3)
    runs = manager(model, stream_tick=0.0)
    run = runs.start(new_turn(store), "alice")
    await asyncio.wait_for(model.paused.wait(), 5)
    await eventually(lambda: len(text_blocks(run.items)) == 2, "two finished blocks")

    # A reconnecting browser says it holds the entry that brought the first block.
    held = next(e.seq for e in run.log.entries if e.items)
    follower = events_of(run.follow(after=held, heartbeat=5))
    first = await anext(follower)
    assert blocks_html([first]) == "<p>B.</p>\n"
    assert first[1][1] == len(run.log.entries)
    model.resume.set()
    rest = [e async for e in follower]
    assert blocks_html(rest) == "<p>C.</p>\n<p>D.</p>\n"


async def test_two_followers_see_the_same_reply(manager, store, scripted):
    chunks = [f"Word{i} " if i % 7 else f"\n\nPara {i}. " for i in range(60)]
    model = scripted(chunks, delay=0.001)
    runs = manager(model, stream_tick=0.002)
    run = runs.start(new_turn(store), "alice")
    a, b = await asyncio.gather(collect(run, heartbeat=5), collect(run, heartbeat=5))

    assert blocks_html(a) == blocks_html(b) == render("".join(chunks))
    assert a[-1] == b[-1] == ("end", run.end_state())
    assert len(model.calls) == 1


async def test_a_follower_busy_sending_when_the_run_ends_still_gets_everything(
    manager, store, scripted
):
    model = scripted(["A.\n\n", "B.\n\n", "C", ", the last block."], pause_after=3)
    runs = manager(model, stream_tick=0.0)
    run = runs.start(new_turn(store), "alice")
    await asyncio.wait_for(model.paused.wait(), 5)
    await eventually(lambda: len(text_blocks(run.items)) == 2, "two finished blocks")

    follower = events_of(run.follow(heartbeat=5))
    first = await anext(follower)
    # While this event is on its way to the browser, the reply finishes.
    model.resume.set()
    await run.task
    rest = [e async for e in follower]
    assert rest[-1] == ("end", run.end_state())
    assert blocks_html([first, *rest]) == render("".join(model.chunks))


async def test_a_follower_after_the_end_gets_the_whole_reply_at_once(manager, store, scripted):
    model = scripted(CHUNKS)
    runs = manager(model)
    run = runs.start(new_turn(store), "alice")
    await run.task

    events = await collect(run, heartbeat=5)
    assert [k for k, _ in events][1:] == ["end"]
    assert blocks_html(events) == render(TEXT)
    assert len(model.calls) == 1


async def test_follow_sends_a_heartbeat_while_the_model_is_silent(manager, store, scripted):
    model = scripted(["Thinking"], pause_after=1)
    runs = manager(model, stream_tick=0.0)
    run = runs.start(new_turn(store), "alice")
    await asyncio.wait_for(model.paused.wait(), 5)
    await eventually(lambda: bool(run.tail), "the first text")

    follower = events_of(run.follow(heartbeat=0.01))
    assert (await anext(follower))[0] == "tail"
    assert await anext(follower) == ("ping", None)
    model.resume.set()
    assert [e async for e in follower][-1] == ("end", run.end_state())


async def test_stop_keeps_the_partial_reply_and_saves_it_as_stopped(manager, store, scripted):
    model = scripted(["Partial ", "answer", " never sent"], pause_after=2)
    runs = manager(model, stream_tick=0.0)
    turn = new_turn(store, "Tell me")
    run = runs.start(turn, "alice")
    await asyncio.wait_for(model.paused.wait(), 5)
    follower = asyncio.create_task(collect(run, heartbeat=5))

    assert await runs.stop(turn["id"]) is True
    await asyncio.wait_for(run.task, 5)
    events = await follower

    assert run.status == "stopped"
    assert events[-1] == ("end", run.end_state())
    assert blocks_html(events) == "<p>Partial answer</p>\n"
    row = store.turn(turn["id"], "alice")
    assert row["status"] == "stopped"
    assert row["reply_text"] == "Partial answer"
    assert row["error"] is None
    messages = ModelMessagesTypeAdapter.validate_json(row["messages"])
    assert user_prompts(messages) == ["Tell me"]
    # The next turn's history holds what the user saw.
    assert "".join(reply_texts(messages)) == "Partial answer"
    assert await runs.stop(turn["id"]) is False


async def test_stop_right_after_start_saves_a_stopped_reply(manager, store, scripted):
    model = scripted(["Never ", "seen"])
    runs = manager(model)
    turn = new_turn(store, "Quick")
    run = runs.start(turn, "alice")
    assert await runs.stop(turn["id"]) is True
    await asyncio.wait_for(run.task, 5)
    row = store.turn(turn["id"], "alice")
    assert row["status"] == "stopped"
    assert row["user_text"] == "Quick"
    assert user_prompts(ModelMessagesTypeAdapter.validate_json(row["messages"])) == ["Quick"]


async def test_a_silent_model_is_given_up_on_and_the_partial_reply_kept(manager, store, scripted):
    model = scripted(["Partial", " and never more"], pause_after=1)  # never resumed
    runs = manager(model, stall_timeout=0.05, stream_tick=0.0)
    turn = new_turn(store)
    await asyncio.wait_for(runs.start(turn, "alice").task, 5)
    row = store.turn(turn["id"], "alice")
    assert row["status"] == "failed"
    assert row["reply_text"] == "Partial"
    assert "try again" in row["error"].lower()


async def test_stop_of_an_unknown_turn_is_refused(manager):
    assert await manager(None).stop(12345) is False


async def test_a_failing_model_gives_a_friendly_error_and_keeps_everything(
    manager, store, scripted, caplog
):
    model = scripted(["Half an ", "answer"], error=ModelBroke("Traceback: secret sk-live-123"))
    runs = manager(model, stream_tick=0.0)
    turn = new_turn(store, "Please answer")
    run = runs.start(turn, "alice")
    events = await collect(run, heartbeat=5)
    await run.task

    assert run.status == "failed"
    assert events[-1] == ("end", run.end_state())
    row = store.turn(turn["id"], "alice")
    assert row["status"] == "failed"
    assert row["error"] == run.error
    assert row["error"] and "try again" in row["error"].lower()
    for secret in ("sk-live-123", "Traceback", "ModelBroke", "secret"):
        assert secret not in row["error"]
    assert row["user_text"] == "Please answer"
    assert row["reply_text"] == "Half an answer"
    messages = ModelMessagesTypeAdapter.validate_json(row["messages"])
    assert user_prompts(messages) == ["Please answer"]
    assert len(model.calls) == 1


async def test_an_unknown_model_fails_the_reply_with_a_message(manager, store):
    runs = manager(None)
    turn = store.add_turn(
        store.create_conversation("alice")["id"],
        "hi",
        [ModelRequest(parts=[UserPromptPart(content="hi")])],
        model="nosuchprovider:some-model",
    )
    run = runs.start(turn, "alice")
    await run.task
    row = store.turn(turn["id"], "alice")
    assert row["status"] == "failed"
    assert "nosuchprovider:some-model" in row["error"]
    assert row["user_text"] == "hi"


async def test_updates_are_coalesced(manager, store, scripted):
    chunks = [f"w{i} " for i in range(300)]
    model = scripted(chunks)  # as fast as the event loop allows
    runs = manager(model)
    run = runs.start(new_turn(store), "alice")
    events = await collect(run, heartbeat=5)

    tails = [e for e in events if e[0] == "tail"]
    assert len(tails) < 60, f"{len(tails)} tail updates for 300 chunks"
    assert run.version < 60
    assert blocks_html(events) == render("".join(chunks))


async def test_partial_reply_is_flushed_to_disk_while_streaming(manager, store, scripted):
    model = scripted(["Saved ", "so far", " and more"], pause_after=2)
    runs = manager(model, stream_tick=0.0, flush_every=0.0)
    turn = new_turn(store)
    runs.start(turn, "alice")
    await asyncio.wait_for(model.paused.wait(), 5)
    await eventually(
        lambda: store.turn(turn["id"], "alice")["reply_text"] == "Saved so far", "a flush"
    )
    assert store.turn(turn["id"], "alice")["status"] == "streaming"
    model.resume.set()


async def test_shutdown_saves_the_replies_in_flight(manager, store, scripted):
    model = scripted(["Cut ", "short", " here"], pause_after=2)
    runs = manager(model, stream_tick=0.0)
    turn = new_turn(store)
    run = runs.start(turn, "alice")
    await asyncio.wait_for(model.paused.wait(), 5)

    await runs.shutdown(timeout=5)
    assert runs.accepting is False
    assert run.done
    row = store.turn(turn["id"], "alice")
    assert row["status"] != "streaming"
    assert row["reply_text"] == "Cut short"


async def test_a_reply_cut_off_by_shutdown_is_marked_interrupted(manager, store, scripted):
    model = scripted(["Cut ", "short", " here"], pause_after=2)
    runs = manager(model, stream_tick=0.0)
    turn = new_turn(store)
    runs.start(turn, "alice")
    await asyncio.wait_for(model.paused.wait(), 5)
    await runs.shutdown(timeout=5)
    row = store.turn(turn["id"], "alice")
    # The user did not press Stop: the reply must not say so.
    assert row["status"] == "interrupted"
    assert row["error"]
    assert row["reply_text"] == "Cut short"


async def test_a_reply_with_bare_carriage_returns_completes(manager, store, scripted):
    model = scripted(["one\r\rtwo\r\r", "three"])
    runs = manager(model, stream_tick=0.0)
    turn = new_turn(store)
    await runs.start(turn, "alice").task
    assert store.turn(turn["id"], "alice")["status"] == "complete"


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (ModelHTTPError(401, "m", body={"error": "bad key sk-abc"}), "API key"),
        (ModelHTTPError(403, "m", body="sk-abc"), "API key"),
        (ModelHTTPError(404, "m", body="sk-abc"), "does not offer the model"),
        (ModelHTTPError(429, "m", body="sk-abc"), "rate limiting"),
        (ModelHTTPError(500, "m", body="sk-abc"), "HTTP 500"),
        (ModelAPIError("m", "connection reset sk-abc"), "could not be reached"),
        (RuntimeError("sk-abc"), "Something went wrong"),
    ],
)
def test_describe_error_is_friendly_and_leaks_nothing(exc, expected):
    message = describe_error(exc)
    assert expected in message
    assert "sk-abc" not in message
    assert "Traceback" not in message


def test_describe_error_for_a_usage_limit():
    message = describe_error(UsageLimitExceeded("The next request would exceed 10 tokens"))
    assert "usage limit" in message


async def test_titles_wait_while_the_server_is_busy_with_replies(store, settings, monkeypatch):
    from pydantic_ai.models.function import FunctionModel

    import chat.runs
    from chat.agent import INSTRUCTIONS, short_title

    release, title_calls = asyncio.Event(), []

    async def stream(messages, info):
        if INSTRUCTIONS not in (info.instructions or ""):  # the agent that writes titles
            title_calls.append(messages)
            yield "A model title"
            return
        if user_prompts(messages)[-1].startswith("hold"):
            await release.wait()
        yield "Hello"

    monkeypatch.setattr(chat.runs, "_SHARED_TICK", 1)  # "busy" = more than one reply at once
    m = RunManager(store, build_agent(), settings, model=FunctionModel(stream_function=stream))
    try:
        m.start(new_turn(store, "hold 1"), "alice")
        m.start(new_turn(store, "hold 2"), "alice")
        first = new_turn(store, "Hi there")
        store.set_title(first["conversation_id"], short_title("Hi there"))  # as /send does
        m.start(first, "alice")
        await eventually(lambda: first["id"] not in m.runs, "the short reply to finish")
        await asyncio.sleep(1.2)  # more than two of the title's checks
        assert title_calls == []  # two replies still streaming: the title waits

        release.set()
        await eventually(lambda: len(title_calls) >= 1, "a title request")
        await m.titles.wait(first["conversation_id"])
        assert store.conversation(first["conversation_id"], "alice")["title"] == "A model title"
    finally:
        release.set()
        await m.shutdown(timeout=5)
        others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        if others:
            await asyncio.wait(others, timeout=5)


async def test_a_follower_still_ends_when_the_last_publish_fails(
    manager, store, scripted, monkeypatch
):
    """Waking the followers at the end can fail (a bug, the Redis mirror): a follower attached
    while the reply ran still gets an end, with the reply's status, instead of pings forever."""
    from chat.runs import Run

    real = Run.publish

    def failing_at_end(self: Run) -> None:
        if self.done:
            raise RuntimeError("injected")
        real(self)

    monkeypatch.setattr(Run, "publish", failing_at_end)
    model = scripted(["Para one.\n\n", "Para two."], pause_after=1)
    run = manager(model, stream_tick=0.0).start(new_turn(store), "alice")
    await asyncio.wait_for(model.paused.wait(), 5)
    follower = asyncio.create_task(collect(run, heartbeat=0.05))
    await asyncio.sleep(0.05)  # attached before the end
    model.resume.set()
    events = await asyncio.wait_for(follower, 5)
    assert events[-1] == ("end", run.end_state()) and run.status == "complete"


async def test_a_title_is_one_plain_request_and_a_model_that_never_stops_is_cut_off():
    from pydantic_ai.models.function import FunctionModel

    from chat.agent import TITLE_INSTRUCTIONS, make_title

    seen, sent = [], 0

    async def endless(messages, info):
        nonlocal sent
        seen.append(info)
        yield "Streaming replies "
        while True:  # a hostile or broken endpoint: the title never ends
            sent += 1
            yield "and more "
            await asyncio.sleep(0)

    title = await asyncio.wait_for(
        make_title(FunctionModel(stream_function=endless), "How does streaming work?", "It..."),
        timeout=10,
    )
    assert title.startswith("Streaming replies and more") and len(title) <= 81
    assert sent < 200  # read until a title's worth, then the stream is closed
    # The title request carries the title instructions and nothing of the chat agent's.
    assert len(seen) == 1 and seen[0].instructions == TITLE_INSTRUCTIONS
    assert seen[0].function_tools == []


# The reply's database writes wait in threads (tests/test_loop_free.py: the loop stays free) --


async def test_partial_saves_come_one_at_a_time_and_never_after_the_final_one(
    manager, store, scripted, monkeypatch
):
    """A slow database (a lock, a round trip) makes partial saves take longer than the text
    takes to come: they never pile up in threads, the last words still reach the disk, and no
    partial save starts once the final one has."""
    import threading
    import time

    calls: list[str] = []
    busy = threading.Lock()
    overlapped = []
    real_partial, real_finish = store.save_partial, store.finish_turn

    def slow_partial(*args, **kwargs):
        if not busy.acquire(blocking=False):
            overlapped.append(True)
            return
        try:
            calls.append("partial")
            time.sleep(0.1)  # in its thread: the reply streams on meanwhile
            real_partial(*args, **kwargs)
        finally:
            busy.release()

    def finish(*args, **kwargs):
        calls.append("final")
        real_finish(*args, **kwargs)

    monkeypatch.setattr(store, "save_partial", slow_partial)
    monkeypatch.setattr(store, "finish_turn", finish)
    words = [f"w{i} " for i in range(40)]
    whole = "".join(words).strip()
    model = scripted(words, delay=0.01, pause_after=len(words))
    run = manager(model, stream_tick=0.0, flush_every=0.0).start(new_turn(store), "alice")
    # Words that came while a save was under way are saved by the next one, model quiet or not.
    saved = lambda: store.turn(run.turn_id, "alice")["reply_text"].strip()  # noqa: E731
    await eventually(lambda: saved() == whole, "the last words on disk")
    assert "final" not in calls
    model.resume.set()
    await asyncio.wait_for(run.task, 10)
    assert not overlapped, "two partial saves of one reply ran at once"
    assert 2 <= calls.count("partial") < len(words)  # chained, not one thread per update
    assert calls[-1] == "final" and calls.count("final") == 1
    row = store.turn(run.turn_id, "alice")
    assert (row["status"], row["reply_text"].strip()) == ("complete", whole)


async def test_a_final_save_cut_off_by_shutdown_is_still_saved(manager, store, scripted):
    """Shutdown cancels a reply whose final save is waiting for the database: the reply
    leaves `runs`, is kept as pending until the save lands, and shutdown waits for that save
    (or tries once more) before the store is closed."""
    import threading

    entered, gate = threading.Event(), threading.Event()
    real = store.finish_turn

    def stuck_once(*args, **kwargs):
        if not entered.is_set():
            entered.set()
            gate.wait(1)  # the database makes this first save wait, past shutdown's patience
        real(*args, **kwargs)

    store.finish_turn = stuck_once
    try:
        model = scripted(["Whole ", "reply."])
        runs = manager(model, stream_tick=0.0)
        run = runs.start(new_turn(store), "alice")
        await eventually(entered.is_set, "the final save")
        assert run.turn_id in runs.runs  # saved before the run leaves `runs`
        await runs.shutdown(timeout=0.2)
        assert not runs.runs and run.done and run.status == "complete"
        assert not runs.unsaved and run.pending is None
        row = store.turn(run.turn_id, "alice")
        assert (row["status"], row["reply_text"]) == ("complete", "Whole reply.")
    finally:
        gate.set()
        del store.finish_turn
