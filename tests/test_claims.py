"""One reply at a time per conversation, over every process (REDIS_URL): the claim in Redis.

A send claims its conversation in Redis (SET NX) before its message is committed; the reply's
lease takes the claim over in the transaction that takes the lease; a send that stops short
(refused by the limits, a failed commit) gives it back. The two-process race itself is in
tests/test_scale.py.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from chat.agent import build_agent
from chat.cluster import Cluster
from chat.config import Settings
from chat.runs import RunManager
from chat.store import ChatStore
from tests.redis_server import redis_client_fixture, redis_server_fixture  # noqa: F401  (used by name)
from tests.test_limits import HX, finish
from tests.test_runs import eventually, new_turn

pytestmark = pytest.mark.slow


@pytest.fixture
async def two(redis, settings, scripted):
    """Two RunManagers (two processes) on one store and one Redis, replies held mid-way."""
    store = ChatStore(settings.db_path)
    model = scripted(["Some words.\n\n", "the rest."], pause_after=1)
    made = []
    for _ in range(2):
        s = Settings(**{**settings.__dict__, "stream_tick": 0.0})
        cluster = Cluster(redis, lease_seconds=5, lease_refresh=1)
        made.append(RunManager(store, build_agent(), s, model=model.model, cluster=cluster))
    yield store, model, made
    model.resume.set()
    for m in made:
        await m.shutdown(timeout=5)
    store.close()


async def test_a_claim_is_held_by_one_process_then_by_the_reply_s_lease(two, redis):
    store, model, (a, b) = two
    turn = new_turn(store)
    cid = turn["conversation_id"]
    assert await a.claim(cid)
    assert not await b.claim(cid) and not await a.claim(cid)
    await a.unclaim(cid)  # the send stopped short: the next one may go
    assert await b.claim(cid)
    run = b.start(turn, "alice")  # the reply takes the claim over
    await asyncio.wait_for(model.paused.wait(), 5)
    await eventually(lambda: not b._shared, "the lease taken")
    assert await redis.keys("chat:claim:*") == []  # the lease holds the conversation now
    assert not await a.claim(cid)
    assert await redis.keys("chat:claim:*") == []  # a refused claim leaves nothing behind
    await b.unclaim(cid)  # taken over: nothing to give back
    model.resume.set()
    await asyncio.wait_for(run.task, 5)
    await eventually(lambda: not b._shared, "the lease given back")
    assert await a.claim(cid)


async def test_a_claim_only_its_taker_gives_back(redis):
    a, b = Cluster(redis, lease_seconds=0.2), Cluster(redis, lease_seconds=5)
    first = await a.claim("conv")
    await asyncio.sleep(0.3)  # lapsed (its process died, say) ...
    second = await b.claim("conv")  # ... so another send may claim it
    assert first and second
    await a.unclaim("conv", first)  # the first taker's late give-back is a no-op
    assert await a.claim("conv") is None


def test_a_send_refused_by_the_limits_gives_its_claim_back(
    make_client, scripted, redis_server, redis
):
    import redis as sync_redis

    client = make_client(scripted(["ok"]), redis_url=redis_server, messages_per_minute=1)
    sent = client.post("/send", data={"msg": "first"}, headers=HX)
    finish(client, sent)
    cid = sent.headers["HX-Push-Url"].rsplit("/", 1)[1]
    keys = sync_redis.Redis.from_url(redis_server)
    try:
        for _ in range(200):  # the first reply's lease is given back just after its stream
            if not keys.zcard("chat:leases"):
                break
            time.sleep(0.01)
        refused = client.post("/send", data={"msg": "second", "cid": cid}, headers=HX)
        assert refused.status_code == 429
        assert keys.keys("chat:claim:*") == []
    finally:
        keys.close()


def test_health_says_whose_replies_it_counts(make_client, scripted, redis_server, redis):
    alone = make_client(scripted(["ok"])).get("/health").json()
    assert alone["runs"] == 0 and "runs_everywhere" not in alone
    shared = make_client(scripted(["ok"]), redis_url=redis_server).get("/health").json()
    assert shared["runs"] == 0 and shared["runs_everywhere"] == 0


def test_with_redis_gone_a_send_into_a_conversation_is_refused_clearly(
    make_client, scripted, tmp_path
):
    from tests.redis_server import start_redis

    server = start_redis(tmp_path / "redis")
    try:
        client = make_client(scripted(["ok"]), redis_url=server.url)
        sent = client.post("/send", data={"msg": "first"}, headers=HX)
        finish(client, sent)
        cid = sent.headers["HX-Push-Url"].rsplit("/", 1)[1]
        server.stop()  # Redis goes away: the conversation cannot be claimed
        refused = client.post("/send", data={"msg": "second", "cid": cid}, headers=HX)
        assert refused.status_code == 503 and "not taking messages" in refused.text
    finally:
        server.stop()
