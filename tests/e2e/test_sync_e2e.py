"""The fleet pointed at an application's own database and at a model named by
Hugging Face id: `fleet nightly` (a real CLI process) syncs app.conversations +
app.messages from a separate database, a real worker classifies with the model
resolved from a hub cache (built locally in the hub's layout), and the
application reads the labels back through the fleet_latest_results view."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url

from config.taskconfig import load_tasks
from db.engine import transaction
from tests.appdb import QUERY, add_conversation, create_app_database, sql
from tests.e2e.conftest import Fleet
from tests.hubcache import add_to_hub_cache
from tests.support import drop_database, fleet_env, run_fleet
from workers.adapters.base import Source
from workers.adapters.sequence_classify import SequenceClassifyAdapter

pytestmark = pytest.mark.e2e

COMMIT = "0123456789abcdef0123456789abcdef01234567"
REPO_ID = "acme/tiny-intent"
CANDIDATES = [
    "my manager moved the deadline and the report is late",
    "I feel so lonely tonight",
    "can you look this up in the FAQ",
    "I want to run a marathon next year",
    "what a nice sunny day, haha",
    "my sister and I are planning a trip with friends",
    "explain how photosynthesis works, I have an exam",
    "therapy has helped me with my anxiety",
]


def _varied_classifier(folder: Path) -> Path:
    """A tiny random BERT classifier (MiniLM's tokenizer) with weights drawn wide
    (initializer_range 1.0), so that different texts get different labels; the
    default narrow draw labels every text the same."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from fleet.models.catalogue import minilm_path
    from fleet.models.finetune import INTENT_LABELS

    torch.manual_seed(3)
    tok = AutoTokenizer.from_pretrained(str(minilm_path()), local_files_only=True)
    cfg = BertConfig(
        vocab_size=tok.vocab_size,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=512,
        num_labels=len(INTENT_LABELS),
        id2label=dict(enumerate(INTENT_LABELS)),
        label2id={name: i for i, name in enumerate(INTENT_LABELS)},
        initializer_range=1.0,
    )
    BertForSequenceClassification(cfg).eval().save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture
def app_fleet(db_url: str, broker_url: str, tmp_path: Path) -> Iterator[tuple[Fleet, str, str]]:
    app_name, app_url, app_plain = create_app_database()
    hub = tmp_path / "hf" / "hub"
    model = _varied_classifier(tmp_path / "built" / "tiny-intent")
    add_to_hub_cache(hub, REPO_ID, model, commit=COMMIT)
    config = tmp_path / "tasks.toml"
    config.write_text(
        "include_bundled = false\n"
        "[tasks.intent]\n"
        'kind = "sequence_classify"\n'
        'source = "conversation"\n'
        "[[tasks.intent.ladder]]\n"
        'name = "tiny-intent"\n'
        f'path = "{REPO_ID}"\n'
        "max_length = 128\n"
        "max_batch_tokens = 4096\n"
        "\n[sources.app]\n"
        'shape = "messages"\n'
        f"query = '''{QUERY}'''\n"
    )
    env = fleet_env(
        {
            "DATABASE_URL": db_url,
            "BROKER_URL": broker_url,
            "FLEET_SOURCE_DATABASE_URL": app_url,
            "FLEET_STATE_DIR": str(tmp_path / "state"),
            "FLEET_MODELS_DIR": str(tmp_path / "no-local-models"),
            "FLEET_CONFIG_FILE": str(config),
            "HF_HOME": str(tmp_path / "hf"),
            "FLEET_LEASE_SECONDS": "30",
            "FLEET_RECONCILE_INTERVAL": "1",
            "FLEET_BATCH_SIZE": "8",
        }
    )
    env.pop("HF_HUB_CACHE", None)
    f = Fleet(db_url, broker_url, tmp_path, env)
    try:
        yield f, app_url, app_plain
    finally:
        for w in f.workers:
            w.stop()
        drop_database(app_name)


def _labels(url: str) -> dict[str, tuple[str, str, str]]:
    with transaction(url) as s:
        return {
            r.external_id: (r.label, r.model, r.model_revision)
            for r in s.execute(
                text("SELECT * FROM fleet_latest_results WHERE task = 'intent' AND source = 'app'")
            )
        }


def _predict(model_dir: Path, config: Path, turns: list[list[dict[str, str]]]) -> list[str]:
    """What the worker's adapter makes of these conversations (the same code, in-process)."""
    spec = load_tasks(config)["intent"]
    adapter = SequenceClassifyAdapter()
    adapter.load(spec.ladder[0], str(model_dir), "cpu")
    prepared = [
        adapter.prepare(Source(i, "conversation", str(i), {"messages": m, "language": "en"}))
        for i, m in enumerate(turns)
    ]
    return [p.label for p in adapter.predict(prepared)]  # type: ignore[union-attr]


def _join_from_the_app(app_plain: str, fleet_url: str) -> list[tuple]:
    """The application joins its own table to the view (postgres_fdw from its database)."""
    u = make_url(fleet_url)
    sql(app_plain, "CREATE EXTENSION IF NOT EXISTS postgres_fdw")
    sql(
        app_plain,
        f"CREATE SERVER fleet FOREIGN DATA WRAPPER postgres_fdw OPTIONS "
        f"(host '{u.host}', port '{u.port or 5432}', dbname '{u.database}')",
    )
    sql(
        app_plain,
        f"CREATE USER MAPPING FOR CURRENT_USER SERVER fleet OPTIONS (user '{u.username}')",
    )
    sql(
        app_plain,
        "IMPORT FOREIGN SCHEMA public LIMIT TO (fleet_latest_results) FROM SERVER fleet INTO app",
    )
    return sql(
        app_plain,
        "SELECT c.id, c.title, r.label, r.model_revision FROM app.conversations c "
        "JOIN app.fleet_latest_results r ON r.external_id = c.id::text "
        "AND r.source = 'app' AND r.task = 'intent' ORDER BY c.id",
    )


def test_nightly_syncs_an_app_database_and_classifies_with_a_hub_model(app_fleet):
    fleet, app_url, app_plain = app_fleet
    for cid in range(1, 7):
        add_conversation(app_plain, cid, [("user", CANDIDATES[cid]), ("assistant", "I see.")])
    worker = fleet.worker("intent")
    worker.wait_ready()
    first = run_fleet(["nightly", "--task", "intent", "--timeout", "240", "--json"], fleet.env)
    assert json.loads(first.stdout)["counts"]["intent"] == {"done": 6}, first.stdout
    before = _labels(fleet.db_url)
    assert set(before) == {str(i) for i in range(1, 7)}
    assert {(m, r) for _, m, r in before.values()} == {("tiny-intent", COMMIT)}

    # The application edits conversation 1 so that its label changes, deletes
    # conversation 3 and starts conversation 7.
    config = Path(fleet.env["FLEET_CONFIG_FILE"])
    snapshot = (
        Path(fleet.env["HF_HOME"])
        / "hub"
        / f"models--{REPO_ID.replace('/', '--')}"
        / "snapshots"
        / COMMIT
    )
    edits = [
        [
            {"role": "user", "content": CANDIDATES[1]},
            {"role": "assistant", "content": "I see."},
            {"role": "user", "content": c},
        ]
        for c in CANDIDATES
    ]
    predicted = _predict(snapshot, config, edits)
    pick = next((i for i, label in enumerate(predicted) if label != before["1"][0]), None)
    assert pick is not None, f"no candidate edit changes the tiny model's label {before['1'][0]}"
    sql(
        app_plain,
        "INSERT INTO app.messages (conversation_id, seq, role, body) VALUES (1, 2, 'user', %s)",
        [CANDIDATES[pick]],
    )
    sql(app_plain, "DELETE FROM app.conversations WHERE id = 3")
    add_conversation(app_plain, 7, [("user", CANDIDATES[0])])

    second = run_fleet(["nightly", "--task", "intent", "--timeout", "240", "--json"], fleet.env)
    night = json.loads(second.stdout)
    # The run's own work: the edited and the new conversation classified, one gone;
    # the ledger holds the four untouched ones too.
    assert night["counts"]["intent"] == {"done": 2, "gone": 1}, second.stdout
    assert night["ledger"]["intent"] == {"done": 6, "gone": 1}, second.stdout
    after = _labels(fleet.db_url)
    assert set(after) == {"1", "2", "4", "5", "6", "7"}
    assert after["1"][0] == predicted[pick] != before["1"][0]
    with transaction(fleet.db_url) as s:
        hist = s.execute(
            text(
                "SELECT external_id, label, model_name, model_revision, reason, classified_at "
                "FROM result_history ORDER BY external_id"
            )
        ).all()
        gone = s.execute(
            text(
                "SELECT w.status, w.last_error FROM work_items w JOIN conversations c "
                "ON c.id = w.source_id WHERE c.external_id = '3'"
            )
        ).one()
    assert [(h.external_id, h.label, h.model_name, h.model_revision, h.reason) for h in hist] == [
        ("1", before["1"][0], "tiny-intent", COMMIT, "content_changed"),
        ("3", before["3"][0], "tiny-intent", COMMIT, "gone"),
    ]
    assert gone.status == "gone" and "disappeared from source 'app'" in gone.last_error

    joined = _join_from_the_app(app_plain, fleet.db_url)
    assert [(r[0], r[2]) for r in joined] == [
        (int(k), after[k][0]) for k in ("1", "2", "4", "5", "6", "7")
    ]
    assert {r[3] for r in joined} == {COMMIT}

    # `fleet rerun`: another revision is current -> every item goes back.
    rerun = run_fleet(["rerun", "--task", "intent", "--model-not", "f" * 40, "--json"], fleet.env)
    assert json.loads(rerun.stdout)["items"] == 6
    # Without --model-not, the ladder's own revision is current: nothing is stale.
    run_fleet(["nightly", "--task", "intent", "--timeout", "240", "--json"], fleet.env)
    again = run_fleet(["rerun", "--task", "intent", "--dry-run", "--json"], fleet.env)
    assert json.loads(again.stdout) == {
        "task": "intent",
        "current": [COMMIT],
        "items": 0,
        "dry_run": True,
    }


def test_a_hub_model_missing_from_the_cache_stops_the_worker_with_the_fix(app_fleet):
    fleet, _, _ = app_fleet
    worker = fleet.worker("intent", HF_HOME=str(fleet.tmp / "empty-hf"))
    assert worker.proc is not None
    assert worker.proc.wait(timeout=120) == 2
    log = worker.log.read_text()
    assert REPO_ID in log and "fleet models pull" in log
