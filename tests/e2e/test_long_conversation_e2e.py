"""Long conversations whose label is decided only by their last turn, classified by a
real intent worker with the fine-tuned MiniLM: the worker reads every window, so the
request appended after long small talk decides the label, and the result says how
many windows were read and which one decided. Reading the head (the old way) sees
only the small talk and answers chitchat."""

from __future__ import annotations

import subprocess
import sys

import pytest
from sqlalchemy import text

from db.engine import transaction
from tests.support import REPO, WorkerProcess, fleet_env, run_fleet, write_jsonl

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

SMALL_TALK = [
    ("user", "morning! the sun is finally out after a week of grey skies"),
    ("assistant", "Good morning! A sunny day after a grey week always feels like a gift."),
    ("user", "yeah i had breakfast on the balcony, first time this year"),
    ("assistant", "That sounds lovely. Did you have anything special?"),
    ("user", "just toast and way too much coffee haha"),
    ("assistant", "Toast and coffee in the sun is hard to beat."),
    ("user", "my dog keeps barking at the pigeons on the roof across the street"),
    ("assistant", "Dogs take their pigeon-watching duties very seriously!"),
    ("user", "lol he really does. also the neighbours are painting their fence bright yellow"),
    ("assistant", "Bright yellow is a bold choice. It will certainly cheer up the street."),
    ("user", "it is very bright. anyway how is your day going"),
    ("assistant", "It's going well, thank you for asking. Chatting with you is a nice part of it."),
    ("user", "aw thanks. i might go for a walk by the river later if the weather holds"),
    ("assistant", "A river walk sounds perfect for a day like this. Enjoy the fresh air."),
    ("user", "the ducks there are hilarious, they chase anyone with bread"),
    ("assistant", "Ducks can be surprisingly bold when food is involved!"),
]

LAST_TURNS = {
    "rag_query": "ok actual question: can you look up in the employee handbook how many days of "
    "bereavement leave we get? quote the document please",
    "learning": "ok actual question: can you explain how compound interest works, step by "
    "step with an example? i never understood it in school",
    "psychological": "ok actual question: for months i have had panic attacks before every "
    "meeting, my chest gets tight and i cant breathe. is this an anxiety disorder?",
    "aspirational": "ok actual question: my long term dream is to become an architect and "
    "design my own house one day, how should i plan the next ten years toward that?",
}


def conversation(label: str, last: str) -> dict:
    messages = [{"role": r, "content": c} for r, c in SMALL_TALK * 2]
    messages.append({"role": "user", "content": last})
    return {"external_id": f"last-{label}", "messages": messages, "language": "en"}


def classify(task, rows, db_url, broker_url, models_dir, tmp_path, batch_size):
    """Ingest `rows`, run a real `task` worker over them until done and return
    {external_id: (label, output)} of the results."""
    env = fleet_env(
        {
            "DATABASE_URL": db_url,
            "BROKER_URL": broker_url,
            "FLEET_STATE_DIR": str(tmp_path / "state"),
            "FLEET_MODELS_DIR": str(models_dir),
            "FLEET_BATCH_SIZE": str(batch_size),
        }
    )
    run_fleet(["ingest", "conversations", str(write_jsonl(tmp_path / "c.jsonl", rows))], env)
    worker = WorkerProcess(task, env, tmp_path / f"{task}.log").start()
    try:
        run = subprocess.run(
            [sys.executable, "-m", "fleet.cli", "run", "-t", task, "--timeout", "900"],
            env=env,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=960,
        )
        assert run.returncode == 0, run.stderr
    finally:
        worker.stop()
    with transaction(db_url) as s:
        return {
            eid: (label, output)
            for eid, label, output in s.execute(
                text("""
                SELECT c.external_id, r.label, r.output FROM work_items w
                JOIN conversations c ON c.id = w.source_id
                JOIN results r ON r.work_item_id = w.id WHERE w.task = :task"""),
                {"task": task},
            ).all()
        }


def test_the_last_turn_decides_a_long_conversation(
    db_url, broker_url, bundled_models_dir, trained_intent, tmp_path
):
    from transformers import AutoTokenizer

    from workers.adapters.text import conversation_text

    out, _, _ = trained_intent
    rows = [conversation(lab, last) for lab, last in LAST_TURNS.items()]
    tok = AutoTokenizer.from_pretrained(str(out))
    for r in rows:  # longer than the 256 tokens the head reading keeps
        assert len(tok(conversation_text(r, max_chars=10**6))["input_ids"]) > 512
    got = classify("intent", rows, db_url, broker_url, bundled_models_dir, tmp_path, 8)
    last_turn = len(SMALL_TALK) * 2
    for label in LAST_TURNS:
        predicted, output = got[f"last-{label}"]
        reading = output["reading"]
        assert reading["windows"] >= 3, reading
        assert "unread" not in reading  # nothing left out at the default max_windows
        assert reading["deciding_turns"][-1] == last_turn, reading
        assert predicted == label, (label, predicted, reading)


def test_the_llm_scores_the_turn_its_selector_picks(
    db_url, broker_url, bundled_models_dir, smollm_dir, trained_intent, tmp_path
):
    """The bundled llm_classify tier (SmolLM2-135M, label scoring) on the same long
    conversations, by a real worker: the intent encoder reads every user turn
    (`window_by = "user_turns"`, `turn_selector`), picks the turn that beats chitchat
    by the widest margin, and the LLM scores that turn alone; the result says which
    turn and why. Read as one prompt, the small talk sways the model (bench.long)."""
    rows = [conversation(lab, last) for lab, last in LAST_TURNS.items()]
    got = classify("llm_classify", rows, db_url, broker_url, bundled_models_dir, tmp_path, 4)
    last_turn = len(SMALL_TALK) * 2
    user_turns = len(SMALL_TALK) + 1  # SMALL_TALK twice is 16 user turns, then the request
    right = 0
    for label in LAST_TURNS:
        predicted, output = got[f"last-{label}"]
        reading = output["reading"]
        assert reading["windows"] == user_turns and reading["window_by"] == "user_turns"
        assert reading["pooling"] == "margin" and "unread" not in reading
        assert reading["deciding_turns"] == [last_turn, last_turn], reading
        selector = reading["selector"]
        assert selector["model"] == "intent-minilm" and selector["turn"] == last_turn
        assert selector["turns_read"] == user_turns and selector["margin"] > 0
        assert output["category"] == predicted
        right += predicted == label
    assert right >= 3, got
