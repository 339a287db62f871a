"""The store: conversations, turns and their pydantic-ai messages (on SQLite and on Postgres:
the `store` fixture runs each test on both)."""

from __future__ import annotations

import json
import sqlite3
import time

import pytest
from pydantic_ai.messages import (
    ModelMessage,
    ModelMessagesTypeAdapter,
    ModelRequest,
    ModelResponse,
    TextPart,
    UserPromptPart,
)

from chat.store import ChatStore
from tests.conftest import user_prompts


def request(text: str) -> ModelRequest:
    return ModelRequest(parts=[UserPromptPart(content=text)])


def exchange(text: str, reply: str) -> list[ModelMessage]:
    return [request(text), ModelResponse(parts=[TextPart(content=reply)])]


def answered(store: ChatStore, cid: str, text: str, reply: str) -> dict:
    """Add a turn and finish it as complete, as a run would."""
    turn = store.add_turn(cid, text, [request(text)], model="m")
    store.finish_turn(
        turn["id"], status="complete", reply_text=reply, messages=exchange(text, reply)
    )
    return turn


def test_create_conversation(store):
    conv = store.create_conversation("alice", model="openai-chat:x")
    assert conv["owner"] == "alice"
    assert conv["model"] == "openai-chat:x"
    assert conv["head_turn_id"] is None
    assert store.conversation(conv["id"], "alice")["id"] == conv["id"]


def test_conversation_ids_are_unguessable(store):
    ids = {store.create_conversation("alice")["id"] for _ in range(20)}
    assert len(ids) == 20
    assert all(len(i) >= 16 for i in ids)


def test_conversations_are_listed_most_recently_active_first(store):
    a = store.create_conversation("alice")
    b = store.create_conversation("alice")
    c = store.create_conversation("alice")
    assert [x["id"] for x in store.conversations("alice")] == [c["id"], b["id"], a["id"]]
    time.sleep(0.002)  # timestamps have millisecond resolution
    store.add_turn(a["id"], "bump", [request("bump")], model=None)
    assert [x["id"] for x in store.conversations("alice")][0] == a["id"]


def test_another_owner_sees_nothing(store):
    conv = store.create_conversation("alice")
    turn = store.add_turn(conv["id"], "private", [request("private")], model=None)
    assert store.conversation(conv["id"], "mallory") is None
    assert store.turn(turn["id"], "mallory") is None
    assert store.conversations("mallory") == []
    assert store.turn(turn["id"], "alice")["user_text"] == "private"


def test_set_title(store):
    conv = store.create_conversation("alice")
    store.set_title(conv["id"], "Trip to Lisbon")
    assert store.conversation(conv["id"], "alice")["title"] == "Trip to Lisbon"


@pytest.mark.sqlite_only(
    "opens the SQLite file itself; tests/test_pgstore.py has the Postgres case"
)
def test_add_turn_is_committed_at_once(store, tmp_path):
    conv = store.create_conversation("alice")
    turn = store.add_turn(conv["id"], "hello", [request("hello")], model="m")
    # Another connection (another process) sees the message before any model is called.
    other = sqlite3.connect(tmp_path / "chat.db")
    try:
        row = other.execute(
            "select user_text, status, messages from turns where id = ?", [turn["id"]]
        ).fetchone()
        head = other.execute(
            "select head_turn_id from conversations where id = ?", [conv["id"]]
        ).fetchone()
    finally:
        other.close()
    assert row[0] == "hello"
    assert row[1] == "streaming"
    assert user_prompts(ModelMessagesTypeAdapter.validate_json(row[2])) == ["hello"]
    assert head == (turn["id"],)


def test_turns_chain_from_the_head(store):
    conv = store.create_conversation("alice")
    t1 = store.add_turn(conv["id"], "one", [request("one")], model=None)
    t2 = store.add_turn(conv["id"], "two", [request("two")], model=None)
    assert t1["parent_id"] is None
    assert t2["parent_id"] == t1["id"]
    assert store.conversation(conv["id"], "alice")["head_turn_id"] == t2["id"]


def test_history_is_the_branch_before_the_turn(store):
    conv = store.create_conversation("alice")
    answered(store, conv["id"], "first", "reply one")
    answered(store, conv["id"], "second", "reply two")
    third = store.add_turn(conv["id"], "third", [request("third")], model=None)

    history = store.history(third)
    # Valid as pydantic-ai message_history: it survives a round trip through the adapter.
    again = ModelMessagesTypeAdapter.validate_json(ModelMessagesTypeAdapter.dump_json(history))
    assert again == history
    assert user_prompts(history) == ["first", "second"]
    replies = [p.content for m in history if isinstance(m, ModelResponse) for p in m.parts]
    assert replies == ["reply one", "reply two"]


def test_history_of_the_first_turn_is_empty(store):
    conv = store.create_conversation("alice")
    first = store.add_turn(conv["id"], "first", [request("first")], model=None)
    assert store.history(first) == []


def test_history_follows_only_its_own_branch(store):
    conv = store.create_conversation("alice")
    root = answered(store, conv["id"], "root", "r")
    answered(store, conv["id"], "abandoned", "a")
    # A sibling of the abandoned turn (an edit) sees only what came before it.
    edited = store.add_turn(
        conv["id"], "edited", [request("edited")], model=None, parent_id=root["id"]
    )
    assert user_prompts(store.history(edited)) == ["root"]


def test_finish_turn_records_the_outcome(store):
    conv = store.create_conversation("alice")
    turn = store.add_turn(conv["id"], "hi", [request("hi")], model="m")
    usage = {"input_tokens": 3, "output_tokens": 5}
    store.finish_turn(
        turn["id"],
        status="complete",
        reply_text="**hello**",
        messages=exchange("hi", "**hello**"),
        usage=usage,
    )
    row = store.turn(turn["id"], "alice")
    assert row["status"] == "complete"
    assert row["reply_text"] == "**hello**"
    assert row["error"] is None
    assert row["finished_at"]
    assert json.loads(row["usage"]) == usage
    messages = ModelMessagesTypeAdapter.validate_json(row["messages"])
    assert isinstance(messages[-1], ModelResponse)
    assert messages[-1].parts[0].content == "**hello**"


def test_finish_turn_keeps_an_error(store):
    conv = store.create_conversation("alice")
    turn = store.add_turn(conv["id"], "hi", [request("hi")], model="m")
    store.finish_turn(
        turn["id"], status="failed", reply_text="", messages=[request("hi")], error="Try again."
    )
    row = store.turn(turn["id"], "alice")
    assert (row["status"], row["error"]) == ("failed", "Try again.")
    assert row["user_text"] == "hi"


def test_finish_turn_refuses_an_unknown_status(store):
    conv = store.create_conversation("alice")
    turn = store.add_turn(conv["id"], "hi", [request("hi")], model="m")
    with pytest.raises(AssertionError):
        store.finish_turn(turn["id"], status="streaming", reply_text="", messages=[])


def test_save_partial_only_while_streaming(store):
    conv = store.create_conversation("alice")
    turn = store.add_turn(conv["id"], "hi", [request("hi")], model="m")
    store.save_partial(turn["id"], "Hel")
    assert store.turn(turn["id"], "alice")["reply_text"] == "Hel"
    store.finish_turn(turn["id"], status="complete", reply_text="Hello", messages=[])
    # A late flush never overwrites the finished reply.
    store.save_partial(turn["id"], "Hel")
    assert store.turn(turn["id"], "alice")["reply_text"] == "Hello"


def test_mark_interrupted_finishes_only_streaming_turns(store):
    conv = store.create_conversation("alice")
    done = answered(store, conv["id"], "done", "ok")
    left = store.add_turn(conv["id"], "left", [request("left")], model="m")
    store.save_partial(left["id"], "half a rep")

    assert store.mark_interrupted() == 1
    row = store.turn(left["id"], "alice")
    assert row["status"] == "interrupted"
    assert row["reply_text"] == "half a rep"
    assert row["error"]
    assert row["finished_at"]
    assert store.turn(done["id"], "alice")["status"] == "complete"
    assert store.mark_interrupted() == 0


def test_branch_is_oldest_first_and_limit_keeps_the_newest(store):
    conv = store.create_conversation("alice")
    turns = [answered(store, conv["id"], f"m{i}", f"r{i}") for i in range(5)]
    head = turns[-1]["id"]
    assert [t["user_text"] for t in store.branch(head)] == ["m0", "m1", "m2", "m3", "m4"]
    assert [t["user_text"] for t in store.branch(head, limit=2)] == ["m3", "m4"]
    assert [t["user_text"] for t in store.branch(turns[2]["id"], limit=10)] == ["m0", "m1", "m2"]
    assert store.branch(None) == []


def test_data_survives_reopening(tmp_path):
    s = ChatStore(tmp_path / "chat.db")
    conv = s.create_conversation("alice")
    answered(s, conv["id"], "kept", "also kept")
    s.close()
    s = ChatStore(tmp_path / "chat.db")
    try:
        [turn] = s.branch(s.conversation(conv["id"], "alice")["head_turn_id"])
        assert (turn["user_text"], turn["reply_text"]) == ("kept", "also kept")
    finally:
        s.close()


def test_in_memory_store_works():
    s = ChatStore(":memory:")
    try:
        conv = s.create_conversation("alice")
        assert s.conversation(conv["id"], "alice") is not None
    finally:
        s.close()


def test_rendered_html_is_cached_for_finished_replies_only_and_dropped_when_rewritten(store):
    cid = store.create_conversation("alice")["id"]
    done = answered(store, cid, "q", "a")
    live = store.add_turn(cid, "q2", [request("q2")], model="m")

    store.cache_html([(done["id"], "<p>a</p>"), (live["id"], "<p>partial</p>")], 3)

    def cached(tid):
        t = store.turn(tid, "alice")
        return t["reply_html"], t["reply_html_version"]

    assert cached(done["id"]) == ("<p>a</p>", 3)
    assert cached(live["id"]) == (None, None)  # still streaming: its text will change
    store.finish_turn(done["id"], status="complete", reply_text="b", messages=exchange("q", "b"))
    assert cached(done["id"]) == (None, None)


def test_siblings_can_be_asked_for_a_few_parents_only(store):
    cid = store.create_conversation("alice")["id"]
    a = store.add_turn(cid, "a", [request("a")], model="m")
    b = store.add_turn(cid, "b", [request("b")], model="m")
    b2 = store.add_turn(cid, "b again", [request("b")], model="m", parent_id=a["id"])
    c = store.add_turn(cid, "c", [request("c")], model="m")
    everything = store.siblings(cid)
    assert everything == {None: [a["id"]], a["id"]: [b["id"], b2["id"]], b2["id"]: [c["id"]]}
    assert store.siblings(cid, [a["id"]]) == {a["id"]: [b["id"], b2["id"]]}
    assert store.siblings(cid, [None, b2["id"]]) == {None: [a["id"]], b2["id"]: [c["id"]]}
    assert store.siblings(cid, []) == {}


def test_a_page_of_a_long_branch_reads_a_page_not_the_branch(store):
    cid = store.create_conversation("alice")["id"]
    ids = [answered(store, cid, f"q{i}", f"a{i}")["id"] for i in range(30)]
    assert [t["id"] for t in store.branch(ids[-1], limit=5)] == ids[-5:]
    assert [t["id"] for t in store.later(ids[0], limit=5)] == ids[1:6]
    assert store.later(ids[-1], limit=5) == []
    pages = list(store.branch_pages(ids[-1], size=7))
    assert [len(p) for p in pages] == [7, 7, 7, 7, 2]
    assert [t["id"] for p in pages for t in p] == ids
    assert list(store.branch_pages(None)) == []


def test_each_thread_gets_its_own_connection_to_the_same_file(tmp_path):
    import threading

    s = ChatStore(tmp_path / "chat.db")
    try:
        cid = s.create_conversation("alice")["id"]
        seen = {}

        def worker():
            seen["db"] = s.db
            seen["conv"] = s.conversation(cid, "alice")

        t = threading.Thread(target=worker)
        t.start()
        t.join()
        assert seen["db"] is not s.db and seen["conv"]["id"] == cid
    finally:
        s.close()


# Search, feedback, comparisons -------------------------------------------------------------


def test_search_matches_word_prefixes_and_quotes_fts_syntax(store):
    cid = store.create_conversation("alice")["id"]
    answered(store, cid, "I like Python and pythonic code", "Snakes too")
    other = store.create_conversation("bob")["id"]
    answered(store, other, "python for bob", "ok")
    hits = store.search("alice", "pyth")
    assert [h["conversation_id"] for h in hits] == [cid]
    assert "\x02Python\x03" in hits[0]["snippet"]
    assert store.search("alice", "snak")[0]["turn_id"] is not None
    for hostile in ('"', "NEAR(a b)", "py*", "a OR", "-x", "col:py", "'", "%", "_"):
        store.search("alice", hostile)  # never an FTS5 syntax error


def test_search_matches_titles_by_word_start_first(store):
    cid = store.create_conversation("alice")["id"]
    store.set_title(cid, "Trip to Lisbon")
    answered(store, cid, "hello", "hi")
    mid = store.create_conversation("alice")["id"]
    store.set_title(mid, "100% done_now")
    hits = store.search("alice", "lisb")
    assert hits[0] == {
        "turn_id": None, "conversation_id": cid, "title": "Trip to Lisbon",
        "created_at": hits[0]["created_at"], "snippet": "",
    }  # fmt: skip
    assert store.search("alice", "isbon") == []  # a word start, not any substring
    assert store.search("alice", "trip lis")[0]["conversation_id"] == cid
    assert store.search("bob", "lisb") == []
    # LIKE wildcards in the query are text.
    assert [h["conversation_id"] for h in store.search("alice", "100%")] == [mid]
    assert store.search("alice", "1_0") == []
    store.delete(cid, "alice")
    assert store.search("alice", "lisb") == []


def test_feedback_is_set_cleared_and_only_by_the_owner(store):
    cid = store.create_conversation("alice")["id"]
    turn = answered(store, cid, "q", "a")
    assert store.set_feedback(turn["id"], "bob", "up") is False
    assert store.set_feedback(turn["id"], "alice", "up") is True
    assert store.turn(turn["id"], "alice")["feedback"] == "up"
    store.set_feedback(turn["id"], "alice", None)
    assert store.turn(turn["id"], "alice")["feedback"] is None
    with pytest.raises(AssertionError):
        store.set_feedback(turn["id"], "alice", "maybe")


def test_a_comparison_is_recorded_and_read_back_by_group(store):
    cid = store.create_conversation("alice")["id"]
    a = store.add_turn(cid, "q", [request("q")], model="a", parent_id=None)
    b = store.add_turn(cid, "q", [request("q")], model="b", parent_id=None)
    store.mark_comparison([a["id"], b["id"]])
    assert {t["id"] for t in store.comparisons([a["id"]])[a["id"]]} == {a["id"], b["id"]}
    assert store.comparisons([]) == {}
    assert store.has_later_turns(a["id"]) is False
    store.add_turn(cid, "next", [request("next")], model="a", parent_id=a["id"])
    assert store.has_later_turns(a["id"]) is True
