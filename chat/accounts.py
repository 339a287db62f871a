"""Accounts for AUTH=password: argon2 hashing, sign-up rules and login checks."""

from __future__ import annotations

import re

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from chat.storage import Store

_hasher = PasswordHasher()
USERNAME = re.compile(r"^[A-Za-z0-9_.-]{3,40}$")
MIN_PASSWORD = 10
# Verified against when the username does not exist, so both cases take the same time.
_DUMMY = _hasher.hash("not a real password, only for timing")


def signup_problem(username: str, password: str) -> str | None:
    """Why these sign-up details are not acceptable, or None."""
    if not USERNAME.match(username):
        return "Usernames are 3 to 40 letters, digits, dots, dashes or underscores."
    if len(password) < MIN_PASSWORD:
        return f"Use a password of at least {MIN_PASSWORD} characters."
    if len(password) > 1024:
        return "That password is too long."
    return None


def create(store: Store, username: str, password: str) -> dict | None:
    """Create an account (None if the username is taken); the password is stored hashed."""
    return store.create_user(username, _hasher.hash(password))


def authenticate(store: Store, username: str, password: str) -> dict | None:
    """The account if the password is right, else None. Upgrades outdated hashes."""
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
