"""Settings: read once from an environment mapping, with documented defaults."""

from __future__ import annotations

import dataclasses
import stat
from pathlib import Path

import pytest

from chat.config import Settings, load_or_create_secret


def test_defaults_match_the_contract(tmp_path):
    s = Settings.from_env({}, db_path=tmp_path / "chat.db")
    assert s.model is None
    assert s.demo is True
    assert s.models == ()
    assert (s.host, s.port) == ("127.0.0.1", 5001)
    assert s.https_only is False
    assert s.provider_keys == ()


def test_default_db_path_is_data_chat_db():
    s = Settings.from_env({}, secret_key="given")
    assert s.db_path == Path("data/chat.db")


def test_environment_values_are_read():
    env = {
        "MODEL": " openai-chat:gpt-4o-mini ",
        "HOST": "0.0.0.0",
        "PORT": "8080",
        "DB_PATH": "/srv/chat/chat.db",
        "SECRET_KEY": "s3cret",
        "HTTPS": "true",
        "MAX_MESSAGE_CHARS": "1000",
    }
    s = Settings.from_env(env)
    assert s.model == "openai-chat:gpt-4o-mini"
    assert s.demo is False
    assert s.host == "0.0.0.0"
    assert s.port == 8080
    assert s.db_path == Path("/srv/chat/chat.db")
    assert s.secret_key == "s3cret"
    assert s.https_only is True
    assert s.max_message_chars == 1000


def test_models_list_always_offers_the_configured_model_first():
    s = Settings.from_env(
        {"MODEL": "anthropic:claude-sonnet-4-5", "MODELS": "openai-chat:a, ,openai-chat:b,"},
        secret_key="k",
    )
    assert s.models == ("anthropic:claude-sonnet-4-5", "openai-chat:a", "openai-chat:b")


def test_models_list_does_not_repeat_the_configured_model():
    env = {"MODEL": "openai-chat:b", "MODELS": "openai-chat:a,openai-chat:b"}
    s = Settings.from_env(env, secret_key="k")
    assert s.models == ("openai-chat:a", "openai-chat:b")


def test_blank_model_means_the_demo_model():
    s = Settings.from_env({"MODEL": "   "}, secret_key="k")
    assert s.model is None
    assert s.demo is True


@pytest.mark.parametrize("value", ["", "0", "no", "false"])
def test_https_is_off_unless_asked_for(value):
    assert Settings.from_env({"HTTPS": value}, secret_key="k").https_only is False


def test_provider_keys_are_noted_by_name_only():
    env = {"OPENAI_API_KEY": "sk-secret", "ANTHROPIC_API_KEY": ""}
    s = Settings.from_env(env, secret_key="k")
    assert s.provider_keys == ("OPENAI_API_KEY",)
    assert "sk-secret" not in repr(s)


def test_overrides_win_over_the_environment():
    s = Settings.from_env({"PORT": "8080", "MODEL": "x:y"}, port=9000, model=None, secret_key="k")
    assert s.port == 9000
    assert s.model is None


def test_settings_are_frozen():
    s = Settings.from_env({}, secret_key="k")
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.port = 1  # type: ignore[misc]


def test_secret_key_is_generated_once_and_kept_beside_the_database(tmp_path):
    db = tmp_path / "sub" / "chat.db"
    first = Settings.from_env({"DB_PATH": str(db)})
    second = Settings.from_env({"DB_PATH": str(db)})
    key_file = tmp_path / "sub" / ".secret_key"
    assert len(first.secret_key) >= 32
    assert first.secret_key == second.secret_key == key_file.read_text().strip()
    # Owner-only: the key lets anyone forge any browser's identity.
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600


def test_a_given_secret_key_writes_no_file(tmp_path):
    Settings.from_env({"DB_PATH": str(tmp_path / "chat.db"), "SECRET_KEY": "given"})
    assert not (tmp_path / ".secret_key").exists()


def test_in_memory_database_gets_a_fresh_key_and_no_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    a, b = load_or_create_secret(Path(":memory:")), load_or_create_secret(Path(":memory:"))
    assert a and b and a != b
    assert list(tmp_path.iterdir()) == []


def test_a_model_given_as_an_override_is_offered_too():
    s = Settings.from_env({"MODELS": "openai-chat:a"}, model="openai-chat:cli", secret_key="k")
    assert s.models[0] == "openai-chat:cli"


def test_account_and_edge_settings_are_read(tmp_path):
    env = {
        "ALLOWED_HOSTS": " Chat.Example.com ,.example.org,",
        "LOGIN_ATTEMPTS": "4",
        "HEADER_TIMEOUT": "2.5",
    }
    s = Settings.from_env(env, db_path=tmp_path / "chat.db")
    assert s.allowed_hosts == ("chat.example.com", ".example.org")
    assert (s.login_attempts, s.header_timeout) == (4, 2.5)
    defaults = Settings.from_env({}, db_path=tmp_path / "chat.db")
    assert defaults.allowed_hosts == ("localhost", "127.0.0.1", "::1")
    assert (defaults.login_attempts, defaults.header_timeout) == (10, 10.0)
    named = Settings.from_env({"HOST": "chat.lan"}, db_path=tmp_path / "chat.db")
    assert named.allowed_hosts == ("localhost", "127.0.0.1", "::1", "chat.lan")
    assert Settings.from_env({"HOST": "::"}, db_path=tmp_path / "x.db").allowed_hosts == ("*",)
