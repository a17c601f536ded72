"""Rows gone from a source: the key scan, and the guard against a mass delete.

A pass that looks for deleted rows (every full pass; an incremental one with
`detect_deletes`, the default) copies the source's keys into a temporary table
in the fleet's database (COPY to COPY, never Python objects) and anti-joins the
stored rows of that source against it:

    gone        a stored row whose key the source no longer has is marked gone
                (its items `gone`, results to result_history) or, with
                on_delete = "delete", removed; unless
    guarded     more than `mass_delete_rows` rows and more than
                `mass_delete_share` of the source would go at once (an empty
                read during a rebuild, a broken join): then none is marked, the
                pass warns, and `fleet sync --allow-mass-delete` (or the source's
                `allow_mass_delete = true`) applies it
    recounted   shape "messages": the scan also carries each conversation's
                count of distinct positions with content; a stored conversation
                whose count differs (a message deleted, which touches no
                updated_at) is read again by the same pass

This module imports nothing from the project but config/.
"""

from __future__ import annotations

import datetime as dt

from sqlalchemy import Engine, text
from sqlalchemy.orm import Session

from config.taskconfig import SourceSpec
from db import history
from db.ledger import id_array
from db.syncreport import SyncReport


def keys_sql(spec: SourceSpec) -> str:
    """Every external_id the source has now, with (shape "messages") its count of
    distinct positions with content: the key scan compares it with the stored
    conversation to find deleted messages."""
    if spec.kind == "conversation" and spec.shape == "messages":
        return (
            "SELECT CAST(q.external_id AS text), "
            "count(DISTINCT q.position) FILTER (WHERE q.content IS NOT NULL) "
            f"FROM ({spec.select}) AS q GROUP BY 1"
        )
    return f"SELECT CAST(q.external_id AS text), 0 FROM ({spec.select}) AS q"


def mass_delete(spec: SourceSpec, n: int, live: int) -> bool:
    """Whether marking `n` of a source's `live` rows gone is a mass delete."""
    return n > spec.mass_delete_rows and n > spec.mass_delete_share * live


def apply_gone(
    session: Session,
    spec: SourceSpec,
    report: SyncReport,
    *,
    seen_table: str,
    allow_mass_delete: bool = False,
) -> None:
    """Rows of this source that the key scan did not see: gone (or deleted), unless
    there are too many of them (`_mass_delete`): then none, and a warning."""
    table = history.TABLES[spec.kind]
    ids = list(
        session.execute(
            text(
                f"""
                SELECT t.id FROM {table} t
                WHERE t.source = :source AND t.gone_at IS NULL
                  AND NOT EXISTS (SELECT 1 FROM {seen_table} k WHERE k.external_id = t.external_id)
                """
            ),
            {"source": spec.name},
        ).scalars()
    )
    session.execute(
        text(
            f"DELETE FROM sync_problems p WHERE p.source = :source AND p.external_id <> '' "
            f"AND NOT EXISTS (SELECT 1 FROM {seen_table} k WHERE k.external_id = p.external_id)"
        ),
        {"source": spec.name},
    )
    if not ids:
        return
    live = session.execute(
        text(f"SELECT count(*) FROM {table} WHERE source = :s AND gone_at IS NULL"),
        {"s": spec.name},
    ).scalar_one()
    if mass_delete(spec, len(ids), live) and not (allow_mass_delete or spec.allow_mass_delete):
        report.withheld = len(ids)
        report.warnings.append(
            f"{len(ids):,} of {live:,} rows are no longer in source {spec.name!r}: not marked "
            f"gone (more than {spec.mass_delete_rows} rows and {spec.mass_delete_share:.0%}); "
            "their labels stay. If the rows were really deleted, run "
            f"`fleet sync --source {spec.name} --allow-mass-delete`"
        )
        return
    items = history.items_of_sources(session, source_kind=spec.kind, source_ids=ids)
    if spec.on_delete == "delete":
        history.archive_results(session, item_ids=items, reason="gone")
        session.execute(
            text("DELETE FROM work_items WHERE id = ANY(CAST(:ids AS bigint[]))"),
            {"ids": id_array(items)},
        )
        session.execute(
            text(f"DELETE FROM {table} WHERE id = ANY(CAST(:ids AS bigint[]))"),
            {"ids": id_array(ids)},
        )
        report.deleted += len(ids)
        return
    session.execute(
        text(f"UPDATE {table} SET gone_at = now() WHERE id = ANY(CAST(:ids AS bigint[]))"),
        {"ids": id_array(ids)},
    )
    stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    history.mark_gone(
        session,
        item_ids=items,
        why=f"the row disappeared from source {spec.name!r} (fleet sync at {stamp})",
    )
    report.gone += len(ids)


def recounted(session: Session, spec: SourceSpec, *, seen_table: str) -> list[str]:
    """Shape "messages": stored conversations whose count of messages differs from
    the source's (a message deleted, or added with an old updated_at)."""
    if not (spec.kind == "conversation" and spec.shape == "messages"):
        return []
    return list(
        session.execute(
            text(
                f"""
                SELECT t.external_id FROM conversations t JOIN {seen_table} k
                  ON k.external_id = t.external_id
                WHERE t.source = :source AND t.gone_at IS NULL
                  AND jsonb_array_length(t.messages) <> k.messages
                """
            ),
            {"source": spec.name},
        ).scalars()
    )


def scan_deletes(
    fleet: Engine, source: Engine, spec: SourceSpec, report: SyncReport, *, allow: bool
) -> list[str]:
    """Copy the source's keys into a temporary table, then mark the rest gone.
    Returns the external ids whose message count changed (to be read again).

    COPY ... TO STDOUT on the source feeds COPY ... FROM STDIN on the fleet, block
    by block: the keys never become Python objects, and memory holds one block."""
    with fleet.connect() as conn, source.connect() as src:
        conn.execute(
            text(
                "CREATE TEMPORARY TABLE fleet_sync_seen (external_id text, messages int) "
                "ON COMMIT DROP"
            )
        )
        into = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
        out = src.connection.driver_connection.cursor()  # type: ignore[union-attr]
        with (
            out.copy(f"COPY ({keys_sql(spec)}) TO STDOUT") as reader,
            into.copy("COPY fleet_sync_seen (external_id, messages) FROM STDIN") as writer,
        ):
            for block in reader:
                writer.write(block)
        src.rollback()
        # An index, so the anti-join stays cheap whatever the planner believes about
        # a table this pass has just filled (stale statistics pick a nested loop).
        conn.execute(text("CREATE INDEX ON fleet_sync_seen (external_id)"))
        conn.execute(text("ANALYZE fleet_sync_seen"))
        with Session(bind=conn) as session:
            apply_gone(session, spec, report, seen_table="fleet_sync_seen", allow_mass_delete=allow)
            recount = recounted(session, spec, seen_table="fleet_sync_seen")
            session.flush()
        conn.commit()
    return recount
