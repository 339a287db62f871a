"""The run log: entries a stream replays and follows, in memory and in a real Redis; the leases
and Stop channel of chat/cluster.py; two RunManagers (two processes) sharing one Redis."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from chat.agent import build_agent
from chat.cluster import Cluster
from chat.config import Settings
from chat.logreader import LogReader
from chat.markdown import render
from chat.redislog import ENDED_TTL, LogWriter, RedisLog, append_end, follow_redis, log_key
from chat.reply import ToolView
from chat.runlog import Block, End, Entry, MemoryLog, ToolUpdate, batches, merge
from chat.runs import RunManager
from chat.stores import open_store
from tests.redis_server import redis_client_fixture, redis_server_fixture  # noqa: F401  (used by name)
from tests.test_runs import eventually, new_turn


async def take(follower: AsyncIterator[Entry | None]) -> list[Entry]:
    """A follower's entries (pings left out) up to its end."""
    out = []
    async for entry in follower:
        if entry is not None:
            out.append(entry)
    return out


def html_of(entries: list[Entry]) -> str:
    return "".join(i.html for e in entries for i in e.items if isinstance(i, Block))


def fill(log, mirror=None) -> None:
    """A small reply: two blocks, a tool call and its result, a tail, an end."""
    tool = ToolView(id="c1", name="lookup", args='{"q": 1}')
    steps = [
        ([Block("<p>One</p>")], "<p>Tw</p>", "One\n\nTw", None),
        ([Block("<p>Two</p>"), tool], "", "o", None),
        ([ToolUpdate(ToolView("c1", "lookup", '{"q": 1}', "42", "success"))], None, "", None),
        ([Block("<p>Three</p>")], "", "\n\nThree", End("complete", model="m", copy=True)),
    ]
    for items, tail, text, end in steps:
        entry = log.append(items, tail, text, end)
        if mirror is not None:
            mirror(entry)


# In memory ---------------------------------------------------------------------------------


async def test_memory_log_replays_everything_then_ends():
    log = MemoryLog()
    fill(log)
    # Merged as far as order allows: the text after the tool call is an entry of its own.
    before, after = await take(log.follow(heartbeat=5))
    assert (before.seq, before.end, before.text) == (3, None, "One\n\nTwo")
    assert [type(i).__name__ for i in before.items] == ["Block", "Block", "ToolView", "ToolUpdate"]
    assert after.seq == 4 and after.end == End("complete", model="m", copy=True)
    assert html_of([before, after]) == "<p>One</p><p>Two</p><p>Three</p>"
    # The source, for front ends without HTML, in the order it was written.
    assert before.text + after.text == "One\n\nTwo\n\nThree"


async def test_memory_log_resumes_after_an_entry_number():
    log = MemoryLog()
    fill(log)
    entries = await take(log.follow(after=2, heartbeat=5))
    assert html_of(entries) == "<p>Three</p>" and "".join(e.text for e in entries) == "\n\nThree"
    assert entries[-1].seq == 4


def test_batches_never_put_text_before_the_tool_call_it_followed():
    tool = ToolView("c1", "lookup", '{"q": 1}')
    entries = [
        Entry(1, [Block("a")], None, "a"),
        Entry(2, [tool], None, ""),
        Entry(3, [], "<p>b</p>", "b"),
        Entry(4, [Block("b")], "", "", End("complete")),
    ]
    first, second = batches(entries, seq=4)
    assert (first.seq, first.text, first.items) == (2, "a", [Block("a"), tool])
    assert (second.seq, second.text, second.tail) == (4, "b", "")
    assert second.end == End("complete")
    assert batches([]) == [Entry(0)]


async def test_memory_log_follows_live_merging_what_a_slow_follower_missed():
    log = MemoryLog()
    follower = log.follow(heartbeat=0.01)
    assert await anext(follower) is not None  # the (empty) current tail: a joiner gets it once
    assert await anext(follower) is None  # silence: a heartbeat
    log.append([Block("<p>a</p>")], "<p>b</p>", "a\n\nb", None)
    log.append([], "<p>bc</p>", "c", None)  # both land before the follower reads again
    got = await anext(follower)
    assert (html_of([got]), got.tail, got.text, got.seq) == ("<p>a</p>", "<p>bc</p>", "a\n\nbc", 2)
    log.append([Block("<p>bc</p>")], "", "", End("stopped"))
    rest = await take(follower)
    assert rest[-1].end == End("stopped") and rest[-1].seq == 3


def test_merge_keeps_order_and_the_newest_tail():
    a = Entry(1, [Block("1")], "t1", "x")
    b = Entry(2, [Block("2")], None, "y")
    merged = merge([a, b])
    assert (merged.seq, html_of([merged]), merged.tail, merged.text) == (2, "12", "t1", "xy")
    assert merged is not a and a.items == [Block("1")]  # the log's own entries are untouched


# In Redis ----------------------------------------------------------------------------------

needs_redis = pytest.mark.slow


@needs_redis
async def test_redis_log_holds_the_same_entries_under_the_same_numbers(redis):
    log, mirror = MemoryLog(), RedisLog(redis, 7)
    fill(log, mirror)
    await mirror.flushed()
    from_memory = await take(log.follow(heartbeat=5))
    from_redis = await take(follow_redis(redis, 7, heartbeat=5))
    assert html_of(from_redis) == html_of(from_memory)
    assert "".join(e.text for e in from_redis) == "".join(e.text for e in from_memory)
    assert from_redis[-1].end == from_memory[-1].end and from_redis[-1].seq == 4
    tools = [i for e in from_redis for i in e.items if isinstance(i, ToolUpdate)]
    assert tools[0].tool.result == "42"
    # Numbered as in memory (ids 0-<n>), and kept only a while after the end.
    ids = [entry_id for entry_id, _ in await redis.xrange(log_key(7))]
    assert ids[-1] == b"0-4"
    assert 0 < await redis.ttl(log_key(7)) <= ENDED_TTL


@needs_redis
async def test_redis_log_resumes_after_an_entry_number_with_the_newest_tail(redis):
    log, mirror = MemoryLog(), RedisLog(redis, 8)
    log.append([Block("<p>A</p>")], "<p>B</p>", "A\n\nB", None)
    mirror(log.entries[-1])
    await mirror.flushed()
    log.append([], "<p>B2</p>", "2", None)
    mirror(log.entries[-1])
    await mirror.flushed()
    follower = follow_redis(redis, 8, after=1, heartbeat=0.05)
    first = await anext(follower)
    assert first.items == [] and first.tail == "<p>B2</p>" and first.text == "2"
    assert await anext(follower) is None  # nothing new yet: a heartbeat
    log.append([Block("<p>B2</p>")], "", "", End("complete"))
    mirror(log.entries[-1])
    rest = await take(follower)
    assert html_of(rest) == "<p>B2</p>" and rest[-1].end.status == "complete"


@needs_redis
async def test_a_redis_follower_waits_for_a_log_not_written_yet(redis):
    follower = asyncio.ensure_future(take(follow_redis(redis, 9, heartbeat=5)))
    await asyncio.sleep(0.05)
    await append_end(redis, 9, End("interrupted", "cut off"))
    [entry] = await asyncio.wait_for(follower, 5)
    assert entry.end == End("interrupted", "cut off") and entry.tail == ""


@needs_redis
async def test_entries_gathered_while_writing_go_out_together_each_under_its_number(redis):
    log, mirror = MemoryLog(), RedisLog(redis, 10)
    for i in range(200):  # all before the writer's first round trip
        mirror(log.append([Block(f"<p>{i}</p>")], f"<p>tail {i}</p>", f"{i} ", None))
    await mirror.flushed()
    rows = await redis.xrange(log_key(10))
    assert [r[0] for r in rows] == [f"0-{i}".encode() for i in range(1, 201)]
    assert sum(b"t" in fields for _, fields in rows) == 1  # only the newest tail was written
    mirror(log.append([], "", "", End("complete")))
    # Resuming after any entry this process numbered repeats nothing, on any process.
    entries = await take(follow_redis(redis, 10, after=150, heartbeat=5))
    assert html_of(entries) == "".join(f"<p>{i}</p>" for i in range(150, 200))


@needs_redis
async def test_a_follower_outwaits_the_client_s_socket_timeout(redis_server, redis):
    from redis.asyncio import Redis

    # A reply silent for longer than the client's socket timeout (a model slow to start) is
    # still followed: heartbeats meanwhile, then its entries.
    client = Redis.from_url(redis_server, socket_timeout=1.0)
    try:
        follower = follow_redis(client, 11, heartbeat=2.5)
        assert await asyncio.wait_for(anext(follower), 10) is None
        log, mirror = MemoryLog(), RedisLog(redis, 11)
        mirror(log.append([Block("<p>late</p>")], "", "late", End("complete")))
        entries = await asyncio.wait_for(take(follower), 5)
        assert html_of(entries) == "<p>late</p>" and entries[-1].end.status == "complete"
    finally:
        await client.aclose()


@needs_redis
async def test_one_process_s_replies_share_their_round_trips_to_redis(redis):
    writer = LogWriter(redis)
    trips = 0
    pipeline = redis.pipeline

    def counted(*args, **kw):
        nonlocal trips
        trips += 1
        return pipeline(*args, **kw)

    redis.pipeline = counted
    logs = [(MemoryLog(), RedisLog(redis, 100 + n, writer=writer)) for n in range(50)]
    for n, (log, mirror) in enumerate(logs):  # 50 replies each update once, within one tick
        mirror(log.append([Block(f"<p>{n}</p>")], "", f"{n}", None))
    for _, mirror in logs:
        await mirror.flushed()
    assert trips == 1
    for log, mirror in logs:  # then each ends: in one trip or a few, not 50
        mirror(log.append([], "", "", End("complete")))
    for _, mirror in logs:
        await mirror.flushed()
    assert trips <= 3
    for n in range(50):
        entries = await take(follow_redis(redis, 100 + n, heartbeat=5))
        assert html_of(entries) == f"<p>{n}</p>" and entries[-1].end.status == "complete"


@needs_redis
async def test_followers_on_one_process_share_one_read(redis):
    reader = LogReader(redis)
    reads = 0
    xread = redis.xread

    async def counted(*args, **kw):
        nonlocal reads
        reads += 1
        return await xread(*args, **kw)

    redis.xread = counted
    writer = LogWriter(redis)
    logs = [(MemoryLog(), RedisLog(redis, 200 + n, writer=writer)) for n in range(10)]
    for log, mirror in logs:  # a first entry each, then followers join at 0 and at 1
        mirror(log.append([Block("<p>one</p>")], "", "one", None))
    for _, mirror in logs:
        await mirror.flushed()
    followers = [
        asyncio.ensure_future(take(follow_redis(redis, 200 + n, after, 5, reader=reader)))
        for n in range(10)
        for after in (0, 1)
    ]
    await asyncio.sleep(0.2)  # all of them waiting on the reader
    reads = 0
    for log, mirror in logs:
        mirror(log.append([Block("<p>two</p>")], "", "two", None))
        mirror(log.append([], "", "", End("complete")))
    done = await asyncio.wait_for(asyncio.gather(*followers), 5)
    for n, entries in enumerate(done):
        expected = "<p>one</p><p>two</p>" if n % 2 == 0 else "<p>two</p>"
        assert html_of(entries) == expected and entries[-1].end.status == "complete"
    assert reads < 10  # 20 followers of 10 logs: a few reads in all, not one per follower


@needs_redis
async def test_leases_count_for_every_process_and_lapse_when_not_renewed(redis):
    a = Cluster(redis, lease_seconds=0.3, lease_refresh=0.1)
    b = Cluster(redis, lease_seconds=0.3, lease_refresh=0.1)
    await a.register(1, "conv", "alice")
    await a.register(2, "other", "alice")
    assert await b.streaming_in("conv") and not await b.streaming_in("nothing")
    assert await b.running("alice") == 2 and await b.running("bob") == 0
    assert await b.total() == 2
    await a.release(2, "other", "alice")
    assert await b.running("alice") == 1 and not await b.streaming_in("other")
    for _ in range(4):  # renewed: it stays
        await asyncio.sleep(0.1)
        await a.renew([(1, "conv", "alice")])
    assert await b.running("alice") == 1 and await b.lapsed() == []
    await asyncio.sleep(0.4)  # not renewed: it lapses, and exactly one process claims it
    assert await b.running("alice") == 0 and not await b.streaming_in("conv")
    assert await b.unleased([1, 3]) == [1, 3]
    assert await b.lapsed() == [(1, {"cid": "conv", "owner": "alice", "worker": a.worker})]
    assert await a.lapsed() == []


@needs_redis
async def test_stop_reaches_the_process_holding_the_reply(redis):
    a = Cluster(redis, lease_seconds=5, lease_refresh=1)
    b = Cluster(redis, lease_seconds=5, lease_refresh=1)
    stops = a.stops()
    listening = asyncio.ensure_future(anext(stops))
    await asyncio.sleep(0.1)  # subscribed by then
    await b.request_stop(42)
    assert await asyncio.wait_for(listening, 5) == 42
    await stops.aclose()
    # A Stop published while nobody listened is found at the next renewal.
    await a.register(43, "c", "alice")
    await b.request_stop(43)
    assert await a.renew([(43, "c", "alice")]) == {43}


# Two RunManagers on one store and one Redis: two processes in one test ----------------------


@pytest.fixture
async def pair(redis, settings, scripted):
    """Factory: two RunManagers sharing a store and a Redis, each with its own Cluster."""
    store = open_store(settings)
    made: list[RunManager] = []

    def make(model, **overrides) -> tuple[RunManager, RunManager]:
        s = Settings(**{**settings.__dict__, **overrides})
        for _ in range(2):
            cluster = Cluster(redis, lease_seconds=s.lease_seconds, lease_refresh=s.lease_refresh)
            m = RunManager(store, build_agent(), s, model=model.model, cluster=cluster)
            m.share()
            made.append(m)
        return made[-2], made[-1]

    yield store, make
    for m in made:
        await m.shutdown(timeout=5)
    store.close()


@needs_redis
async def test_a_reply_on_one_process_streams_and_stops_from_the_other(pair, scripted):
    store, make = pair
    model = scripted(["Para one.\n\n", "Para two", " goes on.\n\n", "never"], pause_after=2)
    a, b = make(model, stream_tick=0.0)
    turn = new_turn(store)
    run = a.start(turn, "alice")
    await asyncio.wait_for(model.paused.wait(), 5)
    await eventually(lambda: "Para two" in run.tail, "the tail")
    assert b.get(turn["id"]) is None  # not this process's run ...
    assert await b.streaming_in(turn["conversation_id"])  # ... but it counts here
    assert await b.running("alice") == 1 and await b.total_running() == 1
    row = store.turn(turn["id"], "alice")
    follower = b.follow(row, heartbeat=5)
    seen: list[Entry] = []
    while not seen or seen[-1].tail != "<p>Para two</p>\n":  # live, while the model is paused
        seen.append(await asyncio.wait_for(anext(follower), 5))
    assert html_of(seen) == "<p>Para one.</p>\n" and seen[-1].end is None

    assert await b.stop(turn["id"]) is True  # published; A cancels its token
    await asyncio.wait_for(run.task, 5)
    rest = await asyncio.wait_for(take(follower), 5)
    assert rest[-1].end.status == "stopped"
    assert render("Para one.\n\nPara two") == html_of([*seen, *rest])
    assert store.turn(turn["id"], "alice")["status"] == "stopped"
    await eventually(lambda: not a._shared, "the lease given back")
    assert await b.running("alice") == 0 and len(model.calls) == 1


@needs_redis
async def test_a_starting_process_ends_only_replies_no_live_process_holds(pair, scripted):
    store, make = pair
    a, b = make(scripted(["never"]), lease_seconds=0.3, lease_refresh=0.1)
    held, orphan = new_turn(store, "held"), new_turn(store, "orphan")
    lease = (held["id"], held["conversation_id"], "alice")
    await a.cluster.register(*lease)
    for _ in range(4):  # both older than a lease by then; only `held` has a live one
        await asyncio.sleep(0.1)
        await a.cluster.renew([lease])
    follower = asyncio.ensure_future(take(follow_redis(b.cluster.redis, orphan["id"])))

    assert await b.recover() == 1
    assert store.turn(held["id"], "alice")["status"] == "streaming"
    assert store.turn(orphan["id"], "alice")["status"] == "interrupted"
    # A stream following the orphan elsewhere sees it end.
    assert (await asyncio.wait_for(follower, 5))[-1].end.status == "interrupted"


@needs_redis
async def test_a_dead_process_s_reply_is_ended_by_another_once_its_lease_lapses(pair, scripted):
    store, make = pair
    a, b = make(scripted(["never"]), lease_seconds=0.3, lease_refresh=0.1)
    turn = new_turn(store, "cut off")
    store.save_partial(turn["id"], "Partial text")
    # A process took the lease, then died: nobody renews it.
    dead = Cluster(b.cluster.redis, lease_seconds=0.3, lease_refresh=0.1)
    await dead.register(turn["id"], turn["conversation_id"], "alice")
    follower = asyncio.ensure_future(take(follow_redis(b.cluster.redis, turn["id"])))

    ended = await asyncio.wait_for(follower, 5)
    assert ended[-1].end.status == "interrupted" and ended[-1].end.copy
    row = store.turn(turn["id"], "alice")
    assert (row["status"], row["reply_text"]) == ("interrupted", "Partial text")
    assert await a.running("alice") == 0
