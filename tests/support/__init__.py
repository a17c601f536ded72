"""Shared test helpers, one module per purpose; every name is re-exported here,
so `from tests.support import X` works for each of them.

    env        the repository root, the local Postgres and Redis addresses
    databases  throwaway databases; status counts and results read back
    inputs     conversations, JSONL files, a task config
    models     a tiny real BERT classifier
    cli        the `fleet` command as a subprocess
    processes  a real `celery worker`, an HTTP-serving `fleet` command, a free port
    speech     transcript words and the word error rate
"""

from tests.support.cli import fleet_env, run_fleet, sigint_as_at_a_terminal
from tests.support.databases import (
    create_database,
    drop_database,
    result_count_per_item,
    status_counts,
)
from tests.support.env import ADMIN_URL, REDIS_BASE, REPO
from tests.support.inputs import conversations, tasks_toml, write_jsonl
from tests.support.models import build_tiny_classifier
from tests.support.processes import ServedProcess, WorkerProcess, free_port
from tests.support.speech import normalize, wer

__all__ = [
    "ADMIN_URL",
    "REDIS_BASE",
    "REPO",
    "ServedProcess",
    "WorkerProcess",
    "build_tiny_classifier",
    "conversations",
    "create_database",
    "drop_database",
    "fleet_env",
    "free_port",
    "normalize",
    "result_count_per_item",
    "run_fleet",
    "sigint_as_at_a_terminal",
    "status_counts",
    "tasks_toml",
    "wer",
    "write_jsonl",
]
