"""A user's FLEET_CONFIG_FILE extends the bundled tasks and label sets
(config.taskconfig.merge_documents); `fleet tasks` shows what is in force;
a nightly run with no tasks is a configuration error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from config.taskconfig import ConfigError, load_tasks, merge_documents
from fleet.cli import main

BUNDLED = {
    "labels": {"intent": {"a": "A"}, "mood": {"x": "X"}},
    "tasks": {"intent": {"kind": "sequence_classify"}, "topic": {"kind": "zero_shot"}},
}


@pytest.mark.parametrize(
    ("user", "tasks", "labels"),
    [
        ({}, {"intent", "topic"}, {"intent", "mood"}),
        ({"sources": {"app": {"table": "t"}}}, {"intent", "topic"}, {"intent", "mood"}),
        ({"tasks": {"mine": {"kind": "fake"}}}, {"intent", "topic", "mine"}, {"intent", "mood"}),
        ({"labels": {"mine": {"y": "Y"}}}, {"intent", "topic"}, {"intent", "mood", "mine"}),
        ({"include_bundled": False, "tasks": {"mine": {"kind": "fake"}}}, {"mine"}, set()),
        ({"include_bundled": False}, set(), set()),
    ],
)
def test_merge_table(user, tasks, labels):
    got = merge_documents(BUNDLED, user)
    assert set(got.get("tasks", {})) == tasks
    assert set(got.get("labels", {})) == labels
    assert "include_bundled" not in got


def test_a_task_of_the_same_name_is_updated_key_by_key():
    got = merge_documents(
        BUNDLED, {"tasks": {"intent": {"kind": "fake", "ladder": [{"path": "m"}]}}}
    )
    assert got["tasks"]["intent"] == {"kind": "fake", "ladder": [{"path": "m"}]}
    assert got["tasks"]["topic"] == {"kind": "zero_shot"} and "sources" not in got


def test_the_readme_example_swaps_the_bundled_intent_ladder(tmp_path: Path):
    config = tmp_path / "mine.toml"
    config.write_text(
        '[sources.app]\ntable = "app.conversations"\n'
        '[[tasks.intent.ladder]]\nname = "minilm-intent"\npath = "acme/minilm-intent"\n'
    )
    intent = load_tasks(config)["intent"]
    assert intent.kind == "sequence_classify" and "professional" in intent.labels
    assert [t.path for t in intent.ladder] == ["acme/minilm-intent"]


def test_include_bundled_must_be_a_boolean():
    with pytest.raises(ConfigError, match="include_bundled"):
        merge_documents(BUNDLED, {"include_bundled": "no"})


def test_a_sources_only_file_keeps_every_bundled_task(tmp_path: Path):
    config = tmp_path / "mine.toml"
    config.write_text('[sources.app]\ntable = "app.conversations"\n')
    assert set(load_tasks(config)) == set(load_tasks(None))
    assert "intent" in load_tasks(config)


def test_a_users_task_can_use_a_bundled_label_set(tmp_path: Path):
    config = tmp_path / "mine.toml"
    config.write_text(
        '[tasks.triage]\nkind = "sequence_classify"\nlabels = "sentiment"\n'
        '[[tasks.triage.ladder]]\npath = "triage-model"\n'
    )
    tasks = load_tasks(config)
    assert {"triage", "intent", "transcribe"} <= set(tasks)
    assert list(tasks["triage"].labels) == ["negative", "neutral", "positive"]


def test_a_misspelt_top_level_table_is_an_error(tmp_path: Path):
    config = tmp_path / "mine.toml"
    config.write_text('[source.app]\ntable = "app.conversations"\n')
    with pytest.raises(ConfigError, match="unknown top-level key.*source"):
        load_tasks(config)


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """Settings that would fail on any service access: these commands need none."""
    monkeypatch.setenv("DATABASE_URL", "postgresql://nobody@127.0.0.1:1/none")
    monkeypatch.setenv("BROKER_URL", "redis://127.0.0.1:1/0")
    monkeypatch.setenv("FLEET_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.delenv("FLEET_MODELS_DIR", raising=False)
    monkeypatch.delenv("FLEET_NIGHTLY_TASKS", raising=False)
    return monkeypatch


def test_fleet_tasks_lists_tasks_ladders_and_sources(offline, tmp_path):
    config = tmp_path / "mine.toml"
    config.write_text(
        '[sources.app]\ntable = "app.conversations"\n'
        '[tasks.triage]\nkind = "sequence_classify"\nlabels = "sentiment"\n'
        f'[[tasks.triage.ladder]]\nname = "small"\npath = "{tmp_path}"\n'
    )
    offline.setenv("FLEET_CONFIG_FILE", str(config))
    result = CliRunner().invoke(main, ["tasks", "--json"])
    assert result.exit_code == 0, result.output
    got = json.loads(result.output)
    by_name = {t["name"]: t for t in got["tasks"]}
    assert {"intent", "transcribe", "triage"} <= set(by_name)
    assert by_name["triage"]["origin"] == str(config) and by_name["intent"]["origin"] == "bundled"
    assert by_name["triage"]["ladder"] == [
        {"name": "small", "path": str(tmp_path), "resolved": str(tmp_path), "present": True}
    ]
    assert [t["name"] for t in by_name["transcribe"]["ladder"]] == [
        "whisper-base",
        "whisper-tiny.en",
    ]
    assert by_name["triage"]["labels"] == ["negative", "neutral", "positive"]
    assert got["sources"][0]["name"] == "app" and got["sources"][0]["table"] == "app.conversations"

    text = CliRunner().invoke(main, ["tasks"])
    assert text.exit_code == 0, text.output
    assert "triage" in text.output and "tier 0: small" in text.output
    assert "app  (conversation" in text.output
    assert "missing" in text.output  # the bundled models are not prepared in this state folder


def test_nightly_with_no_tasks_is_a_configuration_error(offline, tmp_path):
    config = tmp_path / "empty.toml"
    config.write_text('include_bundled = false\n[sources.app]\ntable = "app.conversations"\n')
    offline.setenv("FLEET_CONFIG_FILE", str(config))
    result = CliRunner().invoke(main, ["nightly"])
    assert result.exit_code == 2, result.output
    assert "no tasks to run" in result.output and "fleet tasks" in result.output


def test_model_folder_options_resolve_under_the_models_dir(tmp_path: Path) -> None:
    """llm_classify's `turn_selector` names a model folder: relative under the models
    folder (as a tier's path), absolute as given; a tier without one is unchanged."""
    from config.taskconfig import TierSpec, with_model_folders

    tier = TierSpec(
        name="t", path="llm", options={"turn_selector": "intent-minilm", "pooling": "margin"}
    )
    got = with_model_folders(tier, tmp_path)
    assert got.options == {"turn_selector": str(tmp_path / "intent-minilm"), "pooling": "margin"}
    assert tier.options["turn_selector"] == "intent-minilm"  # the spec itself is not changed
    absolute = TierSpec(name="t", path="llm", options={"turn_selector": "/srv/models/enc"})
    assert with_model_folders(absolute, tmp_path).options["turn_selector"] == "/srv/models/enc"
    plain = TierSpec(name="t", path="llm")
    assert with_model_folders(plain, tmp_path) is plain
