"""ENV=production refuses to start with a weak or public secret, naming every one."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from model_api.settings import PLACEHOLDER_SECRETS, Settings

STRONG_KEY = "k" * 32
SOUND = {
    "env": "production",
    "secret_key": STRONG_KEY,
    "database_url": "postgresql://model_api:a-real-db-password@db/model_api",
    "admin_password": "a real admin password",
}


def _refusal(**overrides) -> str:
    with pytest.raises(ValidationError) as caught:
        Settings(**{**SOUND, **overrides})
    return str(caught.value)


def test_sound_production_settings_start():
    assert Settings(**SOUND).env == "production"


@pytest.mark.parametrize("secret_key, says", [
    (None, "SECRET_KEY must be set"),
    ("a", "SECRET_KEY is too short"),
    ("x" * 31, "SECRET_KEY is too short"),
    ("change-me-to-a-long-random-string", "SECRET_KEY is the public placeholder"),
    ("please-CHANGE-ME-before-going-live-0123456789", "SECRET_KEY is the public placeholder"),
])
def test_a_missing_short_or_placeholder_secret_key_is_refused(secret_key, says):
    assert says in _refusal(secret_key=secret_key)


@pytest.mark.parametrize("url", [
    "postgresql://model_api:change-me-db-password@postgres:5432/model_api",
    "postgresql+psycopg://u:change-me@db/x",
])
def test_a_placeholder_database_password_is_refused(url):
    assert "DATABASE_URL holds the placeholder database password" in _refusal(database_url=url)


def test_sqlite_is_refused():
    assert "DATABASE_URL must name a server database" in _refusal(database_url="sqlite:///x.sqlite3")


@pytest.mark.parametrize("password", ["change-me-demo-password", "Change-Me"])
def test_a_placeholder_admin_password_is_refused(password):
    assert "ADMIN_PASSWORD is the public placeholder" in _refusal(admin_password=password)


def test_a_placeholder_metrics_token_is_refused():
    assert "METRICS_TOKEN" in _refusal(metrics_token="change-me")


def test_every_offending_setting_is_named_at_once():
    message = _refusal(secret_key="a", database_url="postgresql://u:change-me-db-password@db/x",
                       admin_password="change-me-demo-password", metrics_token="change-me")
    for name in ("SECRET_KEY", "DATABASE_URL", "ADMIN_PASSWORD", "METRICS_TOKEN"):
        assert name in message


@pytest.mark.parametrize("env", ["development", "test"])
def test_outside_production_placeholders_are_tolerated(env):
    assert Settings(env=env, secret_key="a", admin_password="change-me-demo-password").env == env


def test_the_placeholders_are_refused_whatever_their_case_or_surroundings():
    for placeholder in PLACEHOLDER_SECRETS:
        assert "SECRET_KEY" in _refusal(secret_key=placeholder.upper() + "-0123456789abcdef")


def test_bootstrap_in_production_cannot_create_demo_with_the_placeholder_password(monkeypatch):
    from click.testing import CliRunner

    from model_api.entry import main

    for key, value in {**SOUND, "admin_password": "change-me-demo-password", "admin_username": "demo"}.items():
        monkeypatch.setenv(key.upper(), value)
    result = CliRunner().invoke(main, ["bootstrap"])
    assert result.exit_code != 0
    assert "ADMIN_PASSWORD is the public placeholder" in str(result.exception) + result.output
