"""The fault shapes that made a sync silently wrong, each against the real
Postgres with the source in a database of its own: an edit missed, a label
lost, a bad row out of sight."""

from __future__ import annotations

from collections.abc import Iterator

import psycopg
import pytest
from sqlalchemy import text

from config.settings import Settings
from config.taskconfig import SourceSpec
from db import ledger, triggers
from db.engine import get_engine, transaction
from producer.sync import beat_tick, sync_sources
from tests.appdb import QUERY, add_conversation, create_app_database, sql
from tests.integration.test_sync import _classify, _messages, _status, _sync
from tests.support import drop_database


@pytest.fixture
def app_db() -> Iterator[tuple[str, str]]:
    name, url, plain = create_app_database()
    try:
        yield url, plain
    finally:
        drop_database(name)


STRICT = SourceSpec(name="app", shape="messages", query=QUERY, overlap_seconds=0)


def _problems(db_url: str, source: str = "app") -> dict[str, tuple[str, bool]]:
    with transaction(db_url) as s:
        return {
            r.external_id: (r.reason, r.refused)
            for r in s.execute(
                text("SELECT external_id, reason, refused FROM sync_problems WHERE source = :s"),
                {"s": source},
            )
        }


def _history(db_url: str) -> int:
    with transaction(db_url) as s:
        return s.execute(text("SELECT count(*) FROM result_history")).scalar_one()


def _labels(db_url: str, task: str = "intent") -> dict[str, str]:
    with transaction(db_url) as s:
        return dict(
            s.execute(
                text("SELECT external_id, label FROM fleet_latest_results WHERE task = :t"),
                {"t": task},
            ).all()
        )


def test_an_edit_in_a_transaction_longer_than_the_overlap_is_not_missed(db_url, app_db):
    """airbyte#9668: stamped with now() at its start, visible only at its commit."""
    app_url, plain = app_db
    add_conversation(plain, 1, [("user", "first")])
    _sync(db_url, app_url, STRICT)
    with psycopg.connect(plain) as long:  # one transaction, open across a pass
        long.execute(
            "UPDATE app.messages SET body = 'edited late', updated_at = now() "
            "WHERE conversation_id = 1"
        )
        add_conversation(plain, 2, [("user", "second")])  # committed, stamped later
        assert _sync(db_url, app_url, STRICT).new == 1
        long.commit()
    after = _sync(db_url, app_url, STRICT)
    assert after.changed == 1
    assert _messages(db_url, "1") == [{"role": "user", "content": "edited late"}]


def test_a_timestamp_without_zone_in_a_source_east_of_utc(db_url, app_db):
    """kafka-connect-sap#121: the mark was stored 9 h in the future."""
    app_url, plain = app_db
    name = plain.rsplit("/", 1)[1]
    sql(plain, f"ALTER DATABASE {name} SET timezone TO 'Asia/Tokyo'")
    sql(
        plain,
        "CREATE TABLE app.tickets (id int, body jsonb, updated_at timestamp NOT NULL DEFAULT now())",
    )
    spec = SourceSpec(
        name="tickets",
        query="SELECT id::text AS external_id, body AS messages, updated_at FROM app.tickets",
        overlap_seconds=0,
    )
    sql(
        plain,
        """INSERT INTO app.tickets (id, body) VALUES (1, '[{"role": "user", "content": "a"}]')""",
    )
    assert _sync(db_url, app_url, spec).new == 1
    with transaction(db_url) as s:  # the mark is not 9 hours ahead of the clock
        assert s.execute(text("SELECT watermark <= now() FROM sync_state")).scalar_one()
    sql(
        plain,
        """INSERT INTO app.tickets (id, body) VALUES (2, '[{"role": "user", "content": "b"}]')""",
    )
    assert _sync(db_url, app_url, spec).new == 1


def test_rows_with_a_null_updated_at_are_synced_and_named(db_url, app_db):
    """posthog#76090: the application sets updated_at on UPDATE only."""
    app_url, plain = app_db
    sql(plain, "CREATE TABLE app.notes (id int, body jsonb, updated_at timestamptz)")
    spec = SourceSpec(
        name="notes",
        query="SELECT id::text AS external_id, body AS messages, updated_at FROM app.notes",
    )
    sql(plain, """INSERT INTO app.notes VALUES (1, '[{"role": "user", "content": "a"}]', now())""")
    _sync(db_url, app_url, spec)
    sql(plain, """INSERT INTO app.notes VALUES (2, '[{"role": "user", "content": "b"}]', NULL)""")
    report = _sync(db_url, app_url, spec)
    assert not report.full and report.new == 1
    assert [e for e, _ in report.notes] == ["2"]
    reason, refused = _problems(db_url, "notes")["2"]
    assert "updated_at is NULL" in reason and not refused
    sql(plain, "UPDATE app.notes SET updated_at = now() WHERE id = 2")
    _sync(db_url, app_url, spec)
    assert _problems(db_url, "notes") == {}


def test_a_join_that_repeats_rows_is_not_folded_in(db_url, app_db):
    """posthog#99996: every message stored twice, and reset on every pass."""
    app_url, plain = app_db
    sql(plain, "CREATE TABLE app.tags (conversation_id bigint, tag text)")
    for cid in (1, 2):
        add_conversation(plain, cid, [("user", f"hi {cid}"), ("assistant", "hello")])
        sql(plain, "INSERT INTO app.tags VALUES (%s, 'a'), (%s, 'b')", (cid, cid))
    spec = SourceSpec(
        name="app",
        shape="messages",
        query=QUERY.replace(
            "JOIN app.messages m ON m.conversation_id = c.id",
            "JOIN app.messages m ON m.conversation_id = c.id JOIN app.tags t "
            "ON t.conversation_id = c.id",
        ),
    )
    first = _sync(db_url, app_url, spec)
    assert _messages(db_url, "1") == [
        {"role": "user", "content": "hi 1"},
        {"role": "assistant", "content": "hello"},
    ]
    assert first.new == 2 and len(first.notes) == 2
    assert "position 0 appears twice: one kept" in _problems(db_url)["1"][0]
    assert _classify(db_url, "intent", "chitchat") == 2
    sql(plain, "UPDATE app.conversations SET updated_at = now()")  # touched, not edited
    for full in (False, True):
        again = _sync(db_url, app_url, spec, full=full)
        assert (again.changed, again.items_reset) == (0, 0)
    assert _history(db_url) == 0 and _status(db_url, "1") == "done"


def test_two_messages_at_one_position_are_refused_not_folded(db_url, app_db):
    app_url, plain = app_db
    sql(
        plain,
        "CREATE TABLE app.lines (conv text, pos int, role text, body text, "
        "updated_at timestamptz NOT NULL DEFAULT now())",
    )
    sql(plain, "INSERT INTO app.lines VALUES ('a', 0, 'user', 'one'), ('a', 1, 'user', 'two')")
    spec = SourceSpec(
        name="lines",
        shape="messages",
        query="SELECT conv AS external_id, role, body AS content, pos AS position, updated_at "
        "FROM app.lines",
    )
    _sync(db_url, app_url, spec)
    assert _classify(db_url, "intent", "chitchat") == 1
    sql(plain, "INSERT INTO app.lines VALUES ('a', 1, 'user', 'TWO')")
    for full in (False, True, False):
        report = _sync(db_url, app_url, spec, full=full)
        assert report.changed == 0 and [e for e, _ in report.bad] == ["a"]
    reason, refused = _problems(db_url, "lines")["a"]
    assert refused and "position 1 appears twice with different content" in reason
    assert _status(db_url, "a", source="lines") == "done" and _history(db_url) == 0
    assert _labels(db_url) == {"a": "chitchat"}
    sql(plain, "DELETE FROM app.lines WHERE body = 'TWO'")
    _sync(db_url, app_url, spec, full=True)
    assert _problems(db_url, "lines") == {}


def test_an_empty_read_during_a_rebuild_marks_nothing_gone(db_url, app_db):
    """Connapse#384: 20 of 20 rows gone, every label lost, then all reclassified."""
    app_url, plain = app_db
    for cid in range(1, 21):
        add_conversation(plain, cid, [("user", f"message {cid}")])
    _sync(db_url, app_url)
    assert _classify(db_url, "intent", "chitchat") == 20
    saved = sql(plain, "SELECT conversation_id, seq, role, body FROM app.messages")
    sql(plain, "DELETE FROM app.messages")  # the rebuild's empty moment
    report = _sync(db_url, app_url)
    assert report.gone == 0 and report.withheld == 20
    assert "--allow-mass-delete" in report.warnings[0]
    assert len(_labels(db_url)) == 20
    # The rows really went: with the flag they are gone, and their labels with them.
    forced = _sync(db_url, app_url, allow_mass_delete=True)
    assert forced.gone == 20 and _labels(db_url) == {}
    # They come back unchanged: the old results come back, nothing is reclassified.
    with psycopg.connect(plain, autocommit=True) as conn, conn.cursor() as cur:
        cur.executemany("INSERT INTO app.messages VALUES (%s, %s, %s, %s)", saved)
    back = _sync(db_url, app_url)
    assert (back.returned, back.restored, back.items_reset) == (20, 20, 0)
    assert _labels(db_url) == {str(c): "chitchat" for c in range(1, 21)}
    assert _status(db_url, "7") == "done"


def test_null_messages_stop_neither_their_source_nor_the_next(db_url, app_db):
    """One row with NULL or JSON null messages stopped every pass of the source,
    and the sources after it; now it is refused, named and kept in sight."""
    app_url, plain = app_db
    sql(plain, "CREATE TABLE app.inbox (id int, body jsonb, updated_at timestamptz DEFAULT now())")
    sql(
        plain,
        """INSERT INTO app.inbox (id, body) VALUES
           (1, '[{"role": "user", "content": "fine"}]'), (2, NULL), (3, 'null'),
           (4, '{"role": "user"}'), (5, '[{"role": "user", "content": null},
                                          {"role": "user", "content": "kept"}]')""",
    )
    inbox = SourceSpec(
        name="inbox",
        query="SELECT id::text AS external_id, body AS messages, updated_at FROM app.inbox",
    )
    broken = SourceSpec(name="broken", query="SELECT * FROM app.nope")
    settings = Settings(database_url=db_url, source_database_url=app_url)
    add_conversation(plain, 1, [("user", "after")])
    reports = sync_sources(settings, [inbox, broken, STRICT])
    assert [r.error is None for r in reports] == [True, False, True]
    assert "app.nope" in (reports[1].error or "")
    assert (reports[0].new, len(reports[0].bad), reports[2].new) == (2, 3, 1)
    problems = _problems(db_url, "inbox")
    assert {e: refused for e, (_, refused) in problems.items()} == {
        "2": True,
        "3": True,
        "4": True,
        "5": False,
    }
    assert "messages is NULL" in problems["2"][0] and "not a list" in problems["4"][0]
    assert problems["5"][0] == "message 0 has NULL content: skipped"
    assert _messages(db_url, "5", "inbox") == [{"role": "user", "content": "kept"}]
    with transaction(db_url) as s:
        error = s.execute(text("SELECT last_error FROM sync_state WHERE source = 'broken'"))
        assert "app.nope" in error.scalar_one()
    sql(plain, """UPDATE app.inbox SET body = '[]', updated_at = now() WHERE id = 2""")
    assert sync_sources(settings, [inbox])[0].new == 1
    assert set(_problems(db_url, "inbox")) == {"3", "4", "5"}


def test_a_deleted_message_is_seen_without_a_full_pass(db_url, app_db):
    """The README's own schema: deleting a message touches no updated_at."""
    app_url, plain = app_db
    add_conversation(plain, 1, [("user", "a"), ("assistant", "b"), ("user", "c")])
    add_conversation(plain, 2, [("user", "x")])
    _sync(db_url, app_url, STRICT)
    sql(plain, "DELETE FROM app.messages WHERE conversation_id = 1 AND seq = 1")
    report = _sync(db_url, app_url, STRICT)
    assert not report.full and (report.reread, report.changed) == (1, 1)
    assert _messages(db_url, "1") == [
        {"role": "user", "content": "a"},
        {"role": "user", "content": "c"},
    ]


def test_nightly_makes_a_full_pass_when_full_every_has_passed(db_url, app_db):
    app_url, plain = app_db
    settings = Settings(database_url=db_url, source_database_url=app_url)
    spec = SourceSpec(name="app", shape="messages", query=QUERY, full_every_seconds=3600)
    add_conversation(plain, 1, [("user", "a")])
    assert sync_sources(settings, [spec], scheduled=True)[0].full  # never had one
    assert not sync_sources(settings, [spec], scheduled=True)[0].full
    with transaction(db_url) as s:
        s.execute(text("UPDATE sync_state SET last_full_at = now() - interval '2 hours'"))
    assert sync_sources(settings, [spec], scheduled=True)[0].full


def test_a_failed_beat_tick_keeps_its_marks(db_url, app_db):
    """otter#1400: the marks were consumed before the pass failed."""
    app_url, plain = app_db
    sql(plain, "CREATE VIEW app.feed AS " + QUERY)
    spec = SourceSpec(
        name="app",
        shape="messages",
        query="SELECT * FROM app.feed",
        trigger_tables=("app.conversations", "app.messages"),
    )
    settings = Settings(database_url=db_url, source_database_url=app_url)
    triggers.install(get_engine(app_url), "app", spec.trigger_tables)
    add_conversation(plain, 1, [("user", "a")])
    sql(plain, "DROP VIEW app.feed")  # a deploy
    failed = beat_tick(settings, {"app": spec})
    assert failed[0]["error"] and "app.feed" in failed[0]["error"]
    sql(plain, "CREATE VIEW app.feed AS " + QUERY)
    assert [r["new"] for r in beat_tick(settings, {"app": spec})] == [1]
    assert beat_tick(settings, {"app": spec}) == []


def test_rejected_rows_are_in_status_metrics_and_the_report(db_url, broker_url, app_db, tmp_path):
    """Rows the sync refused were visible only in that one pass' output; a row
    that turned bad kept its old label with no flag."""
    from prometheus_client.exposition import generate_latest
    from prometheus_client.registry import CollectorRegistry

    from fleet.observe.prometheus import metric_families
    from fleet.observe.status import collect
    from fleet.reporting.html import write_report
    from wire.stats import redis_client

    app_url, plain = app_db
    sql(plain, "CREATE TABLE app.inbox (id text, body json, lang text, updated_at timestamptz)")
    sql(
        plain,
        """INSERT INTO app.inbox VALUES
           ('ok', '[{"role": "user", "content": "fine"}]', 'en', now()),
           ('turns-bad', '[{"role": "user", "content": "fine too"}]', 'en', now()),
           (NULL, '[{"role": "user", "content": "no id"}]', 'en', now()),
           ('nul', '[{"role": "user", "content": "a\\u0000b"}]', 'en', now()),
           ('lang', '[{"role": "user", "content": "x"}]', 'english-as-spoken-here', now())""",
    )
    spec = SourceSpec(
        name="inbox",
        query="SELECT id AS external_id, body AS messages, lang AS language, updated_at "
        "FROM app.inbox",
    )
    assert _sync(db_url, app_url, spec).new == 2
    assert _classify(db_url, "intent", "chitchat") == 2
    sql(
        plain,
        "UPDATE app.inbox SET lang = repeat('x', 40), updated_at = now() WHERE id = 'turns-bad'",
    )
    report = _sync(db_url, app_url, spec)
    assert sorted(e for e, _ in report.bad) == ["", "lang", "nul", "turns-bad"]
    # The row that turned bad keeps its label, and is named as refused.
    assert _labels(db_url)["turns-bad"] == "chitchat"
    assert _problems(db_url, "inbox")["turns-bad"][1] is True

    st = collect(db_url, redis_client(broker_url), tasks=["intent"])
    src = st.to_json()["sources"]["inbox"]
    assert (src["rows_refused"], src["rows_with_note"], src["last_error"]) == (4, 0, None)
    assert src["lag_seconds"] is not None and src["lag_seconds"] < 60

    registry = CollectorRegistry()

    class Once:
        def collect(self):  # noqa: ANN202
            return metric_families(st)

    registry.register(Once())
    scraped = generate_latest(registry).decode()
    assert 'fleet_source_problem_rows{kind="refused",source="inbox"} 4.0' in scraped

    out = tmp_path / "report.html"
    write_report(db_url, out, since="2000-01-01")
    page = out.read_text()
    assert "<h2>Sources</h2>" in page and "is longer than 16 characters" in page


def test_continuous_mode_keeps_the_label_and_feeds_the_edit_at_once(
    db_url, broker_url, app_db, tmp_path
):
    """An edit under triggers + `fleet beat`: its label vanished at once and the
    new one came only with the next nightly. Now the beat's sync task discovers
    and feeds it, and the view serves the old label, stale, meanwhile."""
    import redis

    from config.taskconfig import load_tasks
    from producer.schedule import SYNC_TASK, install
    from wire.app import create_app

    app_url, plain = app_db
    config = tmp_path / "tasks.toml"
    config.write_text(
        'include_bundled = false\n[tasks.intent]\nkind = "fake"\nsource = "conversation"\n'
        '[[tasks.intent.ladder]]\nname = "fake"\npath = "fake"\n'
        f"[sources.app]\nshape = \"messages\"\nquery = '''{QUERY}'''\n"
        'trigger_tables = ["app.conversations", "app.messages"]\n'
    )
    settings = Settings(
        database_url=db_url,
        broker_url=broker_url,
        source_database_url=app_url,
        config_file=config,
        sync_seconds=5,
    )
    add_conversation(plain, 1, [("user", "hello")])
    _sync(db_url, app_url)
    assert _classify(db_url, "intent", "chitchat") == 1
    triggers.install(get_engine(app_url), "app", ("app.conversations", "app.messages"))
    app = install(create_app(settings), settings, load_tasks(config))
    sql(plain, "UPDATE app.messages SET body = 'my report is late', updated_at = now()")

    ticked = app.tasks[SYNC_TASK]()  # what beat's worker runs, in this process
    assert [r["changed"] for r in ticked] == [1]
    with transaction(db_url) as s:
        view = s.execute(text("SELECT label, stale FROM fleet_latest_results")).all()
        counts = ledger.counts(s, task="intent")
    assert [tuple(v) for v in view] == [("chitchat", True)]  # still served, flagged
    assert counts == {"intent": {"queued": 1}}  # fed at once, not left for the nightly
    assert redis.Redis.from_url(broker_url).llen("fleet.intent") == 1
    with transaction(db_url) as s:  # the new result lands (as a worker would finish it)
        s.execute(text("UPDATE batches SET lease_until = now() - interval '1 second'"))
        ledger.reconcile(s, max_attempts=5)
    assert _classify(db_url, "intent", "professional") == 1
    assert _labels(db_url) == {"1": "professional"}
    with transaction(db_url) as s:
        assert s.execute(text("SELECT stale FROM fleet_latest_results")).scalar_one() is False
