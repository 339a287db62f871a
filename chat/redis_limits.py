"""The limits of chat/limits.py counted in Redis, so every worker sees the same counts.

- Messages per minute: a sorted set per identity and per address, scored by Redis's own clock
  (workers' clocks may differ), trimmed to the window on every check and expiring with it.
- Open streams: a set of slots per identity, each slot named after the worker holding it.
  Every worker keeps a heartbeat key that expires 30 s after it stops refreshing it, and
  counting drops the slots of workers whose heartbeat is gone: a worker killed mid-stream
  (SIGKILL, OOM) leaks no slot for long.
- Replies running (pages and APIs alike) are counted by the RunManager and passed in.

Each check is one Lua script, so it is atomic: two workers cannot both take the last slot.
The scripts touch keys they compute (the heartbeats), which a standalone Redis or a primary
with replicas allows; Redis Cluster does not, and is not supported.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import secrets
from collections import defaultdict
from typing import TYPE_CHECKING

from chat.config import Settings
from chat.limits import (
    BUSY_RETRY_AFTER,
    SERVER_BUSY,
    WINDOW,
    Limiter,
    Refusal,
    rate_refusal,
    running_refusal,
)
from chat.redislog import DEFAULT_PREFIX

if TYPE_CHECKING:
    from redis.asyncio import Redis

log = logging.getLogger("chat")
# Under the deployment's REDIS_PREFIX (default "chat:"): "<prefix>limits:...".
LIMITS = "limits:"
HEARTBEAT_TTL = 30  # seconds a worker's slots outlive its last heartbeat
HEARTBEAT_EVERY = 10.0
SLOTS_TTL = 24 * 3600  # an idle identity's slot set goes away by itself

# Counts the slots in KEYS[n] whose worker is alive, forgetting the rest.
_LIVE = """
local function live(key, beat_prefix)
  local n = 0
  for _, m in ipairs(redis.call('SMEMBERS', key)) do
    local wid = string.match(m, '^([^/]+)/')
    if wid and redis.call('EXISTS', beat_prefix .. wid) == 1 then
      n = n + 1
    else
      redis.call('SREM', key, m)
    end
  end
  return n
end
"""

# KEYS: id window, address window.
# ARGV: window ms, id limit, address limit (-1: none), count, running, total running,
#       concurrent limit (-1: skip the running checks, as for an import), server limit (-1: none),
#       a unique token for this send's entries.
_CHECK = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local window, count = tonumber(ARGV[1]), tonumber(ARGV[4])
for i = 1, 2 do
  local limit = tonumber(ARGV[1 + i])
  redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', now - window)
  if limit >= 0 then
    local n = redis.call('ZCARD', KEYS[i])
    if n + count > limit then
      local oldest = redis.call('ZRANGE', KEYS[i], 0, 0, 'WITHSCORES')
      local age = oldest[2] and (now - tonumber(oldest[2])) or 0
      return {'rate', i, window - age}
    end
  end
end
local concurrent = tonumber(ARGV[7])
if concurrent >= 0 then
  local running = tonumber(ARGV[5])
  if running + count > concurrent then
    return {'mine', running, 0}
  end
  local server = tonumber(ARGV[8])
  if server >= 0 and tonumber(ARGV[6]) + count > server then
    return {'server', 0, 0}
  end
end
for i = 1, 2 do
  for j = 1, count do
    redis.call('ZADD', KEYS[i], now, ARGV[9] .. ':' .. j)
  end
  redis.call('PEXPIRE', KEYS[i], window)
end
return {'ok', 0, 0}
"""

# KEYS: a slot set. ARGV: limit (-1: none), slot name, heartbeat prefix, set ttl s.
_TAKE = (
    _LIVE
    + """
local limit = tonumber(ARGV[1])
if limit >= 0 and live(KEYS[1], ARGV[3]) >= limit then
  return 0
end
redis.call('SADD', KEYS[1], ARGV[2])
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[4]))
return 1
"""
)


UNCHECKED = Refusal(
    "The server cannot check its limits right now, so it is not taking messages. "
    "Try again in a moment.",
    503,
    BUSY_RETRY_AFTER,
)


class RedisUnavailable(RuntimeError):
    """REDIS_URL is set but that Redis cannot be reached at start-up."""


class RedisLimiter(Limiter):
    """`Limiter`'s rules with the counts in Redis (see the module docstring)."""

    def __init__(self, redis: Redis, *, prefix: str = DEFAULT_PREFIX, **kw):
        super().__init__(**kw)
        self.redis = redis
        self.worker = secrets.token_hex(6)
        self.prefix = prefix + LIMITS
        self._beat_prefix = self.prefix + "worker:"
        # Imported here: without REDIS_URL the app never loads the redis package.
        from redis.exceptions import RedisError

        self._errors = (RedisError, OSError)
        self._check = redis.register_script(_CHECK)
        self._take = redis.register_script(_TAKE)
        # This worker's slots, so a close gives back one of its own.
        self._held: dict[str, list[str]] = defaultdict(list)
        self._serial = 0
        self._heartbeat: asyncio.Task | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> RedisLimiter:
        """A limiter on the Redis at REDIS_URL, for the app's settings."""
        from redis.asyncio import Redis

        return cls(
            Redis.from_url(settings.redis_url),
            prefix=settings.redis_prefix,
            **cls.options(settings),
        )

    # Lifetime ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Say this worker is alive (now, and every few seconds until `close`)."""
        try:
            await self._beat()
        except self._errors as exc:
            kw = self.redis.connection_pool.connection_kwargs
            where = kw.get("path") or f"{kw.get('host')}:{kw.get('port')}"
            raise RedisUnavailable(
                f"REDIS_URL: cannot use Redis at {where} ({exc}). Start it, fix REDIS_URL, or "
                "unset it (and WORKERS) to run as one process."
            ) from None
        self._heartbeat = asyncio.create_task(self._beat_forever(), name="limits-heartbeat")

    async def close(self) -> None:
        """Stop the heartbeat, give back this worker's slots and disconnect."""
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._heartbeat
        with contextlib.suppress(Exception):  # Redis gone: the heartbeat's expiry frees them
            async with self.redis.pipeline(transaction=True) as pipe:
                for key, slots in self._held.items():
                    if slots:
                        pipe.srem(key, *slots)
                pipe.delete(self._beat_prefix + self.worker)
                await pipe.execute()
        self._held.clear()
        await self.redis.aclose()

    async def _beat(self) -> None:
        await self.redis.set(self._beat_prefix + self.worker, "1", ex=HEARTBEAT_TTL)

    async def _beat_forever(self) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_EVERY)
            try:
                await self._beat()
            except Exception as exc:  # Redis away for a moment: try again next time
                log.warning("limits heartbeat failed: %r", exc)

    # Messages per minute -----------------------------------------------------------------

    async def _run_check(
        self, who: str, addr: str, count: int, running: int, total: int, sending: bool
    ) -> Refusal | None:
        self._serial += 1
        keys = [
            self.prefix + "sent:id:" + who,
            self.prefix + "sent:ip:" + addr,
        ]
        args = [
            int(WINDOW * 1000),
            self.per_minute,
            -1 if self.address_per_minute is None else self.address_per_minute,
            count,
            running,
            total,
            self.concurrent_runs if sending else -1,
            -1 if self.max_running is None else self.max_running,
            f"{self.worker}:{self._serial}:{secrets.token_hex(4)}",
        ]
        try:
            kind, a, b = await self._check(keys=keys, args=args)
        except self._errors as exc:
            # Unchecked sends would be unlimited ones: refuse, clearly, until Redis is back.
            log.warning("limits: Redis unavailable, refusing a send: %r", exc)
            return UNCHECKED
        kind = kind.decode() if isinstance(kind, bytes) else kind
        if kind == "rate":
            limit = self.per_minute if a == 1 else self.address_per_minute
            return rate_refusal(a == 2, limit, max(1, math.ceil(int(b) / 1000)))
        if kind == "mine":
            return running_refusal(int(a), self.concurrent_runs)
        if kind == "server":
            return SERVER_BUSY
        return None

    async def check_send(
        self, who: str, addr: str, *, running: int, total_running: int, count: int = 1
    ) -> Refusal | None:
        """As `Limiter.check_send`, counted in Redis across every worker."""
        return await self._run_check(who, addr, count, running, total_running, sending=True)

    async def check_import(self, who: str, addr: str) -> Refusal | None:
        """As `Limiter.check_import`, counted in Redis across every worker."""
        return await self._run_check(who, addr, 1, 0, 0, sending=False)

    # Slots: streams open -----------------------------------------------------------------

    def _slot(self) -> str:
        self._serial += 1
        return f"{self.worker}/{self._serial}"

    async def _take_slot(self, key: str, limit: int | None) -> bool:
        slot = self._slot()
        args = [-1 if limit is None else limit, slot, self._beat_prefix, SLOTS_TTL]
        try:
            if not await self._take(keys=[key], args=args):
                return False
        except self._errors as exc:
            # A stream or a reply already allowed goes on uncounted rather than failing: what
            # could be abused (a new send) is refused by `check_send` meanwhile.
            log.warning("limits: Redis unavailable, slot not counted: %r", exc)
        self._held[key].append(slot)  # given back on close either way (a no-op if not taken)
        return True

    async def _give_back(self, key: str) -> None:
        slots = self._held.get(key)
        if not slots:
            return
        slot = slots.pop()
        if not slots:
            del self._held[key]
        try:
            await self.redis.srem(key, slot)
        except self._errors as exc:  # the heartbeat's expiry frees it in the end
            log.warning("limits: Redis unavailable, slot not given back: %r", exc)

    async def open_stream(self, who: str) -> bool:
        """Take one of `who`'s stream slots, over every worker; False if all are in use."""
        return await self._take_slot(self.prefix + "streams:" + who, self.open_streams)

    async def close_stream(self, who: str) -> None:
        """Give a stream slot back."""
        await self._give_back(self.prefix + "streams:" + who)


def limiter_for(settings: Settings) -> Limiter:
    """The app's limiter: in Redis when REDIS_URL is set, else in this process's memory."""
    if settings.redis_url:
        return RedisLimiter.from_settings(settings)
    return Limiter.from_settings(settings)
