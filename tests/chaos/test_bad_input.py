"""The bad-input corpus (tests/chaos/corpus.py) mixed with good items, through
`fleet ingest`, `fleet run` and real workers: every bad case ends where the
corpus says (rejected at ingest with its reason, or failed with its reason,
or done when it is odd but valid), the good items are done, batches holding
bad items still finish their good ones, and neither worker process restarts.
"""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
from sqlalchemy import text

from db.engine import transaction
from tests.chaos.conftest import TINY_LADDER, make_fleet
from tests.chaos.corpus import AUDIO, CONVERSATIONS, conversation_ext, pcm16, tone, wav_bytes
from tests.support import conversations, run_fleet

pytestmark = [pytest.mark.chaos, pytest.mark.e2e, pytest.mark.slow]

SPOKEN = {
    "good-budget.wav": "I think we should review the budget before the next meeting.",
    "good-refund.wav": "The customer asked for a refund because the package arrived late.",
}


def _config(path, whisper_dir):
    lines = [
        "include_bundled = false",
        "[tasks.intent]",
        'kind = "sequence_classify"',
        'source = "conversation"',
    ]
    for tier in TINY_LADDER:
        lines.append("[[tasks.intent.ladder]]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in tier.items()]
    lines += [
        "[tasks.transcribe]",
        'kind = "transcribe"',
        'source = "audio"',
        "[[tasks.transcribe.ladder]]",
        'name = "whisper-tiny.en"',
        f"path = {json.dumps(str(whisper_dir))}",
        "max_batch_tokens = 48000",
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def _write_conversations(path, good):
    """Good lines with the corpus interleaved; returns {line number: case name}."""
    bad_lines = iter(CONVERSATIONS)
    lines: list[bytes] = []
    where: dict[int, str] = {}
    for i, row in enumerate(good):
        lines.append(json.dumps(row).encode())
        if i % 2 == 1:
            case = next(bad_lines, None)
            if case is not None:
                lines.append(case[1])
                where[len(lines)] = case[0]
    for name, line, _ in bad_lines:
        lines.append(line)
        where[len(lines)] = name
    path.write_bytes(b"\n".join(lines) + b"\n")
    return where


def _good_audio(folder):
    if shutil.which("espeak-ng"):
        for name, sentence in SPOKEN.items():
            subprocess.run(["espeak-ng", "-w", str(folder / name), sentence], check=True)
        return list(SPOKEN)
    (folder / "good-tone.wav").write_bytes(wav_bytes(pcm16(tone(2.0))))
    return ["good-tone.wav"]


def _outcomes(url, kind):
    table = {"conversation": "conversations", "audio": "audio_files"}[kind]
    with transaction(url) as s:
        rows = s.execute(
            text(
                f"""
                SELECT src.external_id, w.status, w.last_error, w.batch_id::text,
                       (SELECT count(*) FROM results r WHERE r.work_item_id = w.id)
                FROM {table} src JOIN work_items w
                  ON w.source_id = src.id AND w.source_kind = :kind
                """
            ),
            {"kind": kind},
        ).all()
    return {ext: (status, err or "", batch, n) for ext, status, err, batch, n in rows}


def _check(case: str, expect, got, ingest_bad: list[str]) -> str | None:
    """None if the case ended as expected, else what went wrong."""
    reason = expect.reason.lower()
    if expect.outcome == "ingest":
        if got is not None:
            return f"expected ingest to reject it, but it was stored and ended {got[0]}"
        if not any(reason in r.lower() for r in ingest_bad):
            return f"ingest did not report {expect.reason!r}: {ingest_bad}"
        return None
    if expect.outcome == "skipped":
        return None if got is None else f"expected no item, got {got[0]}"
    if got is None:
        return "expected an item, none was stored"
    status, err, _, results = got
    if expect.outcome == "done":
        return None if status == "done" and results == 1 else f"ended {status}: {err}"
    if status != "failed" or reason not in err.lower():
        return f"expected failed with {expect.reason!r}, ended {status}: {err!r}"
    return None


def test_bad_input_corpus_fails_each_bad_item_with_its_reason(
    db_url, broker_url, tiny_models, whisper_dir, tmp_path, capsys
):
    root = tmp_path / "audio"
    folder = root / "night1"
    folder.mkdir(parents=True)
    outside = tmp_path / "secret.wav"
    outside.write_bytes(wav_bytes(pcm16(tone())))
    fleet = make_fleet(
        db_url,
        broker_url,
        tiny_models,
        tmp_path,
        config=_config(tmp_path / "tasks.toml", whisper_dir),
        FLEET_AUDIO_ROOT=str(root),
        FLEET_BATCH_SIZE="24",
        FLEET_LEASE_SECONDS="120",
    )
    workers = [fleet.worker("intent"), fleet.worker("transcribe")]
    try:
        # conversations: the corpus between good lines, tiny good ones included so the
        # smallest batch (claims go by size) holds good items beside the tiny bad ones
        good = conversations(40) + [
            {"external_id": f"tiny{i}", "messages": [{"role": "u", "content": w}]}
            for i, w in enumerate(["hi", "ok", "yes", "no", "thanks", "bye", "why", "help"])
        ]
        where = _write_conversations(tmp_path / "corpus.jsonl", good)
        out = run_fleet(
            ["ingest", "conversations", str(tmp_path / "corpus.jsonl"), "--json"], fleet.env
        )
        report = json.loads(out.stdout)
        bad_by_case = {where[b["line"]]: b["reason"] for b in report["bad"]}

        # audio: every case's file, good files beside them, rows other systems wrote
        made = {name: make(folder, outside) for name, make, _ in AUDIO}
        good_audio = _good_audio(folder)
        out = run_fleet(["ingest", "audio", str(folder), "--json"], fleet.env)
        audio_report = json.loads(out.stdout)
        rows = [(f"row/{n}", m.row_uri) for n, m in made.items() if m.row_uri is not None]
        with transaction(db_url) as s:
            s.execute(
                text("INSERT INTO audio_files (external_id, uri) VALUES (:e, :u)"),
                [{"e": e, "u": u} for e, u in rows],
            )

        for w in workers:
            w.wait_ready(timeout=240)
        pids = [w.proc.pid for w in workers]
        run = fleet.run("intent", timeout=400)
        run_audio = fleet.run("transcribe", timeout=400)
        code, out_text, err = fleet.wait_run(run, timeout=420)
        code_audio, out_audio, err_audio = fleet.wait_run(run_audio, timeout=420)
        alive = [
            w.proc.poll() is None and w.proc.pid == pid
            for w, pid in zip(workers, pids, strict=True)
        ]
    finally:
        fleet.close()
    assert code == 1 and code_audio == 1, (out_text, err[-3000:], out_audio, err_audio[-3000:])
    assert all(alive), fleet.logs()[-4000:]  # the same worker processes all along
    assert all(w.log.read_text().count(" ready.") == 1 for w in workers)

    conv = _outcomes(db_url, "conversation")
    audio = _outcomes(db_url, "audio")
    problems = {}
    for name, _, expect in CONVERSATIONS:
        ext = conversation_ext(name)
        bad = [bad_by_case[name]] if name in bad_by_case else []
        problem = _check(name, expect, conv.get(ext), bad)
        if problem:
            problems[f"conversation {name}"] = problem
    audio_bad = [b["reason"] for b in audio_report["bad"]]
    for name, _, expect in AUDIO:
        m = made[name]
        ext = (
            f"row/{name}"
            if m.row_uri is not None
            else f"{folder.name}/{m.file}"
            if m.file
            else None
        )
        problem = _check(name, expect, audio.get(ext) if ext else None, audio_bad)
        if problem:
            problems[f"audio {name}"] = problem
    assert not problems, json.dumps(problems, indent=1)

    # nothing else went wrong: every good item done, nothing reported bad but the corpus
    assert all(conv[g["external_id"]][0] == "done" for g in good)
    assert all(audio[f"{folder.name}/{n}"][0] == "done" for n in good_audio)
    assert set(bad_by_case.values()) and set(bad_by_case) == {
        n for n, _, e in CONVERSATIONS if e.outcome == "ingest"
    }
    assert len(audio_bad) == sum(e.outcome == "ingest" for _, _, e in AUDIO)
    # batches that held bad items finished their good ones (each batch has done items)
    for items in (conv, audio):
        batches: dict[str, set[str]] = {}
        for status, _, batch, _ in items.values():
            batches.setdefault(batch, set()).add(status)
        mixed = [b for b, statuses in batches.items() if "failed" in statuses]
        assert mixed and all("done" in batches[b] for b in mixed), batches
    with capsys.disabled():
        print(
            f"\n[chaos] bad input: {len(CONVERSATIONS)} conversation and {len(AUDIO)} audio cases, "
            f"{len(bad_by_case) + len(audio_bad)} rejected at ingest, "
            f"{sum(s == 'failed' for s, *_ in conv.values()) + sum(s == 'failed' for s, *_ in audio.values())} "
            "failed with their reasons, the rest done"
        )
