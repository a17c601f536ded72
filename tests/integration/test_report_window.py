"""A run's report is what the run did, after the fact too: results it made that
were replaced since (result_history) still count, parked items count as failed;
a --since window's items/s leave idle pauses out; `fleet report` with no option
reports the latest run. Real Postgres, the real ledger and history functions."""

from __future__ import annotations

import datetime as dt

from click.testing import CliRunner
from sqlalchemy import func, text, update

from db import history, ledger
from db.engine import transaction
from db.schema import Run
from db.sources import ingest_conversations
from fleet.cli import main
from fleet.reporting.rundata import read_report
from tests.integration.test_html_report import _batch, _finish, _result, _start
from tests.support import conversations


def _run(url: str, n: int, *, fail: int = 0) -> tuple[int, list[int]]:
    """A closed run of `n` intent items, the first `fail` of them failed; (run id, item ids)."""
    with transaction(url) as s:
        run = Run(trigger="nightly", task="intent")
        s.add(run)
        s.flush()
        run_id = run.id
    batch = _batch(url, "intent", n)
    _start(url, batch)
    _finish(
        url,
        batch,
        [
            ledger.Outcome(i, None, "unreadable")
            if k < fail
            else ledger.Outcome(i, _result("social", 0))
            for k, i in enumerate(batch.item_ids)
        ],
    )
    with transaction(url) as s:
        s.execute(update(Run).where(Run.id == run_id).values(finished_at=func.now()))
    return run_id, list(batch.item_ids)


def test_a_runs_report_keeps_results_replaced_and_items_parked_since(db_url):
    with transaction(db_url) as s:
        ingest_conversations(s, conversations(20))
        ledger.discover(s, task="intent", source_kind="conversation")
    run_id, items = _run(db_url, 20, fail=2)
    before = read_report(db_url, run_id=run_id).total
    assert (before.done, before.failed) == (18, 2)

    # After the run: six items' content changed (results to history, items pending),
    # two rows went away (gone), and the failures were acknowledged (parked).
    with transaction(db_url) as s:
        history.reset_items(s, item_ids=items[2:8], reason="content_changed")
        history.mark_gone(s, item_ids=items[8:10], why="deleted at the source")
        assert ledger.park(s, statuses=["failed"], task="intent") == 2
    after = read_report(db_url, run_id=run_id)
    assert (after.total.done, after.total.failed, after.total.dead) == (18, 2, 0)
    assert dict(after.labels["intent"]) == {"social": 18}
    assert [(t.model, t.done) for t in after.tiers] == [("tiny-big", 18)]


def test_since_throughput_leaves_idle_pauses_out(db_url):
    with transaction(db_url) as s:
        ingest_conversations(s, conversations(40))
        ledger.discover(s, task="intent", source_kind="conversation")
    _, first = _run(db_url, 20)
    _, second = _run(db_url, 20)
    now = dt.datetime.now(dt.UTC)
    # Two nights: 20 items finished over 19 s each, 23 hours apart.
    with transaction(db_url) as s:
        for night, ids in ((2, first), (1, second)):
            for k, item in enumerate(ids):
                s.execute(
                    text("UPDATE work_items SET updated_at = :t WHERE id = :i"),
                    {"t": now - dt.timedelta(days=night) + dt.timedelta(seconds=k), "i": item},
                )
    data = read_report(db_url, since="3d")
    assert data.total.items == 40
    assert data.duration_s == 38.0  # 19 s + 19 s of finishing, not 23 hours
    assert data.items_per_s is not None and data.items_per_s > 1.0


def test_report_with_no_option_reports_the_latest_run(db_url, broker_url, tmp_path):
    env = {"DATABASE_URL": db_url, "BROKER_URL": broker_url}
    out = tmp_path / "r.html"
    res = CliRunner().invoke(main, ["report", "--out", str(out)], env=env)
    assert res.exit_code == 2 and "no run is recorded yet" in res.output
    with transaction(db_url) as s:
        ingest_conversations(s, conversations(12))
        ledger.discover(s, task="intent", source_kind="conversation")
    _run(db_url, 5)
    latest, _ = _run(db_url, 7)
    assert read_report(db_url).window.run_id == latest
    res = CliRunner().invoke(main, ["report", "--out", str(out)], env=env)
    assert res.exit_code == 0, res.output
    assert f"{out}: 7 items" in res.output and out.is_file()
