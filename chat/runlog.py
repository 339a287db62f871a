"""A reply's run log: the entries a stream replays and follows, in memory or in a Redis Stream.

The run that generates a reply appends an `Entry` each time its visible state changes (at most
once per `stream_tick`, however many tokens arrived): the blocks and tool calls finished since
the last entry, the tail (the unfinished block) when it changed, the reply's source text
appended since the last entry, and finally how it ended. Entries are numbered 1, 2, 3, ... per
reply; that number is the SSE `id:`, and `Last-Event-ID: n` resumes after entry n in both modes.

- `MemoryLog`: the entries in this process (the default, and what the owning process's own
  streams read in every mode).
- chat/redislog.py: a copy of the entries in a Redis Stream per reply (REDIS_URL), so a stream
  on any process can replay and follow it.

Following yields merged entries (`Entry`, its `seq` the last one merged) and None after
`heartbeat` seconds of silence; the last thing yielded has `end` set.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from chat.reply import ToolView


@dataclass
class Block:
    """A finished block of the reply's markdown, rendered to safe HTML."""

    html: str


@dataclass
class ToolUpdate:
    """A tool call's result arrived: the call already shown must be redrawn."""

    tool: ToolView


Item = Block | ToolView | ToolUpdate


@dataclass(frozen=True)
class End:
    """How a reply ended, as its footer shows it."""

    status: str
    error: str | None = None
    usage: dict | None = None
    model: str = ""
    copy: bool = False  # the reply has text to copy


@dataclass(slots=True)
class Entry:
    """One change of a reply's visible state (or several, merged)."""

    seq: int
    items: list[Item] = field(default_factory=list)
    tail: str | None = None  # None: unchanged
    text: str = ""  # source markdown appended since the previous entry
    end: End | None = None


def merge(entries: list[Entry], *, tail: str | None = None, seq: int | None = None) -> Entry:
    """Several consecutive entries as one (a new Entry): their items and text in order, the
    newest tail (`tail` if none of them has one), numbered `seq` (default: the last one's)."""
    out = Entry(seq if seq is not None else (entries[-1].seq if entries else 0), tail=tail)
    for e in entries:
        out.items.extend(e.items)
        if e.tail is not None:
            out.tail = e.tail
        out.text += e.text
        out.end = e.end or out.end
    return out


def batches(
    entries: list[Entry], *, tail: str | None = None, seq: int | None = None
) -> list[Entry]:
    """`entries` merged into as few entries as keep their order: text that follows a tool call
    (or its result) starts a new one, since a merged entry's text reads as coming before its
    items. The last one gets `tail` and `seq` as `merge` does; always at least one."""
    groups: list[list[Entry]] = [[]]
    tooled = False
    for e in entries:
        if e.text and tooled:
            groups.append([])
            tooled = False
        groups[-1].append(e)
        tooled = tooled or any(not isinstance(i, Block) for i in e.items)
    *first, last = groups
    return [*(merge(g) for g in first), merge(last, tail=tail, seq=seq)]


class MemoryLog:
    """A reply's entries in this process, and the followers waiting for the next one."""

    def __init__(self) -> None:
        self.entries: list[Entry] = []
        self.tail = ""  # the newest tail, for followers that join midway
        self._changed = asyncio.Event()

    @property
    def ended(self) -> bool:
        """True once the end entry has been appended."""
        return bool(self.entries) and self.entries[-1].end is not None

    def append(self, items: list[Item], tail: str | None, text: str, end: End | None) -> Entry:
        """Append an entry (numbered next) and wake every follower."""
        entry = Entry(len(self.entries) + 1, items, tail, text, end)
        self.entries.append(entry)
        if tail is not None:
            self.tail = tail
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()
        return entry

    def amend_end(self, end: End) -> None:
        """Correct how an ended reply ended (its save failed later): for streams opened next."""
        if self.ended:
            self.entries[-1].end = end

    async def follow(self, after: int = 0, heartbeat: float = 15.0) -> AsyncIterator[Entry | None]:
        """Replay the entries after `after` (with the current tail), then follow them live."""
        sent = max(0, after)
        first = True
        while True:
            changed = self._changed  # taken before reading, so no wake-up is missed
            entries = self.entries
            if len(entries) > sent or first:
                new = entries[sent:]
                sent = max(sent, len(entries))
                # A follower that joins gets the tail as it is now, once (none if it ended empty).
                tail = self.tail if first and (self.tail or not self.ended) else None
                first = False
                if new or tail is not None:
                    for batch in batches(new, tail=tail, seq=sent):
                        yield batch
                        if batch.end is not None:
                            return
            try:
                await asyncio.wait_for(changed.wait(), heartbeat)
            except TimeoutError:
                yield None
