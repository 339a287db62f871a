"""The edges of HTTP: Host names (DNS rebinding), HSTS, the 500 page, ids too large for SQLite,
NUL characters, owner-only database files, the session key file, and slow clients."""

from __future__ import annotations

import inspect
import os
import re
import socket
import stat
import time
from pathlib import Path

import pytest
from starlette.testclient import TestClient

import main
from chat.config import SecretKeyError, Settings, load_or_create_secret
from chat.security import SECURITY_HEADERS
from chat.store import ChatStore
from tests.live import running_app
from web import api, auth, chat, pages, stream

HX = {"HX-Request": "true"}


def started(settings: Settings, **client_kw) -> TestClient:
    client = TestClient(main.create_app(settings), **client_kw)
    client.__enter__()
    return client


def assert_security_headers(response) -> None:
    for name, value in SECURITY_HEADERS.items():
        assert response.headers.get(name) == value, name


# Host names ---------------------------------------------------------------------------------


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1"])
def test_on_loopback_only_local_names_are_answered(tmp_path, host):
    settings = Settings.from_env({"HOST": host}, db_path=tmp_path / "chat.db", secret_key="k")
    client = started(settings, base_url="http://localhost:5001")
    try:
        for name in ("localhost:5001", "127.0.0.1:5001", "[::1]:5001", "LOCALHOST"):
            assert client.get("/health", headers={"host": name}).status_code == 200, name
        # A name rebound to 127.0.0.1 by another site, a missing Host, a look-alike.
        for name in ("evil.example", "evil.example:5001", "", "localhost.evil.example"):
            refused = client.get("/", headers={"host": name})
            assert refused.status_code == 400, name
            assert refused.text == "Unknown host name for this site."
            assert refused.headers["content-type"].startswith("text/plain")
            assert_security_headers(refused)
        # Writes too, before anything is stored.
        assert (
            client.post("/send", data={"msg": "hi"}, headers={"host": "evil.example"}).status_code
            == 400
        )
        assert client.app.state.store.all_conversations() == []
    finally:
        client.__exit__(None, None, None)


def test_serving_on_all_addresses_answers_any_host_unless_restricted(tmp_path):
    anyhost = Settings.from_env({"HOST": "0.0.0.0"}, db_path=tmp_path / "a.db", secret_key="k")
    assert anyhost.allowed_hosts == ("*",)
    client = started(anyhost)
    try:
        assert client.get("/health", headers={"host": "chat.example.com"}).status_code == 200
    finally:
        client.__exit__(None, None, None)
    env = {"HOST": "0.0.0.0", "ALLOWED_HOSTS": "chat.example.com, .example.org"}
    strict = Settings.from_env(env, db_path=tmp_path / "b.db", secret_key="k")
    client = started(strict)
    try:
        for name in ("chat.example.com", "chat.example.com:443", "www.example.org"):
            assert client.get("/health", headers={"host": name}).status_code == 200, name
        for name in ("testserver", "example.com", "evil.example.org.attacker.net"):
            assert client.get("/health", headers={"host": name}).status_code == 400, name
    finally:
        client.__exit__(None, None, None)


# HSTS and the 500 page -----------------------------------------------------------------------


def test_hsts_only_with_https(make_client):
    plain = make_client()
    assert "strict-transport-security" not in plain.get("/").headers
    secure = make_client(https_only=True)
    for response in (secure.get("/"), secure.get("/nowhere"), secure.get("/static/app.css")):
        assert response.headers["strict-transport-security"] == "max-age=31536000"


@pytest.mark.parametrize("https", [False, True])
def test_a_crash_answers_a_plain_page_with_the_security_headers(settings, https):
    app = main.create_app(Settings(**{**settings.__dict__, "https_only": https}))

    @app.route("/boom")
    def boom():
        raise RuntimeError("secret detail from the database layer")

    with TestClient(app, raise_server_exceptions=False) as client:
        for headers in ({}, HX):
            answer = client.get("/boom", headers=headers)
            assert answer.status_code == 500
            assert answer.headers["content-type"].startswith("text/html")
            assert_security_headers(answer)
            assert ("strict-transport-security" in answer.headers) is https
            assert "Something went wrong" in answer.text
            for leak in ("secret detail", "Traceback", "RuntimeError", "Internal Server Error"):
                assert leak not in answer.text


# Ids too large for SQLite, and NUL ----------------------------------------------------------


def _int_routes() -> list[tuple[object, list[str]]]:
    """Every route function in web/ with int parameters, and the names of those parameters."""
    found = []
    for module in (pages, chat, stream, api, auth):
        for fn in vars(module).values():
            if not callable(getattr(fn, "to", None)):
                continue
            params = inspect.signature(fn).parameters.values()
            ints = [p.name for p in params if "int" in str(p.annotation)]
            if ints:
                found.append((fn, ints))
    return found


def test_int_routes_are_found():
    names = {fn.__name__ for fn, _ in _int_routes()}
    assert {"conversation", "older", "stream", "stop", "edit", "show"} <= names


@pytest.mark.parametrize("number", ["99999999999999999999", "-99999999999999999999", "9" * 400])
def test_ids_too_large_for_sqlite_are_not_found(client, number):
    sent = client.post("/send", data={"msg": "hello"}, headers=HX)
    cid = re.search(r"/c/([\w-]+)/turns/", sent.text).group(1)
    quiet = TestClient(client.app, raise_server_exceptions=False)
    quiet.portal, quiet.cookies = client.portal, client.cookies
    for fn, ints in _int_routes():
        url = fn.to(cid=cid, **dict.fromkeys(ints, number))
        for method in ("get", "post"):
            answer = quiet.request(method, url, data={"msg": "x"}, headers=HX)
            assert answer.status_code in (400, 404, 405, 422), (method, url, answer.status_code)


@pytest.mark.parametrize(
    "url",
    ["/search?q=%00", "/search?q=a%00b", "/c/abc?at=%00", "/login?next=/%00", "/c/a%00b", "/%00"],
)
def test_nul_in_the_address_is_a_bad_request(client, url):
    quiet = TestClient(client.app, raise_server_exceptions=False)
    quiet.portal = client.portal
    answer = quiet.get(url)
    assert answer.status_code == 400
    assert "NUL" in answer.text
    assert_security_headers(answer)


# Files --------------------------------------------------------------------------------------


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_database_files_are_owner_only_whatever_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        store = ChatStore(tmp_path / "data" / "chat.db")
        store.create_conversation("someone")
        files = [tmp_path / "data" / name for name in ("chat.db", "chat.db-wal", "chat.db-shm")]
        assert all(f.exists() for f in files)
        assert [mode(f) for f in files] == [0o600, 0o600, 0o600]
        copy = store.backup(tmp_path / "backup.db")
        assert mode(copy) == 0o600
        store.close()
        assert mode(tmp_path / "data") == 0o700
        load_or_create_secret(tmp_path / "data" / "chat.db")
        assert mode(tmp_path / "data" / ".secret_key") == 0o600
    finally:
        os.umask(old)


@pytest.mark.parametrize("content", ["", "\n", "   \n"])
def test_an_empty_secret_key_file_is_an_error(tmp_path, content):
    (tmp_path / ".secret_key").write_text(content)
    with pytest.raises(SecretKeyError, match=r"\.secret_key is empty"):
        Settings.from_env({}, db_path=tmp_path / "chat.db")
    # SECRET_KEY in the environment is used instead, as before.
    assert Settings.from_env({"SECRET_KEY": "given"}, db_path=tmp_path / "chat.db").secret_key


# Slow clients -------------------------------------------------------------------------------


def read_response(sock: socket.socket) -> bytes:
    """One whole HTTP/1.1 response with a Content-Length body."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))
    while len(body) < length:
        body += sock.recv(65536)
    return data


def test_a_client_dribbling_its_headers_is_cut_off(tmp_path):
    with running_app(tmp_path, model=None, HEADER_TIMEOUT="1") as app:
        port = app.port
        # Sends a header byte every 0.3 s: never idle long, never finishing.
        slow = socket.create_connection(("127.0.0.1", port), timeout=10)
        silent = socket.create_connection(("127.0.0.1", port), timeout=10)
        start = time.monotonic()
        slow.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        closed_after = None
        while time.monotonic() - start < 8:
            try:
                slow.sendall(b"X")
            except OSError:
                closed_after = time.monotonic() - start
                break
            slow.settimeout(0.3)
            try:
                if slow.recv(1024) == b"":
                    closed_after = time.monotonic() - start
                    break
            except TimeoutError:
                pass
        assert closed_after is not None and closed_after < 4, closed_after
        # A connection that never sends anything is closed too.
        silent.settimeout(5)
        assert silent.recv(1024) == b""
        # A normal client, and a kept-alive connection's next request, are served.
        fine = socket.create_connection(("127.0.0.1", port), timeout=10)
        request = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
        for _ in range(2):
            fine.sendall(request)
            assert read_response(fine).startswith(b"HTTP/1.1 200")
            time.sleep(1.5)  # longer than the header deadline, shorter than keep-alive
        for s in (slow, silent, fine):
            s.close()
