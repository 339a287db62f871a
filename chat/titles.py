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

    def start(self, model: Model, cid: str, owner: str, user_text: str, reply_text: str) -> None:
        """Name conversation `cid` after its first exchange, unless it is named already."""
        conv = self.store.conversation(cid, owner)
        if cid in self.tasks or conv is None or conv["title"] != short_title(user_text):
            return  # already being named, or named already (by the model or by the user)

        async def title() -> None:
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
            try:
                conv = self.store.conversation(cid, owner)
                # Only replace the provisional title; a name the user chose is kept.
                if conv and conv["title"] == short_title(user_text) and new:
                    self.store.set_title(cid, new)
            except sqlite3.Error as exc:  # the database is busy or not writable: keep the old
                log.info("no title for %s: %s", cid, exc)

        task = asyncio.create_task(title(), name=f"title-{cid}")
        self.tasks[cid] = task
        task.add_done_callback(lambda _: self.tasks.pop(cid, None))

    async def wait(self, cid: str, timeout: float = 20.0) -> None:
        """Wait (bounded) for a conversation's title to be written, if one is being made."""
        task = self.tasks.get(cid)
        if task is not None:
            await asyncio.wait([task], timeout=timeout)
