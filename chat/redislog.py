"""A reply's run log in a Redis Stream (REDIS_URL), so a stream on any process can follow it.

The process writing a reply copies each entry of its MemoryLog (chat/runlog.py) to the Stream
`<prefix>log:<turn id>` with the explicit id `0-<entry number>`, capped (`XADD MAXLEN ~`) and
expiring a while after the end. Entries that gather while a write is under way (or for
`WRITE_EVERY`) go out together in one round trip, each under its own number, with only the
newest tail: never a round trip per token. Any process replays the Stream with
`XRANGE` and follows it with `XREAD BLOCK`; entry numbers match the MemoryLog's, so
`Last-Event-ID` resumes the same way on every process.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import asdict
from typing import TYPE_CHECKING

from chat.reply import ToolView
from chat.runlog import Block, End, Entry, Item, ToolUpdate, batches

if TYPE_CHECKING:
    from redis.asyncio import Redis

log = logging.getLogger(__name__)

# Every Redis key and channel of the app starts with the deployment's prefix (REDIS_PREFIX),
# so two deployments on one Redis database never count, follow or stop each other's replies.
DEFAULT_PREFIX = "chat:"

# A stream holds at most about this many entries (XADD MAXLEN ~). A reply has at most one entry
# per tick (15 ms, longer under load), so only a reply of several minutes comes near it.
MAX_ENTRIES = 20_000
# How long a finished reply's log stays readable (streams opened just as it ends still read it
# there; later ones read the saved reply from the database), and how long a running one's does
# if its writer vanishes without ending it (refreshed by every write).
ENDED_TTL = 300
RUNNING_TTL = 3600
# A reply's entries reach Redis at most this often (what arrives meanwhile goes out together):
# other processes' streams update 20 times a second, and a fast reply costs Redis (and this
# process) a round trip per 50 ms, not one per tick. Streams on the writing process read its
# MemoryLog.
WRITE_EVERY = 0.05
_WRITE_RETRY = 0.5
_WRITE_TRIES = 20


def log_key(turn_id: int, prefix: str = DEFAULT_PREFIX) -> str:
    """The Redis Stream holding a reply's entries, under a deployment's key prefix."""
    return f"{prefix}log:{turn_id}"


def _item_data(item: Item) -> dict:
    if isinstance(item, Block):
        return {"b": item.html}
    if isinstance(item, ToolUpdate):
        return {"u": asdict(item.tool)}
    return {"t": asdict(item)}


def _item(data: dict) -> Item:
    if "b" in data:
        return Block(data["b"])
    if "u" in data:
        return ToolUpdate(ToolView(**data["u"]))
    return ToolView(**data["t"])


def to_fields(entry: Entry) -> dict[str, str]:
    """An entry as Redis Stream fields (at least one: a stream entry cannot be empty)."""
    out = {"x": entry.text}
    if entry.items:
        out["i"] = json.dumps([_item_data(i) for i in entry.items], ensure_ascii=False)
    if entry.tail is not None:
        out["t"] = entry.tail
    if entry.end is not None:
        out["e"] = json.dumps(asdict(entry.end), ensure_ascii=False)
    return out


def from_fields(entry_id: str | bytes, fields: dict) -> Entry:
    """The entry a Redis Stream entry holds."""
    f = {_s(k): _s(v) for k, v in fields.items()}
    seq = int(_s(entry_id).partition("-")[2])
    items = [_item(d) for d in json.loads(f["i"])] if "i" in f else []
    end = End(**json.loads(f["e"])) if "e" in f else None
    return Entry(seq, items, f.get("t"), f.get("x", ""), end)


def _s(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


class RedisLog:
    """Copies one reply's entries into its Redis Stream, in order, merging what waits."""

    def __init__(self, redis: Redis, turn_id: int, prefix: str = DEFAULT_PREFIX) -> None:
        self.redis = redis
        self.key = log_key(turn_id, prefix)
        self.pending: list[Entry] = []
        self._task: asyncio.Task | None = None

    def __call__(self, entry: Entry) -> None:
        """Queue an entry (called by the run, on the loop, never waiting for Redis)."""
        self.pending.append(entry)
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._drain(), name=self.key)

    async def flushed(self, timeout: float = 5.0) -> None:
        """Wait (bounded) until every queued entry is in Redis."""
        if self._task is not None:
            await asyncio.wait([self._task], timeout=timeout)

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        tries = 0
        expires_at = 0.0  # loop time when the stream's running expiry was last set
        try:
            while self.pending:
                batch = list(self.pending)
                count = len(batch)
                now = loop.time()
                # The expiry is set on the first write, refreshed now and then, and shortened
                # at the end: most writes are one XADD.
                ended = batch[-1].end is not None
                expire = ended or now - expires_at > RUNNING_TTL / 4
                try:
                    await write(self.redis, self.key, batch, expire=expire)
                except Exception as exc:  # Redis away: keep the entries, try again
                    tries += 1
                    if tries >= _WRITE_TRIES:
                        log.error("gave up writing %s to Redis: %s", self.key, exc)
                        self.pending.clear()
                        return
                    log.warning("could not write %s to Redis yet: %s", self.key, exc)
                    await asyncio.sleep(_WRITE_RETRY)
                    continue
                tries = 0
                if expire:
                    expires_at = now
                del self.pending[:count]
                if not ended:
                    await asyncio.sleep(WRITE_EVERY)  # let the next entries gather
        finally:
            self._task = None


async def write(redis: Redis, key: str, entries: list[Entry], *, expire: bool = True) -> None:
    """XADD entries (capped), each as `0-<its number>`, in one round trip; with `expire`, also
    set the stream's expiry. Each keeps its own number, so `Last-Event-ID` from any process
    resumes exactly; of the tails only the newest is written (the others were never seen)."""
    newest_tail = max((i for i, e in enumerate(entries) if e.tail is not None), default=-1)
    async with redis.pipeline(transaction=False) as pipe:
        for i, entry in enumerate(entries):
            if entry.tail is not None and i != newest_tail:
                entry = Entry(entry.seq, entry.items, None, entry.text, entry.end)
            pipe.xadd(key, to_fields(entry), id=f"0-{entry.seq}", maxlen=MAX_ENTRIES)
        if expire:
            pipe.expire(key, ENDED_TTL if entries[-1].end is not None else RUNNING_TTL)
        await pipe.execute()


async def append_end(redis: Redis, turn_id: int, end: End, prefix: str = DEFAULT_PREFIX) -> None:
    """End a reply's log from outside its run (its owner died): numbered after the last entry."""
    key = log_key(turn_id, prefix)
    last = await redis.xrevrange(key, count=1)
    seq = int(_s(last[0][0]).partition("-")[2]) + 1 if last else 1
    await write(redis, key, [Entry(seq, tail="", end=end)])


async def follow_redis(
    redis: Redis,
    turn_id: int,
    after: int = 0,
    heartbeat: float = 15.0,
    prefix: str = DEFAULT_PREFIX,
) -> AsyncIterator[Entry | None]:
    """Replay a reply's entries after `after` from Redis (with the newest tail), then follow.

    The stream may not exist yet (the owner has not written its first entry): then this waits
    for it. Entries trimmed by the cap (`MAX_ENTRIES`) are gone: a stream that joins a reply
    that long shows it from the oldest entry kept, and the whole reply once it is reloaded.
    """
    key = log_key(turn_id, prefix)
    rows = await redis.xrange(key)
    parsed = [from_fields(i, f) for i, f in rows]
    cursor = max([after, *(e.seq for e in parsed)])
    new = [e for e in parsed if e.seq > after]
    tail = next((e.tail for e in reversed(parsed) if e.tail is not None), None)
    if new or tail:
        for batch in batches(new, tail=tail, seq=cursor):
            yield batch
            if batch.end is not None:
                return
    block = max(1, int(heartbeat * 1000))
    while True:
        got = await redis.xread({key: f"0-{cursor}"}, block=block)
        if not got:
            yield None
            continue
        _, rows = got[0]
        entries = [from_fields(i, f) for i, f in rows]
        for batch in batches(entries):
            cursor = batch.seq
            yield batch
            if batch.end is not None:
                return
