"""One blocked XREAD for every run log a process follows from Redis (REDIS_URL).

A stream opened on a process that is not writing its reply follows the reply's Redis Stream
(chat/redislog.py `follow_redis`). Each such follower waiting on its own `XREAD BLOCK` costs a
round trip per entry per follower; here they all wait on one reader, which asks for every
followed log in one `XREAD` and hands each follower the entries after its own cursor. A
follower that joins while the read is blocked is in the next one, at most `BLOCK` later.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from redis.asyncio import Redis

log = logging.getLogger(__name__)

# How long one XREAD blocks: the longest a follower that just joined waits to be included
# (entries are written every 50 ms at most often anyway), and, while every followed reply is
# silent, one round trip per this long for the whole process.
BLOCK = 0.05

Rows = list[tuple[bytes | str, dict]]


def _seq(entry_id: bytes | str) -> int:
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    return int(text.partition("-")[2])


class LogReader:
    """Reads the Redis Streams this process's followers wait on, all in one XREAD."""

    def __init__(self, redis: Redis) -> None:
        self.redis = redis
        # stream key -> the followers waiting on it: (entries after this number, their future)
        self._waiting: dict[str, list[tuple[int, asyncio.Future]]] = {}
        self._task: asyncio.Task | None = None

    async def wait(self, key: str, cursor: int, timeout: float) -> Rows:
        """The entries of stream `key` numbered after `cursor`, as soon as there are some;
        [] if none came within `timeout` seconds."""
        future = asyncio.get_running_loop().create_future()
        waiter = (cursor, future)
        self._waiting.setdefault(key, []).append(waiter)
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="redis-follow")
        try:
            return await asyncio.wait_for(future, timeout)
        except TimeoutError:
            return []
        finally:
            waiters = self._waiting.get(key)
            if waiters is not None and waiter in waiters:
                waiters.remove(waiter)
                if not waiters:
                    del self._waiting[key]

    async def _run(self) -> None:
        try:
            while self._waiting:
                cursors = {
                    key: [cursor for cursor, future in waiters if not future.done()]
                    for key, waiters in self._waiting.items()
                }
                streams = {key: f"0-{min(c)}" for key, c in cursors.items() if c}
                if not streams:  # only followers on their way out: they leave at once
                    await asyncio.sleep(0)
                    continue
                try:
                    got = await self.redis.xread(streams, block=max(1, int(BLOCK * 1000)))
                except Exception as exc:  # Redis away: the followers see it, as with their own
                    for waiters in list(self._waiting.values()):
                        for _, future in waiters:
                            if not future.done():
                                future.set_exception(exc)
                    await asyncio.sleep(BLOCK)  # the failed ones leave; others try again
                    continue
                for key, rows in got or ():
                    key = key.decode() if isinstance(key, bytes) else key
                    waiters = self._waiting.get(key, [])
                    for waiter in list(waiters):
                        cursor, future = waiter
                        mine = [row for row in rows if _seq(row[0]) > cursor]
                        if mine and not future.done():
                            future.set_result(mine)
                        if future.done():
                            # Gone from the next read now, not when its follower next runs: its
                            # old cursor would have the next XREAD answer at once, again.
                            waiters.remove(waiter)
                    if not waiters:
                        self._waiting.pop(key, None)
        finally:
            self._task = None
