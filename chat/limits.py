"""Per-identity limits: messages per minute, replies running at once, streams open at once.

In memory, per process: right for the single-container deployment this app defaults to. A
multi-process deployment would move these counters to a shared store (see README, Scale out).
"""

from __future__ import annotations

import time
from collections import defaultdict, deque


class Limiter:
    """Counts what each identity is doing and says no, with a reason, when a limit is reached."""

    def __init__(self, *, per_minute: int, concurrent_runs: int, open_streams: int):
        self.per_minute = per_minute
        self.concurrent_runs = concurrent_runs
        self.open_streams = open_streams
        self._sent: dict[str, deque[float]] = defaultdict(deque)
        self._streams: dict[str, int] = defaultdict(int)

    def check_send(self, who: str, running: int, count: int = 1) -> str | None:
        """Why `who` may not start `count` replies now (None if they may); records the sends."""
        now = time.monotonic()
        sent = self._sent[who]
        while sent and now - sent[0] > 60:
            sent.popleft()
        if len(sent) + count > self.per_minute:
            wait = int(60 - (now - sent[0])) + 1 if sent else 60
            return (
                f"You have sent {self.per_minute} messages in the last minute, the limit here. "
                f"Try again in {wait} s."
            )
        if running + count > self.concurrent_runs:
            return (
                f"{running} of your replies are still being written (the limit is "
                f"{self.concurrent_runs}). Wait for one to finish or stop it."
            )
        sent.extend([now] * count)
        return None

    def open_stream(self, who: str) -> bool:
        """Take one of `who`'s stream slots; False if they are all in use."""
        if self._streams[who] >= self.open_streams:
            return False
        self._streams[who] += 1
        return True

    async def close_stream(self, who: str) -> None:
        """Give a stream slot back (async: Starlette runs a sync background task in a thread)."""
        self._streams[who] -= 1
        if self._streams[who] <= 0:
            del self._streams[who]
