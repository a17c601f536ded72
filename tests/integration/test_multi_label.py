"""Multi-label classifiers through a real `celery worker` on the real Postgres and Redis.

* A multi-label checkpoint built from a config (MiniLM with a fresh head, `problem_type =
  "multi_label_classification"`, a temperature in calibration.json, per-label
  thresholds in thresholds.json and one label's threshold set in the tier): every
  result holds the label set its thresholds give over sigmoid(logit / T) computed
  here from the raw model, every label's probability and the thresholds used; the
  item with no label over its threshold is an empty set (label NULL), not a top-1.
  `fleet results`, exports, `fleet eval` against label-list gold lines and the HTML
  report's per-label rates read the same sets.
* A single-label model is unchanged: each bundled classifier (intent, worthiness,
  sentiment) served by a worker gives, on every item of its evaluation set, the
  label of the softmax reading (temperature, windows, salient pooling past its
  background labels) computed here without the adapter.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from sqlalchemy import text

from db.engine import get_engine
from fleet.cli import main
from fleet.reporting.scoring import multilabel_report
from tests.support import (
    WorkerProcess,
    conversations,
    fleet_env,
    write_jsonl,
)
from workers.calibration import SIGMOID_METHOD, Calibration, read_calibration, write_calibration

NAMES = ["angry", "hopeful", "worried"]
TEMPERATURE = 2.0


def emotion_model(folder: Path, texts: list[str]) -> Path:
    """The bundled MiniLM encoder with a fresh multi-label head (seeded), rescaled so
    that over `texts` each label's logit has mean 0 and spread 2: thresholds between
    items are then not decided by float rounding."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from fleet.models.catalogue import minilm_path

    torch.manual_seed(5)
    tok = AutoTokenizer.from_pretrained(minilm_path())
    model = AutoModelForSequenceClassification.from_pretrained(
        minilm_path(),
        num_labels=len(NAMES),
        id2label=dict(enumerate(NAMES)),
        label2id={n: i for i, n in enumerate(NAMES)},
        problem_type="multi_label_classification",
    ).eval()
    with torch.no_grad():
        z = torch.stack([model(**tok(t, return_tensors="pt")).logits[0] for t in texts])
        k = 2.0 / z.std(dim=0)
        model.classifier.bias.copy_(k * (model.classifier.bias - z.mean(dim=0)))
        model.classifier.weight.mul_(k[:, None])
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    write_calibration(folder, Calibration(temperature=TEMPERATURE, method=SIGMOID_METHOD))
    return folder


def probabilities(folder: Path, texts: list[str]) -> list[dict[str, float]]:
    """sigmoid(logit / T) per label, from the raw model (one text at a time, no adapter)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    out = []
    with torch.inference_mode():
        for t in texts:
            z = model(**tok(t, return_tensors="pt")).logits[0].tolist()
            out.append(
                {n: 1 / (1 + math.exp(-v / TEMPERATURE)) for n, v in zip(NAMES, z, strict=True)}
            )
    return out


def text_of(conv: dict) -> str:
    return "\n".join(f"{m['role']}: {m['content']}" for m in conv["messages"])


def cut_between(values: list[float], below: float) -> float:
    """A threshold just above `below`: halfway to the next higher value."""
    higher = sorted(v for v in values if v > below)
    assert higher and higher[0] - below > 1e-3, "no clear gap above the chosen item"
    return round((below + higher[0]) / 2, 6)


@pytest.fixture
def env(db_url, broker_url, tmp_path, monkeypatch, bundled_models_dir, trained_intent):
    from config.taskconfig import bundled_document, parse_tasks
    from fleet.models.prepare import BUNDLED, prepare_bundled

    bundled = parse_tasks(bundled_document())
    single = ""
    folders = {}
    for (
        b
    ) in BUNDLED.values():  # the bundled single-label tasks, as config/data/tasks.toml serves them
        folders[b.task] = prepare_bundled(bundled_models_dir, b.folder)
        tier = bundled[b.task].ladder[0]
        single += (
            f'[tasks.{b.task}]\nkind = "sequence_classify"\n[[tasks.{b.task}.ladder]]\n'
            f'name = "{tier.name}"\npath = "{folders[b.task]}"\nmax_length = {tier.max_length}\n'
            f"max_batch_tokens = {tier.max_batch_tokens}\n"
            f"background_labels = {json.dumps(tier.options['background_labels'])}\n"
        )
    convs = conversations(12, prefix="e")
    emotion = emotion_model(tmp_path / "emotion-tiny", [text_of(c) for c in convs])
    probs = probabilities(emotion, [text_of(c) for c in convs])
    # the item whose labels rank lowest gets no label: each threshold sits just above it
    ranks = [max(sorted(p[n] for p in probs).index(probs[i][n]) for n in NAMES) for i in range(12)]
    empty = ranks.index(min(ranks))
    cuts = {n: cut_between([p[n] for p in probs], probs[empty][n]) for n in NAMES}
    stored = {n: cuts[n] for n in NAMES if n != "hopeful"}
    (emotion / "thresholds.json").write_text(json.dumps({"thresholds": stored}))
    labels = "".join(f'{n} = "{n}"\n' for n in NAMES)
    config = tmp_path / "tasks.toml"
    config.write_text(
        "include_bundled = false\n"
        f"[labels.emotion]\n{labels}"
        '[tasks.emotion]\nkind = "sequence_classify"\nlabels = "emotion"\n'
        f'[[tasks.emotion.ladder]]\nname = "tiny"\npath = "{emotion}"\nmax_length = 128\n'
        f"thresholds = {{ hopeful = {cuts['hopeful']} }}\n" + single
    )
    settings = {
        "DATABASE_URL": db_url,
        "BROKER_URL": broker_url,
        "FLEET_CONFIG_FILE": str(config),
        "FLEET_STATE_DIR": str(tmp_path / "state"),
        "FLEET_MODELS_DIR": str(tmp_path),
        "FLEET_TORCH_THREADS": "1",
    }
    for key in [k for k in os.environ if k.startswith("FLEET_")]:
        monkeypatch.delenv(key)
    for k, v in settings.items():
        monkeypatch.setenv(k, v)
    return {
        "env": fleet_env(settings),
        "tmp": tmp_path,
        "convs": convs,
        "probs": probs,
        "cuts": cuts,
        "empty": empty,
        "single": folders,
        "bundled": bundled,
    }


def fleet(*args: str, code: int = 0):
    res = CliRunner().invoke(main, list(args))
    assert res.exit_code == code, res.output
    return res


def serve(task: str, env: dict, log: Path) -> None:
    w = WorkerProcess(task, env, log).start()
    try:
        w.wait_ready()
        fleet("run", "-t", task, "--no-local-workers", "--timeout", "300")
    finally:
        w.stop()


def exported(task: str) -> dict[str, dict]:
    rows = [json.loads(x) for x in fleet("export", "-t", task).stdout.splitlines() if x.strip()]
    return {r["external_id"]: r for r in rows}


def test_label_sets_with_per_label_thresholds(env) -> None:
    tmp, convs, probs, cuts = env["tmp"], env["convs"], env["probs"], env["cuts"]
    fleet("ingest", "conversations", str(write_jsonl(tmp / "e.jsonl", convs)))
    serve("emotion", env["env"], tmp / "emotion.log")
    rows = exported("emotion")
    assert len(rows) == 12 and {r["status"] for r in rows.values()} == {"done"}
    sources = {"angry": "thresholds.json", "hopeful": "tier", "worried": "thresholds.json"}
    sets = {}
    for conv, p in zip(convs, probs, strict=True):
        r = rows[conv["external_id"]]
        out = r["output"]
        want = sorted(n for n in NAMES if p[n] >= cuts[n])
        sets[conv["external_id"]] = want
        assert r["scores"] == pytest.approx(p, abs=1e-5)  # every label's probability
        assert out["multi_label"] is True and out["thresholds"] == cuts
        assert out["thresholds_from"] == sources
        assert out["calibrated"] is True and out["temperature"] == TEMPERATURE
        assert sorted(out["labels"]) == want
        assert out["labels"] == sorted(want, key=lambda n: -p[n])  # most probable first
        assert r["label"] == (";".join(want) or None)
        assert r["confidence"] == pytest.approx(
            math.prod(p[n] if n in want else 1 - p[n] for n in NAMES), abs=1e-5
        )
    empty = rows[convs[env["empty"]]["external_id"]]
    assert empty["label"] is None and empty["output"]["labels"] == []
    assert empty["output"]["no_label"].startswith("no label at or above its threshold")
    assert sum(1 for s in sets.values() if s) >= 6, sets  # the others do get labels

    # the view applications read: the set in `label`, the list in output.labels
    with get_engine(env["env"]["DATABASE_URL"]).connect() as c:
        viewed = c.execute(
            text(
                "SELECT external_id, label, output -> 'labels' FROM fleet_latest_results "
                "WHERE task = 'emotion'"
            )
        ).all()
    assert {r[0]: (r[1], sorted(r[2])) for r in viewed} == {
        k: (";".join(v) or None, v) for k, v in sets.items()
    }

    # `fleet results` shows the sets, and says "(none)" with the reason for the empty one
    listed = json.loads(fleet("results", "-t", "emotion", "--json").stdout)
    assert {r["external_id"]: r["label"] for r in listed} == {
        k: (";".join(v) or None) for k, v in sets.items()
    }
    table = fleet("results", "-t", "emotion").stdout
    assert "(none)" in table

    # a CSV export carries the set in `label` and the list in `output`
    csv_text = fleet("export", "-t", "emotion", "--format", "csv").stdout
    assert any(";" in (r["label"] or "") for r in rows.values()) and ";" in csv_text

    # fleet eval against label-list gold lines: two items given a different gold set
    ids = [c["external_id"] for c in convs]
    gold = {k: list(v) for k, v in sets.items()}
    gold[ids[0]] = sorted(set(NAMES) - set(gold[ids[0]]))
    gold[ids[1]] = []
    gold_file = tmp / "gold.jsonl"
    write_jsonl(gold_file, [{"external_id": k, "labels": v} for k, v in gold.items()])
    rep = json.loads(fleet("eval", "-t", "emotion", "--gold", str(gold_file), "--json").stdout)
    want = multilabel_report([gold[k] for k in ids], [sets[k] for k in ids], NAMES)
    assert rep["multi_label"] is True and rep["n"] == 12
    for key in ("micro_f1", "macro_f1", "subset_accuracy", "hamming_loss"):
        assert rep[key] == pytest.approx(want[key]), key
    for n in NAMES:
        assert rep["per_label"][n] == pytest.approx(want["per_label"][n]), n
    shown = fleet("eval", "-t", "emotion", "--gold", str(gold_file)).stdout
    assert re.search(r"micro-F1 \d\.\d{3}\s+macro-F1", shown) and "Hamming loss" in shown

    # the HTML report: per-label rates over time, counted from the same sets
    page = tmp / "report.html"
    fleet("report", "-o", str(page), "--since", "1h")
    html = page.read_text()
    assert "Labels over time (multi-label tasks)" in html
    data = json.loads(re.search(r'id="report-data">(.*?)</script>', html, re.S).group(1))
    rates = data["label_rates"]["emotion"]
    assert sum(rates["items"]) == 12
    for n in NAMES:
        assert sum(rates["labels"].get(n, [0])) == sum(1 for s in sets.values() if n in s)
    assert sum(rates["labels"]["(none)"]) == sum(1 for s in sets.values() if not s)


@pytest.mark.parametrize("task", ["intent", "worthiness", "sentiment"])
def test_a_single_label_model_is_unchanged(env, task: str) -> None:
    """A bundled classifier through a worker: every label is the softmax reading's."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from config.data import data_path as data_file
    from fleet.models.catalogue import bundled_for_task
    from workers.adapters.windowed import Reading, background_indices, encode_windows
    from workers.windows import pool

    evalset = data_file(bundled_for_task(task).eval)
    fleet("ingest", "conversations", str(evalset))
    serve(task, env["env"], env["tmp"] / f"{task}.log")
    rows = exported(task)
    folder = env["single"][task]
    tier = env["bundled"][task].ladder[0]
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    names = [model.config.id2label[i] for i in range(model.config.num_labels)]
    reading = Reading.from_options(tier.max_length, tier.options)
    background = background_indices(names, tier.options)
    cal = read_calibration(folder)
    temperature = cal.temperature if cal else 1.0
    convs = [json.loads(x) for x in evalset.read_text().splitlines() if x.strip()]
    same = 0
    with torch.inference_mode():
        for conv in convs:
            w = encode_windows(tok, conv, reading, max_chars=1_000_000)
            padded = tok.pad({"input_ids": w.ids}, return_tensors="pt")
            logits = model(**padded).logits.float() / temperature
            pooled = pool(
                logits.softmax(-1).tolist(), w.plan, reading.pooling, background=background
            )
            want = names[max(range(len(names)), key=pooled.probs.__getitem__)]
            got = rows[conv["external_id"]]
            assert "multi_label" not in (got["output"] or {})
            same += got["label"] == want
    assert len(rows) == len(convs) >= 60
    assert same == len(convs)  # 100 %
