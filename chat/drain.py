"""A worker told to stop drains: it takes no new replies, says it is not ready, lets the replies
it is writing finish within a grace period, interrupts what is left (partial text kept), and only
then lets the server shut down.

SIGTERM drains (what Docker, Kubernetes and uvicorn's own worker supervisor send); SIGINT, a
person at a terminal pressing Ctrl-C, stops the replies at once, as before. A second signal of
either kind during a drain ends it at once.

It works by wrapping the signal handlers the server installed (uvicorn's, in one process or in
each worker), so it serves `python main.py`, `WORKERS=N` and `uvicorn main:app --workers N`
alike. The listening socket stays open while draining: a load balancer sees `/ready` answer
503 and a send a 503 "restarting" message, rather than refused connections mid-reply.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Protocol

log = logging.getLogger("chat")
_POLL = 0.1


class Runs(Protocol):
    """What draining needs of the RunManager."""

    accepting: bool
    runs: dict

    async def shutdown(self) -> None:
        """Stop accepting, interrupt what is running, and save it."""


Handler = Callable[[int, FrameType | None], object]


class Drain:
    """Owns the SIGTERM/SIGINT handling of one serving process."""

    def __init__(self, runs: Runs, grace: float):
        self.runs = runs
        self.grace = grace
        self.task: asyncio.Task | None = None
        self._prev: dict[int, Handler] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._passed = False  # a signal has reached the server's own handler

    @property
    def draining(self) -> bool:
        """True once a stop was asked for: no new replies, not ready."""
        return not self.runs.accepting

    def install(self) -> bool:
        """Wrap the server's handlers for SIGTERM and SIGINT; False where that cannot be done
        (not the main thread, as under a test client, or no server handler to pass on to)."""
        if threading.current_thread() is not threading.main_thread():
            return False
        self._loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            prev = signal.getsignal(sig)
            if callable(prev):
                self._prev[sig] = prev
                signal.signal(sig, self._handle)
        return bool(self._prev)

    def uninstall(self) -> None:
        """Give the server its own handlers back (if ours are still in place)."""
        if threading.current_thread() is not threading.main_thread():
            return
        for sig, prev in self._prev.items():
            if signal.getsignal(sig) == self._handle:
                signal.signal(sig, prev)

    def _handle(self, sig: int, frame: FrameType | None) -> None:
        assert self._loop is not None
        if self.task is not None or sig != signal.SIGTERM:
            # Ctrl-C, or a second signal: stop the replies now (saved as interrupted) and
            # let the server go.
            self._loop.call_soon_threadsafe(self._stop_now)
            self._pass_on(sig, frame)
            return
        self.runs.accepting = False  # sends now get "The server is restarting", /ready a 503
        self._loop.call_soon_threadsafe(self._start, sig, frame)

    def _start(self, sig: int, frame: FrameType | None) -> None:
        self.task = asyncio.create_task(self.drain(sig, frame), name="drain")

    def _stop_now(self) -> None:
        # A drain under way then finds nothing left to wait for and ends too.
        asyncio.create_task(self.runs.shutdown(), name="stop-replies")

    def _pass_on(self, sig: int, frame: FrameType | None) -> None:
        self._passed = True
        if prev := self._prev.get(sig):
            prev(sig, frame)

    async def drain(self, sig: int = signal.SIGTERM, frame: FrameType | None = None) -> None:
        """Wait up to the grace period for running replies, interrupt the rest, then pass the
        signal on so the server shuts down."""
        self.runs.accepting = False
        running = len(self.runs.runs)
        log.info("stopping: no new replies; %d running, allowed %.0f s", running, self.grace)
        try:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + self.grace
            while self.runs.runs and loop.time() < deadline:
                await asyncio.sleep(_POLL)
            if left := len(self.runs.runs):
                log.warning("grace period over: interrupting %d replies (partial text kept)", left)
            await self.runs.shutdown()  # saves what is left as interrupted; no-op when none
        finally:
            if not self._passed:  # else a second signal has already ended the drain
                self._pass_on(sig, frame)
