"""A transcribe ladder that mixes kinds, through real worker processes: Whisper
tiny.en first, a CTC model (a small wav2vec2 with random weights,
bench.ctc_model) below it. A simulated memory cap on the Whisper tier makes
the long file run out of memory alone, so the worker steps down to the CTC
tier, prepares the file again as CTC windows and transcribes it there; the
result records tier 1, the CTC model's name and its folder's revision, and the
transcript gets an intent from a second worker. Silence ends done with no text
on either kind; a corrupt file fails with its reason.
"""

from __future__ import annotations

import shutil
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
from sqlalchemy import text

from bench.ctc_model import build_ctc_model
from db.engine import transaction
from tests.support import REPO, WorkerProcess, fleet_env, run_fleet

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

CAP_CS = 1500  # tier 0's simulated memory: 15 s of padded audio


@pytest.fixture
def ctc_fleet(db_url, broker_url, tiny_models, whisper_dir, tmp_path):
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (./scripts/install.sh installs it)")
    ctc_dir = build_ctc_model(tmp_path / "wav2vec2-test", seed=7, attention_mask=True)
    root = tmp_path / "audio"
    batch = root / "night1"
    batch.mkdir(parents=True)
    subprocess.run(
        ["espeak-ng", "-w", str(batch / "short.wav"), "Please call me back tomorrow."],
        check=True,
        capture_output=True,
    )
    speech, sr = sf.read(batch / "short.wav", dtype="float32")
    track = np.zeros(40 * sr, np.float32)  # 40 s: a sentence every 8 s; over the cap alone
    for k in range(5):
        track[k * 8 * sr : k * 8 * sr + len(speech)] = speech
    sf.write(batch / "zlong.wav", track, sr)
    sf.write(batch / "silence.wav", np.zeros(5 * 16000, np.float32), 16000)
    good = (batch / "short.wav").read_bytes()
    (batch / "cut.wav").write_bytes(good[: len(good) // 3])
    config = tmp_path / "tasks.toml"
    config.write_text(f"""
[tasks.transcribe]
kind = "transcribe"
source = "audio"
then = ["audio_intent"]
[[tasks.transcribe.ladder]]
name = "whisper-tiny.en"
path = "{whisper_dir}"
max_batch_tokens = 48000
[[tasks.transcribe.ladder]]
name = "wav2vec2-test"
path = "{ctc_dir}"
max_batch_tokens = 48000
window_s = 15
language = "en"

[tasks.audio_intent]
kind = "sequence_classify"
source = "audio"
input_from = "transcribe"
[[tasks.audio_intent.ladder]]
name = "tiny-big"
path = "tiny-big"
max_length = 128
""")
    env = fleet_env(
        {
            "DATABASE_URL": db_url,
            "BROKER_URL": broker_url,
            "FLEET_STATE_DIR": str(tmp_path / "state"),
            "FLEET_MODELS_DIR": str(tiny_models),
            "FLEET_CONFIG_FILE": str(config),
            "FLEET_AUDIO_ROOT": str(root),
            "FLEET_RECONCILE_INTERVAL": "2",
        }
    )
    workers = [
        WorkerProcess(
            "transcribe",
            env,
            tmp_path / "transcribe.log",
            extra_env={"FLEET_SIMULATE_MEMORY": f"0:{CAP_CS}"},
        ).start(),
        WorkerProcess("audio_intent", env, tmp_path / "intent.log").start(),
    ]
    yield env, batch, db_url, tmp_path / "transcribe.log"
    for w in workers:
        w.stop()


def test_whisper_steps_down_to_ctc(ctc_fleet):
    env, batch, url, log = ctc_fleet
    out = run_fleet(["ingest", "audio", str(batch), "--json"], env)
    assert '"inserted": 4' in out.stdout
    run = subprocess.run(
        [sys.executable, "-m", "fleet.cli", "run", "-t", "transcribe", "--timeout", "300"],
        # One file per message, shortest first: Whisper does the short files, then the
        # long one alone runs out of (simulated) memory on tier 0.
        env={**env, "FLEET_BATCH_SIZE": "1", "FLEET_BATCH_SECONDS": "0"},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=330,
    )
    assert run.returncode == 1, run.stderr  # 1: the corrupt file failed, by design
    with transaction(url) as s:
        rows = s.execute(
            text("""
            SELECT a.external_id, w.task, w.status, w.last_error, r.model_name, r.model_tier,
                   r.model_revision, r.output, r.label
            FROM work_items w JOIN audio_files a ON a.id = w.source_id
            LEFT JOIN results r ON r.work_item_id = w.id""")
        ).all()
    by = {(r[0].split("/")[-1], r[1]): r[2:] for r in rows}
    status, err, model, tier, revision, output, _ = by[("short.wav", "transcribe")]
    assert status == "done" and model == "whisper-tiny.en" and tier == 0, err
    assert "call me back" in output["transcript"].lower()
    status, err, model, tier, revision, output, _ = by[("zlong.wav", "transcribe")]
    assert status == "done" and model == "wav2vec2-test" and tier == 1, err
    assert revision.startswith("sha256:")
    assert output["decoder"] == "ctc_greedy" and output["chunks"] == 4  # 15 s windows, 11 s apart
    assert output["frames"] == 1999 and output["duration_s"] == pytest.approx(40.0)
    assert output["transcript"] and output["no_speech"] is False and output["language"] == "en"
    status, err, *_, label = by[("zlong.wav", "audio_intent")]
    assert status == "done" and label, err
    status, err, model, _, _, output, _ = by[("silence.wav", "transcribe")]
    assert status == "done" and output["transcript"] == "" and output["no_speech"] is True
    assert ("silence.wav", "audio_intent") not in by
    status, err, *_ = by[("cut.wav", "transcribe")]
    assert status == "failed" and "truncated" in err
    text_log = log.read_text(errors="replace")
    assert "OOM task=transcribe tier=0" in text_log and "loaded task=transcribe tier=1" in text_log
