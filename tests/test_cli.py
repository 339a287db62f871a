"""The command lines: `python main.py --help` and manage.py's list, export, delete and backup."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from pydantic_ai.messages import (
    ModelMessagesTypeAdapter,
    ModelRequest,
    ModelResponse,
    TextPart,
    UserPromptPart,
)

from chat.store import ChatStore

ROOT = Path(__file__).resolve().parent.parent


def run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, capture_output=True, text=True, input=stdin, timeout=60
    )


def test_main_help_lists_the_options():
    done = run("main.py", "--help")
    assert done.returncode == 0
    for option in ("--host", "--port", "--db", "--model", "MODEL"):
        assert option in done.stdout


def seeded(tmp_path: Path) -> tuple[Path, str]:
    db = tmp_path / "chat.db"
    store = ChatStore(db)
    conv = store.create_conversation("someone")
    store.set_title(conv["id"], "Planning notes")
    turn = store.add_turn(
        conv["id"], "What next?", [ModelRequest(parts=[UserPromptPart("What next?")])], model="demo"
    )
    messages = [
        ModelRequest(parts=[UserPromptPart("What next?")]),
        ModelResponse(parts=[TextPart("Ship it.")]),
    ]
    store.finish_turn(turn["id"], status="complete", reply_text="Ship it.", messages=messages)
    store.close()
    return db, conv["id"]


def test_manage_list_export_delete(tmp_path):
    db, cid = seeded(tmp_path)
    listed = run("manage.py", "--db", str(db), "list")
    assert listed.returncode == 0 and cid in listed.stdout and "Planning notes" in listed.stdout
    md = run("manage.py", "--db", str(db), "export", cid)
    assert "# Planning notes" in md.stdout and "What next?" in md.stdout and "Ship it." in md.stdout
    js = run("manage.py", "--db", str(db), "export", cid, "--format", "json")
    ModelMessagesTypeAdapter.validate_json(js.stdout)
    assert json.loads(js.stdout)[0]["parts"][0]["content"] == "What next?"
    assert run("manage.py", "--db", str(db), "delete", cid).returncode == 0
    assert cid not in run("manage.py", "--db", str(db), "list").stdout
    assert run("manage.py", "--db", str(db), "delete", cid).returncode == 1


def test_manage_backup_makes_a_restorable_copy(tmp_path):
    db, cid = seeded(tmp_path)
    copy = tmp_path / "backup.db"
    assert run("manage.py", "--db", str(db), "backup", str(copy)).returncode == 0
    assert run("manage.py", "--db", str(copy), "check").stdout.strip() == "ok"
    restored = ChatStore(copy)
    assert restored.conversation(cid, "someone")["title"] == "Planning notes"
    restored.close()
    # An existing file is never overwritten.
    assert run("manage.py", "--db", str(db), "backup", str(copy)).returncode == 1


def test_manage_adduser(tmp_path):
    db, _ = seeded(tmp_path)
    ok = run("manage.py", "--db", str(db), "adduser", "alice", stdin="a long enough password\n")
    assert ok.returncode == 0
    again = run("manage.py", "--db", str(db), "adduser", "alice", stdin="a long enough password\n")
    assert again.returncode == 1 and "taken" in again.stderr
    short = run("manage.py", "--db", str(db), "adduser", "bob", stdin="short\n")
    assert short.returncode == 1


def test_manage_passwd_and_deluser(tmp_path):
    db, cid = seeded(tmp_path)
    assert (
        run("manage.py", "--db", str(db), "adduser", "Alice", stdin="first password!\n").returncode
        == 0
    )
    store = ChatStore(db)
    user = store.user_by_name("alice")
    mine = store.create_conversation("user:" + user["id"])
    store.close()
    short = run("manage.py", "--db", str(db), "passwd", "alice", stdin="short\n")
    assert short.returncode == 1 and "at least 10" in short.stderr
    huge = run("manage.py", "--db", str(db), "passwd", "alice", stdin="x" * 2000 + "\n")
    assert huge.returncode == 1 and "at most 1024" in huge.stderr
    done = run("manage.py", "--db", str(db), "passwd", "ALICE", stdin="second password!\n")
    assert done.returncode == 0 and "sessions are ended" in done.stdout
    store = ChatStore(db)
    assert store.user_by_name("alice")["session_version"] == 1
    store.close()
    assert run("manage.py", "--db", str(db), "passwd", "nobody", stdin="x" * 12).returncode == 1
    gone = run("manage.py", "--db", str(db), "deluser", "alice")
    assert gone.returncode == 0 and "1 conversation" in gone.stdout
    store = ChatStore(db)
    assert store.user_by_name("alice") is None
    ids = [c["id"] for c in store.all_conversations()]
    assert mine["id"] not in ids and cid in ids  # only the account's own conversations go
    store.close()
    assert run("manage.py", "--db", str(db), "deluser", "alice").returncode == 1
