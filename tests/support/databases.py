"""Throwaway databases on the local Postgres, and what tests read back from
the ledger (status counts, results per item)."""

from __future__ import annotations

import uuid

import psycopg
from sqlalchemy import text

from tests.support.env import ADMIN_URL


def create_database() -> tuple[str, str]:
    """A fresh database; returns (name, sqlalchemy url)."""
    name = f"fleet_test_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = ADMIN_URL.rsplit("/", 1)[0]
    return name, f"{base}/{name}".replace("postgresql://", "postgresql+psycopg://")


def drop_database(name: str) -> None:
    from db.engine import dispose_all

    dispose_all()
    with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def status_counts(url: str, task: str) -> dict[str, int]:
    from db import ledger
    from db.engine import transaction

    with transaction(url) as s:
        return ledger.counts(s, task=task).get(task, {})


def result_count_per_item(url: str, task: str) -> dict[int, int]:
    from db.engine import transaction

    with transaction(url) as s:
        rows = s.execute(
            text(
                "SELECT w.id, count(r.id) FROM work_items w LEFT JOIN results r ON r.work_item_id = w.id "
                "WHERE w.task = :t GROUP BY w.id"
            ),
            {"t": task},
        ).all()
    return dict(rows)
