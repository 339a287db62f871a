"""The history budget: the model gets the newest whole exchanges that fit, and the user is told."""

from __future__ import annotations

import re

from pydantic_ai.messages import (
    ModelMessage,
    ModelRequest,
    ModelResponse,
    SystemPromptPart,
    TextPart,
    ToolCallPart,
    ToolReturnPart,
    UserPromptPart,
)

from chat.budget import fit
from tests.conftest import parse_html, parse_sse, user_prompts

HX = {"HX-Request": "true"}


def exchange(i: int, *, tool: bool = False, text: str = "") -> list[ModelMessage]:
    """A user prompt and its reply; with `tool`, a tool call and return between them."""
    out: list[ModelMessage] = [ModelRequest(parts=[UserPromptPart(f"q{i}{text}")])]
    if tool:
        out += [
            ModelResponse(parts=[ToolCallPart("lookup", {"i": i}, tool_call_id=f"c{i}")]),
            ModelRequest(parts=[ToolReturnPart("lookup", "r" * 50, tool_call_id=f"c{i}")]),
        ]
    return [*out, ModelResponse(parts=[TextPart(f"a{i}")])]


def test_no_budget_keeps_everything():
    history = exchange(0) + exchange(1)
    result = fit(history, max_messages=None, max_chars=None)
    assert result.messages == history and result.note is None


def test_the_newest_whole_exchanges_within_the_message_budget():
    history = exchange(0) + exchange(1, tool=True) + exchange(2) + exchange(3)
    for budget in range(0, 11):
        result = fit(history, max_messages=budget, max_chars=None)
        assert len(result.messages) <= budget
        # Whole exchanges, newest first: never a reply without its prompt, never a tool call
        # without its return.
        prompts = user_prompts(result.messages)
        assert prompts == ["q0", "q1", "q2", "q3"][4 - len(prompts) :]
        calls = {
            p.tool_call_id for m in result.messages for p in m.parts if isinstance(p, ToolCallPart)
        }
        returns = {
            p.tool_call_id
            for m in result.messages
            for p in m.parts
            if isinstance(p, ToolReturnPart)
        }
        assert calls == returns
        assert result.total == 4 and result.kept == len(prompts)
    assert user_prompts(fit(history, max_messages=5, max_chars=None).messages) == ["q2", "q3"]
    assert user_prompts(fit(history, max_messages=8, max_chars=None).messages) == ["q1", "q2", "q3"]


def test_the_character_budget_counts_text_arguments_and_results():
    history = exchange(0, text="x" * 1000) + exchange(1, tool=True) + exchange(2)
    result = fit(history, max_messages=None, max_chars=200)
    assert user_prompts(result.messages) == ["q1", "q2"]
    assert result.note == (
        "Earlier messages were left out: this conversation is longer than the model is given "
        "(2 of 3 earlier exchanges were sent)."
    )
    assert fit(history, max_messages=None, max_chars=30).messages == history[-2:]
    assert fit(history, max_messages=None, max_chars=3).messages == []


def test_a_leading_system_prompt_stays():
    first = ModelRequest(parts=[SystemPromptPart("Be brief."), UserPromptPart("q0")])
    history = [first, ModelResponse(parts=[TextPart("a0")]), *exchange(1)]
    result = fit(history, max_messages=2, max_chars=None)
    assert isinstance(result.messages[0].parts[0], SystemPromptPart)
    assert user_prompts(result.messages) == ["q1"]


def _send(client, msg: str, cid: str | None = None):
    r = client.post("/send", data={"msg": msg, **({"cid": cid} if cid else {})}, headers=HX)
    url = re.search(r'sse-connect="([^"]+)"', r.text).group(1)
    with client.stream("GET", url) as s:
        events = parse_sse(b"".join(s.iter_bytes()).decode())
    assert events[-1].data == "complete"
    return r, "".join(e.data for e in events)


def test_a_long_conversation_is_trimmed_and_the_reply_says_so(make_client, scripted):
    model = scripted(["Answer."])
    client = make_client(model, history_max_messages=4, history_max_chars=None)
    first, streamed = _send(client, "one")
    cid = first.headers["HX-Push-Url"].rsplit("/", 1)[1]
    for msg in ("two", "three"):
        _, streamed = _send(client, msg, cid)
        assert "Earlier messages were left out" not in streamed
    _, streamed = _send(client, "four", cid)
    # What reached the model: the last two exchanges whole, then the new prompt.
    assert [user_prompts(c) for c in model.calls] == [
        ["one"],
        ["one", "two"],
        ["one", "two", "three"],
        ["two", "three", "four"],
    ]
    note = "Earlier messages were left out: this conversation is longer than the model is given"
    assert note in streamed and "(2 of 3 earlier exchanges were sent)" in streamed
    # The note stays with that reply on the page, and only with that one.
    page = parse_html(client.get(f"/c/{cid}").text)
    replies = [n.text for n in page.find_all(data_role="assistant")]
    assert [note in r for r in replies] == [False, False, False, True]
