"""The fence around the OpenAI fast paths (chat/openai_fast.py): an SDK without the private names
they use still starts the app and sends the same request, with one warning in the log.

A release that renamed a private name is simulated by hiding it from new imports (a copy of the
SDK module without it in `sys.modules`; the SDK's own modules keep what they imported), and the
app is built afresh: the request that reaches the fake OpenAI server is compared, as JSON, with
the one the fast paths send and the one the SDK sends on its own.
"""

from __future__ import annotations

import importlib
import json
import logging
import sys
import types
import uuid

import pytest
from pydantic_ai.models import override_allow_model_requests
from starlette.testclient import TestClient

from chat import openai_fast
from chat.config import Settings
from tests.fake_openai import FakeOpenAI
from tests.live import is_title_request, title_reply

MODEL = "openai-chat:fake-model"
REPLY = "Fenced and **fine**."
CHAT = {
    "trigger": "submit-message",
    "id": "chat-1",
    "messages": [{"id": "m1", "role": "user", "parts": [{"type": "text", "text": "Hello?"}]}],
}
FAST_MODULES = ("chat.openai_stream", "chat.openai_params")


@pytest.fixture(scope="module")
def upstream():
    with FakeOpenAI(side_reply=title_reply) as fake:
        yield fake


@pytest.fixture
def fake(upstream: FakeOpenAI, monkeypatch):
    upstream.reset()
    upstream.configure(REPLY)
    monkeypatch.setenv("OPENAI_BASE_URL", upstream.base_url)
    monkeypatch.setenv("OPENAI_API_KEY", "test")
    with override_allow_model_requests(True):  # to the loopback fake only
        yield upstream


@pytest.fixture
def fresh_process(monkeypatch):
    """The fence and the SDK as a newly started process finds them: nothing installed yet."""
    from openai._utils._transform import async_maybe_transform
    from openai.resources.chat.completions import completions as sdk_completions

    # The SDK's own transform, whatever an earlier test installed (restored afterwards).
    monkeypatch.setattr(sdk_completions, "async_maybe_transform", async_maybe_transform)
    monkeypatch.setattr(openai_fast, "_state", None)
    for name in FAST_MODULES:
        monkeypatch.delitem(sys.modules, name, raising=False)


def hide(monkeypatch, module: str, name: str) -> None:
    """Simulate an SDK release without `module.name`, for every import made from now on."""
    real = importlib.import_module(module)
    if not hasattr(real, name):  # this release already lacks it: the fallback is the default
        pytest.skip(f"{module}.{name} is not in this openai release")
    copy = types.ModuleType(module)
    copy.__dict__.update({k: v for k, v in vars(real).items() if k != name})
    monkeypatch.setitem(sys.modules, module, copy)


def sent(tmp_path, fake: FakeOpenAI, **overrides) -> dict:
    """Start a fresh app on the fake model, chat once through it; the JSON the model received."""
    import main

    db = tmp_path / f"{uuid.uuid4().hex}.db"
    settings = Settings.from_env(
        {"MODEL": MODEL}, db_path=db, secret_key="test", allowed_hosts=("testserver",), **overrides
    )
    with TestClient(main.create_app(settings)) as client:
        return _chat(client, fake)


def _chat(client: TestClient, fake: FakeOpenAI) -> dict:
    assert client.get("/").status_code == 200  # the app started
    r = client.post("/api/chat", json=CHAT)
    assert r.status_code == 200
    text = "".join(
        json.loads(line[6:])["delta"]
        for line in r.text.splitlines()
        if line.startswith("data: {") and '"text-delta"' in line
    )
    assert text == REPLY
    replies = [q for q in fake.requests if not is_title_request(q.body)]
    return replies[-1].body


def warnings_of(caplog) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno >= logging.WARNING and r.name.startswith("chat.openai")
    ]


@pytest.mark.parametrize(
    "module, name",
    [
        ("openai._streaming", "_SSELineDecoder"),  # the stream fast path's imports
        ("openai._httpx2", "request_exceptions"),
        ("openai._compat", "model_dump"),  # the request-parameter fast path's imports
    ],
)
def test_an_sdk_without_a_private_name_falls_back_with_one_warning(
    module, name, tmp_path, fake, fresh_process, monkeypatch, caplog
):
    caplog.set_level(logging.WARNING)
    fast_body = sent(tmp_path, fake)
    assert warnings_of(caplog) == []

    monkeypatch.setattr(openai_fast, "_state", None)
    for m in FAST_MODULES:
        monkeypatch.delitem(sys.modules, m, raising=False)
    hide(monkeypatch, module, name)
    fallback_body = sent(tmp_path, fake)
    fallback_again = sent(tmp_path, fake)  # a second app in the same process

    assert fallback_body == fast_body == fallback_again
    (warning,) = warnings_of(caplog)  # once per process, not per app or per request
    assert name in warning and "own path" in warning
    assert "FELL BACK" in openai_fast.describe() and name in openai_fast.describe()  # CI's line


def test_a_stream_the_sdk_builds_differently_is_read_by_the_sdk(
    tmp_path, fake, fresh_process, monkeypatch, caplog
):
    caplog.set_level(logging.WARNING)
    fast_body = sent(tmp_path, fake)
    stream = importlib.import_module("chat.openai_stream")

    def changed(cls, sdk_stream):
        raise TypeError("AsyncStream.__init__() got an unexpected keyword argument 'options'")

    monkeypatch.setattr(stream.BatchedChunkStream, "wrap", classmethod(changed))
    monkeypatch.setattr(stream, "_wrap_failed", False)
    assert "fast paths in use" in openai_fast.describe()
    assert sent(tmp_path, fake) == fast_body
    assert sent(tmp_path, fake) == fast_body
    (warning,) = warnings_of(caplog)
    assert "unexpected keyword argument 'options'" in warning


def test_openai_fast_paths_0_imports_nothing_private(tmp_path, fake, fresh_process, caplog):
    caplog.set_level(logging.WARNING)
    fast_body = sent(tmp_path, fake)
    for m in FAST_MODULES:
        sys.modules.pop(m, None)
    openai_fast._state = None

    assert sent(tmp_path, fake, openai_fast_paths=False) == fast_body
    assert not any(m in sys.modules for m in FAST_MODULES)
    assert openai_fast.status() is None
    assert warnings_of(caplog) == []


def test_the_setting_is_read_from_the_environment():
    assert Settings.from_env({}, secret_key="k").openai_fast_paths is True
    for off in ("0", "off", "false"):
        assert (
            Settings.from_env({"OPENAI_FAST_PATHS": off}, secret_key="k").openai_fast_paths is False
        )
