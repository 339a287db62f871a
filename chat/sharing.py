"""The RunManager's part in a cluster of processes (REDIS_URL): leases, Stop, dead workers.

A mixin, so chat/runs.py keeps the one state machine of a reply and this keeps what only
matters when several processes serve the app: taking and renewing each run's lease, obeying
Stops published by other processes, ending the replies of a process that died, and the
start-up check that marks only lapsed replies as interrupted.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from datetime import UTC, datetime, timedelta
from typing import Any

from chat.cluster import Cluster
from chat.redislog import append_end
from chat.runlog import End
from chat.storage import Store
from chat.store import INTERRUPTED

log = logging.getLogger(__name__)


class Sharing:
    """Lease, Stop and recovery work of a RunManager with a `cluster`."""

    cluster: Cluster | None
    store: Store
    runs: dict[int, Any]  # turn id -> chat.runs.Run
    _shared: set[asyncio.Task]
    _background: list[asyncio.Task]

    def _stop_here(self, turn_id: int) -> bool:  # RunManager's
        raise NotImplementedError

    def _in_background(self, work: Coroutine, name: str) -> None:
        """Run lease or log work beside the reply, kept until done (shutdown waits for it)."""
        task = asyncio.get_running_loop().create_task(work, name=name)
        self._shared.add(task)
        task.add_done_callback(self._shared.discard)

    async def _lease(self, run: Any, claim: str | None = None) -> None:
        try:
            await self.cluster.register(run.turn_id, run.conversation_id, run.owner, claim)
        except Exception as exc:  # the reply goes on here; other processes may not see it
            log.warning("reply %s: could not take its lease in Redis: %s", run.turn_id, exc)

    async def _unlease(self, run: Any) -> None:
        """After a run ended: its last entries reach Redis, then its lease goes back."""
        if run.mirror is not None:
            await run.mirror.flushed()
        try:
            await self.cluster.release(run.turn_id, run.conversation_id, run.owner)
        except Exception as exc:  # it lapses by itself; `_end_lapsed` then finds it ended
            log.warning("reply %s: could not give its lease back: %s", run.turn_id, exc)

    def share(self) -> None:
        """Start this process's part in the cluster: renew leases, obey Stops, end the replies
        of processes that died. Call once, on the running loop; shutdown stops it."""
        if self.cluster is None or self._background:
            return
        loop = asyncio.get_running_loop()
        self._background = [
            loop.create_task(self._renew_loop(), name="lease-renewal"),
            loop.create_task(self._stop_loop(), name="stop-channel"),
        ]

    async def recover(self) -> int:
        """At start-up: mark replies left 'streaming' by a process that is gone as interrupted;
        return how many. Alone (no REDIS_URL), every such reply; in a cluster, only those no
        live process holds a lease for, so a starting process never ends another's replies."""
        if self.cluster is None:
            return await asyncio.to_thread(self.store.mark_interrupted)
        # A turn committed a moment ago may not hold its lease yet: only older ones count.
        cutoff = datetime.now(UTC) - timedelta(milliseconds=self.cluster.lease_ms)
        stale = await asyncio.to_thread(
            self.store.streaming_turns, cutoff.isoformat(timespec="milliseconds")
        )
        gone = await self.cluster.unleased(stale)
        if not gone:
            return 0
        count = await asyncio.to_thread(self.store.mark_interrupted, gone)
        for turn_id in gone:  # a stream following one elsewhere sees it end
            await append_end(
                self.cluster.redis, turn_id, End("interrupted", INTERRUPTED), self.cluster.prefix
            )
        return count

    async def _renew_loop(self) -> None:
        while True:
            await asyncio.sleep(self.cluster.lease_refresh)
            try:
                held = [(r.turn_id, r.conversation_id, r.owner) for r in self.runs.values()]
                for turn_id in await self.cluster.renew(held):
                    self._stop_here(turn_id)  # a Stop whose message this process missed
                for turn_id, info in await self.cluster.lapsed():
                    await self._end_lapsed(turn_id, info)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis away for a moment: the next round tries again
                log.warning("could not renew leases: %s", exc)

    async def _stop_loop(self) -> None:
        async for turn_id in self.cluster.stops():
            self._stop_here(turn_id)

    async def _end_lapsed(self, turn_id: int, info: dict) -> None:
        """End a reply whose process stopped renewing its lease (it died): interrupted, with
        the partial text it saved; streams following it elsewhere see it end."""
        if turn_id in self.runs:  # ours, late renewing (a stalled loop): renewed next round
            return
        owner = info.get("owner") or ""
        turn = await asyncio.to_thread(self.store.turn, turn_id, owner) if owner else None
        await asyncio.to_thread(self.store.mark_interrupted, [turn_id])
        end = End(
            "interrupted",
            INTERRUPTED,
            model=(turn or {}).get("model") or "",
            copy=bool((turn or {}).get("reply_text")),
        )
        await append_end(self.cluster.redis, turn_id, end, self.cluster.prefix)
        await self.cluster.release(turn_id, info.get("cid") or "", owner)
        log.warning("reply %s: its process stopped (lease lapsed); ended as interrupted", turn_id)
