"""No secret leaks: a fleet on a Postgres with a real password (scram-sha-256)
and a Redis with `requirepass`, FLEET_FLOWER_PASSWORD set, run through an
outage and through its error paths; then every log, every command's output,
every command line, the worker stats in Redis and the runs table are scanned
for the three passwords.

The queue's own defence, a pickle-serialized message refused and logged, is
tests/e2e/test_security_e2e.py; Flower's password handling in depth is
tests/e2e/test_flower_e2e.py (here Flower only joins the scan).
"""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
from pathlib import Path

import pytest
import redis
from sqlalchemy import text

from db.engine import transaction
from tests.chaos.conftest import make_fleet, start_servers, stop_servers
from tests.e2e.test_flower_e2e import FlowerProcess
from tests.support import REPO, conversations, status_counts, write_jsonl

pytestmark = [pytest.mark.chaos, pytest.mark.e2e, pytest.mark.slow]

N = 400


def _fleet_cmd(
    env: dict[str, str], *args: str, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fleet.cli", *args],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _cmdline(pid: int) -> str:
    try:
        return (
            Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        )
    except OSError:
        return ""


def _descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        parent = todo.pop()
        for p in Path("/proc").iterdir():
            if p.name.isdigit():
                try:
                    stat = (p / "stat").read_text()
                except OSError:
                    continue
                if int(stat.rsplit(")", 1)[1].split()[1]) == parent:
                    out.append(int(p.name))
                    todo.append(int(p.name))
    return out


def test_passwords_never_appear_in_logs_outputs_or_command_lines(tiny_models, tmp_path):
    pg_pw = f"pg-{secrets.token_hex(12)}"
    redis_pw = f"rd-{secrets.token_hex(12)}"
    flower_pw = f"fl-{secrets.token_hex(12)}"
    servers = start_servers(pg_password=pg_pw, redis_password=redis_pw)
    seen: dict[str, str] = {}  # what was captured -> its text
    try:
        assert pg_pw in servers.db_url and redis_pw in servers.broker_url
        fleet = make_fleet(
            servers.db_url,
            servers.broker_url,
            tiny_models,
            tmp_path,
            FLEET_FLOWER_PASSWORD=flower_pw,
            FLEET_LOG_LEVEL="INFO",  # the most talkative level the commands have
        )
        env = fleet.env

        # Postgres really wants the password (scram), and the errors that say so hide it.
        wrong = servers.db_url.replace(pg_pw, "not-the-password")
        refused = _fleet_cmd({**env, "DATABASE_URL": wrong}, "backlog")
        assert refused.returncode == 3 and "password authentication failed" in refused.stderr
        assert "not-the-password" not in refused.stderr + refused.stdout
        seen["fleet backlog (wrong password)"] = refused.stdout + refused.stderr
        port_down = servers.db_url.replace(f":{servers.pg.port}/", ":1/")
        down = _fleet_cmd({**env, "DATABASE_URL": port_down}, "backlog")
        assert down.returncode == 3 and "***" in down.stderr, down.stderr
        seen["fleet backlog (Postgres unreachable)"] = down.stdout + down.stderr

        lines = conversations(N) + [{"external_id": "bad", "messages": 5}]
        path = write_jsonl(tmp_path / "c.jsonl", lines)
        with path.open("a") as f:
            f.write("{not json\n")
        ingest = _fleet_cmd(env, "ingest", "conversations", str(path))
        assert ingest.returncode == 0, ingest.stderr
        seen["fleet ingest"] = ingest.stdout + ingest.stderr

        worker = fleet.worker()
        worker.wait_ready()
        flower = FlowerProcess(env, tmp_path / "flower.log")
        run = fleet.run(timeout=240)
        fleet.wait_done("intent", N // 4, timeout=120)
        servers.pg.restart(mode="immediate", down_seconds=3)  # outage logs, with the URL in play
        code, out, err = fleet.wait_run(run, timeout=260)
        assert code == 1, err[-3000:]  # the one malformed conversation failed
        assert status_counts(servers.db_url, "intent") == {"done": N, "failed": 1}
        assert "Postgres unreachable" in err

        flower.wait_up()
        assert flower.get("/", ("fleet", flower_pw))[0] == 200
        broker_page = flower.get("/broker", ("fleet", flower_pw))[1].decode(errors="replace")
        assert f":{servers.redis.port}" in broker_page, broker_page[:2000]  # it shows the broker
        seen["flower /broker page"] = broker_page

        for name, args in {
            "fleet settings": ["settings"],
            "fleet settings --json": ["settings", "--json"],
            "fleet status": ["status"],
            "fleet status --json": ["status", "--json"],
            "fleet results": ["results", "-t", "intent", "--status", "failed", "--json"],
            "fleet backlog": ["backlog", "--json"],
        }.items():
            got = _fleet_cmd(env, *args)
            assert got.returncode in (0, 1), f"{name}: {got.stderr}"
            seen[name] = got.stdout + got.stderr
        assert "***" in seen["fleet settings"]

        procs = {"worker": worker.proc.pid, "flower": flower.proc.pid}
        for what, pid in procs.items():
            for p in [pid, *_descendants(pid)]:
                seen[f"command line of {what} ({p})"] = _cmdline(p)
        flower.stop()

        client = redis.Redis.from_url(servers.broker_url)
        seen["redis values"] = "\n".join(
            repr(client.get(k)) for k in client.scan_iter(count=1000) if client.type(k) == b"string"
        )
        with transaction(servers.db_url) as s:
            seen["runs table"] = json.dumps(
                [list(r) for r in s.execute(text("SELECT * FROM runs"))], default=str
            )
    finally:
        fleet.close()
        stop_servers(servers)

    for log in sorted(tmp_path.glob("*.log")) + sorted(tmp_path.glob("run*.*")):
        seen[log.name] = log.read_text(errors="replace")
    assert " ready." in seen["worker0.log"] and '"event": "batch"' in seen["worker0.log"]
    leaks = {
        where: [
            n
            for n, pw in (("postgres", pg_pw), ("redis", redis_pw), ("flower", flower_pw))
            if pw in body
        ]
        for where, body in seen.items()
    }
    assert not {w: n for w, n in leaks.items() if n}, leaks
    assert sum(len(b) for b in seen.values()) > 20_000  # the scan read real output
