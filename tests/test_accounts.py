"""Accounts (AUTH=password) through the routes: sign up, sign in, wrong passwords, sign out,
next= redirects, throttling, sessions that really end, usernames in any case, password size,
and hashing that never blocks the event loop."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from chat import accounts
from tests.conftest import manage_args

ROOT = Path(__file__).resolve().parent.parent
PASSWORD = "correct horse battery"


@pytest.fixture
def site(make_client, scripted) -> TestClient:
    """A browser on an app with accounts, allowing 3 failed sign-ins per name."""
    return make_client(scripted(["Hi."]), auth="password", login_attempts=3)


def browser(site: TestClient, address: str = "testclient") -> TestClient:
    """Another browser (no cookies) on the same running app, from `address`."""
    other = TestClient(site.app, client=(address, 50000), follow_redirects=False)
    other.portal = site.portal
    return other


def signup(client: TestClient, username: str, password: str = PASSWORD):
    return client.post("/signup", data={"username": username, "password": password})


def login(client: TestClient, username: str, password: str = PASSWORD, next: str = "/"):
    return client.post("/login", data={"username": username, "password": password, "next": next})


def signed_in(client: TestClient) -> bool:
    """True if the browser reaches the chat page rather than the sign-in form."""
    page = client.get("/")
    return page.status_code == 200 and 'name="msg"' in page.text


def test_sign_up_sign_in_sign_out(site):
    b = browser(site)
    first = b.get("/c/abc")
    assert first.status_code == 303 and first.headers["location"] == "/login?next=/c/abc"
    made = signup(b, "alice")
    assert made.status_code == 303 and made.headers["location"] == "/"
    assert signed_in(b)
    out = b.post("/logout")
    assert out.status_code == 303 and out.headers["location"] == "/login"
    assert not signed_in(b)
    back = login(b, "alice", next="/c/abc")
    assert back.status_code == 303 and back.headers["location"] == "/c/abc"
    assert signed_in(b)


def test_wrong_password_and_unknown_user_look_the_same(site):
    signup(browser(site), "alice")
    wrong = login(browser(site), "alice", "not the password")
    unknown = login(browser(site), "nobody", "not the password")
    assert wrong.status_code == unknown.status_code == 401
    assert "Wrong username or password." in wrong.text
    assert wrong.text.replace("alice", "X") == unknown.text.replace("nobody", "X")
    assert "chat_session" not in wrong.cookies


@pytest.mark.parametrize(
    "target",
    [
        "//evil.example/",
        "https://evil.example/",
        "http:evil.example",
        "/\\evil.example",
        "\\\\evil.example",
        "/\t/evil.example",
        "/\n/evil.example",
        "javascript:alert(1)",
        " //evil.example",
        "evil.example",
        "",
    ],
)
def test_next_never_leaves_the_site(site, target):
    signup(browser(site), "alice")
    location = login(browser(site), "alice", next=target).headers["location"]
    # What a browser would do with it: drop tabs and newlines, treat "\\" as "/".
    seen = location.replace("\t", "").replace("\n", "").replace("\r", "").replace("\\", "/")
    assert seen.startswith("/") and not seen.startswith("//"), location
    page = browser(site).get("/login", params={"next": target})
    assert "evil.example" not in page.text


def test_next_keeps_a_path_on_this_site(site):
    signup(browser(site), "alice")
    answer = login(browser(site), "alice", next="/c/abc?at=3")
    assert answer.headers["location"] == "/c/abc?at=3"


def test_failed_sign_ins_are_throttled_per_name_without_revealing_it(site):
    signup(browser(site), "alice")
    for _ in range(3):
        assert login(browser(site), "alice", "wrong password").status_code == 401
        assert login(browser(site), "nobody", "wrong password").status_code == 401
    # Even the right password waits now; an unknown name gets the very same answer.
    for name, password in [("alice", PASSWORD), ("ALICE", PASSWORD), ("nobody", "x" * 12)]:
        refused = login(browser(site), name, password)
        assert refused.status_code == 429
        assert "Too many attempts. Try again in 15 minutes." in refused.text
        assert 0 < int(refused.headers["retry-after"]) <= 15 * 60
        assert "chat_session" not in refused.cookies
    # Someone else signs in as usual, from the same address too.
    signup(browser(site), "bob")
    assert login(b := browser(site), "bob").status_code == 303 and signed_in(b)


def test_failed_sign_ins_are_throttled_per_address(site):
    signup(browser(site), "carol")
    # 5 times the per-name limit, spread over names so that no one name is throttled.
    for i in range(15):
        assert login(browser(site, "10.0.0.1"), f"guess{i}", "wrong password").status_code == 401
    refused = login(browser(site, "10.0.0.1"), "carol")
    assert refused.status_code == 429 and "Too many attempts" in refused.text
    assert login(browser(site, "10.0.0.2"), "carol").status_code == 303


def test_a_successful_sign_in_resets_the_name_count(site):
    signup(browser(site), "alice")
    for _ in range(2):
        login(browser(site), "alice", "wrong password")
    assert login(browser(site), "alice").status_code == 303
    for _ in range(2):
        login(browser(site), "alice", "wrong password")
    assert login(browser(site), "alice").status_code == 303


def test_signing_out_ends_a_copied_cookie(site):
    b = browser(site)
    signup(b, "alice")
    copy = browser(site)
    copy.cookies.update(b.cookies)
    assert signed_in(copy)
    b.post("/logout")
    assert not signed_in(copy)
    # Signing in again works, with a new session.
    assert login(b, "alice").status_code == 303 and signed_in(b)
    assert not signed_in(copy)


def test_a_new_password_ends_every_session(site, settings):
    b = browser(site)
    signup(b, "alice")
    done = subprocess.run(
        [sys.executable, "manage.py", *manage_args(settings), "passwd", "Alice"],
        cwd=ROOT,
        input="a brand new password\n",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert not signed_in(b)
    assert login(browser(site), "alice").status_code == 401
    assert login(b, "alice", "a brand new password").status_code == 303 and signed_in(b)


def test_a_deleted_account_is_signed_out(site, settings):
    b = browser(site)
    signup(b, "alice")
    done = subprocess.run(
        [sys.executable, "manage.py", *manage_args(settings), "deluser", "alice"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert not signed_in(b)


def test_usernames_ignore_case(site):
    b = browser(site)
    assert signup(b, "Alice").status_code == 303
    b.post("/send", data={"msg": "my note"})
    for name in ("alice", "ALICE", "aLiCe"):
        taken = signup(browser(site), name)
        assert taken.status_code == 422 and "That username is taken." in taken.text
    other = browser(site)
    assert login(other, "ALICE").status_code == 303
    assert "my <mark>note</mark>" in other.get("/search", params={"q": "note"}).text


@pytest.mark.parametrize("size", [1025, 100_000, 1_000_000])
def test_overlong_passwords_are_refused_before_hashing(site, monkeypatch, size):
    hashed: list[int] = []
    real = accounts._hasher

    class Counting:
        def hash(self, password):
            hashed.append(len(password))
            return real.hash(password)

        def verify(self, h, password):
            hashed.append(len(password))
            return real.verify(h, password)

        def check_needs_rehash(self, h):
            return real.check_needs_rehash(h)

    monkeypatch.setattr(accounts, "_hasher", Counting())
    big = "p" * size
    made = signup(browser(site), "alice", big)
    assert made.status_code == 422 and "Passwords are at most 1024 characters." in made.text
    tried = login(browser(site), "alice", big)
    assert tried.status_code == 400 and "Passwords are at most 1024 characters." in tried.text
    assert hashed == []


def test_password_hashing_runs_off_the_event_loop(site, monkeypatch):
    on_loop: list[bool] = []
    real = accounts._hasher

    def running_loop() -> bool:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return False
        return True

    class Watching:
        def hash(self, password):
            on_loop.append(running_loop())
            return real.hash(password)

        def verify(self, h, password):
            on_loop.append(running_loop())
            return real.verify(h, password)

        def check_needs_rehash(self, h):
            return real.check_needs_rehash(h)

    monkeypatch.setattr(accounts, "_hasher", Watching())
    signup(browser(site), "alice")
    login(browser(site), "alice")
    login(browser(site), "alice", "wrong password")
    login(browser(site), "nobody", "wrong password")
    assert on_loop == [False, False, False, False]


def test_m005_renames_accounts_that_differ_only_in_case(caplog):
    from sqlite_utils import Database

    from chat import migrations

    db = Database(memory=True)
    for step in migrations.MIGRATIONS[:4]:
        step(db)
    for i, name in enumerate(["alice", "Alice", "ALICE", "bob", "alice-2x"]):
        db["users"].insert(
            {
                "id": f"u{i}",
                "username": name,
                "password_hash": "h",
                "created_at": f"2025-01-0{i + 1}",
            }
        )
    with caplog.at_level("WARNING", logger="chat"):
        migrations.m005_account_hardening(db)
    names = {row["id"]: row["username"] for row in db["users"].rows}
    # The oldest keeps its name; the others get free, valid, distinct names; others untouched.
    assert names == {"u0": "alice", "u1": "Alice-2", "u2": "ALICE-3", "u3": "bob", "u4": "alice-2x"}
    assert all(accounts.USERNAME.match(n) for n in names.values())
    assert "'Alice'" in caplog.text and "'Alice-2'" in caplog.text and "'ALICE-3'" in caplog.text
    versions = {row["id"]: row["session_version"] for row in db["users"].rows}
    assert versions == {"u0": 0, "u1": 1, "u2": 1, "u3": 0, "u4": 0}
    with pytest.raises(Exception, match="UNIQUE"):
        db["users"].insert({"id": "u9", "username": "BOB", "password_hash": "h", "created_at": "x"})
