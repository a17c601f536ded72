"""Shared test helpers: throwaway databases, tiny real models, worker processes."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psycopg
from sqlalchemy import text

from fleet.models.finetune import INTENT_LABELS

REPO = Path(__file__).resolve().parent.parent
ADMIN_URL = os.environ.get(
    "TEST_ADMIN_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
REDIS_BASE = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379")


def create_database() -> tuple[str, str]:
    """A fresh database; returns (name, sqlalchemy url)."""
    name = f"fleet_test_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = ADMIN_URL.rsplit("/", 1)[0]
    return name, f"{base}/{name}".replace("postgresql://", "postgresql+psycopg://")


def drop_database(name: str) -> None:
    from db.engine import dispose_all

    dispose_all()
    with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def build_tiny_classifier(
    folder: Path,
    *,
    labels: Sequence[str] = INTENT_LABELS,
    hidden: int = 32,
    layers: int = 2,
    seed: int = 0,
) -> Path:
    """A real BERT sequence classifier with random weights (MiniLM's tokenizer)."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from fleet.models.catalogue import minilm_path

    if (folder / "config.json").is_file():
        return folder
    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(str(minilm_path()), local_files_only=True)
    cfg = BertConfig(
        vocab_size=tok.vocab_size,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=hidden * 2,
        max_position_embeddings=512,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={name: i for i, name in enumerate(labels)},
    )
    model = BertForSequenceClassification(cfg).eval()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def tasks_toml(
    path: Path, tiers: Sequence[dict[str, Any]], *, task: str = "intent", extra: str = ""
) -> Path:
    lines = [
        "include_bundled = false",
        f"[tasks.{task}]",
        'kind = "sequence_classify"',
        'source = "conversation"',
    ]
    for t in tiers:
        lines.append(f"[[tasks.{task}.ladder]]")
        for k, v in t.items():
            lines.append(f"{k} = {json.dumps(v)}")
    path.write_text("\n".join(lines) + "\n" + extra)
    return path


def conversations(n: int, *, prefix: str = "c", start: int = 0) -> list[dict[str, Any]]:
    words = [
        "report",
        "deadline",
        "friend",
        "course",
        "happy",
        "goal",
        "weather",
        "document",
        "anxious",
    ]
    out = []
    for i in range(start, start + n):
        k = 1 + (i * 7) % 40
        content = " ".join(words[(i + j) % len(words)] for j in range(k))
        out.append(
            {
                "external_id": f"{prefix}{i:06d}",
                "messages": [
                    {"role": "user", "content": f"message {i}: {content}"},
                    {"role": "assistant", "content": "ok"},
                ],
                "language": "en",
            }
        )
    return out


def write_jsonl(path: Path, rows: Sequence[Any]) -> Path:
    with path.open("w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return path


def fleet_env(settings_env: dict[str, str]) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("FLEET_", "DATABASE_URL", "BROKER_URL"))
    }
    env.update(settings_env)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_fleet(
    args: Sequence[str], env: dict[str, str], *, timeout: float = 300, check: bool = True
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, "-m", "fleet.cli", *args],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"fleet {' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
        )
    return proc


class WorkerProcess:
    """A real `celery worker` (via `fleet worker`) as a subprocess."""

    def __init__(
        self,
        task: str,
        env: dict[str, str],
        log: Path,
        *,
        name: str | None = None,
        extra_env: dict[str, str] | None = None,
    ) -> None:
        self.task, self.env, self.log = task, dict(env), log
        if extra_env:
            self.env.update(extra_env)
        self.name = name
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> WorkerProcess:
        from fleet.ops.workercommand import worker_argv

        argv = worker_argv(self.task, gpu=None, loglevel="INFO", hostname=self.name)
        env = dict(self.env)
        env["CUDA_VISIBLE_DEVICES"] = ""
        self.proc = subprocess.Popen(
            argv,
            env=env,
            cwd=REPO,
            stdout=self.log.open("ab"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        return self

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(
                    f"worker exited {self.proc.returncode}:\n{self.log.read_text()[-4000:]}"
                )
            if " ready." in self.log.read_text(errors="replace"):
                return
            time.sleep(0.2)
        raise AssertionError(f"worker not ready after {timeout}s:\n{self.log.read_text()[-4000:]}")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            self.proc.wait(timeout=60)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()


def status_counts(url: str, task: str) -> dict[str, int]:
    from db import ledger
    from db.engine import transaction

    with transaction(url) as s:
        return ledger.counts(s, task=task).get(task, {})


def result_count_per_item(url: str, task: str) -> dict[int, int]:
    from db.engine import transaction

    with transaction(url) as s:
        rows = s.execute(
            text(
                "SELECT w.id, count(r.id) FROM work_items w LEFT JOIN results r ON r.work_item_id = w.id "
                "WHERE w.task = :t GROUP BY w.id"
            ),
            {"t": task},
        ).all()
    return dict(rows)


def normalize(text: str) -> list[str]:
    """Lowercased words without punctuation ("it's" -> "its", "follow-up" -> "follow up")."""
    text = text.lower().replace("'", "").replace("\u2019", "")
    return re.sub(r"[^a-z0-9]+", " ", text).split()


def wer(reference: str, hypothesis: str) -> float:
    """Word error rate: word-level Levenshtein distance / reference length."""
    ref, hyp = normalize(reference), normalize(hypothesis)
    if not ref:
        return 0.0 if not hyp else 1.0
    row = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        diag, row[0] = row[0], i
        for j, h in enumerate(hyp, 1):
            diag, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, diag + (r != h))
    return row[-1] / len(ref)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServedProcess:
    """A `fleet` command that serves HTTP (flower, metrics) as a real process."""

    def __init__(self, args: Sequence[str], env: dict[str, str], port: int, log: Path) -> None:
        self.port, self.log = port, log
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fleet.cli", *args],
            env=env,
            cwd=REPO,
            stdout=log.open("wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def wait_up(self, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"exited:\n{self.log.read_text()}"
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return
            except OSError:
                time.sleep(0.2)
        raise AssertionError(f"not listening after {timeout}s:\n{self.log.read_text()}")

    def get(self, path: str, auth: tuple[str, str] | None = None) -> tuple[int, bytes]:
        import base64

        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}")
        if auth is not None:
            token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
            req.add_header("Authorization", f"Basic {token}")
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=20)


def sigint_as_at_a_terminal() -> None:
    """preexec_fn for a child that a test stops with SIGINT (a Ctrl-C): restore
    the default disposition. A test run started in the background (`cmd &` in
    a shell without job control) has SIGINT ignored, the child inherits that,
    and Python then installs no KeyboardInterrupt handler at all."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
