"""What local model servers do differently from a hosted API, checked against the fake server and
FunctionModels (so it runs everywhere): no token usage, a slow first token, a small context window.

tests/test_local_model.py checks the same app against a real llama.cpp server when one is there.
"""

from __future__ import annotations

import asyncio
import json

from fasthtml.common import to_xml
from pydantic_ai.messages import ModelRequest, ToolReturnPart
from pydantic_ai.models.function import AgentInfo, DeltaToolCall, FunctionModel

from chat.agent import INSTRUCTIONS
from components.messages import ConversationUsage, Usage
from tests.conftest import parse_html, send, stream
from tests.fake_openai import FakeOpenAI, Fault
from tests.live import HtmxClient, running_app, text_of, title_reply

# No usage in the stream ----------------------------------------------------------------------


def test_a_server_that_reports_no_usage_shows_no_zero_counts(tmp_path):
    """llama.cpp's server sends no usage chunk: the page must not claim "0 in · 0 out"."""
    with FakeOpenAI("Hi there, I am local.", report_usage=False, side_reply=title_reply) as fake:
        env = {"OPENAI_BASE_URL": fake.base_url, "OPENAI_API_KEY": "t"}
        with running_app(tmp_path / "app", **env) as app, HtmxClient(app.url) as client:
            for msg in ("Hello", "And again"):
                sent = client.send(msg)
                events = client.follow(sent.stream_url)
                assert events[-1].data == "complete"
            app.wait_idle()
            rows = [json.loads(t["usage"]) for t in app.turns()]
            # Stored as "not reported", never as a count of zero.
            assert [(u["input_tokens"], u["output_tokens"]) for u in rows] == [(None, None)] * 2
            assert all(u["tokens_per_second"] is None and u["seconds"] > 0 for u in rows)
            page = client.open(f"/c/{sent.cid}")
            footers = [
                text_of(str(m.find(attrs={"data-usage": True})))
                for m in page.find_all(attrs={"data-role": "assistant"})
            ]
            assert len(footers) == 2
            for footer in footers:
                assert "tokens not reported" in footer and "first token" in footer
                assert " in · " not in footer and "tok/s" not in footer
            total = page.find(id="conv-usage")
            assert total is not None and total.get_text(strip=True) == ""
            # The live end of a reply updates the total out of band: no "0 in" there either.
            assert all("0 in" not in e.data for e in events)


def test_a_total_over_counted_and_uncounted_replies_says_what_it_leaves_out():
    total = {"replies": 3, "input_tokens": 120, "output_tokens": 45, "reported": 2}
    text = text_of(to_xml(ConversationUsage(total)))
    assert "120 in · 45 out" in text and "1 not counted" in text
    # All counted: just the figures. None counted: nothing at all.
    assert "not counted" not in text_of(to_xml(ConversationUsage({**total, "reported": 3})))
    assert text_of(to_xml(ConversationUsage({**total, "reported": 0}))) == ""
    # A total stored before `reported` existed still reads as before.
    legacy = {"replies": 1, "input_tokens": 5, "output_tokens": 7}
    assert "5 in · 7 out" in text_of(to_xml(ConversationUsage(legacy)))


def test_a_reply_footer_reads_unreported_tokens_as_not_reported():
    unreported = {"input_tokens": None, "output_tokens": None, "seconds": 1.5}
    assert "tokens not reported" in text_of(to_xml(Usage(unreported, "openai-chat:local")))
    counted = {"input_tokens": 1200, "output_tokens": 30, "seconds": 1.5}
    assert "1,200 in · 30 out" in text_of(to_xml(Usage(counted, "openai-chat:x")))


# A slow first token ---------------------------------------------------------------------------


def slow_start(first_token_after: float, then: str = "Finally here.") -> FunctionModel:
    """A model that reads its prompt for a while (silent), then streams at normal speed."""

    async def fn(messages, info: AgentInfo):
        if INSTRUCTIONS not in (info.instructions or ""):
            yield "Title"
            return
        await asyncio.sleep(first_token_after)
        for word in then.split(" "):
            yield word + " "

    return FunctionModel(stream_function=fn)


def test_a_slow_first_token_is_not_taken_for_a_stall(make_client):
    # The stall limit is for silence mid-reply; the prompt read gets the first-token limit.
    client = make_client(slow_start(0.8), stall_timeout=0.2, first_token_timeout=5)
    events = stream(client, send(client).text)
    assert events[-1].data == "complete"
    assert "Finally here." in text_of("".join(e.data for e in events))


def test_a_model_that_never_starts_ends_with_a_clear_error(make_client):
    client = make_client(slow_start(30), stall_timeout=10, first_token_timeout=0.3)
    r = send(client)
    events = stream(client, r.text)
    assert events[-1].data == "failed"
    end = text_of(next(e.data for e in events if e.name == "end"))
    assert "did not start its reply in time" in end and "FIRST_TOKEN_TIMEOUT" in end
    page = parse_html(client.get(r.headers["HX-Push-Url"]).text)
    reply = page.find_all(None, data_role="assistant")[-1]
    assert reply.find(None, role="alert") is not None


def test_the_request_after_a_tool_call_also_gets_the_first_token_limit(make_client):
    """After a tool result the model reads a new, longer prompt: a slow start is no stall."""

    async def fn(messages, info: AgentInfo):
        if INSTRUCTIONS not in (info.instructions or ""):
            yield "Title"
            return
        last = messages[-1]
        if isinstance(last, ModelRequest) and any(
            isinstance(p, ToolReturnPart) for p in last.parts
        ):
            await asyncio.sleep(0.8)
            yield "The answer is 42."
            return
        yield {0: DeltaToolCall(name="calculate", json_args='{"expression": "6*7"}')}

    client = make_client(
        FunctionModel(stream_function=fn), stall_timeout=0.2, first_token_timeout=5
    )
    events = stream(client, send(client, "what is 6*7").text)
    assert events[-1].data == "complete"
    assert "The answer is 42." in text_of("".join(e.data for e in events))


# The stream's body outlasting [DONE] ---------------------------------------------------------


def test_a_body_that_goes_on_after_done_still_ends_the_reply_cleanly(tmp_path):
    """llama.cpp's server sends [DONE] a moment before its body ends: the reply is complete."""
    with FakeOpenAI("Done is not the end.", side_reply=title_reply) as fake:
        fake.done_linger = 0.3
        env = {"OPENAI_BASE_URL": fake.base_url, "OPENAI_API_KEY": "t"}
        with running_app(tmp_path / "app", **env) as app, HtmxClient(app.url) as client:
            for msg in ("One", "Two"):  # the second reuses the connection the first drained
                events = client.follow(client.send(msg).stream_url)
                assert events[-1].data == "complete", events[-2:]
                assert "Done is not the end." in text_of("".join(e.data for e in events))
            app.wait_idle()
            assert [t["status"] for t in app.turns()] == ["complete", "complete"]
            assert "Traceback" not in app.log()


# A conversation longer than the context window -----------------------------------------------

OVERFLOW = (
    "This model's maximum context length is 2048 tokens. However, you requested 9123 tokens "
    "(9123 in the messages, None in the completion). Please reduce the length of the messages."
)


def test_a_context_window_overflow_says_so(tmp_path):
    """llama.cpp answers a too-long prompt with an empty 200 stream (and other servers with a
    400 naming the context length): either way the user learns what to do."""
    script = [Fault.http(400, message=OVERFLOW), None]
    with FakeOpenAI(side_reply=title_reply, script=script) as fake:
        env = {"OPENAI_BASE_URL": fake.base_url, "OPENAI_API_KEY": "t"}
        with running_app(tmp_path / "app", **env) as app, HtmxClient(app.url) as client:
            events = client.follow(client.send("a very long message").stream_url)
            assert events[-1].data == "failed"
            end = text_of(next(e.data for e in events if e.name == "end"))
            assert "too long for this model's context window" in end and "--n_ctx" in end
            fake.configure(script=[Fault.empty()])
            events = client.follow(client.send("another long one").stream_url)
            assert events[-1].data == "failed"
            end = text_of(next(e.data for e in events if e.name == "end"))
            assert "without sending anything" in end and "context window" in end
            app.wait_idle()
            assert [t["status"] for t in app.turns()] == ["failed", "failed"]
