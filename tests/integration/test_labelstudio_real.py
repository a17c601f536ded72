"""A real Label Studio: `fleet review export` imports into it, people's answers are
made through its API, its JSON export imports back into the fleet, and 100 % of ids
and labels round-trip.

Label Studio is a Django server with its own dependencies (hundreds of MB), so it
lives in a virtual environment of its own: FLEET_LABEL_STUDIO_VENV, else
~/.cache/fleet-tests/label-studio-<version>, created with pip on first use (minutes).
Where it cannot be installed or does not start in time the test is skipped with the
reason; test_review.py checks the documented import schema without it."""

from __future__ import annotations

import json
import os
import random
import secrets
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from sqlalchemy import text

from db.engine import get_engine
from tests.integration.test_review import LABELS, env, fleet, seed_results  # noqa: F401

pytestmark = pytest.mark.slow

VERSION = "1.23.2"
INSTALL_S = 900
START_S = 300


def _venv() -> Path:
    """A virtual environment with Label Studio (skips the test where pip cannot make it)."""
    where = os.environ.get("FLEET_LABEL_STUDIO_VENV")
    venv = Path(where) if where else Path.home() / ".cache/fleet-tests" / f"label-studio-{VERSION}"
    exe = venv / "bin" / "label-studio"
    if exe.exists():
        return venv
    try:
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
        subprocess.run(
            [str(venv / "bin" / "pip"), "install", "-q", f"label-studio=={VERSION}"],
            check=True,
            timeout=INSTALL_S,
            capture_output=True,
        )
    except (subprocess.SubprocessError, OSError) as e:
        pytest.skip(
            f"Label Studio {VERSION} could not be installed in {venv} ({e}); give a virtual "
            "environment that has it with FLEET_LABEL_STUDIO_VENV"
        )
    return venv


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LabelStudio:
    """`label-studio start` on a free port with a data folder of its own."""

    def __init__(self, venv: Path, data: Path) -> None:
        self.port, self.token = _free_port(), secrets.token_hex(20)
        self.base = f"http://127.0.0.1:{self.port}"
        self.log = data / "label-studio.log"
        data.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [
                str(venv / "bin" / "label-studio"),
                "start",
                "--no-browser",
                "--port",
                str(self.port),
                "--data-dir",
                str(data),
                "--username",
                "reviewer@example.org",
                "--password",
                secrets.token_hex(8),
                "--user-token",
                self.token,
                "--enable-legacy-api-token",
            ],
            stdout=self.log.open("w"),
            stderr=subprocess.STDOUT,
            env={**os.environ, "LABEL_STUDIO_BASE_DATA_DIR": str(data)},
        )

    def wait(self) -> None:
        deadline = time.monotonic() + START_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            try:
                with urllib.request.urlopen(self.base + "/health", timeout=5) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(2)
        tail = self.log.read_text(errors="replace")[-2000:]
        self.stop()
        pytest.skip(f"Label Studio did not start within {START_S}s; its log ends:\n{tail}")

    def api(self, method: str, path: str, body: object | None = None) -> object:
        req = urllib.request.Request(
            self.base + path,
            method=method,
            data=None if body is None else json.dumps(body).encode(),
            headers={"Authorization": f"Token {self.token}", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=120) as r:
            return json.loads(r.read() or b"null")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@pytest.mark.timeout(INSTALL_S + START_S + 600)
def test_export_imports_into_label_studio_and_back(env, tmp_path):  # noqa: F811
    venv = _venv()
    studio = LabelStudio(venv, tmp_path / "ls-data")
    try:
        studio.wait()
        seed_results(env, 40)
        out = tmp_path / "q.json"
        fleet(
            "review",
            "export",
            "-t",
            "intent",
            "-n",
            "20",
            "--strategy",
            "margin",
            "--out",
            str(out),
        )
        tasks = json.loads(out.read_text())
        project = studio.api(
            "POST",
            "/api/projects",
            {"title": "fleet review", "label_config": out.with_suffix(".xml").read_text()},
        )
        pid = project["id"]  # type: ignore[index]
        imported = studio.api("POST", f"/api/projects/{pid}/import", tasks)
        assert imported["task_count"] == 20 and imported["prediction_count"] == 20  # type: ignore[index]

        listed = studio.api("GET", f"/api/tasks?project={pid}&page_size=100")
        stored = listed["tasks"] if isinstance(listed, dict) else listed
        assert len(stored) == 20
        rng = random.Random(5)
        predicted = {
            t["data"]["fleet_external_id"]: t["predictions"][0]["result"][0]["value"]["choices"][0]
            for t in tasks
        }
        chosen = {}
        for t in stored:
            label = predicted[t["data"]["fleet_external_id"]]
            if rng.random() < 0.5:  # the reviewer corrects half of them
                label = rng.choice([x for x in LABELS if x != label])
            chosen[t["data"]["fleet_external_id"]] = label
            studio.api(
                "POST",
                f"/api/tasks/{t['id']}/annotations",
                {
                    "result": [
                        {
                            "from_name": "label",
                            "to_name": "text",
                            "type": "choices",
                            "value": {"choices": [label]},
                        }
                    ]
                },
            )
        export = studio.api("GET", f"/api/projects/{pid}/export?exportType=JSON")
        back = tmp_path / "label-studio-export.json"
        back.write_text(json.dumps(export))
        rep = json.loads(fleet("review", "import", str(back), "--json").output)
        assert rep["imported"] == 20 and rep["problems"] == []
        with get_engine(env).connect() as c:
            confirmed = dict(
                c.execute(
                    text(
                        "SELECT external_id, confirmed_label FROM fleet_latest_results "
                        "WHERE confirmed_label IS NOT NULL"
                    )
                ).all()
            )
        assert confirmed == chosen  # 100 % of ids and labels
    finally:
        studio.stop()
