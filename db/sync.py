"""Keeping the fleet's copy of a source in step with the user's own tables.

A source (`[sources.<name>]` in the task config, parsed by fleet.config.taskconfig) is
a SQL query or a table on the fleet's database or a separate one
(FLEET_SOURCE_DATABASE_URL). Its columns map to the fleet's shape:

    conversation, shape "conversation":  external_id, messages (jsonb [{role, content}]),
                                         language (optional), updated_at
    conversation, shape "messages":      external_id, role, content, position,
                                         language (optional), updated_at
                                         (one row per message; folded here in position order)
    audio:                               external_id, uri, duration_s (optional), updated_at

One pass (`sync_source`):

    read    stream the rows with a server-side cursor, `chunk` rows at a time
            (flat memory at any size); incremental passes read only rows with
            updated_at >= watermark - overlap, a full pass reads them all
    compare hash each row's content (blake2b of its canonical JSON) against the
            stored hash of this source's row with the same external_id (ids are
            unique per source, not across sources: uq_<table>_source_external_id):
            an unchanged row costs one indexed lookup, no write
    write   new rows are inserted (discovery then gives them work items); a row
            whose hash changed is updated, and every work item of it goes back to
            pending with its old result moved to result_history (db.history)
    deletes with `detect_deletes` (default) every pass streams the source's keys
            into a temporary table; a stored row the source no longer has is
            marked gone, its items `gone` (on_delete = "delete": removed)
    mark    the watermark (greatest updated_at read) is stored in sync_state

Ties and late commits at the watermark: the next pass reads from the watermark
minus `overlap_seconds` (default 60), so a row committed with an updated_at
just below the last watermark is still seen; the rows read again in the overlap
hash the same and cost nothing.

This module imports nothing from fleet/ (but its config, fleet.config), producer/ or workers/.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection, Engine, text
from sqlalchemy.orm import Session

from db import history
from db.ledger import id_array
from fleet.config.taskconfig import SourceSpec

KINDS = ("conversation", "audio")
MAX_EXTERNAL_ID = 256  # conversations.external_id is String(256)
MAX_LANGUAGE = 16
ANALYZE_AFTER = 50_000  # rows written in one pass past which the fleet table is analyzed


class SyncError(RuntimeError):
    """A source cannot be read as declared (a missing column, a failing query)."""


@dataclass
class SyncReport:
    source: str
    full: bool
    read: int = 0  # source rows read (messages shape: message rows)
    records: int = 0  # conversations / audio files after folding
    new: int = 0
    changed: int = 0
    unchanged: int = 0
    gone: int = 0
    deleted: int = 0
    returned: int = 0  # gone rows that came back
    items_reset: int = 0
    bad: list[tuple[str, str]] = field(default_factory=list)  # (external_id or "", reason)
    watermark: dt.datetime | None = None
    seconds: float = 0.0
    read_seconds: float = 0.0  # content pass
    delete_scan_seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k != "bad"}
        d["watermark"] = self.watermark.isoformat() if self.watermark else None
        d["bad"] = [{"external_id": e, "reason": r} for e, r in self.bad[:100]]
        d["bad_count"] = len(self.bad)
        return d


# -- reading --------------------------------------------------------------------


def content_hash(record: dict[str, Any], kind: str) -> str:
    """Hex blake2b (128 bits) of the content that classification reads (its
    canonical JSON: sorted keys, no spaces). Raises ValueError, with the reason,
    for content Postgres cannot store (a NUL character, an unpaired surrogate)."""
    if kind == "conversation":
        body: Any = [record["messages"], record.get("language")]
    else:
        body = [record["uri"], record.get("duration_s")]
    raw = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    if "\\u0000" in raw or "\x00" in raw:
        raise ValueError("content holds a NUL character (\\u0000), which Postgres cannot store")
    try:
        data = raw.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(
            "content holds an unpaired UTF-16 surrogate, which is not valid Unicode"
        ) from None
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def _incremental_where(spec: SourceSpec) -> str:
    if spec.shape == "messages" and spec.kind == "conversation":
        # A grown conversation is read whole: every message of a conversation that
        # has any message (or header) at or after the mark.
        return (
            f"q.external_id IN (SELECT x.external_id FROM ({spec.select}) AS x "
            "WHERE x.updated_at >= :since)"
        )
    return "q.updated_at >= :since"


def source_sql(spec: SourceSpec, *, since: dt.datetime | None) -> str:
    """The statement a pass streams: the source, filtered by the mark, in fold order."""
    where = f"WHERE {_incremental_where(spec)}" if since is not None else ""
    order = (
        "ORDER BY q.external_id, q.position"
        if spec.shape == "messages" and spec.kind == "conversation"
        else ""
    )
    return f"SELECT * FROM ({spec.select}) AS q {where} {order}"


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
            f"(columns: {', '.join(columns)}); alias them in the query, e.g. "
            f"`SELECT id::text AS external_id, ...`"
        )


def _ts(value: Any) -> dt.datetime | None:
    if value is None:
        return None
    if isinstance(value, dt.datetime):
        return value if value.tzinfo else value.replace(tzinfo=dt.UTC)
    if isinstance(value, dt.date):
        return dt.datetime(value.year, value.month, value.day, tzinfo=dt.UTC)
    raise SyncError(f"updated_at must be a timestamp, got {type(value).__name__} {value!r}")


def _record(row: dict[str, Any], kind: str) -> dict[str, Any]:
    if kind == "audio":
        return {
            "external_id": row["external_id"],
            "uri": row["uri"],
            "duration_s": row.get("duration_s"),
            "updated_at": _ts(row["updated_at"]),
        }
    messages = row["messages"]
    if isinstance(messages, str | bytes):
        try:
            messages = json.loads(messages)
        except ValueError:
            pass  # stored as given: the worker says what is wrong with it
    return {
        "external_id": row["external_id"],
        "messages": messages,
        "language": row.get("language"),
        "updated_at": _ts(row["updated_at"]),
    }


def _fold(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Message rows of one conversation (in position order) -> one record."""
    stamps = [t for t in (_ts(r["updated_at"]) for r in rows) if t is not None]
    return {
        "external_id": rows[0]["external_id"],
        "messages": [{"role": r["role"], "content": r["content"]} for r in rows],
        "language": next((r.get("language") for r in rows if r.get("language")), None),
        "updated_at": max(stamps) if stamps else None,
    }


def read_records(
    conn: Connection,
    spec: SourceSpec,
    *,
    since: dt.datetime | None,
    on_rows: Callable[[int], None] | None = None,
) -> Iterator[list[dict[str, Any]]]:
    """Chunks of records (conversations folded), streamed with a server-side
    cursor: memory holds one chunk whatever the source's size."""
    stmt = text(source_sql(spec, since=since))
    params = {"since": since} if since is not None else {}
    result = conn.execution_options(stream_results=True, yield_per=spec.chunk).execute(stmt, params)
    columns = list(result.keys())
    _require(columns, spec)
    folding = spec.kind == "conversation" and spec.shape == "messages"
    carry: list[dict[str, Any]] = []
    for part in result.mappings().partitions(spec.chunk):
        if on_rows:
            on_rows(len(part))
        if not folding:
            yield [_record(dict(r), spec.kind) for r in part]
            continue
        out: list[dict[str, Any]] = []
        for r in part:
            row = dict(r)
            if carry and row["external_id"] != carry[0]["external_id"]:
                out.append(_fold(carry))
                carry = []
            carry.append(row)
        if out:
            yield out
    if carry:
        yield [_fold(carry)]


def keys_sql(spec: SourceSpec) -> str:
    """Every external_id the source has now (duplicates allowed: the anti-join ignores them)."""
    return f"SELECT CAST(q.external_id AS text) FROM ({spec.select}) AS q"


# -- writing --------------------------------------------------------------------


def _check(rec: dict[str, Any]) -> str | None:
    """Why a record cannot be stored at all (the item cannot even be created)."""
    ext = rec["external_id"]
    if ext is None or str(ext) == "":
        return "no external_id"
    if len(str(ext)) > MAX_EXTERNAL_ID:
        return f"external_id is {len(str(ext)):,} characters; at most {MAX_EXTERNAL_ID} are stored"
    lang = rec.get("language")
    if isinstance(lang, str) and len(lang) > MAX_LANGUAGE:
        return f"language {lang[:20]!r} is longer than {MAX_LANGUAGE} characters; use a code such as 'en'"
    return None


def _jsonable(rec: dict[str, Any], spec: SourceSpec, digest: str) -> dict[str, Any]:
    row = {
        "external_id": str(rec["external_id"]),
        "source": spec.name,
        "content_hash": digest,
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


def apply_chunk(
    session: Session, spec: SourceSpec, records: Sequence[dict[str, Any]], report: SyncReport
) -> None:
    """Compare one chunk with the stored rows and write only what changed."""
    table = history.TABLES[spec.kind]
    good: dict[str, tuple[dict[str, Any], str]] = {}
    for rec in records:
        problem = _check(rec)
        if problem is None:
            try:
                digest = content_hash(rec, spec.kind)
            except (TypeError, ValueError) as e:
                problem = str(e)
        if problem:
            report.bad.append((str(rec["external_id"] or "")[:80], problem))
            continue
        good[str(rec["external_id"])] = (rec, digest)  # a key twice in a chunk: last wins
        if rec["updated_at"] is not None and (
            report.watermark is None or rec["updated_at"] > report.watermark
        ):
            report.watermark = rec["updated_at"]
    report.records += len(records)
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
    for ext, (rec, digest) in good.items():
        if ext not in stored:
            new.append(_jsonable(rec, spec, digest))
            continue
        sid, old_digest, gone = stored[ext]
        if old_digest == digest and not gone:
            report.unchanged += 1
        else:
            changed.append(_jsonable(rec, spec, digest) | {"id": sid})
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


def apply_gone(session: Session, spec: SourceSpec, report: SyncReport, *, seen_table: str) -> None:
    """Rows of this source that the key scan did not see: gone (or deleted)."""
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
    if not ids:
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


# -- the pass ---------------------------------------------------------------------


def load_watermark(session: Session, source: str) -> dt.datetime | None:
    return session.execute(
        text("SELECT watermark FROM sync_state WHERE source = :s"), {"s": source}
    ).scalar_one_or_none()


def save_state(session: Session, report: SyncReport) -> None:
    session.execute(
        text(
            """
            INSERT INTO sync_state (source, watermark, last_sync_at, last_full_at, counts)
            VALUES (:s, :wm, now(), CASE WHEN :full THEN now() END, CAST(:counts AS jsonb))
            ON CONFLICT (source) DO UPDATE SET
                watermark = GREATEST(sync_state.watermark, EXCLUDED.watermark),
                last_sync_at = now(),
                last_full_at = COALESCE(EXCLUDED.last_full_at, sync_state.last_full_at),
                counts = EXCLUDED.counts
            """
        ),
        {
            "s": report.source,
            "wm": report.watermark,
            "full": report.full,
            "counts": json.dumps(report.as_dict()),
        },
    )


def _scan_deletes(fleet: Engine, source: Engine, spec: SourceSpec, report: SyncReport) -> None:
    """Copy the source's keys into a temporary table, then mark the rest gone.

    COPY ... TO STDOUT on the source feeds COPY ... FROM STDIN on the fleet, block
    by block: the keys never become Python objects, and memory holds one block."""
    with fleet.connect() as conn, source.connect() as src:
        conn.execute(
            text("CREATE TEMPORARY TABLE fleet_sync_seen (external_id text) ON COMMIT DROP")
        )
        into = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
        out = src.connection.driver_connection.cursor()  # type: ignore[union-attr]
        with (
            out.copy(f"COPY ({keys_sql(spec)}) TO STDOUT") as reader,
            into.copy("COPY fleet_sync_seen (external_id) FROM STDIN") as writer,
        ):
            for block in reader:
                writer.write(block)
        src.rollback()
        # An index, so the anti-join stays cheap whatever the planner believes about
        # a table this pass has just filled (stale statistics pick a nested loop).
        conn.execute(text("CREATE INDEX ON fleet_sync_seen (external_id)"))
        conn.execute(text("ANALYZE fleet_sync_seen"))
        with Session(bind=conn) as session:
            apply_gone(session, spec, report, seen_table="fleet_sync_seen")
            session.flush()
        conn.commit()


def sync_source(
    fleet: Engine,
    source: Engine,
    spec: SourceSpec,
    *,
    full: bool = False,
    detect_deletes: bool | None = None,
    progress: Callable[[int], None] | None = None,
) -> SyncReport:
    """One pass over a source (see the module docstring). `fleet` and `source`
    may be the same engine. Each chunk commits on its own: a pass that stops
    half way leaves what it wrote consistent, and the watermark is saved only
    at the end, so the next pass reads those rows again (and finds them unchanged).

    Raises SyncError when the source's columns do not match its declared shape.
    """
    started = time.perf_counter()
    with Session(fleet) as s:
        watermark = load_watermark(s, spec.name)
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
            for records in read_records(src, spec, since=since, on_rows=counted):
                with Session(fleet) as session, session.begin():
                    apply_chunk(session, spec, records, report)
        report.read_seconds = time.perf_counter() - started
        # A full pass always looks for deleted rows; an incremental one when the
        # source asks for it (or the caller, e.g. a trigger marked a DELETE).
        scan = (spec.detect_deletes or full) if detect_deletes is None else detect_deletes
        if scan:
            t0 = time.perf_counter()
            _scan_deletes(fleet, source, spec, report)
            report.delete_scan_seconds = time.perf_counter() - t0
    except SyncError:
        raise
    except Exception as e:
        from sqlalchemy.exc import DBAPIError

        if isinstance(e, DBAPIError):
            first = str(e.orig).splitlines()[0] if e.orig else str(e)
            raise SyncError(f"source {spec.name!r}: the query failed: {first}") from e
        raise
    with Session(fleet) as session, session.begin():
        if report.new + report.changed >= ANALYZE_AFTER:
            # Planner statistics for the next pass' lookups and resets (see ledger.analyze).
            session.execute(text(f"ANALYZE {history.TABLES[spec.kind]}"))
        save_state(session, report)
    report.seconds = time.perf_counter() - started
    return report
