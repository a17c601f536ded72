"""Audio end to end: ingest a folder, Whisper transcribes in a real worker on the
two-tier ladder (whisper-base, stepping down to whisper-tiny.en when a long file
does not fit a simulated memory cap), each transcript with speech gets an intent
from a second worker on its own queue; bad files are failed with their reasons,
files with no speech end done with no text and no intent, the rest completes."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from sqlalchemy import text

from db.engine import transaction
from tests.support import REPO, WorkerProcess, fleet_env, run_fleet, wer

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

SPOKEN = {
    "meeting.wav": "I think we should review the budget before the next meeting.",
    "refund.wav": "The customer asked for a refund because the package arrived late.",
}
LONG = " ".join(
    [
        *SPOKEN.values(),
        "We agreed to move the product launch to the end of next month.",
        "Please send the signed contract to the legal team by Friday.",
        "The new office will open in the spring with room for forty people.",
    ]
)
CAP_CS = 1200  # tier 0's simulated memory: 12 s of padded audio; the long file needs ~20 s


def _seven_bit_wav(path: Path, source: Path) -> None:
    """`source`'s 16-bit samples under a header that claims 7-bit PCM."""
    pcm = sf.read(source, dtype="int16")[0].astype("<i2").tobytes()
    fmt = struct.pack("<HHIIHH", 1, 1, 22050, 22050, 1, 7)
    body = b"WAVE" + b"fmt " + struct.pack("<I", 16) + fmt + b"data" + struct.pack("<I", len(pcm))
    path.write_bytes(b"RIFF" + struct.pack("<I", len(body) + len(pcm)) + body + pcm)


def _speak(path: Path, sentence: str) -> None:
    subprocess.run(["espeak-ng", "-w", str(path), sentence], check=True, capture_output=True)


@pytest.fixture
def audio_fleet(db_url, broker_url, tiny_models, whisper_dir, whisper_base_dir, tmp_path):
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (./scripts/install.sh installs it)")
    root = tmp_path / "audio"
    batch = root / "night1"
    batch.mkdir(parents=True)
    for name, sentence in SPOKEN.items():
        _speak(batch / name, sentence)
    (batch / "empty.wav").write_bytes(b"")
    (batch / "notes.wav").write_text("this is a text file, not audio\n")
    good = (batch / "meeting.wav").read_bytes()
    (batch / "cut.wav").write_bytes(good[: len(good) // 3])
    outside = tmp_path / "secret.wav"
    outside.write_bytes(good)
    os.symlink(outside, batch / "escape.wav")
    _speak(batch / "gone.wav", "this file will be deleted")
    _speak(batch / "zlong.wav", LONG)
    rng = np.random.default_rng(14)
    sf.write(batch / "faint.wav", rng.standard_normal(3 * 16000) * 1e-3, 16000, subtype="PCM_16")
    tone = 0.5 * np.sin(2 * np.pi * 440 * np.arange(3 * 16000) / 16000)
    sf.write(batch / "tone.wav", tone, 16000, subtype="PCM_16")
    _seven_bit_wav(batch / "seven.wav", batch / "meeting.wav")
    config = tmp_path / "tasks.toml"
    config.write_text(f"""
include_bundled = false
[tasks.transcribe]
kind = "transcribe"
source = "audio"
then = ["audio_intent"]
[[tasks.transcribe.ladder]]
name = "whisper-base"
path = "{whisper_base_dir}"
max_batch_tokens = 48000
[[tasks.transcribe.ladder]]
name = "whisper-tiny.en"
path = "{whisper_dir}"
max_batch_tokens = 48000

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
    yield env, batch, db_url
    for w in workers:
        w.stop()


def test_audio_folder_transcribed_then_classified(audio_fleet):
    env, batch, url = audio_fleet
    out = run_fleet(["ingest", "audio", str(batch), "--json"], env)
    assert '"inserted": 11' in out.stdout
    (batch / "gone.wav").unlink()  # registered, then lost before the worker reads it
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "fleet.cli",
            "run",
            "-t",
            "transcribe",
            "--timeout",
            "300",
            "--json",
        ],
        # One file per batch message (fixed-size messages: sizing by measured throughput
        # may put a short file and the long one in one message), claimed shortest first:
        # whisper-base does the short files, then the long one does not fit the cap and
        # the worker steps down.
        env={**env, "FLEET_BATCH_SIZE": "1", "FLEET_BATCH_SECONDS": "0"},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=330,
    )
    assert run.returncode == 1, run.stderr  # 1: some items failed, by design
    with transaction(url) as s:
        rows = s.execute(
            text("""
            SELECT a.external_id, w.task, w.status, w.last_error, r.output ->> 'transcript', r.label
            FROM work_items w JOIN audio_files a ON a.id = w.source_id
            LEFT JOIN results r ON r.work_item_id = w.id ORDER BY 1, 2""")
        ).all()
        outputs = {
            ext.split("/")[-1]: (model, output)
            for ext, model, output in s.execute(
                text("""
                SELECT a.external_id, r.model_name, r.output
                FROM work_items w JOIN audio_files a ON a.id = w.source_id
                JOIN results r ON r.work_item_id = w.id WHERE w.task = 'transcribe'""")
            ).all()
        }
    by = {
        (ext.split("/")[-1], task): (status, err, transcript, label)
        for ext, task, status, err, transcript, label in rows
    }
    for name, sentence in {**SPOKEN, "zlong.wav": LONG}.items():
        status, err, transcript, _ = by[(name, "transcribe")]
        assert status == "done", err
        assert wer(sentence, transcript) < 0.2, transcript
        status, err, _, label = by[(name, "audio_intent")]
        assert status == "done" and label, err
    # The ladder: short files on whisper-base (language recorded), the long one stepped down.
    for name in SPOKEN:
        model, output = outputs[name]
        assert model == "whisper-base" and output["language"] == "en", (name, model, output)
    assert outputs["zlong.wav"][0] == "whisper-tiny.en"
    # No speech, no text, and no intent invented for it.
    for name, why in (("faint.wav", "quiet"), ("tone.wav", "tone")):
        status, err, transcript, _ = by[(name, "transcribe")]
        assert status == "done" and transcript == "", (name, err, transcript)
        assert outputs[name][1]["no_speech"] is True
        assert outputs[name][1]["skipped_chunks"] == {why: 1}
        assert (name, "audio_intent") not in by
    status, err, _, _ = by[("seven.wav", "transcribe")]
    assert status == "failed" and "7-bit PCM" in err, err
    assert ("seven.wav", "audio_intent") not in by
    reasons = {
        name: by[(name, "transcribe")][1]
        for name in ("empty.wav", "notes.wav", "cut.wav", "escape.wav", "gone.wav")
    }
    assert all(by[(n, "transcribe")][0] == "failed" for n in reasons), by
    assert "empty" in reasons["empty.wav"].lower() or "0 bytes" in reasons["empty.wav"]
    assert "not audio" in reasons["notes.wav"].lower() or "text" in reasons["notes.wav"].lower()
    assert "truncated" in reasons["cut.wav"].lower()
    assert "outside" in reasons["escape.wav"].lower() or "escape" in reasons["escape.wav"].lower()
    assert (
        "not found" in reasons["gone.wav"].lower()
        or "missing" in reasons["gone.wav"].lower()
        or "does not exist" in reasons["gone.wav"].lower()
    )
    assert not any(
        task == "audio_intent" for (n, task) in by if n in reasons
    )  # no follow-up for failures
