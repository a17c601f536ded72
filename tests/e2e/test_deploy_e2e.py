"""The probes the deployment files declare, run against the real processes.

`fleet flower` and `fleet metrics` are started with the environment their
docker-compose.yml services set (URLs pointed at the test's Postgres and Redis,
a free port instead of the published one), then the exact healthcheck command
of the compose file and the HTTP path of the Kubernetes probe are run against
them: a healthcheck that cannot pass would keep `docker compose up` waiting
and Kubernetes restarting the pod forever.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.support import REPO, ServedProcess, fleet_env, free_port

pytestmark = pytest.mark.e2e

COMPOSE = yaml.safe_load((REPO / "docker-compose.yml").read_text())
K8S = REPO / "deploy" / "k8s"


def k8s_probe_path(file: str) -> str:
    deployment = next(
        d for d in yaml.safe_load_all((K8S / file).read_text()) if d["kind"] == "Deployment"
    )
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return str(container["readinessProbe"]["httpGet"]["path"])


def service_env(service: str, db_url: str, broker_url: str, port: int, tmp: Path) -> dict[str, str]:
    """The service's compose environment, with this test's URLs and port."""
    env = {k: str(v) for k, v in COMPOSE["services"][service]["environment"].items()}
    env.update(DATABASE_URL=db_url, BROKER_URL=broker_url, FLEET_STATE_DIR=str(tmp / "state"))
    env.update(FLEET_MODELS_DIR=str(tmp / "models"), FLEET_AUDIO_ROOT=str(tmp / "audio"))
    for key, value in env.items():
        assert "${" not in value or key.endswith("PASSWORD") or key.endswith("USER"), (key, value)
    env[f"FLEET_{service.upper()}_PORT"] = str(port)
    return fleet_env(env)


def healthcheck_argv(service: str, port: int) -> list[str]:
    """The compose healthcheck of `service`, run here: its python and this port."""
    test = COMPOSE["services"][service]["healthcheck"]["test"]
    assert test[0] == "CMD" and test[1] == "python", test
    published = COMPOSE["services"][service]["environment"][f"FLEET_{service.upper()}_PORT"]
    return [sys.executable, *(re.sub(f":{published}/", f":{port}/", a) for a in test[2:])]


@pytest.fixture
def served() -> Iterator[list[ServedProcess]]:
    started: list[ServedProcess] = []
    yield started
    for s in started:
        s.stop()


def test_flower_as_deployed_passes_its_healthcheck_and_asks_for_the_password(
    db_url, broker_url, tmp_path, served
):
    port = free_port()
    env = service_env("flower", db_url, broker_url, port, tmp_path)
    env.update(FLEET_FLOWER_USER="ops", FLEET_FLOWER_PASSWORD="s3cret-pw")
    flower = ServedProcess(
        COMPOSE["services"]["flower"]["command"], env, port, tmp_path / "flower.log"
    )
    served.append(flower)
    flower.wait_up()

    check = subprocess.run(healthcheck_argv("flower", port), capture_output=True, timeout=30)
    assert check.returncode == 0, check.stderr.decode()
    assert flower.get(k8s_probe_path("flower.yaml"))[0] == 200, "the Kubernetes probe path"
    assert flower.get("/")[0] == 401, "Flower must ask for the password"
    assert flower.get("/", auth=("ops", "wrong"))[0] == 401
    assert flower.get("/", auth=("ops", "s3cret-pw"))[0] == 200
    assert "s3cret-pw" not in flower.log.read_text()


def test_metrics_as_deployed_passes_its_healthcheck(db_url, broker_url, tmp_path, served):
    port = free_port()
    env = service_env("metrics", db_url, broker_url, port, tmp_path)
    exporter = ServedProcess(
        COMPOSE["services"]["metrics"]["command"], env, port, tmp_path / "m.log"
    )
    served.append(exporter)
    exporter.wait_up()

    check = subprocess.run(healthcheck_argv("metrics", port), capture_output=True, timeout=30)
    assert check.returncode == 0, check.stderr.decode()
    status, body = exporter.get(k8s_probe_path("metrics.yaml"))
    assert status == 200 and b"# TYPE " in body
