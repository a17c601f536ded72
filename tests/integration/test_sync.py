"""db.sync and db.history on the real Postgres: an application database of its
own (app.conversations + app.messages), synced into the fleet's database."""

from __future__ import annotations

import datetime as dt
import io
import json
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import text

from config.taskconfig import SourceSpec
from db import history, ledger, triggers
from db.engine import get_engine, transaction
from db.sources import ingest_conversations
from db.sync import SyncError, sync_source
from fleet.reporting.export import evaluate, export
from tests.appdb import QUERY, add_conversation, create_app_database, sql
from tests.support import drop_database

APP = SourceSpec(name="app", shape="messages", query=QUERY, chunk=3, overlap_seconds=30)


@pytest.fixture
def app_db() -> Iterator[tuple[str, str]]:
    name, url, plain = create_app_database()
    try:
        yield url, plain
    finally:
        drop_database(name)


def _sync(db_url: str, app_url: str, spec: SourceSpec = APP, **kw: Any):
    return sync_source(get_engine(db_url), get_engine(app_url), spec, **kw)


def _classify(db_url: str, task: str, label: str, revision: str = "rev-1") -> int:
    """Run the ledger as a worker would: claim, start, finish with one label."""
    with transaction(db_url) as s:
        ledger.discover(s, task=task, source_kind="conversation")
        batches = ledger.claim_batches(s, task=task, limit=1000, batch_size=1000, lease_seconds=60)
    done = 0
    for b in batches:
        with transaction(db_url) as s:
            ledger.start_batch(
                s, batch_id=b.batch_id, item_ids=b.item_ids, worker="w", lease_seconds=60
            )
            outcome = [
                ledger.Outcome(
                    i,
                    {
                        "label": label,
                        "confidence": 0.9,
                        "scores": {label: 0.9},
                        "output": None,
                        "model_name": "m",
                        "model_revision": revision,
                        "model_tier": 0,
                        "device": "cpu",
                        "latency_ms": 1.0,
                    },
                )
                for i in b.item_ids
            ]
            done += ledger.finish_batch(s, batch_id=b.batch_id, outcomes=outcome).done
    return done


def _messages(db_url: str, ext: str, source: str | None = "app") -> list[dict[str, str]]:
    """The stored messages of one row; external ids are unique per source (None: ingest)."""
    with transaction(db_url) as s:
        return s.execute(
            text(
                "SELECT messages FROM conversations "
                "WHERE external_id = :e AND source IS NOT DISTINCT FROM :s"
            ),
            {"e": ext, "s": source},
        ).scalar_one()


def _status(db_url: str, ext: str, task: str = "intent", source: str | None = "app") -> str:
    with transaction(db_url) as s:
        return s.execute(
            text(
                "SELECT w.status FROM work_items w JOIN conversations c ON c.id = w.source_id "
                "WHERE c.external_id = :e AND c.source IS NOT DISTINCT FROM :s AND w.task = :t"
            ),
            {"e": ext, "s": source, "t": task},
        ).scalar_one()


def test_first_pass_folds_messages_across_chunks(db_url, app_db):
    app_url, plain = app_db
    for cid in range(1, 6):  # 1..5 messages each: conversations straddle 3-row chunks
        add_conversation(
            plain,
            cid,
            [("user" if i % 2 == 0 else "assistant", f"c{cid} m{i}") for i in range(cid)],
        )
    report = _sync(db_url, app_url)
    assert report.full and report.read == 15 and report.records == 5 and report.new == 5
    assert _messages(db_url, "4") == [
        {"role": "user", "content": "c4 m0"},
        {"role": "assistant", "content": "c4 m1"},
        {"role": "user", "content": "c4 m2"},
        {"role": "assistant", "content": "c4 m3"},
    ]
    with transaction(db_url) as s:
        row = s.execute(
            text("SELECT source, content_hash, language FROM conversations WHERE external_id = '1'")
        ).one()
        state = s.execute(
            text("SELECT watermark, last_full_at FROM sync_state WHERE source = 'app'")
        ).one()
    assert row.source == "app" and len(row.content_hash) == 32 and row.language == "en"
    assert state.watermark is not None and state.last_full_at is not None
    # Nothing changed: the incremental pass reads only the overlap and writes nothing.
    again = _sync(db_url, app_url)
    assert not again.full and again.new == again.changed == 0 and again.gone == 0


def test_edit_grow_delete_and_history(db_url, app_db):
    app_url, plain = app_db
    for cid in (1, 2, 3, 4):
        add_conversation(plain, cid, [("user", f"hello {cid}"), ("assistant", "hi")])
    _sync(db_url, app_url)
    assert _classify(db_url, "intent", "chitchat") == 4
    assert _classify(db_url, "sentiment", "neutral") == 4

    sql(
        plain,
        "UPDATE app.messages SET body = 'my report is late', updated_at = now() WHERE conversation_id = 1 AND seq = 0",
    )
    sql(
        plain,
        "INSERT INTO app.messages (conversation_id, seq, role, body) VALUES (2, 2, 'user', 'and my deadline')",
    )
    sql(plain, "DELETE FROM app.conversations WHERE id = 3")
    report = _sync(db_url, app_url)
    assert (report.changed, report.gone, report.new) == (2, 1, 0)
    assert report.items_reset == 4  # two conversations x two tasks
    assert _messages(db_url, "2")[-1] == {"role": "user", "content": "and my deadline"}
    for task in ("intent", "sentiment"):
        assert _status(db_url, "1", task) == "pending"
        assert _status(db_url, "2", task) == "pending"
        assert _status(db_url, "3", task) == "gone"
        assert _status(db_url, "4", task) == "done"
    with transaction(db_url) as s:
        hist = s.execute(
            text(
                "SELECT source, external_id, task, label, model_revision, reason "
                "FROM result_history ORDER BY 2, 3"
            )
        ).all()
        gone_error = s.execute(
            text("SELECT DISTINCT last_error FROM work_items WHERE status = 'gone'")
        ).scalar_one()
        # Gone items are never discovered or claimed again.
        assert ledger.discover(s, task="intent", source_kind="conversation") == 0
        assert ledger.discover(s, task="topic", source_kind="conversation") == 3
    # Each history row names the source of its row: an external_id alone is not unique.
    assert [tuple(h) for h in hist] == [
        ("app", "1", "intent", "chitchat", "rev-1", "content_changed"),
        ("app", "1", "sentiment", "neutral", "rev-1", "content_changed"),
        ("app", "2", "intent", "chitchat", "rev-1", "content_changed"),
        ("app", "2", "sentiment", "neutral", "rev-1", "content_changed"),
        ("app", "3", "intent", "chitchat", "rev-1", "gone"),
        ("app", "3", "sentiment", "neutral", "rev-1", "gone"),
    ]
    assert "disappeared from source 'app'" in gone_error

    # Re-classified: the view shows the new label; history keeps the old one.
    assert _classify(db_url, "intent", "professional", revision="rev-2") == 2
    with transaction(db_url) as s:
        view = {
            r.external_id: r
            for r in s.execute(text("SELECT * FROM fleet_latest_results WHERE task = 'intent'"))
        }
    assert set(view) == {"1", "2", "4"}
    assert (view["1"].label, view["1"].model_revision, view["1"].source) == (
        "professional",
        "rev-2",
        "app",
    )
    assert view["4"].label == "chitchat"

    # The row comes back: its items are pending again.
    add_conversation(plain, 3, [("user", "back again")])
    back = _sync(db_url, app_url)
    assert back.returned == 1 and _status(db_url, "3") == "pending"


def test_view_columns_are_the_contract(db_url):
    with transaction(db_url) as s:
        cols = [
            r[0]
            for r in s.execute(
                text(
                    "SELECT column_name FROM information_schema.columns "
                    "WHERE table_name = 'fleet_latest_results' ORDER BY ordinal_position"
                )
            )
        ]
    assert cols == [
        "external_id",
        "source",
        "source_kind",
        "task",
        "label",
        "confidence",
        "scores",
        "output",
        "model",
        "model_revision",
        "updated_at",
        "stale",
        "confirmed_label",
        "decided_by",
        "escalated",
        "first_label",
        "escalation_note",
    ]


def test_overlap_catches_a_late_commit_below_the_watermark(db_url, app_db):
    app_url, plain = app_db
    add_conversation(plain, 1, [("user", "first")])
    _sync(db_url, app_url)
    # A row whose transaction committed late, stamped 3 s before the watermark.
    sql(
        plain,
        "INSERT INTO app.conversations (id, language, updated_at) VALUES (2, 'en', now() - interval '3 seconds')",
    )
    sql(
        plain,
        "INSERT INTO app.messages (conversation_id, seq, role, body, updated_at) VALUES (2, 0, 'user', 'late', now() - interval '3 seconds')",
    )
    assert _sync(db_url, app_url).new == 1
    # Outside the overlap it needs a full pass.
    sql(
        plain,
        "INSERT INTO app.conversations (id, language, updated_at) VALUES (3, 'en', now() - interval '1 hour')",
    )
    sql(
        plain,
        "INSERT INTO app.messages (conversation_id, seq, role, body, updated_at) VALUES (3, 0, 'user', 'old', now() - interval '1 hour')",
    )
    assert _sync(db_url, app_url).new == 0
    assert _sync(db_url, app_url, full=True).new == 1


def test_conversation_shape_on_the_fleet_database_and_bad_rows(db_url):
    """A jsonb-messages table in the fleet's own database; rows that cannot be
    stored are reported with their reason, the rest go in."""
    with transaction(db_url) as s:
        s.execute(text("CREATE TABLE inbox (id text, msgs jsonb, lang text, changed timestamptz)"))
        s.execute(
            text(
                'INSERT INTO inbox VALUES (\'a\', \'[{"role": "user", "content": "hi"}]\', \'en\', now()),'
                " (NULL, '[]', 'en', now()), ('b', '[]', 'english-as-spoken-in-ireland', now()),"
                ' (\'taken\', \'[{"role": "user", "content": "x"}]\', \'en\', now())'
            )
        )
        ingest_conversations(s, [{"external_id": "taken", "messages": [], "language": "en"}])
    spec = SourceSpec(
        name="inbox",
        query="SELECT id AS external_id, msgs AS messages, lang AS language, changed AS updated_at FROM inbox",
    )
    report = _sync(db_url, db_url, spec)
    # 'taken' was ingested from a file too: ids are unique per source, so the
    # source's 'taken' is a row of its own, not a conflict.
    assert report.new == 2
    reasons = dict(report.bad)
    assert reasons == {"": "no external_id", "b": reasons["b"]}
    assert "longer than 16" in reasons["b"]
    assert _messages(db_url, "taken", source=None) == []
    assert _messages(db_url, "taken", source="inbox") == [{"role": "user", "content": "x"}]


def test_two_sources_with_the_same_ids_are_rows_of_their_own(db_url, app_db):
    """Two sources that both number their rows 1, 2, 3, and a file-ingested
    conversation with the same id: external ids are unique per source, so every
    one is its own row, classified on its own; an edit or a delete in one source
    touches only that source's row."""
    app_url, plain = app_db
    for cid in (1, 2, 3):
        add_conversation(plain, cid, [("user", f"app {cid}")])
    with transaction(db_url) as s:
        s.execute(text("CREATE TABLE crm (id int, msgs jsonb, changed timestamptz)"))
        s.execute(
            text(
                "INSERT INTO crm SELECT i, jsonb_build_array(jsonb_build_object("
                "'role', 'user', 'content', 'crm ' || i)), now() FROM generate_series(1, 3) i"
            )
        )
        assert ingest_conversations(s, [{"external_id": "1", "messages": [], "language": "en"}])
    crm = SourceSpec(
        name="crm",
        query="SELECT id::text AS external_id, msgs AS messages, changed AS updated_at FROM crm",
    )
    first_app, first_crm = _sync(db_url, app_url), _sync(db_url, db_url, crm)
    assert (first_app.new, first_app.bad) == (3, [])
    assert (first_crm.new, first_crm.bad) == (3, [])
    # Idempotent: ingesting the same file again inserts nothing, syncing again writes nothing.
    with transaction(db_url) as s:
        assert (
            ingest_conversations(s, [{"external_id": "1", "messages": [], "language": "en"}]) == 0
        )
    assert _sync(db_url, db_url, crm, full=True).unchanged == 3
    assert _classify(db_url, "intent", "chitchat") == 7
    assert _messages(db_url, "2", "app") == [{"role": "user", "content": "app 2"}]
    assert _messages(db_url, "2", "crm") == [{"role": "user", "content": "crm 2"}]
    assert _messages(db_url, "1", None) == []

    # An edit and a delete in crm: only crm's rows change.
    with transaction(db_url) as s:
        s.execute(
            text(
                'UPDATE crm SET msgs = \'[{"role": "user", "content": "crm edited"}]\', '
                "changed = now() WHERE id = 2"
            )
        )
        s.execute(text("DELETE FROM crm WHERE id = 3"))
    report = _sync(db_url, db_url, crm, full=True)
    assert (report.changed, report.gone, report.new, report.bad) == (1, 1, 0, [])
    assert _messages(db_url, "2", "crm") == [{"role": "user", "content": "crm edited"}]
    assert _messages(db_url, "2", "app") == [{"role": "user", "content": "app 2"}]
    assert (_status(db_url, "2", source="crm"), _status(db_url, "3", source="crm")) == (
        "pending",
        "gone",
    )
    for ext in ("1", "2", "3"):
        assert _status(db_url, ext, source="app") == "done"
    assert _status(db_url, "1", source=None) == "done"
    # The app's own full pass marks nothing of crm's (or ingest's) gone.
    assert _sync(db_url, app_url, full=True).gone == 0
    with transaction(db_url) as s:
        view = sorted(
            tuple(r)
            for r in s.execute(
                text("SELECT source, external_id FROM fleet_latest_results WHERE task = 'intent'")
            )
        )
    # crm's edited row 2 keeps serving its previous label (stale) until reclassified.
    assert view == [
        ("app", "1"),
        ("app", "2"),
        ("app", "3"),
        ("crm", "1"),
        ("crm", "2"),
        ("ingest", "1"),
    ]
    # Reports carry the source next to the id; eval leaves an id two sources
    # share out of the score unless told which source to score.
    buf = io.StringIO()
    assert export(db_url, task="intent", fmt="jsonl", out=buf) == 7
    rows = [json.loads(line) for line in buf.getvalue().splitlines()]
    assert sorted((r["source"], r["external_id"]) for r in rows if r["external_id"] == "1") == [
        ("app", "1"),
        ("crm", "1"),
        ("ingest", "1"),
    ]
    gold = {"1": "chitchat", "2": "chitchat"}
    mixed = evaluate(db_url, task="intent", gold=gold)
    assert (mixed["ambiguous"], mixed["n"]) == (2, 0)
    app_only = evaluate(db_url, task="intent", gold=gold, source="app")
    assert (app_only["ambiguous"], app_only["n"], app_only["accuracy"]) == (0, 2, 1.0)


def test_missing_column_is_a_clear_error(db_url, app_db):
    app_url, _ = app_db
    spec = SourceSpec(name="bad", table="app.conversations")
    with pytest.raises(SyncError, match=r"no column external_id, messages.*alias them"):
        _sync(db_url, app_url, spec)
    broken = SourceSpec(name="broken", query="SELECT * FROM app.nope")
    with pytest.raises(SyncError, match="the query failed"):
        _sync(db_url, app_url, broken)


def test_on_delete_delete_removes_rows_and_items(db_url, app_db):
    app_url, plain = app_db
    spec = SourceSpec(name="app", shape="messages", query=QUERY, on_delete="delete")
    add_conversation(plain, 1, [("user", "a")])
    add_conversation(plain, 2, [("user", "b")])
    _sync(db_url, app_url, spec)
    _classify(db_url, "intent", "chitchat")
    sql(plain, "DELETE FROM app.conversations WHERE id = 2")
    assert _sync(db_url, app_url, spec).deleted == 1
    with transaction(db_url) as s:
        assert s.execute(text("SELECT count(*) FROM conversations")).scalar_one() == 1
        assert s.execute(text("SELECT count(*) FROM work_items")).scalar_one() == 1
        # The work item and the source row are deleted; the history still names the source.
        assert s.execute(text("SELECT source, external_id, reason FROM result_history")).one() == (
            "app",
            "2",
            "gone",
        )


def test_rerun_puts_back_results_of_another_revision(db_url, app_db):
    app_url, plain = app_db
    for cid in (1, 2, 3):
        add_conversation(plain, cid, [("user", f"x{cid}")])
    _sync(db_url, app_url)
    with transaction(db_url) as s:  # an ingested row with an id the source also holds
        ingest_conversations(s, [{"external_id": "1", "messages": [], "language": "en"}])
    _classify(db_url, "intent", "chitchat", revision="old")
    with transaction(db_url) as s:
        s.execute(
            text(
                "UPDATE results SET model_revision = 'new' WHERE work_item_id = ("
                "SELECT w.id FROM work_items w JOIN conversations c ON c.id = w.source_id "
                "WHERE c.source = 'app' AND c.external_id = '3')"
            )
        )
        assert len(history.stale_items(s, task="intent", current=["new"])) == 3
        assert history.stale_items(s, task="intent", current=["m"]) == []  # by model name
        future = (dt.datetime.now(dt.UTC) + dt.timedelta(days=1)).isoformat()
        assert history.stale_items(s, task="intent", current=["new"], since=future) == []
        ids = history.stale_items(s, task="intent", current=["new"])
        assert history.reset_items(s, item_ids=ids, reason="rerun") == 3
        assert ledger.counts(s) == {"intent": {"done": 1, "pending": 3}}
        # A synced row's history names its source; an ingested row's has NULL.
        assert s.execute(
            text(
                "SELECT source, external_id, reason FROM result_history "
                "ORDER BY source NULLS LAST, external_id"
            )
        ).all() == [("app", "1", "rerun"), ("app", "2", "rerun"), (None, "1", "rerun")]


def test_triggers_mark_changes_for_a_beat_tick(db_url, app_db):
    app_url, plain = app_db
    engine = get_engine(app_url)
    spec = SourceSpec(
        name="app",
        shape="messages",
        query=QUERY,
        trigger_tables=("app.conversations", "app.messages"),
    )
    assert triggers.install(engine, "app", spec.trigger_tables) == [
        "app.conversations",
        "app.messages",
    ]
    add_conversation(plain, 1, [("user", "a")])
    marks = triggers.take_marks(engine, ["app", "other"])
    assert marks.installed == {"app"} and marks.changed == {"app"} and not marks.deletes["app"]
    assert triggers.take_marks(engine, ["app"]).changed == set()  # consumed
    sql(plain, "DELETE FROM app.messages WHERE conversation_id = 1")
    assert triggers.take_marks(engine, ["app"]).deletes == {"app": True}
    assert triggers.remove(engine, "app") == ["app.conversations", "app.messages"]
    add_conversation(plain, 2, [("user", "b")])
    assert triggers.take_marks(engine, ["app"]).installed == set()


def test_audio_source(db_url):
    """An audio source (external_id, uri, duration_s, updated_at): a changed uri
    puts the file's items back to pending with their size from the new duration."""
    with transaction(db_url) as s:
        s.execute(text("CREATE TABLE calls (id int, path text, secs float8, changed timestamptz)"))
        s.execute(
            text("INSERT INTO calls VALUES (1, 'a.wav', 1.5, now()), (2, 'b.wav', 2.0, now())")
        )
    spec = SourceSpec(
        name="calls",
        kind="audio",
        query="SELECT id::text AS external_id, path AS uri, secs AS duration_s, "
        "changed AS updated_at FROM calls",
    )
    assert _sync(db_url, db_url, spec).new == 2
    with transaction(db_url) as s:
        assert ledger.discover(s, task="transcribe", source_kind="audio") == 2
        s.execute(
            text("UPDATE calls SET path = 'b2.wav', secs = 4.0, changed = now() WHERE id = 2")
        )
    report = _sync(db_url, db_url, spec)
    assert (report.changed, report.unchanged, report.items_reset) == (1, 1, 1)
    with transaction(db_url) as s:
        row = s.execute(
            text(
                "SELECT a.uri, a.source, w.status, w.size_hint FROM audio_files a "
                "JOIN work_items w ON w.source_id = a.id AND w.source_kind = 'audio' "
                "WHERE a.external_id = '2'"
            )
        ).one()
    assert tuple(row) == ("b2.wav", "calls", "pending", 400)


def test_beat_tick_syncs_marked_sources_only(db_url, app_db, monkeypatch):
    """producer.sync.beat_tick: with triggers, nothing marked -> nothing synced;
    a write marks the source and the next tick syncs it (a delete with the key scan)."""
    from config.settings import Settings
    from producer.sync import beat_tick

    app_url, plain = app_db
    settings = Settings(database_url=db_url, source_database_url=app_url)
    spec = SourceSpec(
        name="app",
        shape="messages",
        query=QUERY,
        trigger_tables=("app.conversations", "app.messages"),
    )
    add_conversation(plain, 1, [("user", "a")])
    # No triggers yet: every tick is an incremental pass.
    assert [r["new"] for r in beat_tick(settings, {"app": spec})] == [1]
    triggers.install(get_engine(app_url), "app", spec.trigger_tables)
    assert beat_tick(settings, {"app": spec}) == []
    add_conversation(plain, 2, [("user", "b")])
    ticked = beat_tick(settings, {"app": spec})
    assert [(r["new"], r["delete_scan_seconds"]) for r in ticked] == [(1, 0.0)]
    sql(plain, "DELETE FROM app.conversations WHERE id = 1")
    assert [r["gone"] for r in beat_tick(settings, {"app": spec})] == [1]
    assert beat_tick(settings, {"app": spec}) == []


def test_without_detect_deletes_only_a_full_pass_finds_deleted_rows(db_url, app_db):
    app_url, plain = app_db
    spec = SourceSpec(name="app", shape="messages", query=QUERY, detect_deletes=False)
    add_conversation(plain, 1, [("user", "a")])
    add_conversation(plain, 2, [("user", "b")])
    _sync(db_url, app_url, spec)
    sql(plain, "DELETE FROM app.conversations WHERE id = 2")
    incremental = _sync(db_url, app_url, spec)
    assert incremental.gone == 0 and incremental.delete_scan_seconds == 0.0
    assert _sync(db_url, app_url, spec, full=True).gone == 1
