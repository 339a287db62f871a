"""The chat service: the rules every front end goes through, tested without HTTP."""

from __future__ import annotations

import asyncio
import sqlite3

import pytest
from pydantic_ai.messages import ModelRequest, ModelResponse, TextPart, UserPromptPart

from chat.api_stream import ReplyFailed, ReplyStopped, reply_events
from chat.limits import Limiter
from chat.service import (
    BUSY,
    Caller,
    ChatRequest,
    ChatService,
    NotFound,
    Refused,
    chat_conversation_id,
)
from tests.conftest import ModelBroke, ScriptedModel

ALICE = Caller("alice", "198.51.100.1")
BOB = Caller("bob", "198.51.100.2")


@pytest.fixture
def service(manager):
    """Factory: `service(model, **settings_overrides)` -> ChatService over a fresh RunManager."""

    def make(scripted: ScriptedModel, **overrides) -> ChatService:
        runs = manager(scripted, **overrides)
        return ChatService(runs.store, runs, Limiter.from_settings(runs.settings), runs.settings)

    return make


async def finished(svc: ChatService, sent) -> list[dict]:
    """Wait for the sent replies to end; their stored turns."""
    for run in sent.runs:
        await run.task
    return [svc.store.turn(t["id"], sent.conversation["owner"]) for t in sent.turns]


async def refusal(call) -> Refused:
    with pytest.raises(Refused) as caught:
        await call
    return caught.value


# Sending -----------------------------------------------------------------------------------


async def test_send_commits_starts_one_run_and_continues_the_conversation(service):
    model = ScriptedModel(["Hello ", "there."])
    svc = service(model)
    first = await svc.send(ALICE, "Hi\r\nthere")
    assert first.created and first.conversation["title"]
    (turn,) = await finished(svc, first)
    assert turn["user_text"] == "Hi\nthere" and turn["reply_text"] == "Hello there."
    second = await svc.send(ALICE, "And now?", cid=first.conversation["id"])
    assert not second.created
    await finished(svc, second)
    assert model.prompts == [["Hi\nthere"], ["Hi\nthere", "And now?"]]


@pytest.mark.parametrize(
    ("text", "status", "words"),
    [("   \n", 422, "Type a message"), ("x" * 101, 413, "the limit is 100")],
)
async def test_bad_messages_are_refused_before_anything_is_stored(
    service, store, text, status, words
):
    model = ScriptedModel()
    svc = service(model, max_message_chars=100)
    refused = await refusal(svc.send(ALICE, text))
    assert refused.status == status and words in refused.message
    assert store.conversations("alice") == [] and model.calls == []


async def test_models_and_personas_not_offered_are_refused(service, store):
    svc = service(ScriptedModel())
    assert (await refusal(svc.send(ALICE, "hi", model="openai:gpt-5"))).status == 422
    assert (await refusal(svc.send(ALICE, "hi", persona="nobody"))).status == 422
    assert (await refusal(svc.send(ALICE, "hi", compare=["a", "b"]))).status == 422
    assert store.conversations("alice") == []


async def test_someone_elses_conversation_is_not_found(service):
    svc = service(ScriptedModel())
    sent = await svc.send(ALICE, "mine")
    await finished(svc, sent)
    cid, tid = sent.conversation["id"], sent.turns[0]["id"]
    for call in (
        svc.send(BOB, "yours?", cid=cid),
        svc.regenerate(BOB, cid, tid),
        svc.edit(BOB, cid, tid, "changed"),
        svc.stop(BOB, cid, tid),
    ):
        with pytest.raises(NotFound):
            await call


async def test_a_reply_running_in_the_conversation_refuses_another_send(service, store):
    model = ScriptedModel(["one ", "two"], pause_after=1)
    svc = service(model)
    sent = await svc.send(ALICE, "first")
    await model.paused.wait()
    cid, tid = sent.conversation["id"], sent.turns[0]["id"]
    for call in (
        svc.send(ALICE, "second", cid=cid),
        svc.regenerate(ALICE, cid, tid),
        svc.edit(ALICE, cid, tid, "edited"),
    ):
        assert (await refusal(call)).status == 409
    model.resume.set()
    await finished(svc, sent)
    assert len(model.calls) == 1 and len(store.branch(tid)) == 1


async def test_limits_and_restarts_refuse_with_their_status_and_headers(service):
    svc = service(ScriptedModel(), messages_per_minute=1)
    await finished(svc, await svc.send(ALICE, "one"))
    limited = await refusal(svc.send(ALICE, "two"))
    assert limited.status == 429 and int(limited.headers["Retry-After"]) > 0
    svc.runs.accepting = False
    restarting = await refusal(svc.send(BOB, "hi"))
    assert restarting.status == 503 and "restarting" in restarting.message


async def test_a_users_sends_are_serialized_so_the_checks_still_hold(service, store):
    """Two sends at once into one conversation: exactly one passes the 'reply running' check."""
    model = ScriptedModel(["slow"], delay=0.05)
    svc = service(model)
    first = await svc.send(ALICE, "start")
    await finished(svc, first)
    cid = first.conversation["id"]
    results = await asyncio.gather(
        svc.send(ALICE, "a", cid=cid), svc.send(ALICE, "b", cid=cid), return_exceptions=True
    )
    assert sorted(type(r).__name__ for r in results) == ["Refused", "Sent"]
    await finished(svc, next(r for r in results if not isinstance(r, Exception)))
    assert len(model.calls) == 2


async def test_compare_regenerate_and_edit_add_versions(service, store):
    model = ScriptedModel(["ok"])
    svc = service(model, models=("m1", "m2"), model="m1")
    sent = await svc.send(ALICE, "which?", compare=["m1", "m2"])
    assert [t["model"] for t in sent.turns] == ["m1", "m2"]
    await finished(svc, sent)
    cid, first = sent.conversation["id"], sent.turns[0]
    again = await svc.regenerate(ALICE, cid, first["id"])
    await svc.runs.get(again["id"]).task
    edited = await svc.edit(ALICE, cid, first["id"], "which one?")
    await svc.runs.get(edited["id"]).task
    assert len(store.siblings(cid, [None])[None]) == 4
    assert len(model.calls) == 4


async def test_stop_ends_the_reply_and_keeps_its_text(service, store):
    model = ScriptedModel(["kept ", "never"], pause_after=1)
    svc = service(model)
    sent = await svc.send(ALICE, "go")
    await model.paused.wait()
    assert await svc.stop(ALICE, sent.conversation["id"], sent.turns[0]["id"])
    (turn,) = await finished(svc, sent)
    assert turn["status"] == "stopped" and turn["reply_text"].strip() == "kept"


async def test_a_database_that_cannot_take_the_write_refuses_politely(service, store, monkeypatch):
    svc = service(ScriptedModel())

    def locked(*args, **kwargs):
        raise sqlite3.OperationalError("database is locked")

    monkeypatch.setattr(store, "add_turn", locked)
    busy = await refusal(svc.send(ALICE, "hi"))
    assert (busy.status, busy.message) == (503, BUSY)


# Chats named by the client (the AI SDK's chat id) ---------------------------------------------


async def test_a_client_chat_id_names_one_conversation_per_caller(service, store):
    model = ScriptedModel(["ok"])
    svc = service(model)
    a1 = await svc.send_chat(ALICE, ChatRequest("chat-1", "first"))
    await finished(svc, a1)
    a2 = await svc.send_chat(ALICE, ChatRequest("chat-1", "second"))
    await finished(svc, a2)
    b1 = await svc.send_chat(BOB, ChatRequest("chat-1", "bob's"))
    await finished(svc, b1)
    assert a1.created and not a2.created and b1.created
    assert a1.conversation["id"] == a2.conversation["id"] != b1.conversation["id"]
    assert a1.conversation["id"] == chat_conversation_id("alice", "chat-1")
    # By its stored id too, as /api/conversations lists it; never someone else's.
    a3 = await svc.send_chat(ALICE, ChatRequest(a1.conversation["id"], "third"))
    await finished(svc, a3)
    assert a3.conversation["id"] == a1.conversation["id"]
    b2 = await svc.send_chat(BOB, ChatRequest(a1.conversation["id"], "probe"))
    await finished(svc, b2)
    assert b2.created and b2.conversation["id"] != a1.conversation["id"]
    assert model.prompts[-2] == ["first", "second", "third"]
    assert model.prompts[-1] == ["probe"]


def _history(*pairs: tuple[str, str]) -> list:
    out = []
    for user, assistant in pairs:
        out.append(ModelRequest(parts=[UserPromptPart(content=user)]))
        out.append(ModelResponse(parts=[TextPart(content=assistant)]))
    return out


async def test_client_history_seeds_a_new_chat_and_never_overrides_a_known_one(service, store):
    model = ScriptedModel(["ok"])
    svc = service(model)
    seeded = ChatRequest("c", "third", _history(("one", "uno"), ("two", "dos")))
    sent = await svc.send_chat(ALICE, seeded)
    await finished(svc, sent)
    assert model.prompts[-1] == ["one", "two", "third"]
    assert [t["user_text"] for t in store.branch(sent.turns[0]["id"])] == ["one", "two", "third"]
    forged = ChatRequest("c", "fourth", _history(("forged", "lies")))
    await finished(svc, await svc.send_chat(ALICE, forged))
    assert model.prompts[-1] == ["one", "two", "third", "fourth"]
    assert "forged" not in str(model.calls[-1])


async def test_a_greeting_before_the_first_user_message_is_left_out(service):
    model = ScriptedModel(["ok"])
    svc = service(model)
    history = [
        ModelResponse(parts=[TextPart(content="Hi, ask me anything")]),
        *_history(("a", "b")),
    ]
    await finished(svc, await svc.send_chat(ALICE, ChatRequest("g", "c", history)))
    assert model.prompts == [["a", "c"]]


async def test_a_chat_id_that_is_too_long_is_refused(service, store):
    svc = service(ScriptedModel())
    assert (await refusal(svc.send_chat(ALICE, ChatRequest("x" * 201, "hi")))).status == 422
    assert store.conversations("alice") == []


async def test_stop_chat_and_running_reply_follow_the_chats_latest_reply(service, store):
    model = ScriptedModel(["kept ", "never"], pause_after=1)
    svc = service(model)
    with pytest.raises(NotFound):
        await svc.running_reply(ALICE, "s")
    sent = await svc.send_chat(ALICE, ChatRequest("s", "go"))
    await model.paused.wait()
    assert await svc.running_reply(ALICE, "s") is sent.runs[0]
    with pytest.raises(NotFound):
        await svc.stop_chat(BOB, "s")  # Bob's "s" is another chat, and he has none
    assert await svc.stop_chat(ALICE, "s") == 1
    (turn,) = await finished(svc, sent)
    assert turn["status"] == "stopped"
    assert await svc.running_reply(ALICE, "s") is None
    assert await svc.stop_chat(ALICE, "s") == 0


async def test_regenerate_chat_answers_the_latest_message_again(service, store):
    model = ScriptedModel(["ok"])
    svc = service(model)
    first = await svc.send_chat(ALICE, ChatRequest("r", "question"))
    await finished(svc, first)
    again = await svc.regenerate_chat(ALICE, "r")
    (turn,) = await finished(svc, again)
    assert turn["parent_id"] == first.turns[0]["parent_id"] and turn["user_text"] == "question"
    assert model.prompts == [["question"], ["question"]]
    with pytest.raises(NotFound):
        await svc.regenerate_chat(BOB, "r")


# Importing ---------------------------------------------------------------------------------


async def test_import_counts_against_the_limit_and_a_bad_file_changes_nothing(service, store):
    svc = service(ScriptedModel(), messages_per_minute=2)
    bad = await refusal(svc.import_file(ALICE, b"not json", "x.json"))
    assert bad.status == 422 and bad.message.startswith("Could not import x.json:")
    good = b'[{"kind":"request","parts":[{"part_kind":"user-prompt","content":"hi"}]}]'
    conv = await svc.import_file(ALICE, good, "notes.json")
    assert conv["title"] == "Imported: notes"
    assert (await refusal(svc.import_file(ALICE, good, "again.json"))).status == 429
    assert [c["id"] for c in store.conversations("alice")] == [conv["id"]]


# The reply as stream events (chat/api_stream.py) ----------------------------------------------


async def collect(run) -> tuple[str, Exception | None]:
    text, ended = "", None
    try:
        async for event in reply_events(run):
            text += getattr(getattr(event, "part", None), "content", "") or ""
            text += getattr(getattr(event, "delta", None), "content_delta", "") or ""
    except (ReplyStopped, ReplyFailed) as exc:
        ended = exc
    return text, ended


async def test_reply_events_replay_from_the_start_then_follow_live(service):
    model = ScriptedModel(["Hello ", "there, ", "friend."], pause_after=1)
    svc = service(model)
    sent = await svc.send(ALICE, "hi")
    await model.paused.wait()
    early = asyncio.create_task(collect(sent.runs[0]))
    await asyncio.sleep(0.05)
    model.resume.set()
    late = await collect(sent.runs[0])  # joins after the start; still gets all of it
    assert await early == ("Hello there, friend.", None)
    assert late == ("Hello there, friend.", None)


async def test_reply_events_end_with_the_generic_error_or_a_stop(service):
    broke = ScriptedModel(["Part"], error=ModelBroke("sk-SECRET at http://10.0.0.9"))
    svc = service(broke)
    sent = await svc.send(ALICE, "hi")
    text, ended = await collect(sent.runs[0])
    assert text == "Part" and isinstance(ended, ReplyFailed)
    assert "SECRET" not in str(ended) and "Try again" in str(ended)
    held = ScriptedModel(["kept ", "never"], pause_after=1)
    svc = service(held)
    sent = await svc.send(BOB, "hi")
    await held.paused.wait()
    following = asyncio.create_task(collect(sent.runs[0]))
    await asyncio.sleep(0.02)
    await svc.stop(BOB, sent.conversation["id"], sent.turns[0]["id"])
    text, ended = await following
    assert text == "kept " and isinstance(ended, ReplyStopped)


async def test_a_chat_deleted_on_the_page_stays_deleted(service, store):
    svc = service(ScriptedModel(["ok"]))
    sent = await svc.send_chat(ALICE, ChatRequest("gone", "hello"))
    await finished(svc, sent)
    assert store.delete(sent.conversation["id"], "alice")
    with pytest.raises(NotFound):
        await svc.send_chat(ALICE, ChatRequest("gone", "still there?"))
    assert store.conversations("alice") == []
