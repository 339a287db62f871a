"""Live servers for the end-to-end and browser tests: the real app under uvicorn, the fake model.

The app runs as `python main.py` in a subprocess, exactly as a user starts it, configured only
through the environment; the model is either `openai-chat:fake-model` pointed at a loopback
`FakeOpenAI`, or (no MODEL) the built-in demo model. Also here: a client that speaks to the app
the way htmx does, an SSE reader, and the Chromium fixtures, which record console errors and
Content-Security-Policy violations so tests can assert there are none.

Import the fixtures a test module uses explicitly (`from tests.live import fake_fixture`): each
is registered under its short name (`fake`), so test parameters do not shadow the import.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urljoin

import httpx
import pytest
from bs4 import BeautifulSoup

from tests.conftest import Event, iter_sse
from tests.fake_openai import FakeOpenAI, Recorded

ROOT = Path(__file__).resolve().parent.parent
FAKE_MODEL = "openai-chat:fake-model"
# The app asks the model to name a conversation after its first exchange; these requests are
# answered at once with TITLE and are not replies.
TITLE_MARK = "short title"
TITLE = "Fake title"
# Settings the app reads; the tests decide them, never the developer's environment or .env.
_APP_ENV = (
    "MODEL", "MODELS", "HOST", "PORT", "DB_PATH", "SECRET_KEY", "HTTPS", "MAX_MESSAGE_CHARS",
    "OPENAI_BASE_URL", "OPENAI_API_KEY", "ANTHROPIC_API_KEY", "GOOGLE_API_KEY", "GROQ_API_KEY",
    "DATABASE_URL", "DATABASE_POOL_SIZE",
)  # fmt: skip
STARTUP_TIMEOUT = 30.0
STREAM_TIMEOUT = 30.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def is_title_request(body: dict) -> bool:
    """True for the app's background 'name this conversation' model call."""
    return any(
        m.get("role") in ("system", "developer") and TITLE_MARK in str(m.get("content"))
        for m in body.get("messages") or []
    )


def title_reply(body: dict) -> str | None:
    """FakeOpenAI side reply: answer title requests at once, leave every other request alone."""
    return TITLE if is_title_request(body) else None


def replies(fake: FakeOpenAI) -> list[Recorded]:
    """The requests that generated replies (not titles), oldest first."""
    return [r for r in fake.requests if not is_title_request(r.body)]


def wait_for_replies(fake: FakeOpenAI, n: int, timeout: float = 10.0) -> list[Recorded]:
    """Wait until `n` reply requests have reached the fake model."""
    deadline = time.monotonic() + timeout
    while len(replies(fake)) < n:
        if time.monotonic() > deadline:
            raise TimeoutError(f"expected {n} reply requests, got {len(replies(fake))}")
        time.sleep(0.02)
    return replies(fake)


# The app -----------------------------------------------------------------------------------


@dataclass
class LiveApp:
    """The real app served by `python main.py` in a subprocess."""

    workdir: Path
    model: str | None = FAKE_MODEL
    env: dict[str, str] = field(default_factory=dict)
    port: int = 0
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        """The app's base URL."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def db_path(self) -> Path:
        """The SQLite file the app writes."""
        return self.workdir / "chat.db"

    @property
    def log_path(self) -> Path:
        """Where the app's stdout and stderr go."""
        return self.workdir / "app.log"

    def log(self) -> str:
        """Everything the app has printed so far."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def start(self) -> LiveApp:
        """Start the app and wait until /health answers."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port()
        env = {k: v for k, v in os.environ.items() if k not in _APP_ENV}
        env.update(
            HOST="127.0.0.1",
            PORT=str(self.port),
            DB_PATH=str(self.db_path),
            MODEL=self.model or "",  # empty: the demo model, even if a .env file names one
            NO_PROXY="127.0.0.1,localhost",
            PYTHONUNBUFFERED="1",
        )
        env.update({**postgres_env(self.db_path), **self.env})
        with open(self.log_path, "wb") as log:
            # cwd is the temporary directory, so no .env file of the developer's is read.
            self.proc = subprocess.Popen(
                [sys.executable, str(ROOT / "main.py")],
                cwd=self.workdir,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + STARTUP_TIMEOUT
        with httpx.Client(trust_env=False, timeout=2) as http:
            while True:
                if self.proc.poll() is not None:
                    self.stop()
                    raise RuntimeError(f"the app exited at start-up:\n{self.log()}")
                with contextlib.suppress(httpx.HTTPError):
                    if http.get(f"{self.url}/health").status_code == 200:
                        return self
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"the app did not answer /health:\n{self.log()}")
                time.sleep(0.1)

    def stop(self) -> None:
        """Stop the app as a user would (SIGTERM), killing it if it does not end promptly."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)

    def health(self) -> dict:
        """The /health answer."""
        with httpx.Client(trust_env=False, timeout=10) as http:
            return http.get(f"{self.url}/health").json()

    def wait_idle(self, timeout: float = 20.0) -> None:
        """Wait until no reply is being generated."""
        deadline = time.monotonic() + timeout
        while self.health()["runs"]:
            if time.monotonic() > deadline:
                raise TimeoutError("replies still running")
            time.sleep(0.05)

    def connect(self):
        """A connection to the app's database, beside the running app: the SQLite file, or
        its Postgres schema behind the same small API (`?` placeholders, `with conn:`)."""
        if url := {**postgres_env(self.db_path), **self.env}.get("DATABASE_URL"):
            from tests.conftest import PostgresConnection

            return PostgresConnection(url)
        return sqlite3.connect(self.db_path, timeout=10)

    def integrity(self) -> str:
        """The store's own check of the app's database ('ok' when sound), run beside it."""
        from chat.config import Settings
        from chat.stores import open_store

        url = {**postgres_env(self.db_path), **self.env}.get("DATABASE_URL", "")
        store = open_store(Settings(db_path=self.db_path, database_url=url))
        try:
            return store.integrity()
        finally:
            store.close()

    def turns(self) -> list[dict]:
        """Every row of the `turns` table, oldest first (read-only, beside the running app)."""
        if url := {**postgres_env(self.db_path), **self.env}.get("DATABASE_URL"):
            import psycopg
            from psycopg.rows import dict_row

            from chat.pgstore import TURN_COLS

            with psycopg.connect(url, row_factory=dict_row) as pg:
                return pg.execute(f"select {TURN_COLS} from turns order by id").fetchall()
        conn = sqlite3.connect(f"file:{self.db_path}?mode=ro", uri=True)
        try:
            conn.row_factory = sqlite3.Row
            return [dict(r) for r in conn.execute("select * from turns order by id")]
        finally:
            conn.close()


# TEST_DATABASE=postgres (tests/conftest.py): each app's database is a fresh Postgres schema
# instead of its SQLite file; apps started on one DB_PATH share one schema and one session key,
# as they would share the file and the key beside it.
_POSTGRES: dict[Path, dict[str, str]] = {}


def postgres_env(db_path: Path) -> dict[str, str]:
    """DATABASE_URL and SECRET_KEY for an app on `db_path` when the tests run on Postgres."""
    server = os.environ.get("TEST_POSTGRES_URL")
    if os.environ.get("TEST_DATABASE") != "postgres" or not server:
        return {}
    if db_path not in _POSTGRES:
        from tests.postgres_server import fresh_database_url

        _POSTGRES[db_path] = {
            "DATABASE_URL": fresh_database_url(server),
            "SECRET_KEY": secrets.token_urlsafe(24),
        }
    return _POSTGRES[db_path]


@contextlib.contextmanager
def running_app(workdir: Path, model: str | None = FAKE_MODEL, **env: str) -> Iterator[LiveApp]:
    """The app, started in `workdir` and stopped afterwards; prints its log if it has tracebacks."""
    app = LiveApp(workdir, model=model, env=env).start()
    try:
        yield app
    finally:
        app.stop()
        if "Traceback" in app.log():
            print(f"--- app log ({app.log_path}) ---\n{app.log()}")


# Fixtures: one fake model and one app per test module; each test gets a reset fake -----------


@pytest.fixture(name="fake_server", scope="module")
def fake_server_fixture() -> Iterator[FakeOpenAI]:
    """The fake OpenAI-compatible server shared by a module's tests."""
    with FakeOpenAI(side_reply=title_reply) as fake:
        yield fake


@pytest.fixture(name="app", scope="module")
def app_fixture(fake_server: FakeOpenAI, tmp_path_factory) -> Iterator[LiveApp]:
    """The real app on `openai-chat:fake-model`, talking to `fake_server`."""
    workdir = tmp_path_factory.mktemp("app")
    with running_app(workdir, OPENAI_BASE_URL=fake_server.base_url, OPENAI_API_KEY="test") as a:
        yield a


@pytest.fixture(name="fake")
def fake_fixture(fake_server: FakeOpenAI, app: LiveApp) -> Iterator[FakeOpenAI]:
    """The fake model, reset for this test; afterwards, waits until the app has gone quiet."""
    fake_server.reset()
    yield fake_server
    fake_server.release()
    app.wait_idle()
    time.sleep(0.2)  # a title request may follow a finished reply
    fake_server.wait_until_finished()


@pytest.fixture(name="demo_app", scope="module")
def demo_app_fixture(tmp_path_factory) -> Iterator[LiveApp]:
    """The real app with no MODEL: the built-in offline demo model answers."""
    with running_app(tmp_path_factory.mktemp("demo"), model=None) as a:
        yield a


# Talking to the app as htmx does -------------------------------------------------------------


@dataclass
class Sent:
    """What POSTing the composer answered: the two messages and where the reply streams."""

    response: httpx.Response
    soup: BeautifulSoup
    stream_url: str
    close_event: str
    cid: str

    def text(self, role: str) -> str:
        """The visible text of the message with data-role `role` in the answer."""
        el = self.soup.find(attrs={"data-role": role})
        return el.get_text(" ", strip=True) if el else ""


def text_of(html: str) -> str:
    """The visible text of an HTML fragment, whitespace folded."""
    return " ".join(BeautifulSoup(html, "html.parser").get_text(" ").split())


class HtmxClient:
    """A browser-less client with a cookie jar that sends what htmx would send."""

    def __init__(self, base_url: str):
        self.base_url = base_url
        self.http = httpx.Client(base_url=base_url, trust_env=False, timeout=STREAM_TIMEOUT)
        self.cid = ""
        self.send_url = ""

    def close(self) -> None:
        """Close the connection pool."""
        self.http.close()

    def __enter__(self) -> HtmxClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def open(self, path: str = "/") -> BeautifulSoup:
        """GET a page; remember the composer's form (where it posts, the conversation id)."""
        r = self.http.get(path)
        r.raise_for_status()
        soup = BeautifulSoup(r.text, "html.parser")
        form = soup.find("textarea", attrs={"name": "msg"}).find_parent("form")
        self.send_url = form.get("hx-post") or form.get("action")
        cid = form.find("input", attrs={"name": "cid"})
        self.cid = cid.get("value", "") if cid else ""
        return soup

    def send(self, msg: str, *, expect: int = 200) -> Sent | httpx.Response:
        """Submit the composer like htmx: HX-Request, same-origin, form-encoded msg and cid."""
        if not self.send_url:
            self.open()
        r = self.http.post(
            self.send_url,
            data={"msg": msg, "cid": self.cid},
            headers={
                "HX-Request": "true",
                "HX-Current-URL": self.base_url + "/",
                "Origin": self.base_url,
                "Sec-Fetch-Site": "same-origin",
            },
        )
        assert r.status_code == expect, (r.status_code, r.text)
        if expect != 200:
            return r
        soup = BeautifulSoup(r.text, "html.parser")
        live = soup.find(attrs={"sse-connect": True})
        assert live is not None, f"no sse-connect in the answer: {r.text[:500]}"
        assert live.get("hx-ext") == "sse"
        cid_input = soup.find("input", attrs={"name": "cid"})
        if cid_input is not None and cid_input.get("value"):
            self.cid = cid_input["value"]
        return Sent(r, soup, live["sse-connect"], live["sse-close"], self.cid)

    @contextlib.contextmanager
    def events(self, url: str, headers: dict | None = None) -> Iterator[Iterator[Event]]:
        """Open a stream and iterate its events (the caller decides when to stop)."""
        h = {"Accept": "text/event-stream", "Accept-Encoding": "identity", **(headers or {})}
        with self.http.stream("GET", urljoin(self.base_url, url), headers=h) as r:
            assert r.status_code == 200, r.status_code
            assert r.headers["content-type"].startswith("text/event-stream")
            yield iter_sse(r.iter_lines())

    def wait_for_text(self, url: str, text: str) -> list[Event]:
        """Read a stream until the reply so far (blocks and tail) shows `text`; then let go."""
        deadline = time.monotonic() + STREAM_TIMEOUT
        out: list[Event] = []
        with self.events(url) as events:
            for ev in events:
                out.append(ev)
                tail = next((e.data for e in reversed(out) if e.name == "tail"), "")
                if text in text_of(reply_html(out) + tail):
                    return out
                if ev.name == "done" or time.monotonic() > deadline:
                    break
        raise AssertionError(f"the stream never showed {text!r}: {out}")

    def follow(self, url: str, close: str = "done", headers: dict | None = None) -> list[Event]:
        """Read a stream until its `close` event (as the sse extension would); bounded in time."""
        deadline = time.monotonic() + STREAM_TIMEOUT
        out: list[Event] = []
        with self.events(url, headers) as events:
            for ev in events:
                out.append(ev)
                if ev.name == close:
                    return out
                if time.monotonic() > deadline:
                    break
        raise AssertionError(f"the stream ended without {close!r}: {[e.name for e in out]}")


def reply_html(events: list[Event]) -> str:
    """The reply as the page would hold it at the end: every `blocks` event in order."""
    return "".join(e.data for e in events if e.name == "blocks")


def wait_until(
    check: Callable[[], object], timeout: float = 15.0, what: str = "condition", every: float = 0.05
):
    """Poll `check` every `every` seconds until it is truthy, for at most `timeout` seconds;
    return its value (TimeoutError naming `what` otherwise)."""
    deadline = time.monotonic() + timeout
    while not (result := check()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(every)
    return result


def check_resume_after_drop(
    sender: HtmxClient, resumer: HtmxClient, fake: FakeOpenAI, text: str, message: str
) -> None:
    """Send `message` on `sender`, read its stream until its second paragraph, then reconnect
    on `resumer` with the last event id seen (what EventSource does after a dropped
    connection; `resumer` may be another process behind a balancer): the rest of the reply
    arrives once, nothing repeated, from one model call."""
    fake.configure(text, hold_after=6)
    sent = sender.send(message)
    fake.wait_until_held()
    before = sender.wait_for_text(sent.stream_url, "Second paragraph.")
    blocks = [e for e in before if e.name == "blocks"]
    assert blocks and blocks[-1].id, before
    with resumer.events(sent.stream_url, {"Last-Event-ID": blocks[-1].id}) as events:
        fake.release()
        after = []
        for ev in events:
            after.append(ev)
            if ev.name == "done":
                break
    assert after[-1].data == "complete"
    assert text_of(reply_html(blocks) + reply_html(after)) == text_of(text.replace("\n", " "))
    assert len(replies(fake)) == 1


# Two app processes on one store and one Redis (tests/test_scale.py, test_scale_postgres.py) ---

# Short leases, so a dead process's replies end within seconds here.
LEASE_SECONDS, LEASE_REFRESH = 3, 1
DRAIN_GRACE = 20.0
SHARED_SECRET = "scale-test-key"
PARAGRAPHS = "First paragraph.\n\nSecond paragraph.\n\nThird paragraph.\n\nFourth paragraph."


@dataclass
class SharedApp(LiveApp):
    """The app in its own directory (its own log), on a database shared with other processes."""

    shared_db: Path | None = None

    @property
    def db_path(self) -> Path:
        """The shared SQLite file (unused when DATABASE_URL names a Postgres store)."""
        return self.shared_db


def shared_app(
    workdir: Path, db: Path, fake: FakeOpenAI, redis_url: str, port: int = 0, **extra: str
) -> SharedApp:
    """One of several processes (not started yet) on database `db` (or `extra`'s DATABASE_URL)
    and one Redis, with short leases and the same SECRET_KEY, so a browser's cookie works on
    every process."""
    env = {
        "REDIS_URL": redis_url,
        "LEASE_SECONDS": str(LEASE_SECONDS),
        "LEASE_REFRESH_SECONDS": str(LEASE_REFRESH),
        "OPENAI_BASE_URL": fake.base_url,
        "OPENAI_API_KEY": "test",
        "SECRET_KEY": SHARED_SECRET,  # one browser identity on every process
        "DRAIN_GRACE": str(DRAIN_GRACE),
        **extra,
    }
    return SharedApp(workdir, env=env, port=port, shared_db=db)


def start_app(
    workdir: Path, db: Path, fake: FakeOpenAI, redis_url: str, port: int = 0, **extra: str
) -> SharedApp:
    """`shared_app(...)`, started."""
    return shared_app(workdir, db, fake, redis_url, port, **extra).start()


def stop_app(app: SharedApp) -> None:
    """Stop one of the processes; print its log if it has tracebacks."""
    app.stop()
    if "Traceback" in app.log():
        print(f"--- app log ({app.log_path}) ---\n{app.log()}")


def own_redis_db(redis_url: str, db: int) -> str:
    """The same Redis, another logical database: turn ids restart at 1 in each SQLite file, so
    the module's pair (still running) must not see, and end as lapsed, this test's leases."""
    return redis_url.rsplit("/", 1)[0] + f"/{db}"


@pytest.fixture(name="fake")
def pair_fake_fixture(fake_server: FakeOpenAI, pair) -> Iterator[FakeOpenAI]:
    """For a module whose `pair` fixture yields its processes: the fake model, reset for this
    test; afterwards, waits until both processes are idle."""
    fake_server.reset()
    yield fake_server
    fake_server.release()
    for app in pair:
        app.wait_idle()
    time.sleep(0.2)  # a title request may follow a finished reply
    fake_server.wait_until_finished()


@pytest.fixture(name="clients")
def clients_fixture(pair) -> Iterator[tuple[HtmxClient, HtmxClient]]:
    """One browser identity, talking to A and to B of the module's `pair`."""
    a, b = pair
    with HtmxClient(a.url) as on_a, HtmxClient(b.url) as on_b:
        on_a.open()
        on_b.http.cookies = on_a.http.cookies
        yield on_a, on_b


# Chromium -----------------------------------------------------------------------------------

CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# Reports every CSP violation to Python (exposed binding), surviving reloads and navigations.
# Counts reports once the test side holds them, so a test can wait for one instead of sleeping.
_CSP_WATCH = """
window.__cspReported = 0;
document.addEventListener("securitypolicyviolation", async (e) => {
  await window.__reportCsp({directive: e.violatedDirective, blocked: e.blockedURI,
                            sample: e.sample, source: e.sourceFile, line: e.lineNumber});
  window.__cspReported++;
});
"""


def chromium_path() -> str:
    """The Chromium binary to drive: $CHROMIUM, else /usr/bin/chromium; skip the test if absent."""
    path = os.environ.get("CHROMIUM") or "/usr/bin/chromium"
    found = shutil.which(path)
    if not found:
        pytest.skip(
            f"browser tests need Chromium: {path} not found (set CHROMIUM to a Chromium binary)"
        )
    return found


@pytest.fixture(name="browser", scope="module")
def browser_fixture():
    """A headless Chromium for a module's tests."""
    from playwright.sync_api import sync_playwright

    path = chromium_path()
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=path, args=CHROMIUM_ARGS, timeout=60_000)
        try:
            yield b
        finally:
            b.close()


@dataclass
class Watched:
    """A page with everything that went wrong in it: console errors, page errors, CSP reports."""

    page: object
    context: object
    console_errors: list[str] = field(default_factory=list)
    csp_violations: list[dict] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)

    def assert_clean(self) -> None:
        """No CSP violation, no console error and no uncaught exception happened."""
        assert self.csp_violations == [], self.csp_violations
        assert self.console_errors == [], self.console_errors


def watch(context, page) -> Watched:
    """Start recording a page's console errors, uncaught errors, CSP violations and requests."""
    w = Watched(page, context)
    page.on(
        "console",
        lambda m: (
            w.console_errors.append(f"{m.text} @ {m.location}") if m.type == "error" else None
        ),
    )
    page.on("pageerror", lambda exc: w.console_errors.append(f"uncaught: {exc}"))
    page.on("request", lambda r: w.requests.append(r.url))
    return w


def open_context(browser, base_url: str, **kw) -> Watched:
    """A fresh browser profile (own cookies: a new anonymous user) with one watched page."""
    kw.setdefault("viewport", {"width": 1280, "height": 800})
    context = browser.new_context(base_url=base_url, **kw)
    context.set_default_timeout(15_000)
    violations: list[dict] = []
    context.expose_binding("__reportCsp", lambda _source, v: violations.append(v))
    context.add_init_script(_CSP_WATCH)
    context.add_init_script(_SSE_WATCH)
    watched = watch(context, context.new_page())
    watched.csp_violations = violations
    return watched


# Counts the htmx SSE extension's streams opened and closed, so a test can wait until every
# stream has been closed (after which nothing reconnects) instead of watching for a while.
_SSE_WATCH = """
window.__sseOpened = 0; window.__sseClosed = 0;
document.addEventListener("htmx:sseOpen", () => window.__sseOpened++);
document.addEventListener("htmx:sseClose", () => window.__sseClosed++);
"""


def wait_streams_closed(page, timeout: float = 10_000) -> None:
    """Wait until the page opened a reply stream and has closed every stream it opened."""
    page.wait_for_function(
        "() => window.__sseOpened > 0 && window.__sseClosed >= window.__sseOpened",
        timeout=timeout,
    )


# True once an element's own CSS transitions and animations have all finished. Reading
# getAnimations() flushes style, so a transition just triggered by a class change is counted.
_SETTLED = """sel => {
  const e = document.querySelector(sel);
  return !!e && e.getAnimations().every(a => a.playState === "finished" || a.playState === "idle");
}"""


def wait_settled(page, selector: str, timeout: float = 5_000) -> None:
    """Wait until `selector` has stopped moving (its transitions have ended): a condition, not
    a fixed time, so a test asserts on where a slide-in ends, never on where it happens to be."""
    page.wait_for_function(_SETTLED, arg=selector, timeout=timeout)


@pytest.fixture(name="web")
def web_fixture(browser, app: LiveApp, fake: FakeOpenAI) -> Iterator[Watched]:
    """A watched page in a fresh browser profile on the fake-model app."""
    w = open_context(browser, app.url)
    try:
        yield w
    finally:
        w.context.close()
