"""SIGTERM drains a live app: replies in flight finish (within DRAIN_GRACE), a new send gets the
"restarting" 503, /ready answers 503 so a load balancer looks elsewhere, and a reply that outlasts
the grace is stored as interrupted with the text it had so far."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import httpx
import pytest

from chat.drain import Drain
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


# The drain's rules, without a process: fast, in the quick layer ----------------------------


class _Runs:
    """What Drain needs of a RunManager: runs that end when told, and a shutdown to record."""

    def __init__(self, n: int) -> None:
        self.accepting = True
        self.runs = {i: object() for i in range(n)}
        self.shutdowns = 0

    async def shutdown(self) -> None:
        self.accepting = False
        self.shutdowns += 1
        self.runs.clear()  # what is left is interrupted and saved


async def test_a_drain_waits_for_running_replies_then_lets_the_server_stop():
    runs, passed = _Runs(2), []
    drain = Drain(runs, grace=5)
    drain._prev[signal.SIGTERM] = lambda sig, frame: passed.append(sig)
    task = asyncio.create_task(drain.drain())
    await asyncio.sleep(0.3)
    assert drain.draining and not passed  # no new replies; still waiting for the two
    runs.runs.pop(0)
    runs.runs.pop(1)  # both finished within the grace
    await asyncio.wait_for(task, 2)
    assert passed == [signal.SIGTERM]


async def test_a_drain_interrupts_what_outlasts_the_grace():
    runs, passed = _Runs(1), []
    drain = Drain(runs, grace=0.3)
    drain._prev[signal.SIGTERM] = lambda sig, frame: passed.append(sig)
    started = asyncio.get_running_loop().time()
    await asyncio.wait_for(drain.drain(), 3)
    assert asyncio.get_running_loop().time() - started >= 0.3
    assert runs.shutdowns == 1 and not runs.runs and passed == [signal.SIGTERM]


async def test_sigterm_starts_the_drain_and_a_second_signal_ends_it_at_once():
    runs, passed = _Runs(1), []
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    # Stands in for the server's own handlers, which the drain wraps and passes on to.
    for sig in before:
        signal.signal(sig, lambda sig, frame: passed.append(sig))
    try:
        drain = Drain(runs, grace=30)
        assert drain.install()
        os.kill(os.getpid(), signal.SIGTERM)
        await asyncio.sleep(0.2)
        assert drain.draining and drain.task is not None and not passed  # waiting for the run
        os.kill(os.getpid(), signal.SIGINT)  # impatient: stop now
        await asyncio.wait_for(drain.task, 3)
        assert runs.shutdowns >= 1 and not runs.runs
        assert passed == [signal.SIGINT]  # the server got the signal once, not the drain's too
        drain.uninstall()
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)
