"""Several processes as one app, through Redis: who is writing which reply, Stop, dead workers.

Every reply being written holds a lease: its turn id in three sorted sets (all replies, its
conversation's, its owner's) scored by when the lease lapses. The process writing it renews the
lease every `lease_refresh` seconds; counts read only unlapsed leases, so a process that dies
(SIGKILL, OOM) stops counting within `lease_seconds`, and then any other process ends its
replies as interrupted (`lapsed` hands each to exactly one of them).

A send claims its conversation first (`claim`, SET NX under the lease time) and the reply's
lease takes the claim over in the transaction that takes the lease, so of two processes sending
into one conversation at once exactly one starts a reply.

Every key and channel starts with the deployment's REDIS_PREFIX (default "chat:").

Stop reaches the process writing a reply over a pub/sub channel, backed by a key the owner also
checks at each renewal, so a Stop published while its subscription was reconnecting still lands.

Lease times come from each process's clock: hosts must agree to well within `lease_seconds`
(NTP does).
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Iterable
from typing import TYPE_CHECKING

from chat.logreader import LogReader
from chat.redislog import DEFAULT_PREFIX, LogWriter, log_key

if TYPE_CHECKING:
    from redis.asyncio import Redis

log = logging.getLogger(__name__)

# After a lost connection, the Stop subscription tries again after this long.
_RESUBSCRIBE = 1.0
# Claims KEYS[1] (a conversation) for ARGV[1] for ARGV[3] ms, unless a reply holds a live lease
# in it (KEYS[2], scored by lease end, ARGV[2] now) or another send claimed it: one round trip.
_CLAIM = """
if redis.call('ZCOUNT', KEYS[2], ARGV[2], '+inf') > 0 then
  return 0
end
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[3]) then
  return 1
end
return 0
"""
# Deletes KEYS[1] only while it still holds ARGV[1]: a claim is given back by its taker alone,
# never one that lapsed and was taken again by another send.
_UNCLAIM = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


def _now_ms() -> int:
    return int(time.time() * 1000)


class Cluster:
    """This process's view of the shared state in Redis (REDIS_URL)."""

    def __init__(
        self,
        redis: Redis,
        *,
        lease_seconds: float = 15.0,
        lease_refresh: float = 5.0,
        prefix: str = DEFAULT_PREFIX,
    ):
        self.redis = redis
        self.worker = secrets.token_hex(6)
        self.lease_ms = int(lease_seconds * 1000)
        self.lease_refresh = lease_refresh
        self.prefix = prefix
        self.leases = prefix + "leases"  # every reply being written: turn id -> lease end (ms)
        self.run_info = prefix + "runinfo"  # turn id -> {"cid", "owner", "worker"}
        self.stop_channel = prefix + "stop"
        self._claim = redis.register_script(_CLAIM)
        # Every run log this process writes goes through one writer, and every one it follows
        # from another process through one reader (shared round trips).
        self.writer = LogWriter(redis)
        self.reader = LogReader(redis)

    @classmethod
    def connect(
        cls,
        url: str,
        *,
        lease_seconds: float,
        lease_refresh: float,
        prefix: str = DEFAULT_PREFIX,
    ) -> Cluster:
        """A Cluster on the Redis at `url` (redis://, rediss:// or unix://)."""
        from redis.asyncio import Redis  # only with REDIS_URL: the default needs no Redis

        return cls(
            Redis.from_url(url),
            lease_seconds=lease_seconds,
            lease_refresh=lease_refresh,
            prefix=prefix,
        )

    def _conv(self, cid: str) -> str:
        return f"{self.prefix}conv:{cid}"

    def _who(self, owner: str) -> str:
        return f"{self.prefix}who:{owner}"

    def _stop_key(self, turn_id: int) -> str:
        return f"{self.prefix}stop:{turn_id}"

    def _reap_key(self, turn_id: int) -> str:
        return f"{self.prefix}reap:{turn_id}"

    def _claim_key(self, cid: str) -> str:
        return f"{self.prefix}claim:{cid}"

    def log_key(self, turn_id: int) -> str:
        """The Redis Stream holding reply `turn_id`'s run log (chat/redislog.py)."""
        return log_key(turn_id, self.prefix)

    async def close(self) -> None:
        """Close the connections."""
        await self.redis.aclose()

    # Claims: one reply at a time per conversation ----------------------------------------

    async def claim(self, cid: str) -> str | None:
        """Claim conversation `cid` for a reply about to start, atomically over every process;
        the claim's token, or None if a reply is running or starting there already.

        Taken before the message is committed; the reply's lease takes over from it (see
        `register`), and `unclaim` gives it back if the send stops short. It lapses with the
        lease time, so a process that dies holding one blocks the conversation no longer.
        """
        token = f"{self.worker}:{secrets.token_hex(4)}"
        # A reply that started earlier holds a lease, not a claim: it took over (and deleted)
        # its claim in the same transaction that took the lease, so this sees one or the other.
        keys = [self._claim_key(cid), self._conv(cid)]
        if await self._claim(keys=keys, args=[token, _now_ms(), self.lease_ms]):
            return token
        return None

    async def unclaim(self, cid: str, token: str) -> None:
        """Give back a claim no reply took over (the send was refused or failed)."""
        await self.redis.eval(_UNCLAIM, 1, self._claim_key(cid), token)

    # Leases -------------------------------------------------------------------------------

    async def register(self, turn_id: int, cid: str, owner: str, claim: str | None = None) -> None:
        """Take the lease of a reply this process starts writing (and, with `claim`, let the
        lease take over from the conversation's claim, in one transaction)."""
        until = _now_ms() + self.lease_ms
        info = json.dumps({"cid": cid, "owner": owner, "worker": self.worker})
        async with self.redis.pipeline(transaction=True) as pipe:
            self._lease(pipe, turn_id, cid, owner, until)
            pipe.hset(self.run_info, str(turn_id), info)
            # A log left under this number (a database restored from a backup reuses turn ids)
            # is another reply's: gone before any stream can read it.
            pipe.delete(self.log_key(turn_id))
            if claim is not None:
                pipe.eval(_UNCLAIM, 1, self._claim_key(cid), claim)
            await pipe.execute()

    def _lease(self, pipe, turn_id: int, cid: str, owner: str, until: int, **kw) -> None:
        for key in (self.leases, self._conv(cid), self._who(owner)):
            pipe.zadd(key, {str(turn_id): until}, **kw)
        # A conversation's or a person's set goes away with their last lease.
        pipe.pexpire(self._conv(cid), 2 * self.lease_ms)
        pipe.pexpire(self._who(owner), 2 * self.lease_ms)

    async def release(self, turn_id: int, cid: str, owner: str) -> None:
        """Give a reply's lease back: it has ended (and is saved, or is being saved here)."""
        async with self.redis.pipeline(transaction=True) as pipe:
            for key in (self.leases, self._conv(cid), self._who(owner)):
                pipe.zrem(key, str(turn_id))
            pipe.hdel(self.run_info, str(turn_id))
            pipe.delete(self._stop_key(turn_id))
            await pipe.execute()

    async def renew(self, held: Iterable[tuple[int, str, str]]) -> set[int]:
        """Renew the leases of the replies this process writes; return those asked to stop."""
        held = list(held)
        if not held:
            return set()
        until = _now_ms() + self.lease_ms
        async with self.redis.pipeline(transaction=False) as pipe:
            for turn_id, cid, owner in held:
                self._lease(pipe, turn_id, cid, owner, until)
            for turn_id, _, _ in held:
                pipe.exists(self._stop_key(turn_id))
            answers = await pipe.execute()
        stops = answers[-len(held) :]
        return {turn_id for (turn_id, _, _), stop in zip(held, stops, strict=True) if stop}

    async def streaming_in(self, cid: str) -> bool:
        """True while any process writes a reply in conversation `cid`."""
        return await self.redis.zcount(self._conv(cid), _now_ms(), "+inf") > 0

    async def running(self, owner: str) -> int:
        """How many of `owner`'s replies are being written, by every process."""
        return await self.redis.zcount(self._who(owner), _now_ms(), "+inf")

    async def counts(self, owner: str) -> tuple[int, int]:
        """`running(owner)` and `total()` in one round trip."""
        now = _now_ms()
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.zcount(self._who(owner), now, "+inf")
            pipe.zcount(self.leases, now, "+inf")
            mine, everyone = await pipe.execute()
        return mine, everyone

    async def total(self) -> int:
        """How many replies are being written, by every process."""
        return await self.redis.zcount(self.leases, _now_ms(), "+inf")

    async def unleased(self, turn_ids: Iterable[int]) -> list[int]:
        """Those of `turn_ids` no process holds a live lease for."""
        ids = [str(t) for t in turn_ids]
        if not ids:
            return []
        scores = await self.redis.zmscore(self.leases, ids)
        now = _now_ms()
        return [int(t) for t, s in zip(ids, scores, strict=True) if s is None or s < now]

    async def lapsed(self) -> list[tuple[int, dict]]:
        """Replies whose writer stopped renewing their lease, each claimed for this process
        alone (turn id, {"cid", "owner", "worker"}): the caller ends them, then `release`s."""
        out = []
        for raw in await self.redis.zrangebyscore(self.leases, "-inf", _now_ms()):
            turn_id = int(raw)
            if not await self.redis.set(self._reap_key(turn_id), self.worker, nx=True, ex=60):
                continue  # another process is ending it
            info = await self.redis.hget(self.run_info, str(turn_id))
            out.append((turn_id, json.loads(info) if info else {}))
        return out

    # Stop ---------------------------------------------------------------------------------

    async def request_stop(self, turn_id: int) -> None:
        """Ask whichever process writes reply `turn_id` to stop it."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.set(self._stop_key(turn_id), "1", px=self.lease_ms * 2)
            pipe.publish(self.stop_channel, str(turn_id))
            await pipe.execute()

    async def stops(self) -> AsyncIterator[int]:
        """The turn ids whose Stop was requested, as they are, for as long as it is iterated."""
        while True:
            pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self.stop_channel)
                async for message in pubsub.listen():
                    if message.get("type") == "message":
                        try:
                            yield int(message["data"])
                        except ValueError:
                            continue
            except (OSError, ConnectionError) as exc:
                log.warning("Stop channel lost (%s); subscribing again", exc)
            except Exception as exc:  # redis-py's own connection errors
                if type(exc).__module__.startswith("redis"):
                    log.warning("Stop channel lost (%s); subscribing again", exc)
                else:
                    raise
            finally:
                await pubsub.aclose()
            await asyncio.sleep(_RESUBSCRIBE)
