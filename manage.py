"""Management commands: list, export and delete conversations, and back up the database.

    python manage.py list [--owner ID]
    python manage.py export CONVERSATION_ID [--format md|json] [--out FILE]
    python manage.py delete CONVERSATION_ID
    python manage.py backup FILE        # consistent copy of the live database (VACUUM INTO)
    python manage.py check              # the database's integrity (consistency on Postgres)
    python manage.py adduser NAME       # create an account (AUTH=password); reads the password
    python manage.py passwd NAME        # set a new password; ends the account's sessions
    python manage.py deluser NAME       # delete an account and all its conversations

The database is DB_PATH (default data/chat.db) or --db. Safe to run while the app serves:
SQLite's WAL mode lets these read (and the backup copy) alongside the server.

With DATABASE_URL set (or --database-url), the commands work on that Postgres database
instead, beside any number of running replicas; `backup` then says how to run pg_dump
(the app does not copy a Postgres database itself) and exits with status 2.
"""

from __future__ import annotations

import argparse
import getpass
import sqlite3
import sys
from pathlib import Path

from chat import accounts
from chat.accounts import ACCOUNT_PREFIX
from chat.config import Settings, database_url_from_env, db_path_from_env
from chat.storage import Store
from chat.stores import BackupElsewhere, open_store
from chat.transcript import to_json, to_markdown


def main(argv: list[str] | None = None) -> int:
    """Run one management command; returns the process exit code."""
    parser = argparse.ArgumentParser(prog="manage.py", description=__doc__.split("\n")[0])
    parser.add_argument("--db", help="SQLite file (default: DB_PATH or data/chat.db)")
    parser.add_argument(
        "--database-url", help="PostgreSQL URL to use instead of a SQLite file (DATABASE_URL)"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p_list = sub.add_parser("list", help="list conversations, newest first")
    p_list.add_argument("--owner", help="only this identity's conversations")
    p_export = sub.add_parser("export", help="print or save one conversation")
    p_export.add_argument("cid")
    p_export.add_argument("--format", choices=["md", "json"], default="md")
    p_export.add_argument("--out", help="file to write (default: standard output)")
    p_delete = sub.add_parser("delete", help="delete a conversation for good")
    p_delete.add_argument("cid")
    p_backup = sub.add_parser("backup", help="write a consistent copy of the database")
    p_backup.add_argument("file")
    sub.add_parser("check", help="check the database (SQLite's integrity check, or consistency)")
    p_user = sub.add_parser("adduser", help="create an account for AUTH=password")
    p_user.add_argument("username")
    p_passwd = sub.add_parser("passwd", help="set an account's password and sign it out")
    p_passwd.add_argument("username")
    p_deluser = sub.add_parser("deluser", help="delete an account and its conversations")
    p_deluser.add_argument("username")
    args = parser.parse_args(argv)

    try:
        # An explicit --db names a SQLite file; otherwise DATABASE_URL, when set, wins.
        url = args.database_url or ("" if args.db else database_url_from_env())
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return 2
    db_path = Path(args.db) if args.db else db_path_from_env()
    if not url and not db_path.exists() and args.command != "adduser":
        print(f"No database at {db_path}.", file=sys.stderr)
        return 2
    try:
        store = open_store(Settings(db_path=db_path, database_url=url))
    except sqlite3.OperationalError as exc:  # Postgres unreachable (chat.pgstore.Unavailable)
        print(f"Cannot open the database: {exc}", file=sys.stderr)
        return 2
    try:
        return _run(store, args)
    finally:
        store.close()


def _run(store: Store, args: argparse.Namespace) -> int:
    if args.command == "list":
        for c in store.all_conversations(args.owner):
            state = " (deleted)" if c.get("deleted_at") else ""
            print(f"{c['id']}\t{c['updated_at'][:19]}\t{c['owner'][:8]}…\t{c['title']}{state}")
        return 0
    if args.command == "export":
        conv = next((c for c in store.all_conversations() if c["id"] == args.cid), None)
        if conv is None:
            print(f"No conversation {args.cid}.", file=sys.stderr)
            return 1
        turns = store.branch(conv["head_turn_id"])
        # The JSON carries the attachments' bytes, as the page's export does.
        files = lambda ids: store.attachment_data(conv["owner"], ids)  # noqa: E731
        data = (
            to_json(turns, files)
            if args.format == "json"
            else to_markdown(conv["title"], turns).encode()
        )
        if args.out:
            Path(args.out).write_bytes(data)
        else:
            sys.stdout.buffer.write(data)
        return 0
    if args.command == "delete":
        if not store.erase(args.cid):
            print(f"No conversation {args.cid}.", file=sys.stderr)
            return 1
        print(f"Deleted {args.cid}.")
        return 0
    if args.command == "backup":
        try:
            target = store.backup(args.file)
        except FileExistsError as exc:
            print(exc, file=sys.stderr)
            return 1
        except BackupElsewhere as exc:  # Postgres: pg_dump makes the copy
            print(exc, file=sys.stderr)
            return 2
        print(f"Backed up to {target}.")
        return 0
    if args.command == "adduser":
        password = _read_password()
        if problem := accounts.signup_problem(args.username, password):
            print(problem, file=sys.stderr)
            return 1
        if accounts.create(store, args.username, password) is None:
            print(f"The username {args.username} is taken.", file=sys.stderr)
            return 1
        print(f"Created {args.username}.")
        return 0
    if args.command in ("passwd", "deluser"):
        user = store.user_by_name(args.username)
        if user is None:
            print(f"No account {args.username}.", file=sys.stderr)
            return 1
        if args.command == "passwd":
            password = _read_password()
            if problem := accounts.password_problem(password):
                print(problem, file=sys.stderr)
                return 1
            accounts.set_password(store, user, password)
            print(f"Set a new password for {user['username']}; their sessions are ended.")
            return 0
        owned = store.all_conversations(ACCOUNT_PREFIX + user["id"])
        for conv in owned:
            store.erase(conv["id"])
        store.delete_user(user["id"])
        print(f"Deleted {user['username']} and {len(owned)} conversation(s).")
        return 0
    result = store.integrity()
    print(result)
    return 0 if result == "ok" else 1


def _read_password() -> str:
    """The password from the terminal (not echoed), or the first line of piped input."""
    if sys.stdin.isatty():
        return getpass.getpass("Password: ")
    return sys.stdin.readline().rstrip("\n")


if __name__ == "__main__":
    sys.exit(main())
