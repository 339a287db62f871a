"""Migrations: named steps, each applied once and recorded, on an in-memory database."""

from __future__ import annotations

import pytest
from sqlite_utils import Database

from chat import migrations
from chat.migrations import MIGRATIONS, m001_conversations_and_turns, migrate


@pytest.fixture
def db() -> Database:
    return Database(memory=True)


def test_first_step_creates_conversations_and_turns(db):
    # m001 is shipped and never edited, so its schema is fixed.
    m001_conversations_and_turns(db)
    assert db["conversations"].columns_dict == {
        "id": str,
        "owner": str,
        "title": str,
        "model": str,
        "persona": str,
        "head_turn_id": int,
        "created_at": str,
        "updated_at": str,
    }
    assert db["turns"].columns_dict == {
        "id": int,
        "conversation_id": str,
        "parent_id": int,
        "user_text": str,
        "reply_text": str,
        "messages": str,
        "status": str,
        "error": str,
        "model": str,
        "usage": str,
        "created_at": str,
        "finished_at": str,
    }
    assert db["conversations"].pks == ["id"]
    assert db["turns"].pks == ["id"]
    [fk] = db["turns"].foreign_keys
    assert (fk.column, fk.other_table, fk.other_column) == (
        "conversation_id",
        "conversations",
        "id",
    )
    indexed = {tuple(i.columns) for i in db["turns"].indexes}
    assert ("conversation_id", "id") in indexed
    assert ("parent_id",) in indexed


def test_migrate_applies_every_step_in_order_and_records_it(db):
    applied = migrate(db)
    names = [fn.__name__ for fn in MIGRATIONS]
    assert applied == names
    assert names[0] == "m001_conversations_and_turns"
    assert names == sorted(names), "steps are numbered in the order they apply"
    recorded = [row["name"] for row in db["_migrations"].rows]
    assert recorded == names
    assert all(row["applied_at"] for row in db["_migrations"].rows)


def test_migrated_schema_keeps_every_column_of_the_first_step(db):
    migrate(db)
    for column in ("id", "owner", "title", "model", "head_turn_id", "created_at", "updated_at"):
        assert column in db["conversations"].columns_dict
    for column in ("conversation_id", "parent_id", "user_text", "reply_text", "messages", "status"):
        assert column in db["turns"].columns_dict


def test_turn_defaults(db):
    migrate(db)
    db["conversations"].insert({"id": "c", "owner": "o", "created_at": "t", "updated_at": "t"})
    db["turns"].insert(
        {"conversation_id": "c", "user_text": "hi", "messages": "[]", "created_at": "t"}
    )
    row = next(db["turns"].rows)
    assert row["status"] == "streaming"
    assert row["reply_text"] == ""


def test_migrate_is_idempotent(db):
    migrate(db)
    before = {t: db[t].columns_dict for t in ("conversations", "turns")}
    assert migrate(db) == []
    assert migrate(db) == []
    assert {t: db[t].columns_dict for t in ("conversations", "turns")} == before
    assert db["_migrations"].count == len(MIGRATIONS)


def test_migrate_keeps_existing_rows(db):
    migrate(db)
    db["conversations"].insert({"id": "c", "owner": "o", "created_at": "t", "updated_at": "t"})
    migrate(db)
    assert [r["id"] for r in db["conversations"].rows] == ["c"]


def test_a_new_step_is_applied_once(db, monkeypatch):
    migrate(db)

    def m999_add_notes(d: Database) -> None:
        d["conversations"].add_column("notes", str)

    monkeypatch.setattr(migrations, "MIGRATIONS", [*MIGRATIONS, m999_add_notes])
    assert migrate(db) == ["m999_add_notes"]
    assert migrate(db) == []
    assert db["conversations"].columns_dict["notes"] is str


def test_a_failing_step_leaves_nothing_behind(db, monkeypatch):
    migrate(db)

    def m999_broken(d: Database) -> None:
        d["extra"].create({"id": int}, pk="id")
        raise RuntimeError("step failed half-way")

    monkeypatch.setattr(migrations, "MIGRATIONS", [*MIGRATIONS, m999_broken])
    with pytest.raises(RuntimeError):
        migrate(db)
    assert "extra" not in db.table_names()
    assert "m999_broken" not in {r["name"] for r in db["_migrations"].rows}


def test_m006_adds_nullable_feedback_and_comparison_columns_to_existing_turns(db, monkeypatch):
    # A database made before m006: its rows get no feedback and no comparison.
    before = [fn for fn in MIGRATIONS if fn.__name__ < "m006"]
    monkeypatch.setattr(migrations, "MIGRATIONS", before)
    migrate(db)
    db["conversations"].insert({"id": "c", "owner": "o", "created_at": "t", "updated_at": "t"})
    db["turns"].insert(
        {"conversation_id": "c", "user_text": "hi", "messages": "[]", "created_at": "t"}
    )
    monkeypatch.setattr(migrations, "MIGRATIONS", [*before, migrations.m006_reply_feedback])
    assert migrate(db) == ["m006_reply_feedback"]
    columns = db["turns"].columns_dict
    assert columns["feedback"] is str and columns["compare_group"] is int
    row = next(db["turns"].rows)
    assert row["feedback"] is None and row["compare_group"] is None
    assert ("compare_group",) in {tuple(i.columns) for i in db["turns"].indexes}
