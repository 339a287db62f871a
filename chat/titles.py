"""Conversation titles: named by the model after the first exchange, in the background."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import Callable

from pydantic_ai.models import Model

from chat.agent import make_title, short_title
from chat.storage import Store

log = logging.getLogger(__name__)

# How long a conversation's title waits for the server to be less busy before it is made anyway.
PATIENCE = 60.0


class Titles:
    """Names conversations in background tasks; a name the user chose is never replaced."""

    def __init__(self, store: Store, *, busy: Callable[[], bool]):
        self.store = store
        self.busy = busy  # true while the server is busy with replies: titles wait their turn
        self.tasks: dict[str, asyncio.Task] = {}
        self._calls: set[asyncio.Task] = set()  # store calls in threads (see `close`)

    def start(self, model: Model, cid: str, owner: str, user_text: str, reply_text: str) -> None:
        """Name conversation `cid` after its first exchange, unless it is named already.

        Every read and write of the store runs in a thread: with WORKERS or DATABASE_URL a
        write can wait for another's lock or a pooled connection, and the loop serves everyone.
        """
        if cid in self.tasks:
            return  # already being named

        async def title() -> None:
            provisional = short_title(user_text)
            try:
                conv = await self._off_loop(self.store.conversation, cid, owner)
            except sqlite3.Error as exc:  # both stores raise these (chat/pgstore.py maps its own)
                log.info("no title for %s: %s", cid, exc)
                return
            if conv is None or conv["title"] != provisional:
                return  # named already (by the model or by the user)
            # A title is a nicety (the first words of the message stand in for it): while the
            # server is busy with replies, it waits its turn, for up to a minute.
            loop = asyncio.get_running_loop()
            until = loop.time() + PATIENCE
            while self.busy() and loop.time() < until:
                await asyncio.sleep(0.5)
            try:
                new = await asyncio.wait_for(make_title(model, user_text, reply_text), timeout=30)
            except Exception as exc:
                log.info("no title for %s: %s", cid, exc)
                return
            if new:
                try:
                    await self._off_loop(self._replace, cid, owner, provisional, new)
                except sqlite3.Error as exc:  # the database is busy or not writable: keep the old
                    log.info("no title for %s: %s", cid, exc)

        task = asyncio.create_task(title(), name=f"title-{cid}")
        self.tasks[cid] = task
        task.add_done_callback(lambda _: self.tasks.pop(cid, None))

    async def _off_loop(self, fn, /, *args):
        """`fn(*args)` in a thread; cancelling the caller leaves it to end, and `close` waits
        for it, so the store is never closed under a call still running."""
        task = asyncio.get_running_loop().create_task(asyncio.to_thread(fn, *args))
        self._calls.add(task)
        task.add_done_callback(self._calls.discard)
        return await asyncio.shield(task)

    def _replace(self, cid: str, owner: str, provisional: str, new: str) -> None:
        """Set the model's title, unless the user renamed the conversation meanwhile (blocking)."""
        conv = self.store.conversation(cid, owner)
        if conv and conv["title"] == provisional:
            self.store.set_title(cid, new)

    async def close(self, timeout: float = 2.0) -> None:
        """Drop the titles still being made (the first words stand in for them), and wait
        (bounded) until their tasks have ended, while the loop still runs."""
        tasks = list(self.tasks.values())
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=timeout)
        if self._calls:
            await asyncio.wait(list(self._calls), timeout=timeout + 5)  # a write's busy timeout

    async def wait(self, cid: str, timeout: float = 20.0) -> None:
        """Wait (bounded) for a conversation's title to be written, if one is being made."""
        task = self.tasks.get(cid)
        if task is not None:
            await asyncio.wait([task], timeout=timeout)
