from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from config.settings import Settings, normalize_database_url, redact


def test_defaults_are_embedded(monkeypatch):
    for var in ("DATABASE_URL", "BROKER_URL", "FLEET_DATABASE_URL", "FLEET_BROKER_URL"):
        monkeypatch.delenv(var, raising=False)
    s = Settings()
    assert s.embedded
    assert s.resolved_models_dir == s.state_dir / "models"
    assert s.resolved_audio_root == s.state_dir / "audio"


def test_env_parsing(monkeypatch, tmp_path):
    monkeypatch.setenv("DATABASE_URL", "postgresql://u:secret@db:5432/fleet")
    monkeypatch.setenv("BROKER_URL", "redis://:pw@redis:6379/0")
    monkeypatch.setenv("FLEET_STATE_DIR", str(tmp_path))
    monkeypatch.setenv("FLEET_BATCH_SIZE", "64")
    monkeypatch.setenv("FLEET_LOG_JSON", "true")
    s = Settings()
    assert not s.embedded
    assert s.db_url() == "postgresql+psycopg://u:secret@db:5432/fleet"
    assert s.batch_size == 64 and s.log_json and s.state_dir == tmp_path
    assert "secret" not in repr(s) and "pw" not in str(s.broker_url)
    env = s.child_env()
    assert env["DATABASE_URL"] == s.db_url() and env["FLEET_STATE_DIR"] == str(tmp_path)


def test_invalid_values_are_rejected(monkeypatch):
    monkeypatch.setenv("FLEET_BATCH_SIZE", "0")
    with pytest.raises(ValidationError):
        Settings()


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("postgres://a@h/d", "postgresql+psycopg://a@h/d"),
        ("postgresql://a@h/d", "postgresql+psycopg://a@h/d"),
        ("postgresql+psycopg2://a@h/d", "postgresql+psycopg://a@h/d"),
        ("postgresql+psycopg://a@h/d", "postgresql+psycopg://a@h/d"),
    ],
)
def test_normalize_database_url(url, expected):
    assert normalize_database_url(url) == expected


def test_redact_hides_passwords():
    assert "s3cret" not in redact("postgresql+psycopg://user:s3cret@db/fleet")
    assert "s3cret" not in redact("redis://:s3cret@redis:6379/0")
    assert redact("redis+socket:///tmp/r.sock") == "redis+socket:///tmp/r.sock"


def test_every_field_documents_itself():
    for name, field in Settings.model_fields.items():
        assert field.description, f"{name} has no description"


def test_paths_are_paths(monkeypatch, tmp_path):
    monkeypatch.setenv("FLEET_MODELS_DIR", str(tmp_path / "m"))
    assert Settings().resolved_models_dir == Path(tmp_path / "m")


def test_fleet_settings_masks_only_a_password_in_the_source_url(monkeypatch, tmp_path):
    import json

    from click.testing import CliRunner

    from fleet.cli import main

    monkeypatch.setenv("FLEET_STATE_DIR", str(tmp_path))
    monkeypatch.setenv("FLEET_SOURCE_DATABASE_URL", "postgresql://reader@app-db:5432/app")
    shown = json.loads(CliRunner().invoke(main, ["settings", "--json"]).output)
    assert shown["source_database_url"] == "postgresql+psycopg://reader@app-db:5432/app"
    monkeypatch.setenv("FLEET_SOURCE_DATABASE_URL", "postgresql://reader:s3cret@app-db/app")
    result = CliRunner().invoke(main, ["settings", "--json"])
    assert json.loads(result.output)["source_database_url"] == (
        "postgresql+psycopg://reader:***@app-db/app"
    )
    assert "s3cret" not in result.output
