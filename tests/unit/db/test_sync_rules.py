"""The pure decisions of a sync pass, as tables: what a group of source rows
becomes (db.syncrows.build), where the next pass starts (db.syncmark.next_mark),
when a delete is a mass delete, and what `full_every` accepts."""

from __future__ import annotations

import datetime as dt
import json

import pytest
from click.testing import CliRunner

from config.taskconfig import ConfigError, SourceSpec, parse_every
from db.syncgone import mass_delete
from db.syncmark import Horizon, next_mark
from db.syncrows import CURSOR, build

T0 = dt.datetime(2026, 12, 1, 12, 0, tzinfo=dt.UTC)
MSG = SourceSpec(name="m", shape="messages", query="SELECT 1")
CONV = SourceSpec(name="c", query="SELECT 1")


def _m(pos, content, role="user", ext="a", at=T0):  # noqa: ANN001, ANN202
    return {"external_id": ext, "role": role, "content": content, "position": pos, CURSOR: at}


def _c(messages, ext="a", at=T0, language="en"):  # noqa: ANN001, ANN202
    return {"external_id": ext, "messages": messages, "language": language, CURSOR: at}


HI = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(
    ("rows", "spec", "refused", "notes", "messages"),
    [
        ([_m(0, "a"), _m(1, "b")], MSG, None, [], ["a", "b"]),
        ([_m(0, "a"), _m(0, "a"), _m(1, "b")], MSG, None, ["position 0 appears twice"], ["a", "b"]),
        ([_m(0, "a"), _m(0, "A")], MSG, "position 0 appears twice with different", [], None),
        ([_m(0, None), _m(1, "b")], MSG, None, ["position 0 has NULL content"], ["b"]),
        ([_m(0, "a", at=None)], MSG, None, ["updated_at is NULL"], ["a"]),
        (
            [_m(0, "a", ext=None), _m(0, "b", ext=None)],
            MSG,
            "no external_id (2 such rows)",
            [],
            None,
        ),
        ([_c(HI)], CONV, None, [], ["hi"]),
        ([_c(HI), _c(HI)], CONV, None, ["returned this row twice"], ["hi"]),
        ([_c(HI), _c([])], CONV, "2 different rows with this external_id", [], None),
        ([_c(None)], CONV, "messages is NULL", [], None),
        ([_c("null")], CONV, "messages is NULL", [], None),
        ([_c({"role": "user"})], CONV, "messages is a JSON dict, not a list", [], None),
        ([_c(["hi"])], CONV, "message 0 is a JSON str", [], None),
        ([_c('[{"role": "user", "content": null}]')], CONV, None, ["message 0 has NULL"], []),
        ([_c([{"role": "user", "content": "a\x00"}])], CONV, "NUL character", [], None),
        (
            [_c([{"role": "user", "content": "\ud800"}])],
            CONV,
            "unpaired UTF-16 surrogate",
            [],
            None,
        ),
        ([_c(HI, language="x" * 17)], CONV, "longer than 16 characters", [], None),
        ([_c(HI, ext="x" * 257)], CONV, "at most 256 are stored", [], None),
        ([_c(HI, ext="a\x00b")], CONV, "external_id holds a NUL", [], None),
    ],
)
def test_build(rows, spec, refused, notes, messages) -> None:  # noqa: ANN001
    rec = build(rows, spec)
    if refused is None:
        assert rec["refused"] is None
        assert [m["content"] for m in rec["messages"]] == messages
    else:
        assert refused in rec["refused"]
    assert len(rec["notes"]) == len(notes)
    for want, got in zip(notes, rec["notes"], strict=True):
        assert want in got


def test_identical_repeats_hash_like_one_row() -> None:
    once = build([_m(0, "a"), _m(1, "b")], MSG)
    twice = build([_m(0, "a"), _m(0, "a"), _m(1, "b"), _m(1, "b")], MSG)
    assert once["hash"] == twice["hash"]


H = dt.timedelta(hours=1)


@pytest.mark.parametrize(
    ("previous", "read", "horizon", "mark", "note"),
    [
        (None, T0, Horizon(at=T0 + H), T0, None),  # nothing open: the greatest row read
        (None, T0, Horizon(at=T0 + H, oldest_open=T0 - H), T0 - H, None),  # held back
        (None, T0 + 9 * H, Horizon(at=T0), T0, None),  # a stamp ahead of the source clock
        (T0 - H, None, Horizon(at=T0), T0 - H, None),  # nothing read: stays
        (T0 - H, T0, Horizon(at=T0, prepared=1), T0 - H, "prepared"),  # 2PC open: stays
        (None, T0, Horizon(at=T0 + H, hidden=2), T0, "hidden from its role"),
    ],
)
def test_next_mark(previous, read, horizon, mark, note) -> None:  # noqa: ANN001
    got, why = next_mark(previous, read, horizon)
    assert got == mark
    assert (why is None) if note is None else (note in (why or ""))


@pytest.mark.parametrize(
    ("n", "live", "rows", "share", "mass"),
    [
        (10, 10, 10, 0.1, False),  # not more than 10 rows
        (11, 200, 10, 0.1, False),  # not more than 10 %
        (20, 20, 10, 0.1, True),  # an empty read
        (21, 200, 10, 0.1, True),
        (5, 5, 0, 0.0, True),  # a source that guards every delete
    ],
)
def test_mass_delete(n, live, rows, share, mass) -> None:  # noqa: ANN001
    spec = SourceSpec(name="s", query="SELECT 1", mass_delete_rows=rows, mass_delete_share=share)
    assert mass_delete(spec, n, live) is mass


def test_full_every() -> None:
    assert parse_every("s", "7d") == 7 * 86400
    assert parse_every("s", "12h") == 43200
    assert parse_every("s", 90) == 90.0
    assert parse_every("s", None) is None
    for bad in ("weekly", "0d", -1, True):
        with pytest.raises(ConfigError, match="full_every must be a duration"):
            parse_every("s", bad)


def test_a_run_whose_source_failed_exits_2_and_says_so() -> None:
    import click

    from fleet.cli.output import finish_run
    from producer.runs import RunReport

    report = RunReport(run_id=7, counts={"intent": {"done": 3}})
    report.sync = {"app": {"error": "source 'app': the query failed: no view app.feed"}}

    @click.command()
    @click.option("--json", "as_json", is_flag=True)
    def cmd(as_json: bool) -> None:
        finish_run(report, as_json)

    plain = CliRunner().invoke(cmd, [])
    assert plain.exit_code == 2 and "source app not synced" in plain.output
    as_json = CliRunner().invoke(cmd, ["--json"])
    assert as_json.exit_code == 2
    assert "no view app.feed" in json.loads(as_json.output)["sync_failed"]["app"]
