"""SIGTERM drains a live app: replies in flight finish (within DRAIN_GRACE), a new send gets the
"restarting" 503, /ready answers 503 so a load balancer looks elsewhere, and a reply that outlasts
the grace is stored as interrupted with the text it had so far."""

from __future__ import annotations

import signal
import time

import httpx
import pytest

from tests.fake_openai import FakeOpenAI
from tests.live import HtmxClient, running_app, text_of, title_reply, wait_for_replies

GRACE = 6.0
QUICK = " ".join(f"quick{i}" for i in range(30))  # ~2.4 s at the fake's pace below
LONG = " ".join(f"long{i}" for i in range(3000))  # minutes: outlasts the grace
DELAY = 0.08


def _reply(body: dict) -> str:
    last = body["messages"][-1]["content"]
    return LONG if "long" in str(last) else QUICK


@pytest.mark.slow
def test_sigterm_lets_running_replies_finish_then_interrupts_the_rest(tmp_path):
    with FakeOpenAI(_reply, delay=DELAY, side_reply=title_reply) as fake:
        with running_app(
            tmp_path,
            OPENAI_BASE_URL=fake.base_url,
            OPENAI_API_KEY="test",
            DRAIN_GRACE=str(GRACE),
        ) as app:
            with HtmxClient(app.url) as a, HtmxClient(app.url) as b, HtmxClient(app.url) as c:
                long = a.send("a long one please")
                quick = b.send("a quick one please")
                c.open()
                wait_for_replies(fake, 2)
                a.wait_for_text(long.stream_url, "long3")  # the long reply has text to keep
                assert httpx.get(f"{app.url}/ready", trust_env=False).status_code == 200

                app.proc.send_signal(signal.SIGTERM)
                signalled = time.monotonic()
                # Draining: still answering, but not ready, and taking no new replies.
                deadline = time.monotonic() + 5
                while (ready := httpx.get(f"{app.url}/ready", trust_env=False)).status_code == 200:
                    assert time.monotonic() < deadline, "/ready never answered 503"
                    time.sleep(0.05)
                assert ready.status_code == 503 and ready.json()["draining"] is True
                refused = c.send("a new message during the drain", expect=503)
                assert "restarting" in text_of(refused.text)
                # The quick reply, started before the signal, streams to its end.
                events = b.follow(quick.stream_url)
                assert events[-1].data == "complete"
                assert time.monotonic() - signalled < GRACE  # it did not wait for the grace

                app.proc.wait(GRACE + 20)
                took = time.monotonic() - signalled
            assert GRACE - 0.5 <= took < GRACE + 15, took
            rows = {r["user_text"]: r for r in app.turns()}
            done = rows["a quick one please"]
            assert done["status"] == "complete"
            assert done["reply_text"].split() == QUICK.split()
            cut = rows["a long one please"]
            assert cut["status"] == "interrupted"
            words = cut["reply_text"].split()
            assert 4 <= len(words) < 3000 and words == LONG.split()[: len(words)]
            assert "a new message during the drain" not in rows  # refused, nothing stored
