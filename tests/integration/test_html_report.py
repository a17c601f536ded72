"""`fleet report` on the real Postgres: the page's numbers match the ledger, it
references nothing outside itself, and headless Chromium renders it to a PNG
with the charts on it."""

from __future__ import annotations

import json
import re
import struct
import subprocess
import time
import zlib
from collections import Counter
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from sqlalchemy import func, text, update

from db import ledger
from db.engine import transaction
from db.schema import Run
from db.sources import ingest_conversations
from fleet.cli import main
from tests.support import conversations

CHROMIUM = Path("/usr/bin/chromium")
LABELS = ("professional", "learning", "social", "chitchat", "professional", "emotional")
TIERS = {0: "tiny-big", 1: "tiny-small"}


def _result(label: str | None, tier: int) -> dict[str, Any]:
    return {
        "label": label,
        "confidence": 0.8,
        "scores": {label: 0.8} if label else None,
        "output": None,
        "model_name": TIERS[tier],
        "model_tier": tier,
        "device": "cpu",
        "latency_ms": 12.5,
    }


def _batch(url: str, task: str, n: int, *, lease: int = 60) -> ledger.ClaimedBatch:
    with transaction(url) as s:
        (batch,) = ledger.claim_batches(s, task=task, limit=n, batch_size=n, lease_seconds=lease)
    return batch


def _start(url: str, batch: ledger.ClaimedBatch) -> None:
    with transaction(url) as s:
        started = ledger.start_batch(
            s, batch_id=batch.batch_id, item_ids=batch.item_ids, worker="w@test", lease_seconds=60
        )
        assert len(started) == len(batch.item_ids)


def _finish(url: str, batch: ledger.ClaimedBatch, outcomes: list[ledger.Outcome]) -> None:
    with transaction(url) as s:
        got = ledger.finish_batch(s, batch_id=batch.batch_id, outcomes=outcomes)
    assert got.skipped == 0


def fill(url: str, *, rounds: int = 4, pause: float = 1.1) -> tuple[int, dict[str, Counter[str]]]:
    """A nightly run of two tasks through the real ledger: batches a second apart,
    labels, two ladder tiers, failures of three kinds, a poison item and an expired
    lease marked dead; plus items finished before and after the run, which the
    report must leave out. Returns (run id, expected {task: Counter(status)})."""
    with transaction(url) as s:
        ingest_conversations(s, conversations(80))
        for task in ("intent", "sentiment"):
            ledger.discover(s, task=task, source_kind="conversation")

    before = _batch(url, "intent", 5)  # finished before the run: not in its report
    _start(url, before)
    _finish(url, before, [ledger.Outcome(i, _result("social", 0)) for i in before.item_ids])
    time.sleep(pause)

    with transaction(url) as s:
        run = Run(trigger="nightly", task="intent,sentiment")
        s.add(run)
        s.flush()
        run_id = run.id

    expected: dict[str, Counter[str]] = {"intent": Counter(), "sentiment": Counter()}
    for r in range(rounds):
        tier = 0 if r < rounds // 2 else 1  # the worker stepped down half-way
        batch = _batch(url, "intent", 9)
        _start(url, batch)
        outcomes = []
        for k, item in enumerate(batch.item_ids):
            if k == 0:
                outcomes.append(ledger.Outcome(item, None, "conversation has no messages"))
            elif k == 1 and r % 2:
                outcomes.append(
                    ledger.Outcome(
                        item,
                        None,
                        f"message {k + r} has no role (expected a string such as 'user')",
                    )
                )
            elif k == 2 and r == rounds - 1:
                err = f"the model failed on this item (RuntimeError: index {item} out of range)"
                outcomes.append(ledger.Outcome(item, _result(None, tier), err))
            else:
                outcomes.append(ledger.Outcome(item, _result(LABELS[(k + r) % len(LABELS)], tier)))
        _finish(url, batch, outcomes)
        for o in outcomes:
            expected["intent"]["failed" if o.error else "done"] += 1

        batch = _batch(url, "sentiment", 4)
        _start(url, batch)
        _finish(
            url,
            batch,
            [
                ledger.Outcome(i, _result(("positive", "negative")[i % 2], 0))
                for i in batch.item_ids
            ],
        )
        expected["sentiment"]["done"] += 4
        time.sleep(pause)

    poison = _batch(url, "sentiment", 2)
    _start(url, poison)
    with transaction(url) as s:
        ledger.mark_dead(
            s,
            batch_id=poison.batch_id,
            item_ids=poison.item_ids,
            reason="killed its worker 3 times; left out so the rest of its batch could finish",
        )
    lost = _batch(url, "intent", 1)  # a worker took it and was lost: the lease runs out
    _start(url, lost)
    with transaction(url) as s:
        s.execute(
            text(
                "UPDATE batches SET lease_until = now() - interval '1 second' "
                "WHERE batch_id = CAST(:b AS uuid)"
            ),
            {"b": lost.batch_id},
        )
        assert ledger.reconcile(s, max_attempts=1)["dead"] == 1
    expected["sentiment"]["dead"] += len(poison.item_ids)
    expected["intent"]["dead"] += len(lost.item_ids)

    with transaction(url) as s:
        s.execute(update(Run).where(Run.id == run_id).values(finished_at=func.now()))
    time.sleep(0.05)
    after = _batch(url, "intent", 3)  # finished after the run: not in its report either
    _start(url, after)
    _finish(url, after, [ledger.Outcome(i, _result("social", 0)) for i in after.item_ids])
    return run_id, expected


class _Cells(HTMLParser):
    """The summary table's cells: {task: {key: text}} from data-task / data-k."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: dict[str, dict[str, str]] = {}
        self.cards: dict[str, str] = {}
        self._task: str | None = None
        self._key: str | None = None
        self._card: str | None = None
        self._in_v = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "tr" and a.get("data-task"):
            self._task = a["data-task"]
            self.rows[self._task or ""] = {}
        elif tag == "td" and self._task and a.get("data-k"):
            self._key = a["data-k"]
        elif tag == "div" and "card" in (a.get("class") or "").split():
            self._card = a.get("data-k")
        elif tag == "div" and a.get("class") == "v" and self._card:
            self._in_v = True

    def handle_endtag(self, tag: str) -> None:
        if tag == "tr":
            self._task = None
        elif tag == "td":
            self._key = None
        elif tag == "div" and self._in_v:
            self._in_v, self._card = False, None

    def handle_data(self, data: str) -> None:
        if self._task and self._key:
            self.rows[self._task][self._key] = data
        elif self._in_v and self._card:
            self.cards[self._card] = data


def _ledger_truth(url: str, run_id: int) -> dict[str, Any]:
    """What the database says about the run window, by plain SQL."""
    window = "w.updated_at BETWEEN r.started_at AND r.finished_at"
    with transaction(url) as s:
        counts = s.execute(
            text(
                f"SELECT w.task, w.status, count(*) FROM work_items w, runs r WHERE r.id = :r "
                f"AND w.status IN ('done', 'failed', 'dead') AND {window} GROUP BY 1, 2"
            ),
            {"r": run_id},
        ).all()
        labels = s.execute(
            text(
                f"SELECT w.task, x.label, count(*) FROM work_items w JOIN results x "
                f"ON x.work_item_id = w.id, runs r WHERE r.id = :r AND w.status = 'done' "
                f"AND {window} GROUP BY 1, 2"
            ),
            {"r": run_id},
        ).all()
        tiers = s.execute(
            text(
                f"SELECT w.task, x.model_tier, x.model_name, count(*) FROM work_items w "
                f"JOIN results x ON x.work_item_id = w.id, runs r WHERE r.id = :r "
                f"AND w.status IN ('done', 'failed', 'dead') AND {window} GROUP BY 1, 2, 3"
            ),
            {"r": run_id},
        ).all()
        seconds = s.execute(
            text("SELECT extract(epoch FROM finished_at - started_at) FROM runs WHERE id = :r"),
            {"r": run_id},
        ).scalar_one()
    out: dict[str, Any] = {"counts": {}, "labels": {}, "tiers": {}, "seconds": float(seconds)}
    for task, status, n in counts:
        out["counts"].setdefault(task, Counter())[status] = n
    for task, label, n in labels:
        out["labels"].setdefault(task, {})[str(label)] = n
    for task, tier, model, n in tiers:
        out["tiers"][(task, tier, model)] = n
    return out


def _page_data(html: str) -> dict[str, Any]:
    m = re.search(r'<script type="application/json" id="report-data">(.*?)</script>', html, re.S)
    assert m, "the page embeds its numbers as JSON"
    return json.loads(m.group(1))


def _report(env: dict[str, str], *args: str) -> Any:
    return CliRunner().invoke(main, ["report", *args], env=env)


def test_report_numbers_match_the_ledger(db_url, broker_url, tmp_path):
    run_id, expected = fill(db_url)
    env = {"DATABASE_URL": db_url, "BROKER_URL": broker_url}
    out = tmp_path / "report.html"
    res = _report(env, "--run", str(run_id), "--out", str(out))
    assert res.exit_code == 0, res.output
    truth = _ledger_truth(db_url, run_id)
    assert truth["counts"] == expected  # the window holds exactly the run's items
    total = sum(sum(c.values()) for c in expected.values())
    assert f"{total} items" in res.output

    html = out.read_text()
    data = _page_data(html)
    assert data["run_id"] == run_id and data["trigger"] == "nightly"
    for task, c in expected.items():
        got = data["tasks"][task]
        assert (got["done"], got["failed"], got["dead"]) == (c["done"], c["failed"], c["dead"])
        assert got["items"] == sum(c.values())
    assert data["labels"] == truth["labels"]
    assert {(t["task"], t["tier"], t["model"]): t["done"] + t["failed"] for t in data["tiers"]} == (
        truth["tiers"]
    )
    assert {t["tier"] for t in data["tiers"] if t["task"] == "intent"} == {0, 1}
    assert sum(sum(c) for c in data["throughput"]["counts"].values()) == total
    busy_bins = [k for k, n in enumerate(data["throughput"]["counts"]["intent"]) if n]
    assert len(busy_bins) >= 3, "batches a second apart land in separate bins"
    assert data["duration_s"] == pytest.approx(truth["seconds"], abs=0.01)

    reasons = {(f["task"], f["reason"]): (f["failed"], f["dead"]) for f in data["failures"]}
    assert reasons[("intent", "conversation has no messages")] == (4, 0)
    # per-item details (numbers, quoted values) fold into one reason
    assert reasons[("intent", "message N has no role (expected a string such as \u2026)")] == (2, 0)
    assert reasons[("intent", "the model failed on this item (RuntimeError: index N out of range)")]
    assert reasons[
        ("sentiment", "killed its worker N times; left out so the rest of its batch could finish")
    ] == (0, 2)
    assert [v for (t, r), v in reasons.items() if r.startswith("started by a worker")] == [(0, 1)]
    assert sum(a + b for a, b in reasons.values()) == sum(
        c["failed"] + c["dead"] for c in expected.values()
    )

    cells = _Cells()
    cells.feed(html)
    for task, c in expected.items():
        row = cells.rows[task]
        assert [int(row[k].replace(",", "")) for k in ("items", "done", "failed", "dead")] == [
            sum(c.values()),
            c["done"],
            c["failed"],
            c["dead"],
        ]
        rate = sum(c.values()) / truth["seconds"]
        assert float(row["items_per_s"]) == pytest.approx(rate, rel=0.02, abs=0.01)
    assert int(cells.rows["all tasks"]["items"]) == total
    assert int(cells.cards["items"]) == total
    assert int(cells.cards["dead"]) == sum(c["dead"] for c in expected.values())

    # self-contained: the only URL is the SVG namespace; nothing is fetched
    assert set(re.findall(r"https?://[^\s\"'<>)]+", html)) == {"http://www.w3.org/2000/svg"}
    assert not re.search(r"<(link|img|iframe|object|embed)\b|\bsrc=|@import|url\(", html)
    assert html.count("<svg") >= 5  # throughput, two label panels, tiers, failures

    assert "pass <code>--gold TASK=FILE</code>" in html and data["calibration"] == {}

    # --gold draws a reliability diagram: every result at confidence 0.8, half of the
    # gold labels agree, so the 0.7-0.8 bin holds them all at accuracy 0.5.
    with transaction(db_url) as s:
        done = s.execute(
            text(
                "SELECT c.external_id, r.label FROM work_items w JOIN results r ON "
                "r.work_item_id = w.id JOIN conversations c ON c.id = w.source_id "
                "WHERE w.task = 'intent' AND r.label IS NOT NULL ORDER BY c.external_id LIMIT 4"
            )
        ).all()
    gold = tmp_path / "gold.jsonl"
    gold.write_text(
        "".join(
            json.dumps({"external_id": e, "label": lab if k % 2 else "not-" + lab}) + "\n"
            for k, (e, lab) in enumerate(done)
        )
    )
    cal = tmp_path / "cal.html"
    res = _report(env, "--run", str(run_id), "--gold", f"intent={gold}", "--out", str(cal))
    assert res.exit_code == 0, res.output
    page = cal.read_text()
    rep = _page_data(page)["calibration"]["intent"]
    assert rep["n"] == 4 and rep["accuracy"] == 0.5 and rep["ece"] == pytest.approx(0.3)
    assert [b["n"] for b in rep["reliability"]] == [0] * 7 + [4, 0, 0]
    assert "intent: reliability diagram" in page and "ECE 0.300" in page
    bad = _report(env, "--run", str(run_id), "--gold", "intent", "--out", str(cal))
    assert bad.exit_code == 2 and "TASK=FILE" in bad.output

    # --task narrows the page to one task
    one = tmp_path / "intent.html"
    res = _report(env, "--run", str(run_id), "--task", "intent", "--out", str(one))
    assert res.exit_code == 0, res.output
    assert set(_page_data(one.read_text())["tasks"]) == {"intent"}

    # a date window sees the items finished before and after the run too
    wide = tmp_path / "wide.html"
    res = _report(env, "--since", "1h", "--out", str(wide))
    assert res.exit_code == 0, res.output
    wide_data = _page_data(wide.read_text())
    assert wide_data["tasks"]["intent"]["done"] == expected["intent"]["done"] + 5 + 3
    assert wide_data["runs"] == [run_id]
    assert wide_data["trigger"] == f"nightly (run {run_id})"


def test_report_errors_say_what_to_do(db_url, broker_url, tmp_path):
    env = {"DATABASE_URL": db_url, "BROKER_URL": broker_url}
    out = str(tmp_path / "r.html")
    res = _report(env, "--run", "42", "--out", out)
    assert res.exit_code == 2
    assert "no run with id 42" in res.output and "--since" in res.output

    res = _report(env, "--since", "2h", "--out", out)
    assert res.exit_code == 2
    assert "no results between" in res.output and "fleet run --task" in res.output

    with transaction(db_url) as s:
        ingest_conversations(s, conversations(3))
        ledger.discover(s, task="intent", source_kind="conversation")
    batch = _batch(db_url, "intent", 3)
    _start(db_url, batch)
    _finish(db_url, batch, [ledger.Outcome(i, _result("social", 0)) for i in batch.item_ids])
    res = _report(env, "--since", "2020-01-01", "--until", "2020-01-02", "--out", out)
    assert res.exit_code == 2
    assert "no results between 2020-01-01 00:00:00 and 2020-01-02 00:00:00" in res.output
    assert "try --since 20" in res.output  # a window that holds the latest finished item

    with transaction(db_url) as s:
        run = Run(trigger="manual", task="intent", finished_at=func.now())
        s.add(run)
        s.flush()
        run_id = run.id
    res = _report(env, "--run", str(run_id), "--task", "sentiment", "--out", out)
    assert res.exit_code == 2 and "was not part of it" in res.output
    res = _report(env, "--run", str(run_id), "--out", out)
    assert res.exit_code == 2 and f"run {run_id} (manual) finished no items" in res.output

    for args, words in [
        ((), f"run {run_id} (manual) finished no items"),  # no option: the latest run
        (("--run", "1", "--since", "1h"), "give either --run ID or --since DATE"),
        (("--since", "last tuesday"), "cannot read --since 'last tuesday'"),
        (("--since", "1h", "--until", "2h"), "must be after --since"),
    ]:
        res = _report(env, *args, "--out", out)
        assert res.exit_code == 2, res.output
        assert words in res.output
    assert not Path(out).exists()


# -- rendering ---------------------------------------------------------------------


def read_png(path: Path) -> tuple[int, int, list[bytes]]:
    """(width, height, rows of RGB(A) bytes) of an 8-bit RGB or RGBA PNG, unfiltered."""
    blob = path.read_bytes()
    assert blob[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat, width, height, channels = 8, [], 0, 0, 0
    while pos < len(blob):
        (length,) = struct.unpack(">I", blob[pos : pos + 4])
        kind, body = blob[pos + 4 : pos + 8], blob[pos + 8 : pos + 8 + length]
        pos += 12 + length
        if kind == b"IHDR":
            width, height, depth, ctype, _, _, interlace = struct.unpack(">IIBBBBB", body)
            assert depth == 8 and ctype in (2, 6) and interlace == 0, (depth, ctype, interlace)
            channels = 3 if ctype == 2 else 4
        elif kind == b"IDAT":
            idat.append(body)
        elif kind == b"IEND":
            break
    raw = zlib.decompress(b"".join(idat))
    stride, bpp = width * channels, channels
    rows: list[bytes] = []
    prev = bytearray(stride)
    for y in range(height):
        f, line = (
            raw[y * (stride + 1)],
            bytearray(raw[y * (stride + 1) + 1 : (y + 1) * (stride + 1)]),
        )
        if f == 1:
            for i in range(bpp, stride):
                line[i] = (line[i] + line[i - bpp]) & 0xFF
        elif f == 2:
            line = bytearray((a + b) & 0xFF for a, b in zip(line, prev, strict=True))
        elif f == 3:
            for i in range(stride):
                left = line[i - bpp] if i >= bpp else 0
                line[i] = (line[i] + ((left + prev[i]) >> 1)) & 0xFF
        elif f == 4:
            for i in range(stride):
                a = line[i - bpp] if i >= bpp else 0
                b, c = prev[i], prev[i - bpp] if i >= bpp else 0
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 0xFF
        rows.append(bytes(line))
        prev = line
    return width, height, rows


def screenshot(html: Path, png: Path, profile: Path, *, size: str = "1280,2000") -> None:
    subprocess.run(
        [
            str(CHROMIUM),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={profile}",
            f"--screenshot={png}",
            f"--window-size={size}",
            f"file://{html}",
        ],
        check=True,
        capture_output=True,
        timeout=180,
    )


@pytest.mark.skipif(
    not CHROMIUM.exists(), reason="needs /usr/bin/chromium (scripts/install.sh installs it)"
)
def test_report_renders_in_chromium(db_url, broker_url, tmp_path):
    run_id, _ = fill(db_url, rounds=3, pause=0.6)
    out = tmp_path / "report.html"
    res = _report(
        {"DATABASE_URL": db_url, "BROKER_URL": broker_url}, "--run", str(run_id), "-o", str(out)
    )
    assert res.exit_code == 0, res.output
    png = tmp_path / "report.png"
    screenshot(out, png, tmp_path / "chromium-profile")
    width, height, rows = read_png(png)
    assert (width, height) == (1280, 2000)

    channels = len(rows[0]) // width
    pixels: Counter[bytes] = Counter()
    for row in rows[::4]:
        for x in range(0, len(row), channels * 2):
            pixels[row[x : x + 3]] += 1
    sampled = sum(pixels.values())
    white = pixels[b"\xff\xff\xff"]
    assert len(pixels) > 200, f"only {len(pixels)} distinct colours: a blank or broken page"
    assert 0.03 < 1 - white / sampled < 0.6, "the page is neither empty nor a solid block"

    def near(rgb: str, tol: int = 12) -> int:
        want = bytes.fromhex(rgb.lstrip("#"))
        return sum(
            n
            for p, n in pixels.items()
            if all(abs(a - b) <= tol for a, b in zip(p, want, strict=True))
        )

    # the charts drew in their colours: task lines and bars, done / failed / dead
    for fill_colour in ("#4477AA", "#EE6677", "#228833", "#EE7733", "#CC3311"):
        assert near(fill_colour) > 20, f"{fill_colour} is missing from the rendered page"
