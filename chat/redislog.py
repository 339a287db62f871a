"""A reply's run log in a Redis Stream (REDIS_URL), so a stream on any process can follow it.

The process writing a reply copies each entry of its MemoryLog (chat/runlog.py) to the Stream
`<prefix>log:<turn id>` with the explicit id `0-<entry number>`, capped (`XADD MAXLEN ~`) and
expiring a while after the end. Entries that gather while a write is under way (or for
`WRITE_EVERY`) go out together, each under its own number, with only the newest tail: never a
round trip per token, and one process's replies share their round trips (`LogWriter`). Any
process replays the Stream with `XRANGE` and follows it with `XREAD BLOCK`; entry numbers match
the MemoryLog's, so `Last-Event-ID` resumes the same way on every process.
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

    from chat.logreader import LogReader

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
# A follower's XREAD blocks at most this long at a time: under redis-py's default socket
# timeout (5 s) whatever the client was given.
_BLOCK_MAX = 2.0
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
    """One reply's entries on their way into its Redis Stream, in order.

    A `LogWriter` sends them: the process's one writer, so what every reply queued meanwhile
    goes out in one pipeline (by default each log gets a writer of its own).
    """

    def __init__(
        self,
        redis: Redis,
        turn_id: int,
        prefix: str = DEFAULT_PREFIX,
        writer: LogWriter | None = None,
    ) -> None:
        self.key = log_key(turn_id, prefix)
        self.writer = writer or LogWriter(redis)
        self.pending: list[Entry] = []
        self.expires_at = -RUNNING_TTL  # loop time the stream's running expiry was last set
        self._idle = asyncio.Event()
        self._idle.set()

    def __call__(self, entry: Entry) -> None:
        """Queue an entry (called by the run, on the loop, never waiting for Redis)."""
        self.pending.append(entry)
        self._idle.clear()
        self.writer.queue(self, hurry=entry.end is not None)

    def written(self, count: int) -> None:
        """The writer's report: the first `count` pending entries are in Redis."""
        del self.pending[:count]
        if not self.pending:
            self._idle.set()

    def dropped(self) -> None:
        """The writer's report: Redis stayed away, the pending entries are given up."""
        self.pending.clear()
        self._idle.set()

    async def flushed(self, timeout: float = 5.0) -> None:
        """Wait (bounded) until every queued entry is in Redis."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            pass


class LogWriter:
    """Writes the run logs of a process's replies into Redis: whatever they all queued since the
    last write goes out in one pipeline, at most every `WRITE_EVERY` (a reply's end at once), so
    a hundred replies at once cost one round trip per 50 ms, not a hundred."""

    def __init__(self, redis: Redis) -> None:
        self.redis = redis
        self._dirty: dict[str, RedisLog] = {}  # logs with entries waiting, oldest first
        self._task: asyncio.Task | None = None
        self._hurry = asyncio.Event()

    def queue(self, log: RedisLog, *, hurry: bool = False) -> None:
        """`log` has entries waiting; with `hurry` (a reply ended) the next write is now."""
        self._dirty.setdefault(log.key, log)
        if hurry:
            self._hurry.set()
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="redis-logs")

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        tries = 0
        try:
            while self._dirty:
                now = loop.time()
                # The expiry is set on the first write, refreshed now and then, and shortened
                # at the end: most writes are one XADD per reply.
                batches = [
                    (rlog, list(rlog.pending), rlog.pending[-1].end is not None)
                    for rlog in self._dirty.values()
                    if rlog.pending
                ]
                self._hurry.clear()
                try:
                    async with self.redis.pipeline(transaction=False) as pipe:
                        for rlog, batch, ended in batches:
                            expire = ended or now - rlog.expires_at > RUNNING_TTL / 4
                            add(pipe, rlog.key, batch, expire=expire)
                        await pipe.execute()
                except Exception as exc:  # Redis away: keep the entries, try again
                    tries += 1
                    if tries >= _WRITE_TRIES:
                        log.error("gave up writing %d run logs to Redis: %s", len(batches), exc)
                        for rlog, _, _ in batches:
                            rlog.dropped()
                            self._dirty.pop(rlog.key, None)
                        continue
                    log.warning("could not write run logs to Redis yet: %s", exc)
                    await asyncio.sleep(_WRITE_RETRY)
                    continue
                tries = 0
                for rlog, batch, ended in batches:
                    if ended or now - rlog.expires_at > RUNNING_TTL / 4:
                        rlog.expires_at = now
                    rlog.written(len(batch))
                    if not rlog.pending:
                        self._dirty.pop(rlog.key, None)
                # Let the next entries gather (a reply's end cuts the wait short).
                if not self._hurry.is_set():
                    try:
                        await asyncio.wait_for(self._hurry.wait(), WRITE_EVERY)
                    except TimeoutError:
                        pass
        finally:
            self._task = None


def add(pipe, key: str, entries: list[Entry], *, expire: bool = True) -> None:
    """Queue on `pipe` the XADDs of `entries` (capped), each as `0-<its number>`; with
    `expire`, also the stream's expiry. Each keeps its own number, so `Last-Event-ID` from any
    process resumes exactly; of the tails only the newest is written (the others were never
    seen)."""
    newest_tail = max((i for i, e in enumerate(entries) if e.tail is not None), default=-1)
    for i, entry in enumerate(entries):
        if entry.tail is not None and i != newest_tail:
            entry = Entry(entry.seq, entry.items, None, entry.text, entry.end)
        pipe.xadd(key, to_fields(entry), id=f"0-{entry.seq}", maxlen=MAX_ENTRIES)
    if expire:
        pipe.expire(key, ENDED_TTL if entries[-1].end is not None else RUNNING_TTL)


async def write(redis: Redis, key: str, entries: list[Entry], *, expire: bool = True) -> None:
    """XADD entries (see `add`) in one round trip."""
    async with redis.pipeline(transaction=False) as pipe:
        add(pipe, key, entries, expire=expire)
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
    reader: LogReader | None = None,
) -> AsyncIterator[Entry | None]:
    """Replay a reply's entries after `after` from Redis (with the newest tail), then follow:
    through `reader`, the process's one XREAD for all its followers (chat/logreader.py), else
    with an XREAD of its own.

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
    # A blocked XREAD must answer within the client's socket timeout (redis-py's default is
    # 5 s), or the read fails and the stream with it: a reply silent for longer (a model slow
    # to its first token) is waited for in shorter blocks, with a heartbeat every `heartbeat`.
    limit = redis.connection_pool.connection_kwargs.get("socket_timeout")
    step = min(heartbeat, _BLOCK_MAX, max(0.05, limit / 2) if limit else _BLOCK_MAX)
    silent = 0.0
    while True:
        if reader is not None:
            rows = await reader.wait(key, cursor, heartbeat)
            if not rows:
                yield None
                continue
        else:
            got = await redis.xread({key: f"0-{cursor}"}, block=max(1, int(step * 1000)))
            if not got:
                silent += step
                if silent >= heartbeat:
                    silent = 0.0
                    yield None
                continue
            silent = 0.0
            _, rows = got[0]
        entries = [from_fields(i, f) for i, f in rows]
        for batch in batches(entries):
            cursor = batch.seq
            yield batch
            if batch.end is not None:
                return
