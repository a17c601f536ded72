from __future__ import annotations

import pytest

from config.taskconfig import ConfigError, load_tasks, parse_tasks
from wire.messages import BatchMessage


def test_message_round_trip():
    m = BatchMessage("intent", "b-1", (1, 2, 3), attempt=2)
    assert BatchMessage.decode(m.encode()) == m
    assert m.next_attempt().attempt == 3
    assert set(m.encode()) == {"task", "batch_id", "item_ids", "attempt"}
    resumed = m.next_attempt(resume=True)
    assert resumed.encode()["resume"] is True and BatchMessage.decode(resumed.encode()) == resumed
    assert resumed.next_attempt().resume is False  # only the retry that says so
    assert BatchMessage.decode({**m.encode(), "resume": "yes"}).resume is False  # JSON true only


@pytest.mark.parametrize(
    "raw",
    [
        {},
        {"task": "t", "batch_id": "b"},
        {"task": 1, "batch_id": "b", "item_ids": []},
        {"task": "t", "batch_id": "b", "item_ids": ["x"]},
    ],
)
def test_bad_messages_are_rejected(raw):
    with pytest.raises(ValueError):
        BatchMessage.decode(raw)


def test_bundled_tasks_parse():
    tasks = load_tasks()
    assert {"intent", "transcribe", "audio_intent", "llm_classify", "topic"} <= set(tasks)
    assert tasks["intent"].queue == "fleet.intent"
    assert tasks["transcribe"].then == ("audio_intent",)
    assert len(tasks["llm_classify"].labels) == 8
    assert tasks["llm_classify"].ladder[0].options["max_new_tokens"] == 96


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({"tasks": {"a": {"kind": "nope", "ladder": [{"path": "x"}]}}}, "kind must be"),
        ({"tasks": {"a": {"kind": "fake", "ladder": []}}}, "empty model ladder"),
        ({"tasks": {"a": {"kind": "fake", "ladder": [{"name": "x"}]}}}, "has no 'path'"),
        (
            {"tasks": {"a": {"kind": "fake", "then": ["b"], "ladder": [{"path": "x"}]}}},
            "unknown task 'b'",
        ),
        (
            {"tasks": {"a": {"kind": "fake", "labels": "zz", "ladder": [{"path": "x"}]}}},
            "label set",
        ),
        ({"tasks": {"control": {"kind": "fake", "ladder": [{"path": "x"}]}}}, "reserved"),
        ({"tasks": {"default": {"kind": "fake", "ladder": [{"path": "x"}]}}}, "reserved"),
    ],
)
def test_config_errors(doc, message):
    with pytest.raises(ConfigError, match=message):
        parse_tasks(doc)


def test_unreadable_config(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_tasks(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[tasks\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_tasks(bad)
