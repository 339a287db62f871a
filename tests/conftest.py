"""Shared fixtures and helpers: settings on a temporary database, scripted FunctionModels, app
clients, and small parsers for what a browser receives (server-sent events, HTML)."""

from __future__ import annotations

import asyncio
import inspect
import os
import re
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

import pydantic_ai.models
import pytest
from pydantic_ai.messages import ModelMessage, ModelRequest, ModelResponse, TextPart, UserPromptPart
from pydantic_ai.models.function import AgentInfo, FunctionModel
from starlette.testclient import TestClient

from chat.agent import INSTRUCTIONS, build_agent
from chat.config import Settings
from chat.runs import RunManager
from chat.stores import open_store
from tests.postgres_server import fresh_database_url, postgres_server  # noqa: F401

# Unit and route tests never reach a real model: only FunctionModels may answer.
pydantic_ai.models.ALLOW_MODEL_REQUESTS = False


class ModelBroke(Exception):
    """What a scripted model raises when told to fail; its text must never reach the user."""


# Models -----------------------------------------------------------------------------------


@dataclass
class ScriptedModel:
    """A FunctionModel that streams fixed chunks and records the messages each call received.

    `calls` holds the message lists of the chat agent's calls (the replies); calls made by any
    other agent (for instance one that writes conversation titles) go to `side_calls` and are
    answered with `side_reply`. `chunks` may also be a function of the received messages.
    After `pause_after` chunks the model sets `paused` and waits for `resume`, so a test can act
    while a reply is part-way through. With `error`, it raises that after streaming the chunks.
    """

    chunks: Sequence[str] | Callable[[list[ModelMessage]], Sequence[str]] = ("Hello!",)
    delay: float = 0.0
    error: BaseException | None = None
    pause_after: int | None = None
    side_reply: str = "Scripted title"
    calls: list[list[ModelMessage]] = field(default_factory=list)
    side_calls: list[list[ModelMessage]] = field(default_factory=list)
    # asyncio.Event binds to a loop on first use, so these work on whichever loop runs the app.
    paused: asyncio.Event = field(default_factory=asyncio.Event)
    resume: asyncio.Event = field(default_factory=asyncio.Event)
    model: FunctionModel = field(init=False)

    def __post_init__(self) -> None:
        self.model = FunctionModel(stream_function=self._stream, model_name="scripted")

    async def _stream(self, messages: list[ModelMessage], info: AgentInfo) -> AsyncIterator[str]:
        if INSTRUCTIONS not in (info.instructions or ""):
            self.side_calls.append(list(messages))
            yield self.side_reply
            return
        self.calls.append(list(messages))
        chunks = self.chunks(messages) if callable(self.chunks) else self.chunks
        for i, chunk in enumerate(chunks):
            if i == self.pause_after:
                self.paused.set()
                await self.resume.wait()
            yield chunk
            await asyncio.sleep(self.delay)
        if self.pause_after is not None and self.pause_after >= len(chunks):
            self.paused.set()
            await self.resume.wait()
        if self.error is not None:
            raise self.error

    @property
    def prompts(self) -> list[list[str]]:
        """For each reply call, the user prompts in the messages it received, oldest first."""
        return [user_prompts(messages) for messages in self.calls]


def user_prompts(messages: Sequence[ModelMessage]) -> list[str]:
    """The text of every user prompt in `messages`, in order."""
    return [
        part.content
        for m in messages
        if isinstance(m, ModelRequest)
        for part in m.parts
        if isinstance(part, UserPromptPart) and isinstance(part.content, str)
    ]


def reply_texts(messages: Sequence[ModelMessage]) -> list[str]:
    """The text of every text part of the model's responses in `messages`, in order."""
    return [
        part.content
        for m in messages
        if isinstance(m, ModelResponse)
        for part in m.parts
        if isinstance(part, TextPart)
    ]


# What a browser receives ------------------------------------------------------------------


@dataclass
class Event:
    """One server-sent event as a browser's EventSource sees it."""

    name: str
    data: str
    id: str | None = None


def iter_sse(lines: Iterable[str]) -> Iterator[Event]:
    """Events from the lines of a text/event-stream, as EventSource reads them (no comments)."""
    name, data, eid = "message", [], None
    for line in lines:
        if line == "":
            if data:
                yield Event(name, "\n".join(data), eid)
            name, data, eid = "message", [], None
            continue
        if line.startswith(":"):
            continue
        key, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if key == "event":
            name = value
        elif key == "data":
            data.append(value)
        elif key == "id":
            eid = value


HX = {"HX-Request": "true"}


def send(client, msg: str = "hi", **data):
    """POST the composer form the way htmx does; the answer must be 200."""
    r = client.post("/send", data={"msg": msg, **data}, headers=HX)
    assert r.status_code == 200, r.text
    return r


def stream(client, html: str) -> list[Event]:
    """Follow the reply stream that the answer `html` connects to, to its end."""
    url = re.search(r'sse-connect="([^"]+)"', html).group(1)
    with client.stream("GET", url) as r:
        return parse_sse(b"".join(r.iter_bytes()).decode())


def parse_sse(body: str) -> list[Event]:
    """Every event in a whole text/event-stream body."""
    return list(iter_sse(body.replace("\r\n", "\n").replace("\r", "\n").split("\n")))


VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "wbr"}


@dataclass
class Node:
    """An element of a parsed HTML document."""

    tag: str
    attrs: dict[str, str | None]
    children: list[Node | str] = field(default_factory=list)

    def walk(self) -> Iterator[Node]:
        """This element and every element inside it, in document order."""
        yield self
        for child in self.children:
            if isinstance(child, Node):
                yield from child.walk()

    def find_all(self, tag: str | None = None, **attrs: str | None) -> list[Node]:
        """Elements (including this one) with `tag` and the given attribute values."""
        wanted = {k.replace("_", "-"): v for k, v in attrs.items()}
        return [
            n
            for n in self.walk()
            if (tag is None or n.tag == tag)
            and all(n.attrs.get(k, ...) == v for k, v in wanted.items())
        ]

    def find(self, tag: str | None = None, **attrs: str | None) -> Node:
        """The first matching element; fails the test if there is none."""
        found = self.find_all(tag, **attrs)
        assert found, f"no <{tag or '*'} {attrs}> in {self.text[:200]!r}"
        return found[0]

    @property
    def text(self) -> str:
        """All text inside, as a browser would show it (without layout)."""
        return "".join(c if isinstance(c, str) else c.text for c in self.children)


class _TreeBuilder(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.root = Node("#root", {})
        self.stack = [self.root]

    def handle_starttag(self, tag, attrs) -> None:
        node = Node(tag, dict(attrs))
        self.stack[-1].children.append(node)
        if tag not in VOID:
            self.stack.append(node)

    def handle_startendtag(self, tag, attrs) -> None:
        self.stack[-1].children.append(Node(tag, dict(attrs)))

    def handle_endtag(self, tag) -> None:
        for i in range(len(self.stack) - 1, 0, -1):
            if self.stack[i].tag == tag:
                del self.stack[i:]
                return

    def handle_data(self, data) -> None:
        self.stack[-1].children.append(data)


def parse_html(html: str) -> Node:
    """Parse HTML (a page or a fragment) into a tree of `Node`s."""
    builder = _TreeBuilder()
    builder.feed(html)
    builder.close()
    return builder.root


# Layers -----------------------------------------------------------------------------------
# `uv run pytest -m "not slow"` is the quick layer (unit and route tests, in-process); `slow`
# marks what starts a real browser, the app as a subprocess, nginx, or waits on the network.
SLOW_MODULES = {"test_browser", "test_browser_features", "test_e2e", "test_cli", "test_forking"}
# Fixtures that start a live server (tests/live.py): any test using one is slow.
SLOW_FIXTURES = {"browser", "app", "demo_app", "fake_server"}
# A test whose own code starts the app or another process (tests/live.py's running_app).
_STARTS_A_PROCESS = re.compile(r"\brunning_app\(|\bsubprocess\.(run|Popen|check_output|call)\(")


def _starts_a_process(item: pytest.Item) -> bool:
    try:
        return bool(_STARTS_A_PROCESS.search(inspect.getsource(item.function)))
    except (AttributeError, OSError, TypeError):
        return False


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark the slow layer: modules that drive live servers, and tests that start one."""
    for item in items:
        module = item.module.__name__.rsplit(".", 1)[-1] if item.module else ""
        if (
            module in SLOW_MODULES
            or SLOW_FIXTURES & set(getattr(item, "fixturenames", ()))
            or _starts_a_process(item)
        ):
            item.add_marker(pytest.mark.slow)


# Fixtures ---------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def cheap_password_hashing(monkeypatch):
    """In-process tests hash passwords with argon2 at its lowest cost: the same code paths
    (hash, verify, rehash), without a fifth of a second of CPU per sign-up and sign-in."""
    from argon2 import PasswordHasher

    import chat.accounts

    monkeypatch.setattr(
        chat.accounts, "_hasher", PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)
    )


@pytest.fixture
def settings(tmp_path: Path, database_url: str) -> Settings:
    """Settings on a fresh database, with a fixed session key and no configured model.

    The database is a SQLite file, or a fresh Postgres schema (`database_url`) when the test
    runs on Postgres (TEST_DATABASE=postgres, or the `postgres` case of a store test).
    """
    # "testserver" is the Host TestClient sends; the app otherwise answers only local names.
    hosts = ("localhost", "127.0.0.1", "::1", "testserver")
    return Settings.from_env(
        {},
        db_path=tmp_path / "chat.db",
        secret_key="test",
        allowed_hosts=hosts,
        database_url=database_url,
    )


@pytest.fixture
def store(settings: Settings):
    """The chat store on the test's fresh database: each test that uses it runs twice, on
    SQLite and on Postgres (see `backend`)."""
    s = open_store(settings)
    yield s
    s.close()


# Both backends (issue 17) -----------------------------------------------------------------
# Every test that uses `store` runs on SQLite and on Postgres (ids `[sqlite]`, `[postgres]`);
# TEST_DATABASE=postgres runs every other test (route tests, live servers) on Postgres too.
# A test about SQLite itself (its file, WAL, VACUUM INTO, its migrations) is marked
# `sqlite_only`: it runs on SQLite only, and is skipped, saying so, in the Postgres run.
BACKENDS = ("sqlite", "postgres")
TEST_DATABASE = os.environ.get("TEST_DATABASE", "sqlite").strip().lower() or "sqlite"
if TEST_DATABASE not in BACKENDS:
    raise pytest.UsageError(f"TEST_DATABASE must be one of {BACKENDS}, not {TEST_DATABASE!r}")


def pytest_configure(config: pytest.Config) -> None:
    """Register the `sqlite_only` marker."""
    config.addinivalue_line(
        "markers", "sqlite_only(reason): tests SQLite itself; not run on Postgres"
    )


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Run each test that uses the `store` fixture once per backend."""
    if "store" in metafunc.fixturenames and "backend" in metafunc.fixturenames:
        only_sqlite = metafunc.definition.get_closest_marker("sqlite_only") is not None
        params = ("sqlite",) if only_sqlite else BACKENDS
        metafunc.parametrize("backend", params, indirect=True)


def pytest_runtest_setup(item: pytest.Item) -> None:
    """In the Postgres run, skip (saying why) a `sqlite_only` test that is not a `store` test
    running its SQLite case."""
    marker = item.get_closest_marker("sqlite_only")
    if marker is None or TEST_DATABASE != "postgres":
        return
    callspec = getattr(item, "callspec", None)
    if callspec is not None and callspec.params.get("backend") == "sqlite":
        return
    pytest.skip(f"SQLite only: {marker.args[0] if marker.args else 'tests SQLite itself'}")


@pytest.fixture
def backend(request: pytest.FixtureRequest) -> str:
    """The database this test runs on: its `store` case, else TEST_DATABASE."""
    return getattr(request, "param", TEST_DATABASE)


@pytest.fixture
def database_url(backend: str, request: pytest.FixtureRequest) -> str:
    """A fresh Postgres schema's URL when this test runs on Postgres, else ""."""
    if backend != "postgres":
        return ""
    return fresh_database_url(request.getfixturevalue("postgres_server"))


class PostgresConnection:
    """Just enough of `sqlite3.Connection` for a test that reads or changes the app's rows
    directly: `?` placeholders, `execute(...).fetchall()`, `with conn:`, `close()`."""

    def __init__(self, url: str):
        import psycopg

        self._conn = psycopg.connect(url, autocommit=True)

    def execute(self, sql: str, args: Sequence = ()):
        """Run `sql` (with sqlite3's `?` placeholders); the cursor has the results."""
        return self._conn.execute(sql.replace("?", "%s"), args)

    def close(self) -> None:
        """Close the connection."""
        self._conn.close()

    def __enter__(self) -> PostgresConnection:
        return self

    def __exit__(self, *exc) -> None:
        pass  # autocommit: each statement is committed, as after sqlite3's `with conn:`

    def __del__(self) -> None:
        # sqlite3 connections are closed when dropped; tests rely on that (`with connect(...)`
        # does not close), so this one is too, rather than warning.
        self._conn.close()


def connect_db(settings: Settings):
    """A connection to the app's database, another process's view of it: the SQLite file,
    or (with `database_url`) the test's Postgres schema, behind the same small API."""
    if settings.database_url:
        return PostgresConnection(settings.database_url)
    import sqlite3

    return sqlite3.connect(settings.db_path)


def manage_args(settings: Settings) -> list[str]:
    """manage.py's options naming the test's database: its SQLite file or Postgres schema."""
    if settings.database_url:
        return ["--database-url", settings.database_url]
    return ["--db", str(settings.db_path)]


@pytest.fixture(scope="session", autouse=True)
def postgres_for_live_apps(request: pytest.FixtureRequest) -> None:
    """With TEST_DATABASE=postgres, start the server once and name it in the environment, so
    tests/live.py can give each app it starts a fresh schema on it."""
    if TEST_DATABASE == "postgres":
        os.environ["TEST_POSTGRES_URL"] = request.getfixturevalue("postgres_server")


@pytest.fixture
async def manager(store, settings):
    """Factory: `manager(model, **settings_overrides)` -> RunManager; shut down at teardown."""
    made: list[RunManager] = []

    def make(scripted: ScriptedModel | None, /, **overrides) -> RunManager:
        s = Settings(**{**settings.__dict__, **overrides})
        m = RunManager(store, build_agent(), s, model=scripted.model if scripted else None)
        made.append(m)
        return m

    yield make
    for m in made:
        await m.shutdown(timeout=5)
    # Background work a run leaves behind (such as naming the conversation) ends with the test.
    others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    if others:
        await asyncio.wait(others, timeout=5)


@pytest.fixture
def scripted() -> Callable[..., ScriptedModel]:
    """Factory: `scripted(chunks, delay=..., error=..., pause_after=...)` -> ScriptedModel."""

    def make(chunks=("Hello!",), **kw) -> ScriptedModel:
        return ScriptedModel(chunks=chunks, **kw)

    return make


@pytest.fixture
def model(scripted) -> ScriptedModel:
    """The default model of the `client` fixture: a short markdown reply in a few chunks."""
    return scripted(["Hello ", "**there**", ".\n\n", "- one\n", "- two\n"])


@pytest.fixture
def make_client(settings) -> Iterator[Callable[..., TestClient]]:
    """Factory: `make_client(model, **settings_overrides)` -> a started TestClient.

    The client is entered as a context manager, so the app's lifespan (store, run manager) runs;
    it is closed at teardown.
    """
    import main

    clients: list[TestClient] = []

    def make(model: ScriptedModel | FunctionModel | None = None, **overrides) -> TestClient:
        s = Settings(**{**settings.__dict__, **overrides})
        fm = model.model if isinstance(model, ScriptedModel) else model
        client = TestClient(main.create_app(s, model=fm))
        client.__enter__()
        clients.append(client)
        return client

    yield make
    for client in reversed(clients):
        client.__exit__(None, None, None)


@pytest.fixture
def client(make_client, model) -> TestClient:
    """A browser on an app whose replies come from the `model` fixture."""
    return make_client(model)


@pytest.fixture
def other_browser(client) -> TestClient:
    """A second browser on the same running app: no cookies, so a different anonymous user."""
    # Not entered as a context manager, which would run the lifespan a second time; it shares
    # the first client's event loop instead, where the app's runs live.
    other = TestClient(client.app)
    other.portal = client.portal
    return other
