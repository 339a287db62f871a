"""The two stores agree: one scripted sequence of store calls, run on SQLite (ChatStore) and on
Postgres (PostgresStore) with the same clock and the same ids, gives equal results at every step.

Equal means `==` on what the app sees: the same dict keys and values, the same ordering, the
same search hits and snippets. The clock (`chat.store.now`, which both stores read) ticks a
millisecond per call and can be stopped, so ties in ordering are exercised too; conversation,
attachment and account ids come from counters.

Where the backends cannot agree, the script leaves the case out and says why:
- search ranking: SQLite ranks by bm25, Postgres by ts_rank; queries here hit one turn, or
  turns that tie (then both order by turn id), or rank the same way under both.
- snippets of long texts: ts_headline picks its ~12 words by its own rules; a long text here
  has one hit in plain prose, where both pick the same words.
- turn ids after the newest turn is erased: SQLite reuses the id, Postgres never does, so the
  script erases only at its end.
- erasing a conversation with tool approvals: SQLite refuses (a foreign key), Postgres erases.
"""

from __future__ import annotations

import itertools
import re
import secrets
import sqlite3
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from pydantic_ai.messages import ModelRequest, ModelResponse, TextPart, UserPromptPart

import chat.store
from chat.pgstore import PostgresStore
from chat.store import ChatStore, dump_messages
from tests.postgres_server import fresh_database_url

START = datetime(2026, 1, 1, tzinfo=UTC)


class Clock:
    """`now()` for both stores: one millisecond later at every call, unless stopped."""

    def __init__(self) -> None:
        self.ms = 0
        self.stopped = False

    def __call__(self) -> str:
        if not self.stopped:
            self.ms += 1
        return (START + timedelta(milliseconds=self.ms)).isoformat(timespec="milliseconds")

    def at(self, ms: int) -> str:
        """The clock's text for `ms` milliseconds after the start."""
        return (START + timedelta(milliseconds=ms)).isoformat(timespec="milliseconds")


def ask(text: str) -> ModelRequest:
    return ModelRequest(parts=[UserPromptPart(content=text, timestamp=START)], timestamp=START)


def answer(text: str) -> ModelResponse:
    return ModelResponse(parts=[TextPart(content=text)], timestamp=START)


def untimed(row: dict) -> dict:
    """`row` with the times in its messages' JSON blanked."""
    return {**row, "messages": re.sub(r'"timestamp":"[^"]*"', '"timestamp":""', row["messages"])}


def script(store, clock: Clock) -> list[tuple[str, Any]]:
    """Call every store method in one sequence; each step's (name, result)."""
    steps: list[tuple[str, Any]] = []

    def step(name: str, value: Any) -> Any:
        steps.append((name, value))
        return value

    def refused(name: str, call: Callable[[], Any]) -> None:
        try:
            call()
        except sqlite3.IntegrityError:
            steps.append((name, "IntegrityError"))
        else:
            steps.append((name, "accepted"))

    def exchange(cid: str, text: str, reply: str, usage: dict | None = None, **kw) -> dict:
        turn = store.add_turn(cid, text, [ask(text)], model="m1", **kw)
        store.finish_turn(
            turn["id"],
            status="complete",
            reply_text=reply,
            messages=[ask(text), answer(reply)],
            usage=usage or {"input_tokens": 10, "output_tokens": 3},
        )
        return step(f"exchange {text!r}", store.turn(turn["id"], "alice"))

    # Conversations, with ties in the list broken by creation order.
    step("create c-a", store.create_conversation("alice", cid="c-a", model="m1", persona="p"))
    clock.stopped = True
    for cid in ("c-t1", "c-t2", "c-t3"):
        step(f"create {cid}", store.create_conversation("alice", cid=cid))
    step("list with ties", store.conversations("alice"))
    step("list limited", store.conversations("alice", limit=2))
    step("all with ties", store.all_conversations())
    step("all of alice with ties", store.all_conversations("alice"))
    clock.stopped = False
    step("create c-bob", store.create_conversation("bob", cid="c-bob"))
    step("claim taken", store.claim_conversation("c-a", "bob"))
    step("claim new", store.claim_conversation("c-claim", "alice", model="m2", persona="q"))
    refused("create taken", lambda: store.create_conversation("bob", cid="c-bob"))
    step("created with a new id", store.create_conversation("carol"))
    step("conversation", store.conversation("c-a", "alice"))
    step("conversation of another", store.conversation("c-a", "bob"))
    store.set_title("c-a", "Python tips")
    store.set_model("c-a", "m2")
    store.set_persona("c-a", None)
    step("rename", store.rename("c-t1", "alice", "Learning notes"))
    step("rename another's", store.rename("c-t1", "bob", "Mine"))
    step("after settings", store.conversation("c-a", "alice"))

    # Turns, branches, siblings.
    t1 = exchange("c-a", "How do I learn Python quickly?", "Start with the official tutorial.")
    t2 = exchange("c-a", "And then?", "Write small programs every day.")
    t2b = exchange("c-a", "What about running tests?", "Runners run the tests.", parent_id=t1["id"])
    t3 = exchange("c-a", "Tell me about don't and O'Neil", "It's a contraction. O'Neil is a name.")
    t4 = store.add_turn("c-a", "Still thinking", [ask("Still thinking")], model="m1")
    step("add turn", t4)
    store.save_partial(t4["id"], "Half of")
    store.save_partial(t4["id"], "Half of it", [ask("Still thinking"), answer("Half of it")])
    step("partial", store.turn(t4["id"], "alice"))
    step("turn of another", store.turn(t1["id"], "bob"))
    step("turn out of range", store.turn(2**70, "alice"))
    step("branch", store.branch(t4["id"]))
    step("branch limited", store.branch(t4["id"], limit=2))
    step("branch of none", store.branch(None))
    step("pages", list(store.branch_pages(t4["id"], size=2)))
    step("history", store.history(t4))
    step("history of first", store.history(t1))
    step("siblings", store.siblings("c-a"))
    step("siblings of t1", store.siblings("c-a", [t1["id"]]))
    step("siblings of the root", store.siblings("c-a", [None]))
    step("siblings of nothing", store.siblings("c-a", []))
    step("siblings of the branch", store.siblings("c-a", [t2b["id"], t3["id"]]))
    step("newest leaf", store.newest_leaf(t1["id"]))
    step("later", store.later(t1["id"], limit=5))
    step("later bounded", store.later(t1["id"], limit=1))
    store.set_head("c-a", t2["id"])
    step("head moved", store.conversation("c-a", "alice"))
    step("newest leaf after", store.newest_leaf(t2["id"]))
    step("has later", [store.has_later_turns(t["id"]) for t in (t1, t2, t4)])

    # Usage, including a reply whose server counted no input tokens.
    exchange("c-t2", "Count", "Counted", usage={"input_tokens": None, "output_tokens": 7})
    exchange("c-t2", "Again", "Counted again", usage={"input_tokens": 20, "output_tokens": 5})
    step("usage", store.usage_total("c-t2"))
    step("usage of c-a", store.usage_total("c-a"))
    step("usage of an empty conversation", store.usage_total("c-t3"))

    # The rendered-HTML cache: finished replies only, dropped when a reply is rewritten.
    store.cache_html([(t1["id"], "<p>tutorial</p>"), (t4["id"], "<p>partial</p>")], 3)
    store.cache_html([], 3)
    step("cached", [store.turn(t["id"], "alice") for t in (t1, t4)])

    # Feedback and comparisons.
    step("feedback", store.set_feedback(t1["id"], "alice", "up"))
    step("feedback of another", store.set_feedback(t1["id"], "bob", "down"))
    step("feedback cleared", store.set_feedback(t2["id"], "alice", None))
    ca = exchange("c-t3", "Compare these", "Answer A")
    cb = exchange("c-t3", "Compare these", "Answer B", parent_id=None)
    store.mark_comparison([ca["id"], cb["id"]])
    step("comparisons", store.comparisons([ca["id"], ca["id"], 999]))
    step("no comparisons", store.comparisons([]))

    # Search: prefixes, stemming, quotes, punctuation, accents, hostile tsquery syntax.
    exchange("c-t1", "Café culture in Paris", "Cafes serve coffee.")
    exchange("c-t1", "Tell me a joke", "Why did the chicken cross the road?")
    exchange("c-t1", "Tell me a joke", "Why did the chicken cross the road?")
    long = "a long reply " + "word " * 30 + "needle in the middle " + "filler " * 30
    exchange("c-t1", "Find it", long)
    exchange("c-claim", "well-known e-mail", "An e-mail address is well-known.")
    for query in (
        "pyth", "python", "PYTHON", "learning", "learns quick", "runner", "running tests",
        '"official tutorial"', "python's", "don't", "o'neil", "well-known", "e-mail", "cafe",
        "café", "chicken", "needle", "tips", "pyth tips", "notes", "learn", "coffee paris",
        "a & b | !c", "foo:*", "'; drop table turns; --", "(", "<->", "!!!", "", "   ",
        "-python", "python -tutorial", "or", "and or not", "\\", '"', "nothing-here",
    ):  # fmt: skip
        step(f"search {query!r}", store.search("alice", query))
    step("search limited", store.search("alice", "tell", limit=1))
    step("search of another", store.search("bob", "python"))

    # Attachments.
    stale = clock.at(clock.ms - 1)
    a1 = step("upload", store.add_attachment(
        "alice", "a.png", "image/png", b"\x89PNG one", max_pending=2, stale_before=stale
    ))  # fmt: skip
    a2 = step("upload 2", store.add_attachment(
        "alice", "b.txt", "text/plain", b"two", max_pending=2, stale_before=stale
    ))  # fmt: skip
    step("upload over the limit", store.add_attachment(
        "alice", "c.txt", "text/plain", b"three", max_pending=2, stale_before=stale
    ))  # fmt: skip
    step("attachment", store.attachment(a1["id"], "alice"))
    step("attachment of another", store.attachment(a1["id"], "bob"))
    step("pending", store.pending_attachments("alice", [a2["id"], "nope", a1["id"], a2["id"]]))
    step("pending of none", store.pending_attachments("alice", []))
    step("removed", store.remove_attachment(a2["id"], "alice"))
    step("removed again", store.remove_attachment(a2["id"], "alice"))
    store.bind_attachments(
        t1["id"], "alice", [{k: a1[k] for k in ("id", "name", "media_type", "size")}]
    )
    store.bind_attachments(t2["id"], "alice", [])
    store.add_turn_attachments(
        t2["id"],
        "alice",
        [{"id": "imp-1", "name": "i.bin", "media_type": "application/octet-stream",
          "size": 3, "data": b"\x00\x01\x02"}],
    )  # fmt: skip
    step("bound", [store.turn(t["id"], "alice")["attachments"] for t in (t1, t2)])
    step("bytes", store.attachment_data("alice", [a1["id"], "imp-1", "nope"]))
    step("bytes of another", store.attachment_data("bob", [a1["id"]]))
    step("pending after binding", store.pending_attachments("alice", [a1["id"]]))
    store.add_attachment("alice", "d.txt", "text/plain", b"d", max_pending=5, stale_before=stale)
    step("purged pending", store.purge_pending_attachments(clock.at(clock.ms + 10)))

    # Tool approvals.
    calls = [
        {"tool_call_id": "call-1", "tool_name": "search", "args": '{"q": "x"}'},
        {"tool_call_id": "call-2", "tool_name": "fetch", "args": "{}"},
    ]
    store.add_approvals(t4["id"], calls, clock.at(10_000))
    store.finish_turn(
        t4["id"], status="awaiting_approval", reply_text="Half of it", messages=[ask("x")]
    )
    step("approvals", store.approvals(t4["id"]))
    step("approve", store.decide_approval(t4["id"], 0, "approved"))
    step("approve again", store.decide_approval(t4["id"], 0, "denied"))
    step("approve out of range", store.decide_approval(t4["id"], 2**70, "approved"))
    step("approve a missing call", store.decide_approval(t4["id"], 5, "approved"))
    step("expire", store.expire_approvals(t4["id"]))
    step("expire again", store.expire_approvals(t4["id"]))
    step("decided", store.approvals(t4["id"]))
    step("resume", store.claim_resume(t4["id"]))
    step("resume again", store.claim_resume(t4["id"]))

    # Replies cut off by a crash.
    s1 = store.add_turn("c-t3", "Cut off", [ask("Cut off")], model="m1")
    store.save_partial(s1["id"], "Partial answer")
    s2 = store.add_turn("c-t3", "Cut off too", [ask("Cut off too")], model="m1")
    step("streaming", store.streaming_turns(clock.at(clock.ms + 1)))
    step("streaming before", store.streaming_turns(clock.at(0)))
    step("interrupted some", store.mark_interrupted([s1["id"]]))
    step("interrupted none", store.mark_interrupted([]))
    step("interrupted the rest", store.mark_interrupted())
    # The reply text an interruption adds to the messages is stamped with the real time.
    step("interrupted rows", [untimed(store.turn(t["id"], "alice")) for t in (s1, s2, t4)])
    step("history of an interrupted reply", untimed({"messages": dump_messages(store.history(s2))}))

    # Accounts and failed sign-ins.
    alice = step("user", store.create_user("Alice", "hash-1"))
    step("user in another case", store.create_user("ALICE", "hash-2"))
    step("user by name", store.user_by_name("aLiCe"))
    step("user by an accented name", store.user_by_name("Álice"))
    store.set_password_hash(alice["id"], "hash-3")
    store.set_password_hash(alice["id"], "hash-4", end_sessions=True)
    store.end_sessions(alice["id"])
    step("user after", store.user(alice["id"]))
    keys = ["name:alice", "addr:127.0.0.1"]
    store.record_login_failure(keys, clock.at(0))
    store.record_login_failure(keys[:1], clock.at(0))
    step("failures", store.login_failures([*keys, "name:bob"], clock.at(0)))
    step("failures of none", store.login_failures([], clock.at(0)))
    store.clear_login_failures("name:alice")
    step("failures after clearing", store.login_failures(keys, clock.at(0)))
    store.record_login_failure(["addr:other"], clock.at(clock.ms))
    step("failures after forgetting", store.login_failures(keys, clock.at(0)))
    step("delete user", store.delete_user(alice["id"]))
    step("delete user again", store.delete_user(alice["id"]))
    step("user gone", store.user(alice["id"]))

    # Imports.
    imported = [
        {"user_text": "Imported question", "reply_text": "Imported answer",
         "messages": [ask("Imported question"), answer("Imported answer")], "model": "m3",
         "feedback": "down"},
        {"user_text": "Second", "reply_text": "Reply",
         "messages": [ask("Second"), answer("Reply")], "feedback": "sideways"},
    ]  # fmt: skip
    conv = step("import", store.import_conversation("alice", "Imported", imported, cid="c-imp"))
    step("imported branch", store.branch(conv["head_turn_id"]))
    step("import empty", store.import_conversation("alice", "Empty", [], cid="c-empty"))
    refused("import taken", lambda: store.import_conversation("alice", "X", [], cid="c-imp"))
    step("search imported", store.search("alice", "imported"))

    # Deletion, restore, purge, erase: last, as SQLite may reuse an erased newest turn's id.
    step("delete", store.delete("c-t3", "alice"))
    step("delete again", store.delete("c-t3", "alice"))
    step("delete another's", store.delete("c-a", "bob"))
    step("deleted hidden", (store.conversation("c-t3", "alice"), store.conversations("alice")))
    step("deleted not searched", store.search("alice", "compare"))
    step("restore", store.restore("c-t3", "alice"))
    step("restore again", store.restore("c-t3", "alice"))
    step("delete for the purge", store.delete("c-t3", "alice"))
    step("purge nothing yet", store.purge_deleted(clock.at(0)))
    step("purge", store.purge_deleted(clock.at(clock.ms + 10)))
    step("purged", store.all_conversations("alice"))
    step("erase", store.erase("c-bob"))
    step("erase again", store.erase("c-bob"))
    # Not c-a: SQLite cannot erase a conversation whose replies waited on tools (its
    # tool_approvals rows block the turns' deletion); Postgres deletes them with the turns.
    step("erase with files", store.erase("c-t1"))
    step("all", store.all_conversations())
    step("integrity", store.integrity())
    return steps


@pytest.fixture
def fixed(monkeypatch) -> Callable[[], Clock]:
    """Factory: reset the clock and the id counters; returns the new clock."""

    def reset() -> Clock:
        clock = Clock()
        ids = itertools.count(1)
        monkeypatch.setattr(chat.store, "now", clock)
        monkeypatch.setattr(chat.store, "new_id", lambda: f"id-{next(ids)}")
        tokens = itertools.count(1)
        monkeypatch.setattr(secrets, "token_urlsafe", lambda n=None: f"tok-{next(tokens)}")
        return clock

    return reset


def test_sqlite_and_postgres_give_the_same_results(tmp_path: Path, postgres_server, fixed):
    sqlite = ChatStore(tmp_path / "chat.db")
    try:
        expected = script(sqlite, fixed())
    finally:
        sqlite.close()
    pg = PostgresStore(fresh_database_url(postgres_server))
    try:
        got = script(pg, fixed())
    finally:
        pg.close()
    assert [name for name, _ in got] == [name for name, _ in expected]
    for (name, want), (_, have) in zip(expected, got, strict=True):
        assert have == want, f"the stores disagree at {name!r}"
