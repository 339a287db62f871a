"""Limits that hold without a cookie: per client address (X-Forwarded-For only from trusted
proxies), a server-wide cap on replies at once, and limiter memory that follows traffic."""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
import redis
from redis.asyncio import Redis as AsyncRedis
from starlette.testclient import TestClient

from chat.config import Settings
from chat.limits import Limiter, client_address, parse_proxies
from chat.redis_limits import RedisLimiter
from tests.conftest import parse_sse
from tests.redis_server import start_redis

HX = {"HX-Request": "true"}


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def limiter(clock: Clock | None = None, **kw) -> Limiter:
    args = dict(per_minute=100, concurrent_runs=3, open_streams=12, address_per_minute=None)
    return Limiter(**{**args, **kw}, clock=clock or Clock())


def now(coro):
    """The value of a coroutine that never waits (every memory Limiter method), run at once."""
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value
    raise AssertionError("the in-memory limiter waited on something")


def send(limits: Limiter, who: str, addr: str = "198.51.100.7", running: int = 0):
    return now(limits.check_send(who, addr, running=running, total_running=running))


def browser(client: TestClient, addr: str = "testclient") -> TestClient:
    """A new browser on the same running app: no cookie, so a new anonymous identity."""
    other = TestClient(client.app, client=(addr, 50000))
    other.portal = client.portal
    return other


def finish(client: TestClient, response) -> None:
    url = re.search(r'sse-connect="([^"]+)"', response.text).group(1)
    with client.stream("GET", url) as s:
        assert parse_sse(b"".join(s.iter_bytes()).decode())[-1].data == "complete"


# Per address --------------------------------------------------------------------------------


def test_fresh_identities_from_one_address_share_its_limit():
    limits = limiter(per_minute=5, address_per_minute=3)
    assert [send(limits, f"new-{i}") for i in range(3)] == [None, None, None]
    refused = send(limits, "new-3")
    assert refused.status == 429 and "network address" in refused.message
    assert refused.retry_after and 0 < refused.retry_after <= 61
    assert send(limits, "new-4", addr="203.0.113.9") is None  # another address is not affected


def test_a_browser_that_drops_its_cookie_is_still_limited(make_client, scripted):
    client = make_client(scripted(["ok"]), messages_per_minute=20, address_messages_per_minute=2)
    for i in range(2):
        b = browser(client)
        finish(b, b.post("/send", data={"msg": f"hi {i}"}, headers=HX))
    refused = browser(client).post("/send", data={"msg": "again"}, headers=HX)
    assert refused.status_code == 429 and "network address" in refused.text
    api = browser(client).post("/api/chat", json=_chat("again"))
    assert api.status_code == 429 and "network address" in api.json()["error"]
    assert int(api.headers["Retry-After"]) > 0


def _chat(text: str) -> dict:
    parts = [{"type": "text", "text": text}]
    return {
        "trigger": "submit-message",
        "id": "c",
        "messages": [{"id": "m", "role": "user", "parts": parts}],
    }


@pytest.mark.parametrize(
    ("peer", "forwarded", "proxies", "expected"),
    [
        # No trusted proxies: the header is the client's to write, so it is ignored.
        ("198.51.100.7", "1.2.3.4", "", "198.51.100.7"),
        # A peer that is not a trusted proxy cannot speak for anyone else either.
        ("198.51.100.7", "1.2.3.4", "10.0.0.0/8", "198.51.100.7"),
        # From a trusted proxy: the nearest hop that is not one of ours.
        ("10.0.0.2", "1.2.3.4", "10.0.0.0/8", "1.2.3.4"),
        ("10.0.0.2", "6.6.6.6, 1.2.3.4, 10.0.0.9", "10.0.0.0/8", "1.2.3.4"),
        ("::1", "2001:db8::5", "::1", "2001:db8::5"),
        # Only proxies in the chain: the client is the leftmost.
        ("10.0.0.2", "10.0.0.7, 10.0.0.9", "10.0.0.0/8", "10.0.0.7"),
        # A trusted proxy that sent no header: the proxy itself.
        ("10.0.0.2", None, "10.0.0.0/8", "10.0.0.2"),
        # Junk in the header is a distinct key, never someone else's address.
        ("10.0.0.2", "not-an-ip", "10.0.0.2", "not-an-ip"),
    ],
)
def test_client_address(peer, forwarded, proxies, expected):
    nets = parse_proxies(p for p in proxies.split(",") if p)
    assert client_address(peer, forwarded, nets) == expected


def test_forwarded_for_is_honoured_only_from_trusted_proxies(make_client, scripted):
    client = make_client(
        scripted(["ok"]), address_messages_per_minute=1, trusted_proxies=("10.0.0.0/8",)
    )
    proxy = browser(client, "10.0.0.2")
    for user in ("1.2.3.4", "5.6.7.8"):  # two people behind the proxy: one message each
        headers = {**HX, "X-Forwarded-For": user}
        finish(proxy, proxy.post("/send", data={"msg": "hi"}, headers=headers))
    again = {**HX, "X-Forwarded-For": "1.2.3.4"}
    assert (
        browser(client, "10.0.0.2").post("/send", data={"msg": "x"}, headers=again).status_code
        == 429
    )
    # Straight from the internet, a forged header changes nothing: one message, then 429.
    direct = browser(client, "198.51.100.7")
    finish(
        direct,
        direct.post("/send", data={"msg": "hi"}, headers={**HX, "X-Forwarded-For": "9.9.9.9"}),
    )
    forged = {**HX, "X-Forwarded-For": "9.9.9.8"}
    assert (
        browser(client, "198.51.100.7").post("/send", data={"msg": "x"}, headers=forged).status_code
        == 429
    )


def test_trusted_proxies_setting():
    s = Settings.from_env({"TRUSTED_PROXIES": " 10.0.0.0/8, ::1 ,"}, secret_key="k")
    assert s.trusted_proxies == ("10.0.0.0/8", "::1")
    assert len(parse_proxies(s.trusted_proxies)) == 2
    with pytest.raises(ValueError, match="TRUSTED_PROXIES: 'nginx'"):
        parse_proxies(["nginx"])


# Replies at once, over everyone ---------------------------------------------------------------


def test_the_server_says_busy_instead_of_queueing(make_client, scripted, settings):
    model = scripted(["Busy"], pause_after=1)
    client = make_client(model, max_running_replies=1)
    first = client.post("/send", data={"msg": "first"}, headers=HX)
    assert first.status_code == 200
    # The test client answers only once a response is complete: a second reply that were let
    # through would wait on the held model, so the requests run in threads with a timeout.
    with ThreadPoolExecutor(2) as pool:
        try:
            client.portal.call(model.paused.wait)
            page = pool.submit(browser(client).post, "/send", data={"msg": "2"}, headers=HX)
            api = pool.submit(browser(client).post, "/api/chat", json=_chat("third"))
            page, api = page.result(timeout=10), api.result(timeout=10)
        finally:
            client.portal.call(model.resume.set)
    for refused, text in ((page, page.text), (api, api.text)):
        assert refused.status_code == 503 and "The server is busy, try again in a moment" in text
        assert int(refused.headers["Retry-After"]) > 0
    finish(client, first)
    assert len(model.calls) == 1


def test_a_busy_refusal_costs_no_message():
    limits = limiter(per_minute=1, max_running=1)
    refused = now(limits.check_send("a", "198.51.100.7", running=0, total_running=1))
    assert refused.status == 503
    assert send(limits, "a") is None  # once the server has room, the minute is intact


# Memory -------------------------------------------------------------------------------------


def test_limiter_memory_shrinks_back_after_many_identities():
    clock = Clock()
    limits = limiter(clock, address_per_minute=10_000)
    for i in range(5_000):
        assert now(limits.check_send(f"id-{i}", f"ip-{i % 50}", running=0, total_running=0)) is None
    assert len(limits._sent) == 5_050
    clock.now += 61
    assert send(limits, "late") is None
    assert len(limits._sent) == 2  # just "late" and its address
    for i in range(100):
        assert now(limits.open_stream(f"id-{i}"))
    for i in range(100):
        now(limits.close_stream(f"id-{i}"))
    assert limits._streams == {}


def test_limiter_memory_is_bounded_even_within_a_minute():
    limits = limiter(max_keys=1_000, address_per_minute=None)
    for i in range(10_000):
        send(limits, f"id-{i}", addr=f"ip-{i}")
    assert len(limits._sent) <= 1_000
    # The most recently active are the ones kept.
    assert "id:id-9999" in limits._sent and "id:id-0" not in limits._sent


# In Redis: every worker counts against the same allowance -----------------------------------


@pytest.fixture(name="redis_url", scope="module")
def redis_url_fixture(tmp_path_factory) -> Iterator[str]:
    """A real redis-server for this module's tests."""
    server = start_redis(tmp_path_factory.mktemp("redis"))
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture(name="fresh_redis")
def fresh_redis_fixture(redis_url: str) -> str:
    """The module's Redis, emptied for this test."""
    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    client.close()
    return redis_url


@contextlib.asynccontextmanager
async def workers(url: str, n: int = 2, **kw) -> AsyncIterator[list[RedisLimiter]]:
    """`n` limiters on one Redis, as `n` worker processes would have: started, then closed."""
    args = dict(per_minute=100, concurrent_runs=3, open_streams=12, address_per_minute=None)
    limiters = [RedisLimiter(AsyncRedis.from_url(url), **{**args, **kw}) for _ in range(n)]
    for limiter_ in limiters:
        await limiter_.start()
    try:
        yield limiters
    finally:
        for limiter_ in limiters:
            await limiter_.close()


async def rsend(limits, who: str, addr: str = "198.51.100.7", running: int = 0, total: int = 0):
    return await limits.check_send(who, addr, running=running, total_running=total)


async def test_an_identity_has_one_allowance_however_many_workers(fresh_redis):
    async with workers(fresh_redis, per_minute=3) as (a, b):
        assert [await rsend(w, "visitor") for w in (a, b, a)] == [None, None, None]
        for w in (a, b):
            refused = await rsend(w, "visitor")
            assert refused.status == 429 and "You have sent 3 messages" in refused.message
            assert 0 < refused.retry_after <= 61
        assert await rsend(b, "someone else", addr="203.0.113.9") is None
        # An import counts as a message, on any worker.
        assert (await b.check_import("visitor", "198.51.100.7")).status == 429


async def test_fresh_cookies_from_one_address_share_its_limit_across_workers(fresh_redis):
    async with workers(fresh_redis, per_minute=5, address_per_minute=2) as (a, b):
        assert await rsend(a, "new-1") is None and await rsend(b, "new-2") is None
        refused = await rsend(a, "new-3")
        assert refused.status == 429 and "network address" in refused.message


async def test_racing_sends_on_two_workers_pass_exactly_the_limit(fresh_redis):
    async with workers(fresh_redis, per_minute=5) as (a, b):
        results = await asyncio.gather(*(rsend((a, b)[i % 2], "racer") for i in range(20)))
        assert sum(r is None for r in results) == 5


async def test_stream_slots_are_counted_over_every_worker(fresh_redis):
    async with workers(fresh_redis, open_streams=2, concurrent_runs=1, max_running=2) as (a, b):
        assert await a.open_stream("v") and await b.open_stream("v")
        assert not await a.open_stream("v")
        await b.close_stream("v")
        assert await a.open_stream("v")
        # Replies running anywhere are the RunManager's count, passed in: the server's cap.
        refused = await rsend(b, "w", total=2)
        assert refused.status == 503 and refused.retry_after


async def test_a_dead_workers_slots_are_given_back(fresh_redis):
    async with workers(fresh_redis, open_streams=2) as (a, b):
        assert await a.open_stream("v") and await a.open_stream("v")
        assert not await b.open_stream("v")
        # A is killed: no close, its heartbeat stops and lapses.
        a._heartbeat.cancel()
        await b.redis.delete(a._beat_prefix + a.worker)
        assert await b.open_stream("v") and await b.open_stream("v")


def test_two_apps_on_one_redis_share_a_visitors_allowance(make_client, scripted, fresh_redis):
    one = make_client(scripted(["ok"]), redis_url=fresh_redis, messages_per_minute=2)
    two = make_client(scripted(["ok"]), redis_url=fresh_redis, messages_per_minute=2)
    finish(one, one.post("/send", data={"msg": "first"}, headers=HX))
    two.cookies = one.cookies  # the same browser, its next request served by the other worker
    finish(two, two.post("/send", data={"msg": "second"}, headers=HX))
    refused = one.post("/send", data={"msg": "third"}, headers=HX)
    assert refused.status_code == 429 and "You have sent 2 messages" in refused.text
    assert int(refused.headers["Retry-After"]) > 0


async def test_with_redis_gone_sends_are_refused_clearly_and_streams_go_on(tmp_path):
    server = start_redis(tmp_path / "redis")
    client = AsyncRedis.from_url(server.url, socket_connect_timeout=1, socket_timeout=1)
    limits = RedisLimiter(client, per_minute=5, concurrent_runs=3, open_streams=2)
    await limits.start()
    try:
        assert await limits.open_stream("v")
        server.stop()  # Redis goes away mid-run
        refused = await rsend(limits, "v")
        assert refused.status == 503 and "cannot check its limits" in refused.message
        assert refused.retry_after
        # A stream of a reply already allowed is not cut off, and closing one does not fail.
        assert await limits.open_stream("v")
        await limits.close_stream("v")
        await limits.close_stream("v")
    finally:
        server.stop()
        await limits.close()
