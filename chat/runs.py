"""A reply as a server-owned task, with a run log that streams can replay and then follow.

POSTing a message starts a `Run`; the SSE endpoint only ever attaches to one. The run renders
model text as it arrives (coalesced to at most one update per `stream_tick`), keeps the finished
blocks and the current tail, and appends each change to its run log (chat/runlog.py), which
wakes its followers. Any number of followers (tabs, reloads, reconnects) read the same log, so
one message always means exactly one model call. With REDIS_URL the log is copied to Redis and
the reply holds a lease (chat/cluster.py), so streams, Stop and counts work from any process.

Why this module is long: it is one state machine. Driving the model, turning its events
into blocks, pacing updates under load, flushing partial text and finishing (with retried
saves) all read and write the same `Run`; the parts with a job of their own live in
chat/errors.py, chat/outcome.py, chat/titles.py, chat/runlog.py, chat/sharing.py and
chat/cluster.py.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import sqlite3
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from pydantic_ai import Agent, CancellationToken, UsageLimits
from pydantic_ai.exceptions import (
    RunCancelled,
)
from pydantic_ai.messages import (
    FunctionToolCallEvent,
    FunctionToolResultEvent,
    ModelMessage,
    ModelRequest,
    ModelResponse,
    PartDeltaEvent,
    PartStartEvent,
    TextPart,
    TextPartDelta,
    UserPromptPart,
)
from pydantic_ai.models import Model

from chat import approvals, attachments, budget
from chat.agent import resolve_model
from chat.cluster import Cluster
from chat.config import Settings
from chat.errors import (
    NOT_SAVED,
    OUTPUT_LIMIT,
    UNSAVED,
    FirstTokenTimeout,
    InvalidOutput,
    OutputLimitReached,
    StalledError,
    describe_error,
    expected,
)
from chat.markdown import StreamRenderer
from chat.mcp import McpServers
from chat.outcome import (
    clean,
    has_text,
    salvage,
    storable,
    text_of,
    usage_of,
    valid_text,
)
from chat.personas import Persona, load_personas
from chat.redislog import RedisLog, follow_redis
from chat.reply import ToolView
from chat.runlog import Block, End, Entry, MemoryLog, ToolUpdate
from chat.sharing import Sharing
from chat.storage import Store
from chat.store import INTERRUPTED
from chat.titles import Titles
from chat.tools import ToolDeps

log = logging.getLogger(__name__)

# Up to this many replies at once, each updates every `stream_tick`; beyond, updates (and reads
# from the model) slow down in proportion, so the CPU they share goes further.
_SHARED_TICK = 8
# The stream-side output cap estimates tokens from characters. Real text averages about four
# characters a token; counting six makes the estimate low, so a reply the provider would allow
# under `max_tokens` is never cut short here: this cap only catches a provider that ignores it.
_CHARS_PER_TOKEN = 6
# A final save that fails (disk full, database locked) is retried, waiting this long at first,
# doubling up to the maximum.
_SAVE_RETRY_FIRST = 0.5
_SAVE_RETRY_MAX = 30.0
# Shutdown waits this long at most for the store calls still running in threads: a write waits
# up to the store's busy timeout (5 s) for a lock.
_WRITES_WAIT = 6.0


Item = Block | ToolView | ToolUpdate


def _settle_heap(when: str) -> None:
    """Move every object alive now out of the cyclic collector's sight (`gc.freeze`), once per
    process for each `when`: the app loaded ("start"), a provider's SDK imported ("model").

    Modules, classes and settings live as long as the process, yet every full collection
    walked them all: with MCP, AG-UI, Redis and the SDKs loaded, a tenth of a second each time,
    several times per hundred replies. Frozen objects are never collected; what is alive at
    these two moments is kept for good anyway, bar one request's worth (and, in tests, one
    test's fixtures: later RunManagers in the same process do not freeze again).
    """
    if when in _SETTLED:
        return
    _SETTLED.add(when)
    gc.collect()
    gc.freeze()


_SETTLED: set[str] = set()


@dataclass(eq=False)
class Run:
    """One reply being generated: its rendered state and the task generating it."""

    turn_id: int
    conversation_id: str
    owner: str
    model_name: str
    user_text: str = ""
    renderer: StreamRenderer = field(default_factory=StreamRenderer)
    items: list[Item] = field(default_factory=list)
    tail: str = ""
    status: str = "streaming"
    error: str | None = None
    usage: dict | None = None
    version: int = 0
    token: CancellationToken = field(default_factory=CancellationToken)
    task: asyncio.Task | None = None
    started: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    log: MemoryLog = field(default_factory=MemoryLog)
    # With REDIS_URL: copies each entry to the reply's Redis Stream.
    mirror: RedisLog | None = None
    _logged_items: int = 0  # how much of `items` and of the source the log already has
    _logged_chars: int = 0
    _logged_tail: str = ""
    _flush_handle: asyncio.TimerHandle | None = None
    _last_flush: float = 0.0
    _save_handle: asyncio.TimerHandle | None = None
    _saved_at: float | None = None  # loop time of the last partial save
    # The partial save in its thread, if one is under way: never two at once for one reply.
    _saving: asyncio.Task | None = None
    _save_again: bool = False  # text came while `_saving` ran: save again when it is done
    _closing: bool = False  # the final save has begun: no partial save may start
    output_chars: int = 0
    # Set when rendering between model events failed: the run is then cancelled and fails.
    fault: Exception | None = None
    # The final save, while it waits for the database (see RunManager.unsaved).
    pending: dict | None = None

    @property
    def done(self) -> bool:
        """True once the reply has ended, however it ended."""
        return self.status != "streaming"

    def publish(self) -> None:
        """Append what changed since the last entry to the run log, waking every follower."""
        self.version += 1
        if self.log.ended:  # only the end's error can still change (a save given up)
            self.log.amend_end(self.end_state())
            return
        new = self.items[self._logged_items :]
        self._logged_items = len(self.items)
        source = self.renderer.source
        text = source[self._logged_chars :]
        self._logged_chars = len(source)
        tail = None
        if self.tail != self._logged_tail:
            tail = self._logged_tail = self.tail
        entry = self.log.append(new, tail, text, self.end_state() if self.done else None)
        if self.mirror is not None:
            self.mirror(entry)

    def end_log(self) -> None:
        """End the run log with a bare end entry after the last publish failed, so every
        follower still ends (with the reply's status) instead of waiting for an end that never
        comes; the page, read from the store, shows the whole reply."""
        if self.log.ended:
            return
        try:
            entry = self.log.append([], None, "", self.end_state())
            if self.mirror is not None:
                self.mirror(entry)
        except Exception:
            log.exception("could not end the log of reply %s", self.turn_id)

    def end_state(self) -> End:
        """How the reply ended (or stands), as its footer shows it."""
        return End(self.status, self.error, self.usage, self.model_name, bool(self.renderer.source))

    def follow(self, after: int = 0, heartbeat: float = 15.0) -> AsyncIterator[Entry | None]:
        """Replay the log after entry `after`, then follow it live (see MemoryLog.follow)."""
        return self.log.follow(after, heartbeat)


class RunManager(Sharing):
    """Starts, tracks, stops and finishes runs; saves every reply however it ends."""

    def __init__(
        self,
        store: Store,
        agent: Agent,
        settings: Settings,
        *,
        model: Model | None = None,
        mcp: McpServers | None = None,
        cluster: Cluster | None = None,
    ):
        self.mcp = mcp  # MCP servers whose tools the agent offers (chat/mcp.py)
        self.store = store
        # With REDIS_URL: the other processes (leases, Stop, shared logs); None: this one alone.
        self.cluster = cluster
        self._shared: set[asyncio.Task] = set()  # lease and log work of this process's runs
        self._background: list[asyncio.Task] = []
        # Conversations claimed in Redis for a reply about to start (`claim`): cid -> token.
        self._claims: dict[str, str] = {}
        self.agent = agent
        self.settings = settings
        self._model_override = model  # tests pass a FunctionModel here
        self._models: dict[str, Model] = {}
        self.runs: dict[int, Run] = {}
        # Replies that ended but could not be saved yet: kept in memory while the save is retried.
        self.unsaved: dict[int, Run] = {}
        self._retries: dict[int, asyncio.Task] = {}
        # Store calls running in threads, which shutdown lets end before the store is closed.
        self._writes: set[asyncio.Task] = set()
        self.titles = Titles(store, busy=lambda: len(self.runs) > _SHARED_TICK)
        self.personas = load_personas()
        self.accepting = True
        _settle_heap("start")  # the app is loaded: its modules are here to stay

    async def streaming_in(self, cid: str) -> bool:
        """True while a reply in conversation `cid` is being generated (by any process)."""
        if any(run.conversation_id == cid for run in self.runs.values()):
            return True
        return self.cluster is not None and await self.cluster.streaming_in(cid)

    async def claim(self, cid: str) -> bool:
        """Claim conversation `cid` for a reply about to start; False if a reply runs or is
        starting there. Alone, the caller's send lock makes the check and the start one step;
        with REDIS_URL the claim is taken in Redis, so of two processes sending at once exactly
        one wins. The next `start` in `cid` takes the claim over; `unclaim` gives it back."""
        if any(run.conversation_id == cid for run in self.runs.values()):
            return False
        if self.cluster is None:
            return True
        token = await self.cluster.claim(cid)
        if token is None:
            return False
        self._claims[cid] = token
        return True

    async def unclaim(self, cid: str) -> None:
        """Give back a claim on `cid` that no started reply took over (a no-op otherwise)."""
        token = self._claims.pop(cid, None)
        if token is None or self.cluster is None:
            return
        try:
            await self.cluster.unclaim(cid, token)
        except Exception as exc:  # it lapses with the lease time
            log.warning("could not give back the claim on conversation %s: %s", cid, exc)

    async def running(self, owner: str) -> int:
        """How many of `owner`'s replies are being generated now (by every process)."""
        here = sum(1 for run in self.runs.values() if run.owner == owner)
        if self.cluster is None:
            return here
        # A run started here a moment ago may not hold its lease in Redis yet.
        return max(here, await self.cluster.running(owner))

    async def counts(self, owner: str) -> tuple[int, int]:
        """`running(owner)` and `total_running()` together (with REDIS_URL, one round trip)."""
        here = sum(1 for run in self.runs.values() if run.owner == owner)
        if self.cluster is None:
            return here, len(self.runs)
        mine, everyone = await self.cluster.counts(owner)
        # A run started here a moment ago may not hold its lease in Redis yet.
        return max(here, mine), max(len(self.runs), everyone)

    async def total_running(self) -> int:
        """How many replies are being generated now, server-wide (every process)."""
        if self.cluster is None:
            return len(self.runs)
        return max(len(self.runs), await self.cluster.total())

    def get(self, turn_id: int) -> Run | None:
        """The run for a turn while it is generating here, or ended but not saved yet."""
        return self.runs.get(turn_id) or self.unsaved.get(turn_id)

    def live(self, turn: dict) -> bool:
        """True if `turn`'s reply is still being written, here or (REDIS_URL) elsewhere."""
        if self.get(turn["id"]) is not None:
            return True
        return self.cluster is not None and turn["status"] == "streaming"

    def follow(
        self, turn: dict, after: int = 0, heartbeat: float = 15.0
    ) -> AsyncIterator[Entry | None] | None:
        """Follow `turn`'s reply log after entry `after`: this process's run, else (REDIS_URL)
        the shared log of the process writing it; None if it is not being written."""
        run = self.get(turn["id"])
        if run is not None:
            return run.follow(after, heartbeat)
        if self.cluster is not None and turn["status"] == "streaming":
            cluster = self.cluster
            return follow_redis(
                cluster.redis, turn["id"], after, heartbeat, cluster.prefix, cluster.reader
            )
        return None

    def start(self, turn: dict, owner: str) -> Run:
        """Start generating the reply to `turn` (already committed) as a server-owned task."""
        run = Run(
            turn_id=turn["id"],
            conversation_id=turn["conversation_id"],
            owner=owner,
            model_name=turn["model"] or "demo",
            user_text=turn["user_text"],
        )
        self.runs[run.turn_id] = run
        if self.cluster is not None:
            run.mirror = RedisLog(
                self.cluster.redis, run.turn_id, self.cluster.prefix, self.cluster.writer
            )
            claim = self._claims.pop(run.conversation_id, None)
            self._in_background(self._lease(run, claim), f"lease-{run.turn_id}")
        run.task = asyncio.create_task(self._drive(run, turn), name=f"run-{run.turn_id}")
        # A task cancelled before its first step never runs `_drive`'s `finally`: this does.
        run.task.add_done_callback(lambda _: self._reap(run, turn))
        return run

    def _reap(self, run: Run, turn: dict) -> None:
        if run.turn_id in self.runs and self.runs[run.turn_id] is run and not run._closing:
            request = ModelRequest(parts=[UserPromptPart(content=turn["user_text"])])
            # The save runs off the loop, so in a task of its own; shutdown waits for it.
            finish = self._finish(run, "interrupted", INTERRUPTED, [request])
            self._in_background(finish, f"reap-{run.turn_id}")

    async def stop(self, turn_id: int) -> bool:
        """Ask a live run to stop, here or (REDIS_URL) in the process writing it; its partial
        reply is kept. False if it is known not to be running."""
        if self._stop_here(turn_id):
            return True
        if self.cluster is None:
            return False
        await self.cluster.request_stop(turn_id)
        return True

    def _stop_here(self, turn_id: int) -> bool:
        run = self.runs.get(turn_id)
        if run is None or run.done:
            return False
        run.token.cancel()  # pydantic-ai closes the model's stream: the upstream call ends
        return True

    async def shutdown(self, timeout: float = 10.0) -> None:
        """Stop accepting runs, stop the ones in flight and wait until they are saved."""
        self.accepting = False
        tasks = [run.task for run in self.runs.values() if run.task]
        for run in list(self.runs.values()):
            run.token.cancel()
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=timeout)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=2)
        # Other processes see these replies end, and their leases go back.
        if self._shared:
            await asyncio.wait(list(self._shared), timeout=5)
        for task in self._background:
            task.cancel()
        await self.titles.close()
        # Store calls cut off from their (cancelled) callers still run: they end first.
        for task in list(self._retries.values()):
            task.cancel()
        if self._writes:
            await asyncio.wait(list(self._writes), timeout=_WRITES_WAIT)
        # Replies still waiting for the database get one last try before the process ends.
        for run in list(self.unsaved.values()):
            if run.pending is None:  # saved meanwhile (a save left running by a cancelled task)
                self.unsaved.pop(run.turn_id, None)
            elif await self._off_loop(self._try_save, run.pending):
                run.pending = None
                self.unsaved.pop(run.turn_id, None)
            else:
                log.error("reply %s could not be saved before shutdown", run.turn_id)

    def _context(self, run: Run, turn: dict) -> tuple[list[ModelMessage], Persona | None]:
        """The turn's history and the conversation's persona (blocking: call it in a thread)."""
        conv = self.store.conversation(run.conversation_id, run.owner)
        return self.store.history(turn), self.personas.get((conv or {}).get("persona") or "")

    def model_for(self, name: str) -> Model:
        """The Model for a model string (the test override, when one is set)."""
        return self._model(name)

    def _model(self, name: str) -> Model:
        if self._model_override is not None:
            return self._model_override
        if name not in self._models:
            self._models[name] = resolve_model(name, self.settings)
            _settle_heap("model")  # a provider's SDK is imported with its first model
        return self._models[name]

    # The task ------------------------------------------------------------------------------

    async def _drive(self, run: Run, turn: dict) -> None:
        request = ModelRequest(parts=[UserPromptPart(content=turn["user_text"])])
        messages: list[ModelMessage] = [request]
        status, error = "failed", None
        events = None
        prior = None  # a resumed reply's messages so far (chat/approvals.py)
        try:
            cfg = self.settings
            # A long conversation's history takes a while to read and validate, and the persona
            # is a read too: both in one trip off the loop.
            stored, persona = await asyncio.to_thread(self._context, run, turn)
            fitted = budget.fit(
                stored, max_messages=cfg.history_max_messages, max_chars=cfg.history_max_chars
            )
            # MCP servers and tool approvals (chat/mcp.py, chat/approvals.py): a resumed reply
            # continues from its stored messages; a missing server is noted in the reply.
            prompt, history, deferred, prior = approvals.run_input(
                run, turn, fitted.messages, self._text_done
            )
            messages = prior or messages
            toolsets = persona.toolsets if persona else None
            for note in await self.mcp.notes(toolsets) if self.mcp else ():
                run.renderer.feed(f"*{note}*\n\n")
            if fitted.note:  # shown at the top of this reply, and kept with its text
                run.renderer.feed(f"*{fitted.note}*\n\n")
                self._schedule(run)
            model = self._model(run.model_name)
            # The prompt's files, and earlier ones re-sent (chat/attachments.py): read off the loop.
            # A resumed reply (approvals) has no new prompt: its files are in its history.
            if prompt is not None:
                prompt, history = await asyncio.to_thread(
                    attachments.model_input, self.store, turn, run.owner, history, model.profile
                )
            else:
                history = await asyncio.to_thread(
                    attachments.rehydrate, self.store, run.owner, history, model.profile
                )
            model_settings = {"max_retries": cfg.model_retries}
            if cfg.output_tokens_limit:
                # Asked of the model, per request; `_on_event` enforces it if the model ignores it.
                model_settings["max_tokens"] = cfg.output_tokens_limit
            async with self.agent.run_stream_events(
                prompt,
                message_history=history,
                deferred_tool_results=deferred,
                model=model,
                deps=ToolDeps(self.store, run.owner, toolsets),
                instructions=persona.instructions if persona else None,
                cancellation_token=run.token,
                usage_limits=UsageLimits(
                    request_limit=cfg.request_limit, output_tokens_limit=cfg.output_tokens_limit
                ),
                model_settings=model_settings,
            ) as events:
                loop = asyncio.get_running_loop()
                deadline = None
                # Before a model request's first event the server reads the whole prompt, which
                # on a local CPU model takes far longer than any pause between tokens: that wait
                # has its own, longer limit. A tool result means a new request follows.
                waiting = True
                try:
                    # One deadline, pushed back by every event: no task or timer per token.
                    async with asyncio.timeout(cfg.first_token_timeout) as deadline:
                        async for event in events:
                            waiting = isinstance(event, FunctionToolResultEvent)
                            limit = cfg.first_token_timeout if waiting else cfg.stall_timeout
                            deadline.reschedule(loop.time() + limit)
                            self._on_event(run, event)
                            if pause := self._pace(run):
                                await asyncio.sleep(pause)
                except TimeoutError:
                    if deadline is not None and deadline.expired():
                        raise (FirstTokenTimeout if waiting else StalledError) from None
                    raise
            result = events.result
            if result is not None:
                messages = result.new_messages()
                run.usage = usage_of(result.usage, run.started, run.first_token_at)
            # Awaiting approval stores the calls waiting for a decision: a write, off the loop.
            status = await asyncio.shield(
                self._off_loop(approvals.outcome, self.store, run, result, cfg.tool_approval_ttl)
            )
        except RunCancelled as exc:
            messages = exc.new_messages() or messages
            if run.fault is not None:  # rendering failed between events (see `_flush_later`)
                error = describe_error(run.fault)
                log.warning("reply %s failed: %s", run.turn_id, error, exc_info=run.fault)
            elif self.accepting:
                status = "stopped"  # the user pressed Stop
            else:  # the server is shutting down: not the user's doing
                status, error = "interrupted", INTERRUPTED
        except OutputLimitReached:
            status, error = "stopped", OUTPUT_LIMIT
            messages = salvage(events, messages)
        except asyncio.CancelledError:
            status, error = "interrupted", INTERRUPTED
            messages = salvage(events, messages)
            raise
        except Exception as exc:
            error = describe_error(exc)
            log.warning("reply %s failed: %s", run.turn_id, error, exc_info=not expected(exc))
            messages = salvage(events, messages)
        finally:
            await self._finish(run, status, error, approvals.whole(prior, messages))
            if status == "complete" and turn["parent_id"] is None:
                try:
                    self.titles.start(
                        self._model(run.model_name),
                        run.conversation_id,
                        run.owner,
                        turn["user_text"],
                        run.renderer.source,
                    )
                except Exception:  # a title is a nicety; the reply is saved already
                    log.exception("could not start naming conversation %s", run.conversation_id)

    def _on_event(self, run: Run, event: object) -> None:
        if isinstance(event, FunctionToolCallEvent):
            self._text_done(run)
            view = ToolView.from_call(event.part)
            self._count(run, len(view.args))
            run.items.append(view)
            run.publish()
            return
        if isinstance(event, FunctionToolResultEvent):
            for item in run.items:
                if isinstance(item, ToolView) and item.id == event.tool_call_id:
                    item.settle(event.part)
                    run.items.append(ToolUpdate(item))
                    run.publish()
            return
        text = None
        if isinstance(event, PartStartEvent) and isinstance(event.part, TextPart):
            text = event.part.content
            if run.renderer.source and text is not None:
                text = "\n\n" + text  # a new text part (e.g. after a tool call) starts a new block
        elif isinstance(event, PartDeltaEvent) and isinstance(event.delta, TextPartDelta):
            text = event.delta.content_delta
        if text:
            if not valid_text(text):
                raise InvalidOutput
            if run.first_token_at is None:
                run.first_token_at = time.monotonic()
            run.renderer.feed(text)
            self._schedule(run)
            self._count(run, len(text))

    def _count(self, run: Run, chars: int) -> None:
        """Count a reply's output; past MAX_OUTPUT_TOKENS (estimated) the reply is ended."""
        run.output_chars += chars
        limit = self.settings.output_tokens_limit
        if limit and run.output_chars > limit * _CHARS_PER_TOKEN:
            raise OutputLimitReached

    def _tick(self) -> float:
        """How often a reply's page is updated at most. Under load, less often: each update
        costs CPU every stream shares. A few replies update every `stream_tick`; a hundred
        update a few times a second."""
        return self.settings.stream_tick * max(1.0, len(self.runs) / _SHARED_TICK)

    def _pace(self, run: Run) -> float:
        """Seconds a run waits before reading on from its model; 0 unless under load.

        Reading faster than the page is updated only spends CPU early: under load a reply that
        is already showing reads once per tick (taking everything that arrived meanwhile in
        one go), so replies still waiting for their first words get the server first.
        """
        if len(self.runs) <= _SHARED_TICK or run.first_token_at is None:
            return 0.0
        return max(0.0, self._until_next_flush(run))

    def _until_next_flush(self, run: Run) -> float:
        """Seconds until a tick has passed since the run's last render (<= 0: it has)."""
        return run._last_flush + self._tick() - asyncio.get_running_loop().time()

    def _schedule(self, run: Run) -> None:
        """Coalesce updates: render at once if the last render was a tick ago, else at the tick."""
        if run._flush_handle is not None:
            return
        wait = self._until_next_flush(run)
        if wait <= 0:
            self._flush(run)
        else:
            run._flush_handle = asyncio.get_running_loop().call_later(wait, self._flush_later, run)

    def _flush_later(self, run: Run) -> None:
        """A timed flush: outside `_drive`, so a failure is handed to it by cancelling the run."""
        try:
            self._flush(run)
        except Exception as exc:
            run.fault = exc
            run.token.cancel()

    def _text_done(self, run: Run) -> None:
        """End the current run of text (a tool call follows): all of it becomes blocks."""
        if run._flush_handle is not None:
            run._flush_handle.cancel()
            run._flush_handle = None
        new, _ = run.renderer.update(final=True)
        run.items.extend(Block(h) for h in new)
        run.tail = ""

    def _flush(self, run: Run) -> None:
        run._flush_handle = None
        if run.done:
            return
        run._last_flush = asyncio.get_running_loop().time()
        new, run.tail = run.renderer.update()
        run.items.extend(Block(h) for h in new)
        run.publish()
        self._schedule_save(run)

    def _schedule_save(self, run: Run) -> None:
        """Save the text so far soon: the first words at once, later text within `flush_every`
        of arriving, even if the model then goes quiet; never one write per token."""
        if run._save_handle is not None or run._closing:
            return
        if run._saving is not None:  # one save at a time: the next follows when it is done
            run._save_again = True
            return
        loop = asyncio.get_running_loop()
        wait = 0.0
        if run._saved_at is not None:
            wait = run._saved_at + self.settings.flush_every - loop.time()
        if wait <= 0:
            self._save_partial(run)
        else:
            run._save_handle = loop.call_later(wait, self._save_partial, run)

    def _save_partial(self, run: Run) -> None:
        """Save the text so far as the turn's model response, so a crash keeps what was seen.

        The write runs in a thread: a database that makes it wait (another process holding
        SQLite's write lock, a Postgres round trip or a full pool) holds up this save only,
        not every stream and request on the loop."""
        run._save_handle = None
        if run.done or run._closing or run._saving is not None:
            return
        run._saved_at = asyncio.get_running_loop().time()
        text = run.renderer.source
        messages = [
            ModelRequest(parts=[UserPromptPart(content=run.user_text)]),
            ModelResponse(parts=[TextPart(content=text)]),
        ]
        run._saving = asyncio.get_running_loop().create_task(
            self._write_partial(run, text, messages), name=f"partial-{run.turn_id}"
        )

    async def _write_partial(self, run: Run, text: str, messages: list[ModelMessage]) -> None:
        try:
            await asyncio.shield(
                self._off_loop(self.store.save_partial, run.turn_id, text, messages)
            )
        except Exception as exc:  # the final save retries; streaming goes on meanwhile
            log.warning("could not save the partial reply %s: %s", run.turn_id, exc)
        finally:
            run._saving = None
            # Text that came during this save reaches the disk too, one `flush_every` on.
            if run._save_again and not run._closing:
                run._save_again = False
                self._schedule_save(run)

    async def _finish(self, run: Run, status: str, error: str | None, messages: list) -> None:
        """End a run however it went: save it (or keep it for a retried save), free its slot.

        Never raises (bar its task's own cancellation, re-raised once the run is ended): the
        run leaves `runs` and its followers are woken, in that order after the final save, so
        a stream that finds no run reads a row that is no longer 'streaming'. The database
        writes run in threads: a slow or locked database keeps this reply waiting, nobody else.
        """
        run._closing = True  # no partial save starts from now on
        cancelled = False
        try:
            try:
                self._text_done(run)
            except Exception as exc:  # the renderer broke on this text: end as failed
                log.warning("reply %s could not be rendered", run.turn_id, exc_info=exc)
                run.tail = ""
                status, error = "failed", describe_error(exc)
            if run._save_handle is not None:
                run._save_handle.cancel()
                run._save_handle = None
            text = clean(run.renderer.source or text_of(messages))
            if status not in ("complete", approvals.AWAITING) and text and not has_text(messages):
                # Keep the partial reply in the history, so the next turn sees what the user saw.
                messages = [*messages, ModelResponse(parts=[TextPart(content=text)])]
            record = dict(
                tid=run.turn_id,
                status=status,
                reply_text=text,
                messages=storable(attachments.stored(messages)),
                error=error,
                usage=run.usage,
            )
            try:
                saved = await self._save_final(run, record)
            except asyncio.CancelledError:
                # Shutdown cancelled the task mid-save. The thread goes on saving; until it is
                # known to have, the reply is kept as pending, which shutdown's last try (or a
                # retry) saves.
                cancelled = True
                saved = None
                self._keep(run, record)
            if saved is False:
                # Kept in memory, shown from memory (`get`), and saved when the database can be
                # written again; the slot is freed now all the same.
                error = f"{error} {UNSAVED}" if error else UNSAVED
                self._keep(run, record)
                self._retries[run.turn_id] = asyncio.get_running_loop().create_task(
                    self._retry_save(run), name=f"save-{run.turn_id}"
                )
        except Exception:
            log.exception("reply %s could not be finished cleanly", run.turn_id)
            status = "failed" if status == "complete" else status
            error = error or describe_error(RuntimeError())
            try:
                await asyncio.shield(self._off_loop(self._save_plainly, run, status, error))
            except asyncio.CancelledError:
                cancelled = True
        finally:
            run.error = error
            run.status = status
            if self.runs.get(run.turn_id) is run:
                del self.runs[run.turn_id]
            try:
                run.publish()
            except Exception:
                log.exception("could not wake the followers of reply %s", run.turn_id)
                run.end_log()
            if self.cluster is not None:
                self._in_background(self._unlease(run), f"unlease-{run.turn_id}")
        if cancelled:
            raise asyncio.CancelledError

    async def _save_final(self, run: Run, record: dict) -> bool:
        """`_try_save` in a thread, after any partial save still under way (its 'streaming'
        guard keeps it from overwriting the final row anyway): one writer per reply at a time.
        Cancelling the caller leaves the save to finish; what it comes to is then recorded
        (`_settle`)."""

        async def save() -> bool:
            if run._saving is not None:
                await asyncio.wait([run._saving])
            return await asyncio.to_thread(self._try_save, record)

        future = self._track(save())
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            future.add_done_callback(lambda f: self._settle(run, record, f))
            raise

    def _off_loop(self, fn, /, *args) -> asyncio.Task:
        """`fn(*args)` in a thread, as a task shutdown waits for (`_writes`)."""
        return self._track(asyncio.to_thread(fn, *args))

    def _track(self, work) -> asyncio.Task:
        """Run `work` as a task that shutdown waits for: a store call whose caller was
        cancelled still runs in its thread, and must end before the store is closed."""
        task = asyncio.get_running_loop().create_task(work)
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)
        return task

    def _keep(self, run: Run, record: dict) -> None:
        """Keep a finished reply whose save is not confirmed: shown from memory, saved later."""
        run.pending = record
        self.unsaved[run.turn_id] = run

    def _settle(self, run: Run, record: dict, future: asyncio.Future) -> None:
        """A final save left running by a cancelled task has ended: drop the kept copy if it
        saved; else retry it (shutdown's last try covers a process that is ending)."""
        if future.cancelled() or future.exception() is not None or not future.result():
            if self.accepting and run.turn_id not in self._retries:
                self._retries[run.turn_id] = asyncio.get_running_loop().create_task(
                    self._retry_save(run), name=f"save-{run.turn_id}"
                )
            return
        if run.pending is record:
            run.pending = None
            self.unsaved.pop(run.turn_id, None)

    def _save_plainly(self, run: Run, status: str, error: str | None) -> None:
        """Last resort when finishing failed other than on the database (a bug, messages that
        will not serialize): store the text as plain messages, so the turn does not stay
        'streaming' until the next restart and the next turn's history still has it."""
        try:
            text = clean(run.renderer.source)
            messages: list[ModelMessage] = [
                ModelRequest(parts=[UserPromptPart(content=run.user_text)])
            ]
            if text:
                messages.append(ModelResponse(parts=[TextPart(content=text)]))
            self.store.finish_turn(
                run.turn_id, status=status, reply_text=text, messages=messages, error=error
            )
        except Exception:
            log.exception("reply %s could not be saved; the next start marks it", run.turn_id)

    def _try_save(self, record: dict) -> bool:
        """Save a finished reply; False if the database cannot be written now (retry later)."""
        try:
            self.store.finish_turn(record["tid"], **{k: v for k, v in record.items() if k != "tid"})
        except sqlite3.Error as exc:
            log.warning("could not save reply %s yet: %s", record["tid"], exc)
            return False
        return True

    async def _retry_save(self, run: Run) -> None:
        """Retry a failed final save with backoff, for up to `save_retry_for` seconds."""
        loop = asyncio.get_running_loop()
        until = loop.time() + self.settings.save_retry_for
        delay = _SAVE_RETRY_FIRST
        try:
            while True:
                await asyncio.sleep(delay)
                if run.pending is not None and await asyncio.shield(
                    self._off_loop(self._try_save, run.pending)
                ):
                    log.info("reply %s saved after a failed attempt", run.turn_id)
                    run.error, run.pending = run.pending["error"], None
                    return
                if loop.time() >= until:
                    log.error(
                        "gave up saving reply %s after %.0f s; shutdown tries once more, else "
                        "the next start marks it interrupted",
                        run.turn_id,
                        self.settings.save_retry_for,
                    )
                    # Still shown from memory (`get`), now saying it is not stored.
                    first = run.pending["error"]
                    run.error = f"{first} {NOT_SAVED}" if first else NOT_SAVED
                    run.publish()
                    return
                delay = min(delay * 2, _SAVE_RETRY_MAX)
        finally:
            self._retries.pop(run.turn_id, None)
            if run.pending is None:
                self.unsaved.pop(run.turn_id, None)
