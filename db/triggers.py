"""Continuous mode (optional): triggers on a source's tables mark that it changed.

`fleet sync --install-triggers` puts, on each table a source reads
(`trigger_tables`, default its `table`), one statement-level trigger

    AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ... FOR EACH STATEMENT

that appends one row (source, operation) to `fleet_source_marks` in the source
database. A `fleet beat` sync tick (FLEET_SYNC_SECONDS) takes the marks: no
mark, no work (one indexed DELETE); a mark, an incremental sync of that source
within seconds; a DELETE or TRUNCATE marked, the pass also scans the keys. A
mark is consumed only once the pass it asked for has succeeded (`peek_marks`,
then `consume`): a tick whose pass fails leaves it for the next tick.

Cost to the application: one small insert per writing statement (not per row),
append-only so concurrent writers never wait on each other; the marks table is
emptied by every tick. The trigger tells the fleet *when* to look; *what*
changed still comes from updated_at, so the application must keep setting it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from sqlalchemy import Engine, text

from db.ledger import id_array

_SETUP = """
CREATE TABLE IF NOT EXISTS fleet_source_triggers (
    source text NOT NULL,
    tbl text NOT NULL,
    installed_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (source, tbl)
);
CREATE TABLE IF NOT EXISTS fleet_source_marks (
    id bigserial PRIMARY KEY,
    source text NOT NULL,
    op text NOT NULL,
    marked_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS fleet_source_marks_source ON fleet_source_marks (source);
CREATE OR REPLACE FUNCTION fleet_mark_source() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO fleet_source_marks (source, op) VALUES (TG_ARGV[0], TG_OP);
    RETURN NULL;
END
$$;
"""


@dataclass
class Marks:
    installed: set[str] = field(default_factory=set)  # sources with triggers
    changed: set[str] = field(default_factory=set)  # sources with a mark taken now
    deletes: dict[str, bool] = field(default_factory=dict)  # a DELETE/TRUNCATE among them
    ids: dict[str, list[int]] = field(default_factory=dict)  # the marks seen, per source


def trigger_name(source: str) -> str:
    return "fleet_sync_" + re.sub(r"[^A-Za-z0-9_]", "_", source)


def install(engine: Engine, source: str, tables: Sequence[str]) -> list[str]:
    """Create the marks table, the function and one trigger per table (idempotent).
    Returns the tables now watched. Raises ValueError when there is no table."""
    if not tables:
        raise ValueError(
            f"source {source!r} names no table to watch: set `table`, or `trigger_tables = "
            '["app.conversations", "app.messages"]` for a query source'
        )
    name = trigger_name(source)
    with engine.begin() as conn:
        conn.exec_driver_sql(_SETUP)
        for table in tables:
            conn.exec_driver_sql(f"DROP TRIGGER IF EXISTS {name} ON {table}")
            conn.exec_driver_sql(
                f"CREATE TRIGGER {name} AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON {table} "
                # Trigger arguments are literals; source names are [A-Za-z0-9_.-] only
                # (config.taskconfig), table names plain identifiers.
                f"FOR EACH STATEMENT EXECUTE FUNCTION fleet_mark_source('{source}')"
            )
            conn.execute(
                text(
                    "INSERT INTO fleet_source_triggers (source, tbl) VALUES (:s, :t) "
                    "ON CONFLICT DO NOTHING"
                ),
                {"s": source, "t": table},
            )
    return list(tables)


def remove(engine: Engine, source: str) -> list[str]:
    """Drop the source's triggers. Returns the tables no longer watched."""
    name = trigger_name(source)
    with engine.begin() as conn:
        if not _has_setup(conn):
            return []
        tables = list(
            conn.execute(
                text("DELETE FROM fleet_source_triggers WHERE source = :s RETURNING tbl"),
                {"s": source},
            ).scalars()
        )
        for table in tables:
            conn.exec_driver_sql(f"DROP TRIGGER IF EXISTS {name} ON {table}")
        conn.execute(text("DELETE FROM fleet_source_marks WHERE source = :s"), {"s": source})
    return tables


def _has_setup(conn: object) -> bool:
    return bool(
        conn.execute(text("SELECT to_regclass('fleet_source_triggers') IS NOT NULL")).scalar()  # type: ignore[attr-defined]
    )


def take_marks(engine: Engine, sources: Sequence[str]) -> Marks:
    """Which of `sources` have triggers, and which were marked since the last take
    (the marks are consumed)."""
    marks = Marks()
    with engine.begin() as conn:
        if not _has_setup(conn):
            return marks
        marks.installed = set(
            conn.execute(
                text(
                    "SELECT DISTINCT source FROM fleet_source_triggers "
                    "WHERE source = ANY(CAST(:s AS text[]))"
                ),
                {"s": list(sources)},
            ).scalars()
        )
        for source, op in conn.execute(
            text(
                "DELETE FROM fleet_source_marks WHERE source = ANY(CAST(:s AS text[])) "
                "RETURNING source, op"
            ),
            {"s": list(marks.installed)},
        ):
            marks.changed.add(source)
            marks.deletes[source] = marks.deletes.get(source, False) or op in (
                "DELETE",
                "TRUNCATE",
            )
    return marks


def peek_marks(engine: Engine, sources: Sequence[str]) -> Marks:
    """Which of `sources` have triggers and which are marked, leaving the marks in
    place: `consume` them once the pass they asked for has succeeded."""
    marks = Marks()
    with engine.begin() as conn:
        if not _has_setup(conn):
            return marks
        marks.installed = set(
            conn.execute(
                text(
                    "SELECT DISTINCT source FROM fleet_source_triggers "
                    "WHERE source = ANY(CAST(:s AS text[]))"
                ),
                {"s": list(sources)},
            ).scalars()
        )
        for source, deletes, last in conn.execute(
            text(
                "SELECT source, bool_or(op IN ('DELETE', 'TRUNCATE')), array_agg(id) "
                "FROM fleet_source_marks WHERE source = ANY(CAST(:s AS text[])) GROUP BY source"
            ),
            {"s": list(marks.installed)},
        ):
            marks.changed.add(source)
            marks.deletes[source] = bool(deletes)
            marks.ids[source] = list(last)
    return marks


def consume(engine: Engine, ids: Sequence[int]) -> int:
    """Delete the marks a successful pass answered (by id: a mark committed during
    the pass, whatever its id, stays for the next tick). Returns how many."""
    with engine.begin() as conn:
        got = conn.execute(
            text("DELETE FROM fleet_source_marks WHERE id = ANY(CAST(:ids AS bigint[]))"),
            {"ids": id_array(ids)},
        )
    return int(got.rowcount or 0)
