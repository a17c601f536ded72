"""export, eval and compare against stored results on the real Postgres."""

from __future__ import annotations

import csv
import io
import json

from click.testing import CliRunner
from sqlalchemy import text

from db import ledger
from db.engine import transaction
from db.sources import ingest_conversations
from fleet.cli import main
from tests.support import conversations, write_jsonl


def _env(db_url, broker_url, tmp_path, models=None):
    env = {
        "DATABASE_URL": db_url,
        "BROKER_URL": broker_url,
        "FLEET_STATE_DIR": str(tmp_path / "state"),
    }
    if models:
        env["FLEET_MODELS_DIR"] = str(models)
    return env


def _finish(db_url: str, labels: dict[str, str], failed: dict[str, str]) -> None:
    with transaction(db_url) as s:
        ingest_conversations(s, conversations(6))
        ledger.discover(s, task="intent", source_kind="conversation")
    with transaction(db_url) as s:
        (batch,) = ledger.claim_batches(s, task="intent", limit=6, batch_size=6, lease_seconds=60)
    with transaction(db_url) as s:
        ledger.start_batch(
            s, batch_id=batch.batch_id, item_ids=batch.item_ids, worker="w", lease_seconds=60
        )
        ext = dict(
            s.execute(
                text(
                    "SELECT w.id, c.external_id FROM work_items w JOIN conversations c ON c.id = w.source_id"
                )
            ).all()
        )
        outcomes = []
        for item_id in batch.item_ids:
            e = ext[item_id]
            if e in failed:
                outcomes.append(ledger.Outcome(item_id, None, failed[e]))
            else:
                outcomes.append(
                    ledger.Outcome(
                        item_id,
                        {
                            "label": labels[e],
                            "confidence": 0.9,
                            "scores": {labels[e]: 0.9},
                            "output": None,
                            "model_name": "m",
                            "model_tier": 0,
                            "device": "cpu",
                            "latency_ms": 10.0 + len(e),
                        },
                    )
                )
        ledger.finish_batch(s, batch_id=batch.batch_id, outcomes=outcomes)


LABELS = {"c000000": "a", "c000001": "b", "c000002": "a", "c000003": "b", "c000004": "a"}


def test_export_jsonl_csv_individual(db_url, broker_url, tmp_path):
    _finish(db_url, LABELS, {"c000005": "conversation has no messages"})
    env = _env(db_url, broker_url, tmp_path)
    runner = CliRunner()
    out = runner.invoke(main, ["export", "-t", "intent"], env=env)
    assert out.exit_code == 0, out.output
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == 6
    assert {r["external_id"]: r["label"] for r in rows if r["status"] == "done"} == LABELS
    assert [r["error"] for r in rows if r["status"] == "failed"] == ["conversation has no messages"]

    path = tmp_path / "r.csv"
    assert (
        runner.invoke(
            main,
            ["export", "-t", "intent", "--format", "csv", "-o", str(path), "--status", "done"],
            env=env,
        ).exit_code
        == 0
    )
    table = list(csv.DictReader(io.StringIO(path.read_text())))
    assert len(table) == 5 and json.loads(table[0]["scores"]) == {table[0]["label"]: 0.9}

    folder = tmp_path / "items"
    res = runner.invoke(
        main, ["export", "-t", "intent", "--individual", "--output-dir", str(folder)], env=env
    )
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in folder.iterdir()) == [f"c00000{i}.json" for i in range(6)]
    assert json.loads((folder / "c000001.json").read_text())["label"] == "b"
    assert runner.invoke(main, ["export", "-t", "intent", "--individual"], env=env).exit_code == 2


def test_eval_against_gold(db_url, broker_url, tmp_path):
    _finish(db_url, LABELS, {"c000005": "bad"})
    gold = write_jsonl(
        tmp_path / "gold.jsonl",
        [
            {"external_id": "c000000", "label": "a"},
            {"external_id": "c000001", "label": "a"},
            {"external_id": "c000002", "label": "a"},
            {"external_id": "c000003", "label": "b"},
            {"external_id": "c000005", "label": "b"},
            {"external_id": "nope", "label": "b"},
        ],
    )
    res = CliRunner().invoke(
        main,
        ["eval", "-t", "intent", "--gold", str(gold), "--json"],
        env=_env(db_url, broker_url, tmp_path),
    )
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout.splitlines()[-1])
    assert report["n"] == 5 and report["accuracy"] == 3 / 5
    assert report["confusion"]["a"]["b"] == 1 and report["confusion"]["b"]["(none)"] == 1
    assert report["not_in_task"] == 1 and report["not_done"] == 1
    assert report["latency_ms"]["p50"] > 0
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"external_id": "x"}\n')
    res = CliRunner().invoke(
        main, ["eval", "-t", "intent", "--gold", str(bad)], env=_env(db_url, broker_url, tmp_path)
    )
    assert res.exit_code == 2 and "bad.jsonl:1" in res.output


def test_compare_two_models_side_by_side(db_url, broker_url, tiny_models, tmp_path):
    with transaction(db_url) as s:
        ingest_conversations(s, conversations(30))
    out = tmp_path / "cmp.jsonl"
    env = _env(db_url, broker_url, tmp_path, tiny_models)
    res = CliRunner().invoke(
        main,
        [
            "compare",
            "-t",
            "intent",
            "--models",
            "tiny-big",
            "tiny-small",
            "--limit",
            "20",
            "-o",
            str(out),
            "--json",
        ],
        env=env,
    )
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout.splitlines()[-1])
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert report["n"] == len(lines) == 20
    assert {ln["a"]["model"] for ln in lines} == {"tiny-big"} and {
        ln["b"]["model"] for ln in lines
    } == {"tiny-small"}
    disagree = sum(not ln["agree"] for ln in lines)
    assert report["disagreement_rate"] == disagree / 20
    same = CliRunner().invoke(
        main,
        [
            "compare",
            "-t",
            "intent",
            "--models",
            "tiny-big",
            "tiny-big",
            "--limit",
            "20",
            "-o",
            str(out),
            "--json",
        ],
        env=env,
    )
    assert json.loads(same.stdout.splitlines()[-1])["disagreement_rate"] == 0.0
