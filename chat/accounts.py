"""Accounts for AUTH=password: argon2 hashing, sign-up rules, sign-in checks and throttling."""

from __future__ import annotations

import asyncio
import math
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from chat.storage import Store

_hasher = PasswordHasher()
# An account's identity (conversation owner) is this prefix and the account id.
ACCOUNT_PREFIX = "user:"
USERNAME = re.compile(r"^[A-Za-z0-9_.-]{3,40}$")
MIN_PASSWORD = 10
# Hashing cost grows with the password; this bounds the work one request can ask for.
MAX_PASSWORD = 1024
# Failed sign-ins are counted over this window, per username and per client address.
WINDOW = timedelta(minutes=15)
# A client address may fail this many times the per-username limit (one office, many people).
ADDRESS_FACTOR = 5
# Verified against when the username does not exist, so both cases take the same time.
_DUMMY = _hasher.hash("not a real password, only for timing")


@dataclass
class SignInRefused(Exception):
    """Why a sign-in was refused, with the HTTP status to answer and when to retry."""

    message: str
    status: int = 401
    retry_after: int | None = None


def password_problem(password: str) -> str | None:
    """Why this password is not acceptable as a new one, or None."""
    if len(password) < MIN_PASSWORD:
        return f"Use a password of at least {MIN_PASSWORD} characters."
    if len(password) > MAX_PASSWORD:
        return f"Passwords are at most {MAX_PASSWORD} characters."
    return None


def signup_problem(username: str, password: str) -> str | None:
    """Why these sign-up details are not acceptable, or None."""
    if not USERNAME.match(username):
        return "Usernames are 3 to 40 letters, digits, dots, dashes or underscores."
    return password_problem(password)


def hash_password(password: str) -> str:
    """The argon2 hash to store (slow on purpose: call it off the event loop)."""
    return _hasher.hash(password)


def create(store: Store, username: str, password: str) -> dict | None:
    """Create an account (None if the username is taken); the password is stored hashed."""
    return store.create_user(username, hash_password(password))


def set_password(store: Store, user: dict, password: str) -> None:
    """Give an account a new password and end every session it has."""
    store.set_password_hash(user["id"], hash_password(password), end_sessions=True)


def authenticate(store: Store, username: str, password: str) -> dict | None:
    """The account if the password is right, else None. Upgrades outdated hashes. Blocking."""
    user = store.user_by_name(username)
    try:
        _hasher.verify(user["password_hash"] if user else _DUMMY, password)
    except (VerificationError, InvalidHashError):
        return None
    if user is None:
        return None
    if _hasher.check_needs_rehash(user["password_hash"]):
        store.set_password_hash(user["id"], _hasher.hash(password))
    return user


def _keys(username: str, address: str) -> tuple[str, str]:
    # Keyed on the name as typed (folded), whether or not it exists: refusals reveal nothing.
    return "name:" + username[:40].lower(), "addr:" + address


def _stamp(moment: datetime) -> str:
    return moment.isoformat(timespec="milliseconds")  # the format of the store's timestamps


def _wait_text(seconds: int) -> str:
    minutes = max(1, math.ceil(seconds / 60))
    return "a minute" if minutes == 1 else f"{minutes} minutes"


def throttled(store: Store, username: str, address: str, limit: int) -> SignInRefused | None:
    """A refusal if this username or address failed to sign in too often lately, else None."""
    now = datetime.now(UTC)
    name_key, addr_key = _keys(username, address)
    counts = store.login_failures([name_key, addr_key], _stamp(now - WINDOW))
    waits = [
        WINDOW - (now - datetime.fromisoformat(oldest))
        for key, (count, oldest) in counts.items()
        if count >= (limit if key == name_key else limit * ADDRESS_FACTOR)
    ]
    if not waits:
        return None
    seconds = max(1, math.ceil(max(waits).total_seconds()))
    return SignInRefused(
        f"Too many attempts. Try again in {_wait_text(seconds)}.", 429, retry_after=seconds
    )


async def sign_in(store: Store, username: str, password: str, address: str, limit: int) -> dict:
    """The account for these credentials, or raise SignInRefused saying why (never whether
    the account exists). Hashing runs in a thread, so other requests carry on meanwhile."""
    if len(password) > MAX_PASSWORD:
        raise SignInRefused(f"Passwords are at most {MAX_PASSWORD} characters.", 400)
    if limit and (refused := throttled(store, username, address, limit)):
        raise refused
    user = await asyncio.to_thread(authenticate, store, username, password)
    name_key, addr_key = _keys(username, address)
    if user is None:
        store.record_login_failure([name_key, addr_key], _stamp(datetime.now(UTC) - WINDOW))
        raise SignInRefused("Wrong username or password.")
    store.clear_login_failures(name_key)
    return user


async def sign_up(store: Store, username: str, password: str) -> dict:
    """Create an account, or raise SignInRefused saying why not."""
    if problem := signup_problem(username, password):
        raise SignInRefused(problem, 422)
    user = await asyncio.to_thread(create, store, username, password)
    if user is None:
        raise SignInRefused("That username is taken.", 422)
    return user
