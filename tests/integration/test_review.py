"""The review loop on the real Postgres: export a queue (Label Studio import JSON, held),
import reviews back (Label Studio export JSON and JSONL), confirmed_label in the view,
`fleet eval` against confirmed labels.

Here the export is validated against the documented import schema
(labelstud.io/guide/predictions, guide/task_format) and the round trip simulates
annotations in Label Studio's export format; test_labelstudio_real.py (slow) runs
the same round trip through a real Label Studio in a virtual environment of its own."""

from __future__ import annotations

import json
import os
import random

import jsonschema
import pytest
from click.testing import CliRunner
from sqlalchemy import text

from db.engine import get_engine, transaction
from fleet.cli import main

LABELS = ["billing", "bug", "praise", "question"]

# Label Studio's import format for tasks with pre-annotations (a list of tasks with
# `data` and `predictions[].result[]`; choices regions carry value.choices).
IMPORT_SCHEMA = {
    "type": "array",
    "items": {
        "type": "object",
        "required": ["data"],
        "properties": {
            "data": {"type": "object", "required": ["text"]},
            "predictions": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["result"],
                    "properties": {
                        "model_version": {"type": "string"},
                        "score": {"type": "number"},
                        "result": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "required": ["from_name", "to_name", "type", "value"],
                                "properties": {
                                    "type": {"const": "choices"},
                                    "value": {
                                        "type": "object",
                                        "required": ["choices"],
                                        "properties": {
                                            "choices": {
                                                "type": "array",
                                                "items": {"type": "string"},
                                                "minItems": 1,
                                            }
                                        },
                                    },
                                },
                            },
                        },
                    },
                },
            },
        },
    },
}


def seed_results(url: str, n: int, *, task: str = "intent", source: str | None = None) -> None:
    """n conversations with done items and results whose scores vary (seeded)."""
    rng = random.Random(7)
    with transaction(url) as s:
        for i in range(n):
            cid = s.execute(
                text(
                    "INSERT INTO conversations (external_id, messages, source) "
                    "VALUES (:e, CAST(:m AS jsonb), :src) RETURNING id"
                ),
                {
                    "e": f"c{i:04d}",
                    "m": json.dumps(
                        [{"role": "user", "content": f"ticket {i} about {LABELS[i % 4]}"}]
                    ),
                    "src": source,
                },
            ).scalar_one()
            wid = s.execute(
                text(
                    "INSERT INTO work_items (source_kind, source_id, task, status) "
                    "VALUES ('conversation', :c, :t, 'done') RETURNING id"
                ),
                {"c": cid, "t": task},
            ).scalar_one()
            p = [rng.random() for _ in LABELS]
            total = sum(p)
            scores = {lab: v / total for lab, v in zip(LABELS, p, strict=True)}
            top = max(scores, key=scores.__getitem__)
            s.execute(
                text(
                    "INSERT INTO results (work_item_id, label, confidence, scores, model_name, "
                    "model_tier, device, latency_ms, model_revision) VALUES "
                    "(:w, :l, :c, CAST(:s AS jsonb), 'm1', 0, 'cpu', 1.0, 'rev1')"
                ),
                {"w": wid, "l": top, "c": scores[top], "s": json.dumps(scores)},
            )


@pytest.fixture
def env(db_url, tmp_path, monkeypatch):
    config = tmp_path / "tasks.toml"
    config.write_text(
        '[labels.intent]\nbilling = "money"\nbug = "broken"\npraise = "thanks"\nquestion = "asks"\n'
        '[tasks.intent]\nkind = "fake"\nlabels = "intent"\n'
        '[[tasks.intent.ladder]]\nname = "fake"\npath = "fake"\n'
        '[tasks.other]\nkind = "fake"\nlabels = "intent"\n'
        '[[tasks.other.ladder]]\nname = "fake"\npath = "fake"\n'
    )
    for key in [k for k in os.environ if k.startswith("FLEET_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("DATABASE_URL", db_url)
    monkeypatch.setenv("FLEET_CONFIG_FILE", str(config))
    monkeypatch.setenv("FLEET_STATE_DIR", str(tmp_path / "state"))
    return db_url


def fleet(*args: str, code: int = 0):
    res = CliRunner().invoke(main, list(args))
    assert res.exit_code == code, res.output
    return res


def annotate(tasks: list[dict], choose) -> list[dict]:
    """Tasks as Label Studio exports them after review: ids, annotations, predictions kept."""
    out = []
    for n, t in enumerate(tasks, 1):
        label = choose(t)
        out.append(
            {
                "id": n,
                "data": t["data"],
                "annotations": [
                    {
                        "id": 100 + n,
                        "completed_by": {"id": 1, "email": "ann@example.org"},
                        "was_cancelled": False,
                        "result": [
                            {
                                "id": f"r{n}",
                                "from_name": "label",
                                "to_name": "text",
                                "type": "choices",
                                "value": {"choices": [label]},
                                "origin": "manual",
                            }
                        ],
                    }
                ],
                "predictions": t.get("predictions", []),
            }
        )
    return out


def test_export_schema_holds_and_round_trip(env, tmp_path):
    seed_results(env, 60)
    out = tmp_path / "q1.json"
    res = fleet(
        "review",
        "export",
        "-t",
        "intent",
        "-n",
        "20",
        "--strategy",
        "margin",
        "--out",
        str(out),
        "--json",
    )
    assert json.loads(res.output)["held"] == 20
    tasks = json.loads(out.read_text())
    jsonschema.validate(tasks, IMPORT_SCHEMA)
    assert all(t["predictions"][0]["result"][0]["value"]["choices"][0] in LABELS for t in tasks)
    assert '<Choice value="billing"/>' in out.with_suffix(".xml").read_text()
    assert len(out.with_suffix(".jsonl").read_text().splitlines()) == 20
    # a second export hands out other items
    out2 = tmp_path / "q2.json"
    fleet(
        "review", "export", "-t", "intent", "-n", "20", "--strategy", "margin", "--out", str(out2)
    )
    ids1 = {t["data"]["fleet_external_id"] for t in tasks}
    ids2 = {t["data"]["fleet_external_id"] for t in json.loads(out2.read_text())}
    assert len(ids2) == 20 and not ids1 & ids2

    # reviewers correct every other item; the export of Label Studio comes back
    rng = random.Random(3)
    chosen = {}

    def choose(t):
        label = t["predictions"][0]["result"][0]["value"]["choices"][0]
        if rng.random() < 0.5:
            label = rng.choice([x for x in LABELS if x != label])
        chosen[t["data"]["fleet_external_id"]] = label
        return label

    back = tmp_path / "ls-export.json"
    back.write_text(json.dumps(annotate(tasks, choose)))
    res = fleet("review", "import", str(back), "--json")
    rep = json.loads(res.output)
    assert rep["imported"] == 20 and rep["problems"] == []
    with get_engine(env).connect() as c:
        stored = dict(
            c.execute(
                text(
                    "SELECT external_id, confirmed_label FROM fleet_latest_results "
                    "WHERE confirmed_label IS NOT NULL"
                )
            ).all()
        )
        holds = c.execute(text("SELECT COUNT(*) FROM review_holds")).scalar_one()
    assert stored == chosen  # 100 % of ids and labels
    assert holds == 20  # the imported items' holds ended; the second export's remain
    # the report shows model-vs-reviewer agreement per label
    from fleet.reporting.html import write_report

    page = tmp_path / "report.html"
    data = write_report(env, page, since="1h")
    per = data.review["intent"]
    assert sum(c["reviewed"] for c in per.values()) == 20
    for label, c in per.items():
        mine = [t for t in tasks if chosen[t["data"]["fleet_external_id"]] == label]
        same = [t for t in mine if t["predictions"][0]["result"][0]["value"]["choices"][0] == label]
        assert (c["reviewed"], c["agreed"]) == (len(mine), len(same))
    assert "<h2>Reviews</h2>" in page.read_text() and 'class="summary review"' in page.read_text()
    # eval scores the stored answers against the confirmed labels, without a file
    ev = json.loads(fleet("eval", "-t", "intent", "--json").output)
    agreed = sum(
        1
        for t in tasks
        if chosen[t["data"]["fleet_external_id"]]
        == t["predictions"][0]["result"][0]["value"]["choices"][0]
    )
    assert ev["n"] == 20 and ev["accuracy"] == pytest.approx(agreed / 20)
    # confirmed items never go out again; release frees the second export
    fleet("review", "release", "-t", "intent")
    out3 = tmp_path / "q3.json"
    fleet(
        "review", "export", "-t", "intent", "-n", "60", "--strategy", "random", "--out", str(out3)
    )
    ids3 = {t["data"]["fleet_external_id"] for t in json.loads(out3.read_text())}
    assert len(ids3) == 40 and not ids3 & ids1


def test_import_reports_unknown_ids_and_labels_and_keeps_the_rest(env, tmp_path):
    seed_results(env, 5)
    lines = [
        {"external_id": "c0000", "task": "intent", "label": "bug", "reviewer": "ann"},
        {"external_id": "nope", "task": "intent", "label": "bug"},
        {"external_id": "c0001", "task": "intent", "label": "weather"},
        {"external_id": "c0002", "task": "missing", "label": "bug"},
        {"source": "ingest", "external_id": "c0003", "task": "intent", "label": "praise"},
    ]
    f = tmp_path / "r.jsonl"
    f.write_text("\n".join(json.dumps(x) for x in lines) + "\nnot json\n")
    res = fleet("review", "import", str(f), code=1)
    assert "imported 2 of 6" in res.output
    assert "unknown id 'nope'" in res.output
    assert "unknown label 'weather'" in res.output
    assert "unknown task 'missing'" in res.output
    assert "line 6: not JSON" in res.output
    with get_engine(env).connect() as c:
        rows = c.execute(
            text("SELECT label, reviewer, model_label FROM confirmed_labels ORDER BY label")
        ).all()
    assert [(r[0], r[1]) for r in rows] == [("bug", "ann"), ("praise", None)]
    assert all(r[2] in LABELS for r in rows)  # the model answer each review judged


def test_disagreement_and_diverse(env, tmp_path):
    seed_results(env, 40)
    seed_other = []
    with transaction(env) as s:  # the other task answers 'bug' for every row
        for cid in s.execute(text("SELECT id FROM conversations ORDER BY id")).scalars():
            wid = s.execute(
                text(
                    "INSERT INTO work_items (source_kind, source_id, task, status) "
                    "VALUES ('conversation', :c, 'other', 'done') RETURNING id"
                ),
                {"c": cid},
            ).scalar_one()
            s.execute(
                text(
                    "INSERT INTO results (work_item_id, label, confidence, model_name, model_tier, "
                    "device, latency_ms) VALUES (:w, 'bug', 0.9, 'm2', 0, 'cpu', 1.0)"
                ),
                {"w": wid},
            )
            seed_other.append(wid)
    out = tmp_path / "d.json"
    fleet(
        "review",
        "export",
        "-t",
        "intent",
        "-n",
        "50",
        "--strategy",
        "disagreement",
        "--against",
        "other",
        "--out",
        str(out),
    )
    tasks = json.loads(out.read_text())
    assert tasks and all(
        t["predictions"][0]["result"][0]["value"]["choices"][0] != "bug" for t in tasks
    )
    assert all(t["data"]["fleet_other_label"] == "bug" for t in tasks)
    res = fleet(
        "review",
        "export",
        "-t",
        "intent",
        "-n",
        "5",
        "--strategy",
        "disagreement",
        "--out",
        str(out),
        code=2,
    )
    assert "--against" in res.output
    fleet("review", "release", "-t", "intent")
    div = tmp_path / "v.json"
    fleet("review", "export", "-t", "intent", "-n", "4", "--strategy", "diverse", "--out", str(div))
    picked = json.loads(div.read_text())
    assert len(picked) == 4
    topics = {t["data"]["text"].rsplit(" ", 1)[-1] for t in picked}
    assert len(topics) >= 3  # one cluster per topic, not four near-duplicates


def test_train_confirmed_adds_reviewed_labels_at_weight_one(env, tmp_path):
    from fleet.models.labeled import Example
    from fleet.models.training import choose_examples

    seed_results(env, 3)
    f = tmp_path / "r.jsonl"
    f.write_text(
        json.dumps({"external_id": "c0001", "task": "intent", "label": "praise"})
        + "\n"
        + json.dumps({"external_id": "c0002", "task": "intent", "label": "bug"})
        + "\n"
    )
    fleet("review", "import", str(f))
    data = tmp_path / "d.jsonl"  # one example repeats a reviewed text with another label
    data.write_text(
        json.dumps({"text": "user: ticket 1 about bug", "label": "billing"})
        + "\n"
        + json.dumps({"text": "something else", "label": "question"})
        + "\n"
        + json.dumps({"text": "more", "label": "billing"})
        + "\n"
    )
    kwargs = dict(data=data, from_task=None, min_confidence=0.0, confirmed=None)
    chosen = choose_examples(
        "intent", **kwargs, db_url=lambda: env, models_dir=tmp_path, with_confirmed=True
    )
    assert Example("user: ticket 1 about bug", "praise", 1.0) in chosen.examples
    assert Example("user: ticket 2 about praise", "bug", 1.0) in chosen.examples
    assert not any(e.label == "billing" and "ticket 1" in e.text for e in chosen.examples)
    assert len(chosen.examples) == 4 and chosen.extra["confirmed"]["examples"] == 2
    plain = choose_examples("intent", **kwargs, db_url=lambda: env, models_dir=tmp_path)
    assert len(plain.examples) == 3


def test_rerun_counts_the_promoted_ladder_as_current(env, tmp_path):
    """After `fleet promote`, the promoted model's results are current for `fleet rerun`
    and FLEET_RERUN_STALE (else every night would put them back)."""
    from dataclasses import replace

    from config.settings import Settings
    from config.taskconfig import TierSpec, load_tasks
    from db.ladders import promote
    from producer.sync import current_revisions
    from wire.hub import resolve_tier

    for name in ("old-model", "new-model"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps({"name": name}))
    settings = Settings()
    spec = load_tasks(settings.config_file)["intent"]
    spec = replace(spec, ladder=(TierSpec(name="old", path=str(tmp_path / "old-model")),))
    with transaction(env) as s:
        promote(
            s,
            task="intent",
            ladder=[{"name": "new", "path": str(tmp_path / "new-model")}],
            gates={},
        )
    new_rev = resolve_tier(
        TierSpec(name="n", path=str(tmp_path / "new-model")), settings.resolved_models_dir
    ).revision
    assert current_revisions(spec, settings) == [new_rev]
