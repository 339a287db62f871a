"""The chat's use cases: send, compare, regenerate, edit, stop, import and (for /api/chat)
deciding tool approvals, with their rules.

Every front end goes through here: the pages (web/chat.py, web/pages.py), `/api/chat`
(web/api.py) and `/api/ag-ui` (web/agui.py) only parse a request, call a method and render its
result. A refused request raises `Refused` (a message for the user, an HTTP status, headers);
`NotFound` is the refusal for a conversation or turn that is missing or someone else's, which
stay indistinguishable.

Store work runs off the event loop through `off_loop` (a thread by default). A user's sends are
serialized by a lock, from the checks before a send to its run having started, so the checks
still hold when the reply starts (the commit in between runs in a thread). The lock is one
process's: with REDIS_URL the conversation is also claimed in Redis before the commit, so of two
processes sending into it at once exactly one starts a reply.

Why this module is long: it is the one list of the chat's rules. Every use case shares the
send lock, the same checks in the same order, the one call to the limits and the commit, and
keeping them side by side is what makes "the page and the API obey the same rules" checkable.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import sqlite3
from base64 import urlsafe_b64encode
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from zlib import crc32

from pydantic_ai.messages import ModelMessage, ModelRequest, UserPromptPart

from chat import approvals, attachments, untrusted
from chat.agent import short_title
from chat.config import Settings
from chat.limits import Limiter
from chat.redis_limits import UNCHECKED
from chat.runs import Run, RunManager
from chat.storage import Store
from chat.transcript import ImportError_, split_turns, turns_of

log = logging.getLogger(__name__)

# The database could not take a write in time (locked past its busy timeout, or read-only).
BUSY = "The server is busy saving other changes. Try again in a moment."
# Regenerating an earlier reply would branch away the exchanges after it, out of sight.
LATER_EXCHANGES = (
    "Only the last reply can be regenerated: answering this one again would hide the "
    "exchanges after it. To go back to this point, edit your message above it."
)
NO_CONVERSATION = "That conversation does not exist."
REPLY_RUNNING = "Wait for the reply to finish, or stop it, before sending."
NOTHING_WAITS = "No tool call of this chat waits for that approval."
# A client's chat id longer than this is refused: it is hashed into a conversation id, but a
# megabyte of id is no one's chat.
MAX_CHAT_ID = 200
_LOCKS = 64


class Refused(Exception):
    """What the chat will not do, and why: a message for the user, a status and headers."""

    def __init__(self, message: str, status: int, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.status = status
        self.headers = dict(headers or {})


class NotFound(Refused):
    """The conversation or turn is missing or someone else's (the two look the same)."""

    def __init__(self, message: str = NO_CONVERSATION):
        super().__init__(message, 404)


@dataclass(frozen=True)
class Caller:
    """Who is asking: their identity, and the client address the limits count."""

    uid: str
    addr: str


@dataclass
class Sent:
    """A message sent: its conversation, the turns whose replies now run, and whether the
    conversation was created by this send."""

    conversation: dict
    turns: list[dict]
    created: bool = False
    runs: list[Run] = field(default_factory=list)


@dataclass
class ChatRequest:
    """A message from a client that names its chat itself (the AI SDK's chat `id`).

    `history` is what the client says came before; it is used only when the chat is new here
    (cleaned, see chat/untrusted.py), never over the stored history of a known conversation.
    """

    chat_id: str
    text: str
    history: Sequence[ModelMessage] = field(default_factory=list)


def normalize(text: str) -> str:
    """Browsers send line breaks as CRLF; the textarea (and its maxlength) counts one each."""
    return text.replace("\r\n", "\n").replace("\r", "\n")


class ChatService:
    """The rules of the chat, over a store, the run manager and the limits."""

    def __init__(
        self,
        store: Store,
        runs: RunManager,
        limits: Limiter,
        settings: Settings,
        *,
        off_loop: Callable[..., Awaitable] = asyncio.to_thread,
    ):
        self.store = store
        self.runs = runs
        self.limits = limits
        self.settings = settings
        self.off_loop = off_loop
        # Striped: never more than _LOCKS, however many users.
        self._locks = [asyncio.Lock() for _ in range(_LOCKS)]
        # Conversations claimed under each stripe's lock (see `_held`), while it is held.
        self._claimed: list[list[str]] = [[] for _ in range(_LOCKS)]

    # Sending ------------------------------------------------------------------------------

    async def send(
        self,
        who: Caller,
        text: str,
        *,
        cid: str | None = None,
        model: str | None = None,
        persona: str | None = None,
        compare: Iterable[str] = (),
        files: Sequence[str] = (),
    ) -> Sent:
        """Commit a message (in conversation `cid`, else a new one) and start its reply.

        `model` and `persona` switch the conversation's. With two or more `compare` models, one
        reply per model runs side by side, each a version of the exchange; the first is shown.
        `files` are ids of the caller's pending attachments, bound to the new turn(s).
        """
        text = normalize(text)
        models = self._offered(model, persona, compare)
        async with self._held(who):
            conv = await self.off_loop(self.store.conversation, cid, who.uid) if cid else None
            if cid and conv is None:
                raise NotFound()
            # Checked before the message is counted or committed: a bad file changes nothing.
            to = models if len(models) >= 2 else [self._model_of(conv, model)]
            refs: list[dict] = []
            try:
                if any(files):  # most messages carry none: no trip to a thread for them
                    refs = await self.off_loop(
                        attachments.claim,
                        self.store,
                        self.runs,
                        who.uid,
                        files,
                        to,
                        self.settings.max_attachments,
                    )
            except attachments.AttachmentError as exc:
                raise Refused(str(exc), exc.status) from None
            return await self._send(who, conv, text, model, persona, models, refs)

    async def send_chat(self, who: Caller, chat: ChatRequest) -> Sent:
        """Send a message into the chat a client names by its own id (created on first use)."""
        text = normalize(chat.text)
        if not 0 < len(chat.chat_id) <= MAX_CHAT_ID:
            raise Refused("A chat id must be 1 to 200 characters.", 422)
        async with self._held(who):
            conv = await self.off_loop(self._chat, who, chat.chat_id)
            if conv is not None:
                return await self._send(who, conv, text, None, None, [])
            self._check_text(text)
            await self._admit(who, 1, None)
            conv = await self.off_loop(self._create_chat, who, chat, text)
            turn, run = await self._start(who, conv, text)
            return Sent(conv, [turn], created=True, runs=[run])

    async def send_thread(self, who: Caller, thread_id: str, text: str) -> Sent:
        """Send a message into the conversation whose id a client chose itself (AG-UI's
        `threadId`), created under that very id on first use. An id that is someone else's
        conversation, or a deleted one, is NotFound: ids are claimed once, by one owner."""
        text = normalize(text)
        async with self._held(who):
            conv = await self.off_loop(self.store.conversation, thread_id, who.uid)
            if conv is not None:
                return await self._send(who, conv, text, None, None, [])
            self._check_text(text)
            # Counted before the claim, so a refused message claims no id; a probe of someone
            # else's id costs the prober a message of their allowance.
            await self._admit(who, 1, None)
            conv = await self.off_loop(self._claim, who, thread_id, text)
            turn, run = await self._start(who, conv, text)
            return Sent(conv, [turn], created=True, runs=[run])

    async def _send(
        self,
        who: Caller,
        conv: dict | None,
        text: str,
        model: str | None,
        persona: str | None,
        models: list[str],
        files: Sequence[dict] = (),
    ) -> Sent:
        replies = len(models) if len(models) >= 2 else 1
        self._check_text(text, files=len(files))
        await self._admit(who, replies, conv["id"] if conv is not None else None)
        created = conv is None
        persona = persona or (None if conv else next(iter(self.runs.personas)))
        conv = await self.off_loop(self._prepare, who, conv, text, model or None, persona)
        if len(models) >= 2:
            parent = conv["head_turn_id"]
            started = [
                await self._start(who, {**conv, "model": m}, text, parent_id=parent, files=files)
                for m in models
            ]
            await self.off_loop(self.store.set_head, conv["id"], started[0][0]["id"])
            # Stored as one comparison, so a reloaded page shows the replies as columns again.
            await self.off_loop(self.store.mark_comparison, [t["id"] for t, _ in started])
        else:
            started = [await self._start(who, conv, text, files=files)]
        return Sent(conv, [t for t, _ in started], created, [r for _, r in started])

    async def regenerate(self, who: Caller, cid: str, tid: int) -> dict:
        """Answer the same message again, as a new version of the exchange (also: Retry)."""
        async with self._held(who):
            conv, turn = await self.off_loop(self._owned_turn, who, cid, tid)
            if await self.off_loop(self.store.has_later_turns, turn["id"]):
                raise Refused(LATER_EXCHANGES, 409)
            files = attachments.refs(turn)
            self._check_text(turn["user_text"], files=len(files))
            await self._admit(who, 1, cid)
            new, _ = await self._start(
                who, conv, turn["user_text"], parent_id=turn["parent_id"], files=files
            )
            return new

    async def regenerate_chat(self, who: Caller, chat_id: str) -> Sent:
        """Answer a client-named chat's latest message again (the AI SDK's regenerate)."""
        async with self._held(who):
            conv = await self.off_loop(self._chat, who, chat_id)
            if conv is None or conv["head_turn_id"] is None:
                raise NotFound()
            _, turn = await self.off_loop(self._owned_turn, who, conv["id"], conv["head_turn_id"])
            files = attachments.refs(turn)
            self._check_text(turn["user_text"], files=len(files))
            await self._admit(who, 1, conv["id"])
            new, run = await self._start(
                who, conv, turn["user_text"], parent_id=turn["parent_id"], files=files
            )
            return Sent(conv, [new], runs=[run])

    async def edit(self, who: Caller, cid: str, tid: int, text: str) -> dict:
        """Send an edited message as a new version of the exchange; the old one is kept."""
        text = normalize(text)
        async with self._held(who):
            conv, turn = await self.off_loop(self._owned_turn, who, cid, tid)
            self._check_text(text)
            await self._admit(who, 1, cid)
            new, _ = await self._start(
                who, conv, text, parent_id=turn["parent_id"], files=attachments.refs(turn)
            )
            return new

    # Stopping and following -----------------------------------------------------------------

    async def stop(self, who: Caller, cid: str, tid: int) -> bool:
        """Stop a reply; what it produced so far is kept and saved as stopped."""
        await self.off_loop(self._owned_turn, who, cid, tid)
        return await self.runs.stop(tid)

    async def stop_chat(self, who: Caller, chat_id: str) -> int:
        """Stop every reply running in a client-named chat; how many were running."""
        return sum([await self.runs.stop(tid) for tid in await self._latest_turns(who, chat_id)])

    async def running_reply(self, who: Caller, chat_id: str) -> Run | None:
        """The reply still being written in a client-named chat (its shown one), else None."""
        for tid in await self._latest_turns(who, chat_id):
            run = self.runs.get(tid)
            if run is not None and not run.done:
                return run
        return None

    async def _latest_turns(self, who: Caller, chat_id: str) -> list[int]:
        """The chat's shown turn first, then its other versions (side-by-side replies)."""
        conv = await self.off_loop(self._chat, who, chat_id)
        if conv is None:
            raise NotFound()
        head = conv["head_turn_id"]
        if head is None:
            return []
        turn = await self.off_loop(self.store.turn, head, who.uid)
        if turn is None:
            return []
        group = await self.off_loop(self.store.siblings, conv["id"], [turn["parent_id"]])
        return [head, *(t for t in group.get(turn["parent_id"], []) if t != head)]

    # Importing -----------------------------------------------------------------------------

    async def import_file(self, who: Caller, raw: bytes, filename: str) -> dict:
        """Import an exported JSON file as a new conversation; a bad file changes nothing.

        It costs what a message does (parsing, then its history goes to the model): the same
        per-minute limits, counted before the work, whether or not the file is good.
        """
        await self._limit(who, replies=None)
        try:
            # Validating megabytes of JSON is CPU work: off the event loop, like other big work.
            turns = await self.off_loop(
                split_turns,
                raw,
                self.settings.max_import_turns,
                max_file_bytes=self.settings.max_attachment_bytes,  # an upload's limits
                max_files=self.settings.max_attachments,
            )
        except ImportError_ as exc:
            raise Refused(f"Could not import {filename or 'that file'}: {exc}", 422) from None
        title = (filename or "Imported").rsplit(".", 1)[0][:80] or "Imported"
        with _busy_refused():
            return await self.off_loop(self._import, who, f"Imported: {title}", turns)

    def _import(self, who: Caller, title: str, turns: list[dict]) -> dict:
        """Store an imported conversation and the files it carries. Blocking."""
        conv = self.store.import_conversation(who.uid, title, turns)
        attachments.add_imported(self.store, who.uid, conv, turns)
        return conv

    # The rules -----------------------------------------------------------------------------

    def _offered(self, model: str | None, persona: str | None, compare: Iterable[str]) -> list:
        models = list(dict.fromkeys(m for m in compare if m))
        choices = self.settings.choices
        if model and model not in choices or any(m not in choices for m in models):
            raise Refused("That model is not offered here. Pick one from the list.", 422)
        if persona and persona not in self.runs.personas:
            raise Refused("That persona does not exist. Pick one from the list.", 422)
        return models

    def _check_text(self, text: str, *, files: int = 0) -> None:
        limit = self.settings.max_message_chars
        if not text.strip() and not files:  # files alone are a message too
            raise Refused("Type a message before sending.", 422)
        if len(text) > limit:
            raise Refused(
                f"That message is {len(text):,} characters; the limit is {limit:,}. "
                "Shorten it and send again.",
                413,
            )

    async def _admit(self, who: Caller, replies: int, cid: str | None) -> None:
        """Whether `replies` may start now; called last before committing, so a message that
        passes (and only one that passes) is counted against the limits.

        With `cid`, a reply still being written in that conversation refuses it too: the new
        turn's history would lack that reply.
        """
        if not self.runs.accepting:
            raise Refused("The server is restarting. Send again in a moment.", 503)
        if cid is not None:
            if not await self._reserve(who, cid):
                raise Refused(REPLY_RUNNING, 409)
        await self._limit(who, replies=replies)

    async def _limit(self, who: Caller, *, replies: int | None) -> None:
        """The one place the limits are asked: `replies` to start, or None for an import."""
        if replies is None:
            refused = await self.limits.check_import(who.uid, who.addr)
        else:
            running, total = await self.runs.counts(who.uid)
            refused = await self.limits.check_send(
                who.uid, who.addr, running=running, total_running=total, count=replies
            )
        if refused:
            raise Refused(refused.message, refused.status, refused.headers)

    async def open_stream(self, who: Caller) -> bool:
        """Take one of the caller's open-stream slots; False if they are all in use."""
        return await self.limits.open_stream(who.uid)

    async def close_stream(self, who: Caller) -> None:
        """Give back a stream slot taken by `open_stream`."""
        await self.limits.close_stream(who.uid)

    # Committing ----------------------------------------------------------------------------

    async def _reserve(self, who: Caller, cid: str) -> bool:
        """Claim `cid` for the reply about to start (chat/runs.py `claim`); False if one runs
        there. Given back when the send lock is let go, unless a started run took it over."""
        try:
            claimed = await self.runs.claim(cid)
        except Exception as exc:  # Redis away: unchecked would let two replies run at once
            log.warning("could not claim conversation %s in Redis: %r", cid, exc)
            raise Refused(UNCHECKED.message, UNCHECKED.status, UNCHECKED.headers) from None
        if claimed:
            self._claimed[self._stripe(who)].append(cid)
        return claimed

    def _stripe(self, who: Caller) -> int:
        return crc32(who.uid.encode()) % len(self._locks)

    @asynccontextmanager
    async def _held(self, who: Caller) -> AsyncIterator[None]:
        """The user's send lock, held across the checks, the commit and the start of the run;
        a conversation claimed under it and not taken over by a run is given back on leaving
        (a refusal, a failed commit), so it never blocks the next send."""
        stripe = self._stripe(who)
        async with self._locks[stripe]:
            try:
                with _busy_refused():
                    yield
            finally:
                claimed, self._claimed[stripe] = self._claimed[stripe], []
                for cid in claimed:
                    await self.runs.unclaim(cid)

    async def _start(
        self,
        who: Caller,
        conv: dict,
        text: str,
        *,
        parent_id: int | None | str = "head",
        files: Sequence[dict] = (),
    ) -> tuple[dict, Run]:
        """Commit the user's message, then start its reply as a server-owned run."""
        turn = await self.off_loop(self._commit, who, conv, text, parent_id, files)
        return turn, self.runs.start(turn, who.uid)

    def _commit(
        self, who: Caller, conv: dict, text: str, parent_id: int | None | str, files
    ) -> dict:
        """The user's message as a new turn, its files bound to it. Blocking."""
        turn = self.store.add_turn(
            conv["id"],
            text,
            [ModelRequest(parts=[UserPromptPart(content=text)])],
            model=conv["model"] or self.settings.model or "demo",
            parent_id=parent_id,
        )
        if files:
            attachments.bind(self.store, turn, who.uid, files)
        return turn

    def _model_of(self, conv: dict | None, model: str | None) -> str:
        """The model a message goes to: the one picked, else the conversation's, else the
        default."""
        return model or (conv or {}).get("model") or self.settings.default_model

    def _prepare(
        self, who: Caller, conv: dict | None, text: str, model: str | None, persona: str | None
    ) -> dict:
        """Create the conversation, or switch its model and persona, before the message is sent.

        Blocking (the store): called off the loop."""
        if conv is None:
            conv = self.store.create_conversation(
                who.uid, model=model or self.settings.default_model, persona=persona
            )
            conv["title"] = short_title(text)
            self.store.set_title(conv["id"], conv["title"])
            return conv
        if model and model != conv["model"]:
            self.store.set_model(conv["id"], model)
            conv["model"] = model
        if persona and persona != conv["persona"]:
            self.store.set_persona(conv["id"], persona)
            conv["persona"] = persona
        return conv

    # Tool approval over /api/chat ------------------------------------------------------------

    async def decide_chat(
        self, who: Caller, chat_id: str, answers: dict[str, bool]
    ) -> tuple[Run, list[ModelMessage]]:
        """Decide the tool calls a client-named chat's paused reply waits on (by tool call id,
        as the AI SDK's approval responses name them) and resume it; the resumed run, and the
        messages of the reply before the pause (what the client already shows).

        The rules are the page's (chat/approvals.py): only the caller's own chat, only its
        shown reply while it waits, and ids that are not its waiting calls decide nothing. A
        request that decides nothing, leaves calls waiting, or comes too late is refused (409).
        """
        if not self.runs.accepting:
            raise Refused("The server is restarting; decide again in a moment.", 503)
        async with self._held(who):
            conv = await self.off_loop(self._chat, who, chat_id)
            if conv is None or conv["head_turn_id"] is None:
                raise NotFound()
            _, turn = await self.off_loop(self._owned_turn, who, conv["id"], conv["head_turn_id"])
            if turn["status"] != approvals.AWAITING:
                raise Refused(NOTHING_WAITS, 409)
            rows = await self.off_loop(self.store.approvals, turn["id"])
            waiting = {r["tool_call_id"] for r in rows if r["decision"] is None}
            answers = {k: v for k, v in answers.items() if k in waiting}
            if not answers:
                raise Refused(NOTHING_WAITS, 409)
            ttl = self.settings.tool_approval_ttl
            decision = await self.off_loop(approvals.decide_all, self.store, turn, answers, ttl)
            if decision.state == "expired":
                raise Refused(approvals.expired_note(ttl), 409)
            if decision.state == "pending":
                raise Refused("Other tool calls of this reply still wait for a decision.", 409)
            if decision.state != "resume":
                raise Refused(NOTHING_WAITS, 409)
            return self.runs.start(decision.turn, who.uid), decision.turn["resume"].prior

    # Client-named chats ----------------------------------------------------------------------

    def _chat(self, who: Caller, chat_id: str) -> dict | None:
        """The conversation a client's chat id names for this caller: one of theirs by its own
        id (as /api/conversations lists it), else the one created for that chat id. Blocking."""
        if not 0 < len(chat_id) <= MAX_CHAT_ID:
            return None
        return self.store.conversation(chat_id, who.uid) or self.store.conversation(
            chat_conversation_id(who.uid, chat_id), who.uid
        )

    def _history_turns(self, history: Sequence[ModelMessage]) -> list[dict]:
        """A client's earlier messages, cleaned (chat/untrusted.py) and cut into turns; what
        comes before its first user message (a greeting) is left out. Blocking (CPU)."""
        messages = untrusted.clean(history)
        while messages and not _is_prompt(messages[0]):
            messages.pop(0)
        if not messages:
            return []
        try:
            return turns_of(
                messages,
                self.settings.max_import_turns,
                max_file_bytes=self.settings.max_attachment_bytes,
                max_files=self.settings.max_attachments,
            )
        except ImportError_ as exc:
            raise Refused(f"The chat's earlier messages were not accepted: {exc}", 422) from None

    def _create_chat(self, who: Caller, chat: ChatRequest, text: str) -> dict:
        """A new conversation for a client's chat, holding its (cleaned) earlier turns. Blocking."""
        turns = self._history_turns(chat.history)
        cid = chat_conversation_id(who.uid, chat.chat_id)
        title = short_title(turns[0]["user_text"] if turns else text)
        try:
            conv = self.store.import_conversation(who.uid, title, turns, cid=cid)
        except sqlite3.IntegrityError:  # that chat's conversation was deleted: it stays gone
            raise NotFound() from None
        attachments.add_imported(self.store, who.uid, conv, turns)
        conv["model"] = self.settings.default_model
        self.store.set_model(cid, conv["model"])
        conv["persona"] = next(iter(self.runs.personas))
        self.store.set_persona(cid, conv["persona"])
        return conv

    def _claim(self, who: Caller, thread_id: str, text: str) -> dict:
        """A new conversation under the client's own id, for this caller. Blocking."""
        persona = next(iter(self.runs.personas))
        conv = self.store.claim_conversation(
            thread_id, who.uid, model=self.settings.default_model, persona=persona
        )
        if conv is None:
            if self.store.conversation(thread_id, who.uid) is not None:
                # Claimed a moment ago by this caller's other request (another worker): its
                # reply is starting there.
                raise Refused(REPLY_RUNNING, 409)
            raise NotFound()
        conv["title"] = short_title(text)
        self.store.set_title(thread_id, conv["title"])
        return conv

    def _owned_turn(self, who: Caller, cid: str, tid: int | None) -> tuple[dict, dict]:
        """The caller's conversation `cid` and its turn `tid`; NotFound unless both are theirs
        and match. Blocking."""
        conv = self.store.conversation(cid, who.uid)
        if conv is None:
            raise NotFound()
        turn = self.store.turn(tid, who.uid) if tid is not None else None
        if turn is None or turn["conversation_id"] != cid:
            raise NotFound()
        return conv, turn


def chat_conversation_id(uid: str, chat_id: str) -> str:
    """The conversation id for a client's chat id: a hash of both, so clients choose no stored
    id and one user's chat ids can never name, collide with or probe another user's."""
    digest = hashlib.sha256(f"{uid}\x00{chat_id}".encode()).digest()
    return urlsafe_b64encode(digest).decode()[:16]


def _is_prompt(message: ModelMessage) -> bool:
    return isinstance(message, ModelRequest) and any(
        isinstance(p, UserPromptPart) for p in message.parts
    )


@contextmanager
def _busy_refused() -> Iterator[None]:
    """A database that cannot take a write now (locked past its busy timeout, read-only)
    refuses the request politely; what it was asked to change is unchanged."""
    try:
        yield
    except sqlite3.OperationalError:
        raise Refused(BUSY, 503) from None
