"""Keeping the fleet's copy of a source in step with the user's own tables.

A source (`[sources.<name>]` in the task config, parsed by config.taskconfig) is
a SQL query or a table on the fleet's database or a separate one
(FLEET_SOURCE_DATABASE_URL). Its columns map to the fleet's shape:

    conversation, shape "conversation":  external_id, messages (jsonb [{role, content}]),
                                         language (optional), updated_at
    conversation, shape "messages":      external_id, role, content, position,
                                         language (optional), updated_at
                                         (one row per message; folded here in position order)
    audio:                               external_id, uri, duration_s (optional), updated_at

One pass (`sync_source`):

    horizon read on the source first: its clock and the start of its oldest
            open transaction (db.syncmark)
    read    stream the rows with a server-side cursor, `chunk` rows at a time
            (flat memory at any size), ordered by external_id; incremental
            passes read only rows with updated_at >= mark - overlap (or NULL),
            a full pass reads them all; updated_at is also read as timestamptz,
            so a column without zone is taken in the source session's TimeZone
    group   the rows of one external_id become one record, or a refusal, with
            notes (db.syncrows.build: repeats, NULL messages or content, values
            Postgres cannot store); refusals and notes go to sync_problems
    compare hash each record's content (blake2b of its canonical JSON) against the
            stored hash of this source's row with the same external_id (ids are
            unique per source, not across sources: uq_<table>_source_external_id):
            an unchanged row costs one indexed lookup, no write
    write   new rows are inserted (discovery then gives them work items); a row
            whose hash changed is updated, and every work item of it goes back to
            pending with its old result moved to result_history (db.history); a
            gone row back with the hash it had gets its results back. A chunk the
            database refuses is written again row by row: one row never stops it
    deletes the key scan (db.syncgone): rows the source no longer has are marked
            gone unless that is a mass delete; shape "messages": conversations
            whose message count changed are read again
    mark    next_mark (db.syncmark): the least of the greatest updated_at read,
            the horizon's clock and its oldest open transaction, in sync_state

`overlap_seconds` (default 60) is a margin for an application stamping rows
with a clock skewed against the database's; rows read again hash the same and
cost nothing. A pass that fails as a whole saves its reason in
sync_state.last_error and raises SyncError; the mark stays where it was.

This module imports nothing from fleet/ (only config/), producer/ or workers/.
"""

from __future__ import annotations

import copy
import datetime as dt
import json
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from sqlalchemy import Connection, Engine, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from config.taskconfig import SourceSpec
from db import history
from db.ledger import id_array
from db.syncgone import scan_deletes
from db.syncmark import next_mark, read_horizon
from db.syncreport import SyncError, SyncReport
from db.syncrows import CURSOR, build, groups, printable

__all__ = ["SyncError", "SyncReport", "read_records", "source_sql", "sync_source"]

KINDS = ("conversation", "audio")
ANALYZE_AFTER = 50_000  # rows written in one pass past which the fleet table is analyzed


# -- reading --------------------------------------------------------------------


def _incremental_where(spec: SourceSpec) -> str:
    # NULL cursors are read on every pass: nothing else can tell when they change.
    if spec.shape == "messages" and spec.kind == "conversation":
        # A grown conversation is read whole: every message of a conversation that
        # has any message (or header) at or after the mark.
        return (
            f"q.external_id IN (SELECT x.external_id FROM ({spec.select}) AS x "
            "WHERE x.updated_at >= :since OR x.updated_at IS NULL)"
        )
    return "(q.updated_at >= :since OR q.updated_at IS NULL)"


def source_sql(spec: SourceSpec, *, since: dt.datetime | None, ids: bool = False) -> str:
    """The statement a pass streams: the source, filtered by the mark (or by the
    external ids in :ids), ordered by external_id so that repeats arrive together.

    updated_at is also read as timestamptz (CURSOR): a `timestamp without time
    zone` column is taken in the source session's TimeZone, the zone `now()`
    wrote it in, and compared with the mark in that same zone."""
    where = ""
    if ids:
        where = "WHERE CAST(q.external_id AS text) = ANY(CAST(:ids AS text[]))"
    elif since is not None:
        where = f"WHERE {_incremental_where(spec)}"
    order = "q.external_id"
    if spec.shape == "messages" and spec.kind == "conversation":
        order += ", q.position"
    return (
        f"SELECT q.*, CAST(q.updated_at AS timestamptz) AS {CURSOR} "
        f"FROM ({spec.select}) AS q {where} ORDER BY {order}"
    )


def _require(columns: Sequence[str], spec: SourceSpec) -> None:
    need = {"external_id", "updated_at"}
    if spec.kind == "audio":
        need.add("uri")
    elif spec.shape == "messages":
        need |= {"role", "content", "position"}
    else:
        need.add("messages")
    missing = sorted(need - set(columns))
    if missing:
        raise SyncError(
            f"source {spec.name!r}: its rows have no column {', '.join(missing)} "
            f"(columns: {', '.join(c for c in columns if c != CURSOR)}); alias them in the "
            "query, e.g. `SELECT id::text AS external_id, ...`"
        )


def read_records(
    conn: Connection,
    spec: SourceSpec,
    *,
    since: dt.datetime | None,
    ids: Sequence[str] | None = None,
    on_rows: Callable[[int], None] | None = None,
) -> Iterator[list[dict[str, Any]]]:
    """Chunks of records (db.syncrows.build: one per external_id), streamed with a
    server-side cursor: memory holds one chunk whatever the source's size."""
    # The columns first (no rows): a missing one is named before the ordered read fails on it.
    _require(list(conn.execute(text(f"SELECT * FROM ({spec.select}) AS q LIMIT 0")).keys()), spec)
    stmt = text(source_sql(spec, since=since, ids=ids is not None))
    params: dict[str, Any] = {"since": since} if since is not None else {}
    if ids is not None:
        params = {"ids": list(ids)}
    result = conn.execution_options(stream_results=True, yield_per=spec.chunk).execute(stmt, params)

    def parts() -> Iterator[list[dict[str, Any]]]:
        for part in result.mappings().partitions(spec.chunk):
            if on_rows:
                on_rows(len(part))
            yield [dict(r) for r in part]

    for chunk in groups(parts()):
        yield [build(g, spec) for g in chunk]


# -- writing --------------------------------------------------------------------


def _jsonable(rec: dict[str, Any], spec: SourceSpec) -> dict[str, Any]:
    row = {
        "external_id": str(rec["external_id"]),
        "source": spec.name,
        "content_hash": rec["hash"],
        "source_updated_at": rec["updated_at"].isoformat() if rec["updated_at"] else None,
    }
    if spec.kind == "conversation":
        row |= {"messages": rec["messages"], "language": rec.get("language")}
    else:
        row |= {"uri": str(rec["uri"]), "duration_s": rec.get("duration_s")}
    return row


_COLUMNS = {
    "conversation": (
        "external_id, source, content_hash, source_updated_at, messages, language",
        "external_id varchar, source varchar, content_hash varchar, "
        "source_updated_at timestamptz, messages jsonb, language varchar",
        "messages = r.messages, language = r.language",
    ),
    "audio": (
        "external_id, source, content_hash, source_updated_at, uri, duration_s",
        "external_id varchar, source varchar, content_hash varchar, "
        "source_updated_at timestamptz, uri text, duration_s float8",
        "uri = r.uri, duration_s = r.duration_s",
    ),
}


def save_problems(
    session: Session, source: str, problems: dict[str, tuple[str, bool]], clean: Sequence[str]
) -> None:
    """Record (or refresh) each row's problem, and forget those of rows read clean."""
    if problems:
        session.execute(
            text(
                """
                INSERT INTO sync_problems (source, external_id, reason, refused)
                SELECT :s, r.external_id, r.reason, r.refused
                FROM json_to_recordset(CAST(:rows AS json))
                     AS r(external_id varchar, reason text, refused boolean)
                ON CONFLICT (source, external_id) DO UPDATE SET
                    reason = EXCLUDED.reason, refused = EXCLUDED.refused, last_seen = now()
                """
            ),
            {
                "s": source,
                "rows": json.dumps(
                    [
                        {"external_id": printable(e)[:256], "reason": printable(r), "refused": f}
                        for e, (r, f) in problems.items()
                    ],
                    ensure_ascii=False,
                ),
            },
        )
    if clean:
        session.execute(
            text(
                "DELETE FROM sync_problems WHERE source = :s "
                "AND external_id = ANY(CAST(:ids AS text[]))"
            ),
            {"s": source, "ids": list(clean)},
        )


def apply_chunk(
    session: Session, spec: SourceSpec, records: Sequence[dict[str, Any]], report: SyncReport
) -> None:
    """Compare one chunk with the stored rows and write only what changed; record
    each refused or noted row in sync_problems (db.syncrows decides which)."""
    table = history.TABLES[spec.kind]
    good: dict[str, dict[str, Any]] = {}
    problems: dict[str, tuple[str, bool]] = {}
    clean: list[str] = []
    for rec in records:
        ext = "" if rec["external_id"] is None else str(rec["external_id"])
        stamp = rec["updated_at"]
        if stamp is not None and (report.greatest_read is None or stamp > report.greatest_read):
            report.greatest_read = stamp
        if rec["refused"]:
            report.bad.append((ext[:80], rec["refused"]))
            problems[ext] = (rec["refused"], True)
            continue
        good[ext] = rec
        if rec["notes"]:
            report.notes.append((ext[:80], "; ".join(rec["notes"])))
            problems[ext] = ("; ".join(rec["notes"]), False)
        else:
            clean.append(ext)
    report.records += len(records)
    save_problems(session, spec.name, problems, clean)
    if not good:
        return
    # external_id is unique per source (uq_<table>_source_external_id): another
    # source's row, or a `fleet ingest` one, with the same id is a different row.
    stored = {
        ext: (sid, digest, gone)
        for sid, ext, digest, gone in session.execute(
            text(
                f"SELECT id, external_id, content_hash, gone_at IS NOT NULL FROM {table} "
                "WHERE source = :source AND external_id = ANY(CAST(:ids AS text[]))"
            ),
            {"source": spec.name, "ids": list(good)},
        )
    }
    new: list[dict[str, Any]] = []
    changed: list[dict[str, Any]] = []
    back: list[int] = []  # gone rows back with the content they had: results restored
    for ext, rec in good.items():
        if ext not in stored:
            new.append(_jsonable(rec, spec))
            continue
        sid, old_digest, gone = stored[ext]
        if old_digest == rec["hash"]:
            if gone:
                back.append(sid)
            else:
                report.unchanged += 1
        else:
            changed.append(_jsonable(rec, spec) | {"id": sid})
            report.returned += int(gone)
    cols, types, sets = _COLUMNS[spec.kind]
    if new:
        got = session.execute(
            text(
                f"""
                INSERT INTO {table} ({cols})
                SELECT {cols} FROM json_to_recordset(CAST(:rows AS json)) AS r({types})
                ON CONFLICT (source, external_id) DO NOTHING
                """
            ),
            {"rows": json.dumps(new, ensure_ascii=False)},
        )
        report.new += max(getattr(got, "rowcount", len(new)), 0)
    if back:
        session.execute(
            text(f"UPDATE {table} SET gone_at = NULL WHERE id = ANY(CAST(:ids AS bigint[]))"),
            {"ids": id_array(back)},
        )
        report.returned += len(back)
        items = history.items_of_sources(session, source_kind=spec.kind, source_ids=back)
        report.restored += history.restore_gone(session, item_ids=items)
    if changed:
        ids = list(
            session.execute(
                text(
                    f"""
                    UPDATE {table} t
                    SET {sets}, content_hash = r.content_hash,
                        source_updated_at = r.source_updated_at, gone_at = NULL
                    FROM json_to_recordset(CAST(:rows AS json)) AS r(id bigint, {types})
                    WHERE t.id = r.id
                    RETURNING t.id
                    """
                ),
                {"rows": json.dumps(changed, ensure_ascii=False)},
            ).scalars()
        )
        report.changed += len(ids)
        items = history.items_of_sources(session, source_kind=spec.kind, source_ids=ids)
        report.items_reset += history.reset_items(session, item_ids=items, reason="content_changed")


def _apply(
    fleet: Engine, spec: SourceSpec, records: list[dict[str, Any]], report: SyncReport
) -> None:
    """apply_chunk in its own transaction; a chunk the database refuses is applied
    again row by row, so one row it cannot take never stops the source."""
    saved = copy.deepcopy(report.__dict__)
    try:
        with Session(fleet) as session, session.begin():
            apply_chunk(session, spec, records, report)
        return
    except DBAPIError:
        if len(records) == 1:
            raise
        report.__dict__.update(saved)
    for rec in records:
        saved = copy.deepcopy(report.__dict__)
        try:
            with Session(fleet) as session, session.begin():
                apply_chunk(session, spec, [rec], report)
        except DBAPIError as e:
            report.__dict__.update(saved)
            first = str(e.orig).splitlines()[0] if e.orig else str(e)
            rec = rec | {"refused": f"the fleet's database refused the row: {first}"}
            with Session(fleet) as session, session.begin():
                apply_chunk(session, spec, [rec], report)


# -- the pass ---------------------------------------------------------------------


def load_watermark(session: Session, source: str) -> dt.datetime | None:
    return session.execute(
        text("SELECT watermark FROM sync_state WHERE source = :s"), {"s": source}
    ).scalar_one_or_none()


def save_state(session: Session, report: SyncReport) -> None:
    """The pass' mark and counts; a failed pass keeps the old mark and says why."""
    session.execute(
        text(
            """
            INSERT INTO sync_state (source, watermark, last_sync_at, last_full_at, counts,
                                    last_error, last_error_at)
            VALUES (:s, :wm, CASE WHEN CAST(:error AS text) IS NULL THEN now() END,
                    CASE WHEN :full AND CAST(:error AS text) IS NULL THEN now() END,
                    CAST(:counts AS jsonb), CAST(:error AS text),
                    CASE WHEN CAST(:error AS text) IS NOT NULL THEN now() END)
            ON CONFLICT (source) DO UPDATE SET
                watermark = GREATEST(sync_state.watermark, EXCLUDED.watermark),
                last_sync_at = COALESCE(EXCLUDED.last_sync_at, sync_state.last_sync_at),
                last_full_at = COALESCE(EXCLUDED.last_full_at, sync_state.last_full_at),
                counts = EXCLUDED.counts,
                last_error = EXCLUDED.last_error,
                last_error_at = COALESCE(EXCLUDED.last_error_at, sync_state.last_error_at)
            """
        ),
        {
            "s": report.source,
            "wm": report.watermark if report.error is None else None,
            "full": report.full,
            "error": report.error,
            "counts": json.dumps(report.as_dict()),
        },
    )


def sync_source(
    fleet: Engine,
    source: Engine,
    spec: SourceSpec,
    *,
    full: bool = False,
    detect_deletes: bool | None = None,
    allow_mass_delete: bool = False,
    progress: Callable[[int], None] | None = None,
) -> SyncReport:
    """One pass over a source (see the module docstring). `fleet` and `source`
    may be the same engine. Each chunk commits on its own: a pass that stops
    half way leaves what it wrote consistent, and the watermark is saved only
    at the end, so the next pass reads those rows again (and finds them unchanged).

    Raises SyncError when the source's columns do not match its declared shape
    or its query fails (the failure is saved in sync_state.last_error first).
    """
    started = time.perf_counter()
    with Session(fleet) as s:
        watermark = load_watermark(s, spec.name)
        since_wall = s.execute(text("SELECT now()")).scalar_one()
    full = full or watermark is None
    since = (
        None
        if full or watermark is None
        else watermark - dt.timedelta(seconds=spec.overlap_seconds)
    )
    report = SyncReport(spec.name, full=full, watermark=watermark)

    def counted(n: int) -> None:
        report.read += n
        if progress:
            progress(n)

    try:
        with source.connect() as src:
            horizon = read_horizon(src)
            for records in read_records(src, spec, since=since, on_rows=counted):
                _apply(fleet, spec, records, report)
        report.read_seconds = time.perf_counter() - started
        report.watermark, note = next_mark(watermark, report.greatest_read, horizon)
        if note:
            report.warnings.append(note)
        # A full pass always looks for deleted rows; an incremental one when the
        # source asks for it (or the caller, e.g. a trigger marked a DELETE).
        scan = (spec.detect_deletes or full) if detect_deletes is None else detect_deletes
        if scan:
            t0 = time.perf_counter()
            recount = scan_deletes(fleet, source, spec, report, allow=allow_mass_delete)
            if recount:
                report.reread = len(recount)
                with source.connect() as src:
                    for records in read_records(src, spec, since=None, ids=recount):
                        _apply(fleet, spec, records, report)
            report.delete_scan_seconds = time.perf_counter() - t0
    except Exception as e:
        if isinstance(e, SyncError):
            report.error = str(e)
        elif isinstance(e, DBAPIError):
            first = str(e.orig).splitlines()[0] if e.orig else str(e)
            report.error = f"source {spec.name!r}: the query failed: {first}"
        else:
            raise
        with Session(fleet) as session, session.begin():
            save_state(session, report)
        raise SyncError(report.error) from e
    with Session(fleet) as session, session.begin():
        if report.new + report.changed >= ANALYZE_AFTER:
            # Planner statistics for the next pass' lookups and resets (see ledger.analyze).
            session.execute(text(f"ANALYZE {history.TABLES[spec.kind]}"))
        if full:  # every row was read: problems of rows not read are gone with them
            session.execute(
                text("DELETE FROM sync_problems WHERE source = :s AND last_seen < :t"),
                {"s": spec.name, "t": since_wall},
            )
        save_state(session, report)
    report.seconds = time.perf_counter() - started
    return report
