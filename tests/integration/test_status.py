"""`fleet status`, `fleet watch` and `fleet metrics` against the real Postgres
and Redis, as subprocesses. The ledger states are made by the ledger's own
functions (claim, start, finish), as a worker would; the worker stats by the
worker's own publisher. A worker process itself runs in
tests/e2e/test_metrics_e2e.py."""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from db import ledger
from db.engine import transaction
from db.schema import Run
from fleet.observe.prometheus import FleetCollector
from fleet.observe.status import collect, queue_keys
from tests.support import (
    REPO,
    conversations,
    fleet_env,
    run_fleet,
    sigint_as_at_a_terminal,
    write_jsonl,
)
from wire import stats as worker_stats
from wire.stats import Publisher, WorkerStats, redis_client

DB_PASSWORD = "Db-pa55word-9f3k"
BROKER_PASSWORD = "Br0ker-pa55word-x7q"
DASHBOARD = REPO / "deploy" / "grafana" / "fleet-dashboard.json"


def _with_passwords(db_url: str, broker_url: str) -> tuple[str, str]:
    """The same servers, with passwords in the URLs: the trust-auth Postgres ignores
    its password; Redis accepts any password for its passwordless `default` user."""
    db = db_url.replace("://postgres@", f"://postgres:{DB_PASSWORD}@")
    broker = broker_url.replace("redis://", f"redis://default:{BROKER_PASSWORD}@")
    assert DB_PASSWORD in db and BROKER_PASSWORD in broker
    return db, broker


@pytest.fixture
def env(db_url: str, broker_url: str, tmp_path: Path) -> dict[str, str]:
    db, broker = _with_passwords(db_url, broker_url)
    return fleet_env(
        {
            "DATABASE_URL": db,
            "BROKER_URL": broker,
            "FLEET_STATE_DIR": str(tmp_path / "state"),
            "FLEET_BATCH_SIZE": "16",
        }
    )


def _tmp(env: dict[str, str]) -> Path:
    return Path(env["FLEET_STATE_DIR"]).parent


def _ingest(env: dict[str, str], n: int) -> None:
    run_fleet(
        ["ingest", "conversations", str(write_jsonl(_tmp(env) / "c.jsonl", conversations(n)))], env
    )


def _no_secrets(*texts: str) -> None:
    for t in texts:
        assert DB_PASSWORD not in t and BROKER_PASSWORD not in t, t


def _finish(url: str, *, n: int, failed: int, worker: str = "w") -> None:
    """Claim n items as one batch, start it and finish it: n - failed done (with a
    result each), `failed` failed without one."""
    with transaction(url) as s:
        [batch] = ledger.claim_batches(s, task="intent", limit=n, batch_size=n, lease_seconds=600)
    with transaction(url) as s:
        started = ledger.start_batch(
            s, batch_id=batch.batch_id, item_ids=batch.item_ids, worker=worker, lease_seconds=600
        )
    ids = [i.item_id for i in started]
    row = {
        "label": "greeting",
        "confidence": 0.9,
        "scores": None,
        "output": None,
        "model_name": "tiny-small",
        "model_tier": 1,
        "device": "cpu",
        "latency_ms": 1.0,
    }
    outcomes = [ledger.Outcome(i, row) for i in ids[failed:]]
    outcomes += [ledger.Outcome(i, None, "bad input") for i in ids[:failed]]
    with transaction(url) as s:
        ledger.finish_batch(s, batch_id=batch.batch_id, outcomes=outcomes)


def _start_running(url: str, n: int) -> None:
    with transaction(url) as s:
        [batch] = ledger.claim_batches(s, task="intent", limit=n, batch_size=n, lease_seconds=600)
    with transaction(url) as s:
        ledger.start_batch(
            s, batch_id=batch.batch_id, item_ids=batch.item_ids, worker="w", lease_seconds=600
        )


@pytest.fixture
def publisher(broker_url: str) -> Iterator[Publisher]:
    """The worker-side publisher, as a worker on GPU 3 stepped down to tier 1 uses it."""
    p = worker_stats.start(
        broker_url,
        worker="intent@gpu3.testhost",
        task="intent",
        device="cpu",
        placement=lambda: (1, "tiny-small"),
    )
    p.stats.gpu = "3"
    p.record(
        lambda s: s.observe_batch(seconds=0.7, done=12, failed=4, ooms=3, downshifts=1, step_ups=0)
    )
    yield p
    worker_stats.stop()


def test_status_json_matches_the_ledger_and_hides_passwords(db_url, broker_url, env, publisher):
    _ingest(env, 100)
    sent = run_fleet(["enqueue", "-t", "intent", "--limit", "64", "--json"], env)
    assert json.loads(sent.stdout)["batches"] == 4
    before = time.time()
    _finish(db_url, n=20, failed=5)
    _start_running(db_url, 8)
    with transaction(db_url) as s:
        run = Run(trigger="manual", task="intent")
        s.add(run)
        s.flush()
        run_id = run.id

    proc = run_fleet(["status", "--json"], env)
    after = time.time()
    _no_secrets(proc.stdout, proc.stderr)
    doc = json.loads(proc.stdout)
    with transaction(db_url) as s:
        counts = ledger.counts(s, task="intent")["intent"]
    intent = doc["tasks"]["intent"]
    assert {k: v for k, v in intent["counts"].items() if v} == counts
    assert counts == {"pending": 8, "queued": 64, "running": 8, "done": 15, "failed": 5}
    assert intent["total"] == 100 and intent["remaining"] == 80
    r = redis.Redis.from_url(broker_url)
    assert intent["queue_length"] == r.llen("fleet.intent") == 4
    # 15 results written just now: over a span floored at 10 s.
    lo, hi = 15 / max(10.0, after - before + 1), 15 / 10.0
    assert lo <= intent["items_per_second"] <= hi
    assert intent["eta_seconds"] == pytest.approx(80 / intent["items_per_second"], rel=0.01)
    [w] = doc["workers"]
    assert (w["worker"], w["task"], w["tier"], w["model"], w["gpu"]) == (
        "intent@gpu3.testhost",
        "intent",
        1,
        "tiny-small",
        "3",
    )
    assert (w["batches"], w["items_done"], w["items_failed"], w["ooms"], w["downshifts"]) == (
        1,
        12,
        4,
        3,
        1,
    )
    assert intent["workers"] == 1
    assert doc["latest_run"]["id"] == run_id and doc["latest_run"]["finished_at"] is None
    assert doc["errors"] == {} and doc["done"] is False
    assert doc["database"].endswith(db_url.rsplit("@", 1)[1]) and "***" in doc["database"]

    text = run_fleet(["status"], env)
    _no_secrets(text.stdout, text.stderr)
    for expected in ("intent", "tiny-small", "intent@gpu3.testhost", f"#{run_id}", "***"):
        assert expected in text.stdout
    only = json.loads(run_fleet(["status", "--task", "intent", "--json"], env).stdout)
    assert list(only["tasks"]) == ["intent"]


def test_status_says_which_service_is_unreachable_without_its_password(db_url, env):
    env = {**env, "BROKER_URL": f"redis://default:{BROKER_PASSWORD}@127.0.0.1:1/0"}
    proc = run_fleet(["status", "--json"], env, check=False)
    assert proc.returncode == 3, proc.stderr
    _no_secrets(proc.stdout, proc.stderr)
    doc = json.loads(proc.stdout)
    assert "ConnectionError" in doc["errors"]["broker"] and "database" not in doc["errors"]
    assert doc["tasks"]["intent"]["queue_length"] is None  # unknown, not zero
    text = run_fleet(["status"], env, check=False)
    assert text.returncode == 3 and "broker unreadable" in text.stdout
    _no_secrets(text.stdout, text.stderr)


def test_watch_until_done(db_url, env):
    # Nothing to do: exits at once.
    proc = run_fleet(["watch", "--until-done", "--interval", "0.2"], env, timeout=60)
    assert proc.returncode == 0
    # Work left and no worker: --timeout ends it with exit 4 and says why.
    _ingest(env, 10)
    run_fleet(["enqueue", "-t", "intent"], env)
    started = time.monotonic()
    proc = run_fleet(
        ["watch", "--until-done", "--interval", "0.3", "--timeout", "2"], env, check=False
    )
    assert proc.returncode == 4 and time.monotonic() - started >= 2
    assert "timed out with work unfinished" in proc.stderr
    assert "0/10" in proc.stdout  # the bar of the intent task
    # Not a terminal: timestamped progress lines as it goes, before the final view.
    lines = [ln for ln in proc.stdout.splitlines() if "intent 0/10 finished" in ln]
    assert lines and re.fullmatch(
        r"\d\d:\d\d:\d\d intent 0/10 finished, 0\.0/s, 0 worker\(s\)", lines[0]
    )
    _no_secrets(proc.stdout, proc.stderr)


def test_watch_stops_cleanly_on_ctrl_c(env):
    proc = subprocess.Popen(
        [sys.executable, "-m", "fleet.cli", "watch", "--interval", "0.3"],
        env=env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=sigint_as_at_a_terminal,
    )
    assert proc.stderr is not None
    assert "watching every task" in proc.stderr.readline()  # started, about to refresh
    time.sleep(2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "Traceback" not in err and "no live workers" in out


# -- the exporter -------------------------------------------------------------------------


class Exporter:
    """`fleet metrics --port 0` as a subprocess; the port is read from its first line."""

    def __init__(self, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fleet.cli", "metrics", "--port", "0"],
            env=env,
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stderr is not None
        seen = []
        for line in self.proc.stderr:  # blocks until it prints its address, or exits
            seen.append(line)
            m = re.search(r"http://\S+/metrics", line)
            if m:
                self.url = m.group(0)
                return
        raise AssertionError(f"`fleet metrics` exited {self.proc.wait()}: {''.join(seen)}")

    def scrape(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        with urllib.request.urlopen(self.url, timeout=30) as resp:
            body = resp.read().decode()
        return samples(body)

    def stop(self) -> tuple[int, str]:
        self.proc.send_signal(signal.SIGTERM)
        _, err = self.proc.communicate(timeout=30)
        return self.proc.returncode, err


def samples(body: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(body):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(got: dict[Any, float], name: str, **labels: str) -> float:
    return got[(name, tuple(sorted(labels.items())))]


def test_exporter_serves_while_the_broker_is_down(db_url, env):
    _ingest(env, 30)
    run_fleet(["enqueue", "-t", "intent", "--limit", "16"], env)
    down = {**env, "BROKER_URL": f"redis://default:{BROKER_PASSWORD}@127.0.0.1:1/0"}
    exporter = Exporter(down)
    try:
        got = exporter.scrape()
    finally:
        rc, err = exporter.stop()
    assert rc == 0
    assert value(got, "fleet_exporter_up", source="database") == 1
    assert value(got, "fleet_exporter_up", source="broker") == 0
    assert value(got, "fleet_backlog_items", task="intent", status="queued") == 16
    assert value(got, "fleet_backlog_items", task="intent", status="pending") == 14
    assert not [k for k in got if k[0] == "fleet_queue_length"]  # unknown: absent, not 0
    assert "broker unreadable" in err
    _no_secrets(err)


def test_exporter_port_in_use_is_a_clear_error(env):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        proc = run_fleet(["metrics", "--port", str(port)], env, check=False, timeout=60)
    assert proc.returncode == 2
    assert (
        f"cannot listen on 127.0.0.1:{port}" in proc.stderr and "FLEET_METRICS_PORT" in proc.stderr
    )


# -- worker stats -------------------------------------------------------------------------


def test_publisher_keeps_going_when_redis_is_unreachable(caplog):
    stats = WorkerStats("w@x", "intent", 1, "cpu", "cpu", "cpu", time.time())
    p = Publisher(
        redis_client("redis://127.0.0.1:1/0"),
        stats,
        placement=lambda: (0, "m"),
        memory=lambda: (0, 0, 0),
    )
    p.record(
        lambda s: s.observe_batch(seconds=2, done=3, failed=0, ooms=0, downshifts=0, step_ups=0)
    )
    p.publish()
    assert stats.batches == 1
    assert sum("could not publish worker stats" in r.message for r in caplog.records) == 1
    p.stop()


def test_worker_key_expires_and_stop_removes_it(broker_url):
    client = redis_client(broker_url)
    stats = WorkerStats("intent@w9.h", "intent", 1, "cpu", "cpu", "cpu", time.time())
    p = Publisher(
        client, stats, placement=lambda: (0, "m"), memory=lambda: (0, 0, 0), ttl=7, heartbeat=60
    )
    p.start()
    key = worker_stats.worker_key("intent@w9.h")
    assert 0 < redis.Redis.from_url(broker_url).ttl(key) <= 7
    p.stop()
    assert redis.Redis.from_url(broker_url).exists(key) == 0


def test_queue_length_counts_every_priority_list(db_url, broker_url):
    r = redis.Redis.from_url(broker_url)
    keys = queue_keys("intent")
    assert keys[0] == "fleet.intent" and keys[1] == "fleet.intent\x06\x163"
    for i, key in enumerate(keys):
        r.rpush(key, *[b"{}"] * (i + 1))
    st = collect(db_url, redis_client(broker_url), tasks=["intent"])
    assert st.tasks["intent"].queue_length == 1 + 2 + 3 + 4


# -- the dashboard ---------------------------------------------------------------------------


def dashboard_metrics() -> set[str]:
    doc = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in doc["panels"] for t in p.get("targets", [])]
    assert exprs, "the dashboard has no queries"
    exprs += [v["definition"] for v in doc["templating"]["list"] if v["type"] == "query"]
    return {m for e in exprs for m in re.findall(r"\bfleet_[a-z_]+\b", e)}


def test_dashboard_names_only_metrics_the_exporter_exposes(db_url, broker_url, publisher):
    """The exporter's collector, with a live worker and a finished run to report."""
    import datetime as dt

    from prometheus_client import CollectorRegistry, generate_latest

    with transaction(db_url) as s:
        s.add(Run(trigger="nightly", task="intent", finished_at=dt.datetime.now(dt.UTC)))
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FleetCollector(db_url, broker_url, tasks=["intent"], window=60))
    exposed = {name for name, _ in samples(generate_latest(registry).decode())}
    missing = dashboard_metrics() - exposed
    assert not missing, f"dashboard queries metrics the exporter does not expose: {missing}"
    doc = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in doc["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"


def test_scrapes_and_status_answer_while_work_items_is_locked(db_url, env):
    """A migration or VACUUM FULL holds work_items: scrapes answer within Prometheus'
    10 s timeout with the last good figures and fleet_exporter_up{source="database"} 0,
    no more than one backend waits on the lock, and `fleet status` answers too."""
    import threading

    import psycopg

    _ingest(env, 30)
    run_fleet(["enqueue", "-t", "intent", "--limit", "16"], env)
    plain = db_url.replace("postgresql+psycopg://", "postgresql://")
    exporter = Exporter(env)
    locker = psycopg.connect(plain)
    release = threading.Timer(40, locker.cancel)  # never hang the suite on the old behaviour
    try:
        before = exporter.scrape()
        assert value(before, "fleet_exporter_up", source="database") == 1
        locker.execute("LOCK TABLE work_items IN ACCESS EXCLUSIVE MODE")
        release.start()
        time.sleep(1.5)
        results: list[tuple[float, dict[Any, float] | BaseException]] = []
        waiting: list[int] = []

        def scrape() -> None:
            t0 = time.monotonic()
            try:
                got: dict[Any, float] | BaseException = exporter.scrape()
            except BaseException as e:  # noqa: BLE001 - recorded and asserted below
                got = e
            results.append((time.monotonic() - t0, got))

        threads = [threading.Thread(target=scrape) for _ in range(6)]
        for t in threads:
            t.start()
        time.sleep(1.0)
        with psycopg.connect(plain, autocommit=True) as probe:
            waiting.append(
                probe.execute(
                    "SELECT count(*) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND wait_event_type = 'Lock'"
                ).fetchone()[0]
            )
        for t in threads:
            t.join(60)
        started = time.monotonic()
        status = run_fleet(["status", "--json"], env, check=False, timeout=60)
        status_seconds = time.monotonic() - started
        assert locker.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS
    finally:
        release.cancel()
        locker.close()
    assert all(not isinstance(got, BaseException) for _, got in results), results
    assert max(seconds for seconds, _ in results) < 8, [s for s, _ in results]
    assert waiting[0] <= 1, waiting
    for _, got in results:
        assert isinstance(got, dict)
        assert value(got, "fleet_exporter_up", source="database") == 0
        assert value(got, "fleet_exporter_up", source="broker") == 1
        assert value(got, "fleet_backlog_items", task="intent", status="queued") == 16
        assert value(got, "fleet_exporter_ledger_age_seconds") >= 1.5
    assert status.returncode == 3, status.stderr
    assert status_seconds < 10
    doc = json.loads(status.stdout)
    assert "lock timeout" in doc["errors"]["database"], doc["errors"]
    after = exporter.scrape()
    rc, err = exporter.stop()
    assert rc == 0
    assert value(after, "fleet_exporter_up", source="database") == 1
    assert "database unreadable" in err
