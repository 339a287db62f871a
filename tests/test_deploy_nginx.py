"""compose.yaml's `scale` entry point, for real: deploy/nginx-compose.conf (with the shared
deploy/nginx-proxy.conf) in a real nginx, in front of two real app processes sharing one
database and one Redis, as the profile's two replicas do.

Only addresses change (the replicas' names become two loopback ports, `listen 80` a free
loopback port); every proxy setting is as shipped. Through nginx, with no affinity: pages and
reply streams work, streams arrive event by event, consecutive requests reach both replicas
(nginx's access log names the upstream of each), a reply sent through one replica streams from
the other, and once a replica has stopped, nginx passes everything to the one left, sends
included. With TEST_DATABASE=postgres the two processes share a Postgres schema instead of the
SQLite file (tests/live.py).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.fake_openai import FakeOpenAI
from tests.live import HtmxClient, SharedApp, free_port, reply_html, text_of, title_reply
from tests.redis_server import redis_server_fixture  # noqa: F401  (used by name)
from tests.test_deploy import NGINX_COMPOSE, running_nginx, timed_events

pytestmark = pytest.mark.slow

REPLICAS = ("replica-1", "replica-2")
WORDS = 30
TOKEN_DELAY = 0.04  # the model writes for WORDS * TOKEN_DELAY = 1.2 s
REPLY = " ".join(f"word{n}" for n in range(1, WORDS + 1))


def render_compose_site(text: str, ports: dict[str, int], listen: int) -> str:
    """deploy/nginx-compose.conf with each replica's name as a loopback port and nginx listening
    on loopback; fails if a line this relies on is gone."""
    for name, port in ports.items():
        text, n = re.subn(
            rf"(?m)^(\s*server\s+){re.escape(name)}:\d+", rf"\g<1>127.0.0.1:{port}", text
        )
        assert n == 1, f"deploy/nginx-compose.conf has no upstream server {name}"
    text, n = re.subn(r"(?m)^(\s*listen\s+)80;", rf"\g<1>127.0.0.1:{listen};", text)
    assert n == 1, "deploy/nginx-compose.conf does not listen on 80"
    return text


@dataclass
class Hop:
    """One request as nginx's access log has it."""

    upstreams: list[str]  # the replicas tried, in order (more than one when one refused)
    method: str
    path: str
    status: int


def hops(log: Path) -> list[Hop]:
    """Every request nginx has logged so far."""
    out = []
    for line in log.read_text().splitlines():
        upstream, method, path, status = line.rsplit(" ", 3)
        out.append(Hop([u.strip() for u in upstream.split(",")], method, path, int(status)))
    return out


@dataclass
class Stack:
    """Two replicas behind nginx: the URL to use, the replicas, nginx's access log."""

    url: str
    replicas: dict[str, SharedApp]
    access_log: Path

    def replica_of(self, upstream: str) -> str:
        """Which replica an upstream address in the log is."""
        return next(n for n, a in self.replicas.items() if upstream == f"127.0.0.1:{a.port}")


@contextlib.contextmanager
def scale_stack(root: Path, fake: FakeOpenAI, redis_url: str) -> Iterator[Stack]:
    """The `scale` profile on this machine: two replicas on one database and one Redis, and
    deploy/nginx-compose.conf in front of them. They sign sessions with one key: the key file
    beside the shared SQLite database, or on Postgres the SECRET_KEY tests/live.py gives every
    app on that database."""
    env = {
        "REDIS_URL": redis_url,
        "OPENAI_BASE_URL": fake.base_url,
        "OPENAI_API_KEY": "test",
        "DRAIN_GRACE": "5",
    }
    replicas: dict[str, SharedApp] = {}
    try:
        for name in REPLICAS:
            app = SharedApp(root / name, env=env, shared_db=root / "chat.db")
            replicas[name] = app.start()
        (root / "nginx").mkdir()
        port = free_port()
        site = render_compose_site(
            NGINX_COMPOSE.read_text(), {n: a.port for n, a in replicas.items()}, port
        )
        with running_nginx(root / "nginx", site, port) as access_log:
            yield Stack(f"http://127.0.0.1:{port}", replicas, access_log)
    finally:
        for app in replicas.values():
            app.stop()
            if "Traceback" in app.log():
                print(f"--- {app.workdir.name} log ---\n{app.log()}")


def send_and_read(client: HtmxClient, stack: Stack, msg: str) -> list:
    """Send through nginx and read the reply's stream to its close event, timed; then wait
    until the replicas have saved it (the next send in a conversation waits for that)."""
    sent = client.send(msg)
    headers, events = timed_events(client, sent.stream_url, sent.close_event, "identity")
    assert headers["content-type"].startswith("text/event-stream")
    names = [e.name for _, e in events]
    assert names[-1] == sent.close_event, names
    assert f"word{WORDS}" in text_of(reply_html([e for _, e in events]))
    for app in stack.replicas.values():
        if app.proc is not None:
            app.wait_idle()
    return events


def test_nginx_spreads_pages_and_streams_over_both_replicas(tmp_path: Path, redis_server: str):
    with (
        FakeOpenAI(REPLY, delay=TOKEN_DELAY, side_reply=title_reply) as fake,
        scale_stack(tmp_path, fake, redis_server) as stack,
        HtmxClient(stack.url) as visitor,
    ):
        page = visitor.http.get("/")
        assert page.status_code == 200 and 'name="msg"' in page.text
        visitor.open()
        for n in range(3):
            events = send_and_read(visitor, stack, f"Count for me, {n}")
            # Event by event, not held by nginx until the reply ends.
            content = [t for t, e in events if e.name in ("blocks", "tail")]
            closed_at = events[-1][0]
            assert len([t for t in content if closed_at - t > 0.2]) >= 3, len(content)
        # The conversation, as any replica now shows it: every exchange, reloaded through nginx.
        again = visitor.http.get(f"/c/{visitor.cid}")
        assert again.status_code == 200
        assert all(f"Count for me, {n}" in again.text for n in range(3))

        log = hops(stack.access_log)
        assert all(h.status == 200 for h in log), [h for h in log if h.status != 200]
        served = {stack.replica_of(h.upstreams[-1]) for h in log}
        assert served == set(REPLICAS), log
        # No affinity: a reply was sent through one replica and streamed from the other.
        posts = [h for h in log if h.method == "POST"]
        streams = [h for h in log if h.path.endswith("/stream")]
        assert len(posts) == len(streams) == 3, log
        assert any(p.upstreams[-1] != s.upstreams[-1] for p, s in zip(posts, streams, strict=True))


def test_a_stopped_replica_is_passed_over_sends_included(tmp_path: Path, redis_server: str):
    with (
        FakeOpenAI(REPLY, delay=0, side_reply=title_reply) as fake,
        scale_stack(tmp_path, fake, redis_server) as stack,
        HtmxClient(stack.url) as visitor,
    ):
        visitor.open()
        send_and_read(visitor, stack, "Before the restart")
        gone = stack.replicas[REPLICAS[0]]
        gone_at = f"127.0.0.1:{gone.port}"
        gone.stop()  # SIGTERM: it drains (nothing is running) and exits
        before = len(hops(stack.access_log))
        # Round robin would send every other request to the stopped replica: nginx finds it
        # refusing connections and passes each of these to the other, POSTs too (nothing was
        # sent, so nothing can be sent twice).
        for n in range(3):
            assert visitor.http.get("/").status_code == 200
            send_and_read(visitor, stack, f"After the restart, {n}")
        after = hops(stack.access_log)[before:]
        assert after and all(h.status == 200 for h in after), after
        assert all(h.upstreams[-1] != gone_at for h in after), after
