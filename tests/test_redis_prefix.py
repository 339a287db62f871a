"""REDIS_PREFIX: deployments sharing one Redis database stay apart; one deployment's processes
(the same prefix) share everything.

Two deployments have their own databases, so their turn ids collide (both have a turn 1): with
one namespace, one's Stop of "turn 1" would end the other's reply, one's new reply would clear
the other's run log, and they would count each other's replies and messages.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from chat.agent import build_agent
from chat.cluster import Cluster
from chat.config import Settings
from chat.redis_limits import RedisLimiter
from chat.redislog import follow_redis
from chat.runs import RunManager
from chat.store import ChatStore
from tests.redis_server import redis_client_fixture, redis_server_fixture  # noqa: F401  (used by name)
from tests.test_runs import eventually, new_turn

pytestmark = pytest.mark.slow


@pytest.fixture
async def deployments(redis, settings, tmp_path: Path):
    """Factory: two RunManagers, each on its own database, with the given key prefixes."""
    made: list[tuple[RunManager, ChatStore]] = []

    def make(model, prefixes: tuple[str, str]) -> list[tuple[RunManager, ChatStore]]:
        for i, prefix in enumerate(prefixes):
            store = ChatStore(tmp_path / f"deployment-{i}.db")
            s = Settings(**{**settings.__dict__, "stream_tick": 0.0})
            cluster = Cluster(redis, lease_seconds=5, lease_refresh=0.2, prefix=prefix)
            manager = RunManager(store, build_agent(), s, model=model.model, cluster=cluster)
            manager.share()
            made.append((manager, store))
        return made

    yield make
    for manager, store in made:
        await manager.shutdown(timeout=5)
        store.close()


@pytest.mark.parametrize("prefixes", [("one:", "two:"), ("chat:", "chat:")])
async def test_replies_logs_and_stop_are_shared_only_under_one_prefix(
    deployments, scripted, redis, prefixes
):
    apart = prefixes[0] != prefixes[1]
    model = scripted(["First words.\n\n", "more", " and the end."], pause_after=1)
    (a, store_a), (b, store_b) = deployments(model, prefixes)
    turn_a = new_turn(store_a, "Question on A")
    assert turn_a["id"] == new_turn(store_b, "Question on B")["id"] == 1  # ids collide
    run = a.start(turn_a, "alice")
    await asyncio.wait_for(model.paused.wait(), 5)
    await eventually(lambda: not a._shared, "A's lease taken")

    # Counts: B sees A's reply only as one deployment.
    assert await b.total_running() == (0 if apart else 1)
    assert await b.running("alice") == (0 if apart else 1)
    # The run log: A's entries are under A's prefix, readable there whatever B does.
    follower = follow_redis(redis, 1, heartbeat=5, prefix=prefixes[0])
    first = await asyncio.wait_for(anext(follower), 5)
    assert "First words." in "".join(i.html for i in first.items) + (first.tail or "")

    # B's Stop of its own "turn 1" (not running there) reaches A only under one prefix.
    assert await b.stop(1) is True
    if apart:
        await asyncio.sleep(0.6)  # Stop's channel and the stop key checked at renewal, twice
        assert not run.done
        model.resume.set()
        await asyncio.wait_for(run.task, 5)
        assert store_a.turn(1, "alice")["status"] == "complete"
        assert store_a.turn(1, "alice")["reply_text"] == "First words.\n\nmore and the end."
    else:
        await asyncio.wait_for(run.task, 5)
        assert store_a.turn(1, "alice")["status"] == "stopped"
    await follower.aclose()


@pytest.mark.parametrize("prefixes", [("one:", "two:"), ("chat:", "chat:")])
async def test_limits_are_counted_per_prefix(redis_server, redis, prefixes):
    from redis.asyncio import Redis

    limiters = [
        RedisLimiter(
            Redis.from_url(redis_server),
            prefix=prefix,
            per_minute=1,
            concurrent_runs=3,
            open_streams=1,
            address_per_minute=None,
        )
        for prefix in prefixes
    ]
    for limiter in limiters:
        await limiter.start()
    try:
        one, two = limiters
        check = dict(running=0, total_running=0)
        assert await one.check_send("visitor", "198.51.100.7", **check) is None
        assert await one.open_stream("visitor")
        second = await two.check_send("visitor", "198.51.100.7", **check)
        if prefixes[0] != prefixes[1]:
            assert second is None and await two.open_stream("visitor")
        else:
            assert second.status == 429 and not await two.open_stream("visitor")
    finally:
        for limiter in limiters:
            await limiter.close()


async def test_every_key_the_app_writes_carries_the_prefix(
    deployments, scripted, redis, redis_server
):
    from redis.asyncio import Redis

    model = scripted(["Some words.\n\n", "and more."])
    [(a, store)] = deployments(model, ("tenant-a:",))[:1]
    run = a.start(new_turn(store), "alice")
    await asyncio.wait_for(run.task, 5)
    await a.stop(99)  # a Stop for a reply running nowhere: its key is written all the same
    limiter = RedisLimiter(
        Redis.from_url(redis_server),
        prefix="tenant-a:",
        per_minute=5,
        concurrent_runs=3,
        open_streams=2,
    )
    await limiter.start()
    await limiter.check_send("v", "198.51.100.7", running=0, total_running=0)
    await limiter.open_stream("v")
    keys = [k.decode() for k in await redis.keys("*")]
    assert keys and all(k.startswith("tenant-a:") for k in keys), keys
    await limiter.close()


def test_the_prefix_setting_defaults_to_chat():
    assert Settings.from_env({}, secret_key="k").redis_prefix == "chat:"
    assert Settings.from_env({"REDIS_PREFIX": "staging:"}, secret_key="k").redis_prefix == (
        "staging:"
    )
