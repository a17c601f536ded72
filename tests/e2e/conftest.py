from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import pytest

from tests.support import WorkerProcess, fleet_env, tasks_toml


@dataclass
class Fleet:
    """Real worker processes against one database and broker."""

    name_prefix: ClassVar[str] = "w"  # workers are named <task>@<prefix><n>.%h

    db_url: str
    broker_url: str
    tmp: Path
    env: dict[str, str]
    workers: list[WorkerProcess] = field(default_factory=list)

    def worker(
        self, task: str = "intent", *, name: str | None = None, **extra_env: str
    ) -> WorkerProcess:
        n = len(self.workers)
        w = WorkerProcess(
            task,
            self.env,
            self.tmp / f"worker{n}.log",
            name=name or f"{task}@{self.name_prefix}{n}.%h",
            extra_env=extra_env,
        )
        self.workers.append(w)
        return w.start()


@pytest.fixture
def fleet(db_url: str, broker_url: str, tiny_models: Path, tmp_path: Path) -> Iterator[Fleet]:
    config = tasks_toml(
        tmp_path / "tasks.toml",
        [
            {"name": "tiny-big", "path": "tiny-big", "max_length": 128, "max_batch_tokens": 4096},
            {
                "name": "tiny-small",
                "path": "tiny-small",
                "max_length": 128,
                "max_batch_tokens": 4096,
            },
        ],
    )
    env = fleet_env(
        {
            "DATABASE_URL": db_url,
            "BROKER_URL": broker_url,
            "FLEET_STATE_DIR": str(tmp_path / "state"),
            "FLEET_MODELS_DIR": str(tiny_models),
            "FLEET_CONFIG_FILE": str(config),
            "FLEET_LEASE_SECONDS": "8",
            "FLEET_RECONCILE_INTERVAL": "1",
            "FLEET_MAX_INFLIGHT_BATCHES": "4",
            "FLEET_BATCH_SIZE": "32",
        }
    )
    f = Fleet(db_url, broker_url, tmp_path, env)
    yield f
    for w in f.workers:
        w.stop()
