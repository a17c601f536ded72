"""Deployment manifests generated from the task config, so they cannot drift from it.

`fleet deploy compose` writes the per-GPU worker services of a Docker Compose
override: one service per GPU, each reserving exactly that GPU and serving one
task (one resident model per GPU). `fleet deploy k8s` (fleet.ops.k8s) writes a
task's worker Deployment (one GPU per pod) and the KEDA ScaledObject that scales
it on the length of the task's Redis list. The image, user, secrets and config
mount both share are here.

The shapes here are the ones in docker-compose.yml and deploy/k8s/;
tests/unit/fleet/ops/test_deploy_manifests.py checks that they agree.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from config.taskconfig import TaskSpec

IMAGE = "gpu-fleet:latest"
K8S_IMAGE = "gpu-fleet"  # kustomization.yaml sets the registry and tag
UID = 10001  # the non-root `fleet` user of deploy/Dockerfile

# What every fleet container of docker-compose.yml shares (its `x-fleet` block).
COMPOSE_BUILD = {"context": ".", "dockerfile": "deploy/Dockerfile"}
COMPOSE_ENVIRONMENT = {
    "DATABASE_URL": "postgresql://fleet:${POSTGRES_PASSWORD:?set POSTGRES_PASSWORD in .env}"
    "@${POSTGRES_HOST:-postgres}:5432/fleet",
    "BROKER_URL": "redis://:${REDIS_PASSWORD:?set REDIS_PASSWORD in .env}@${REDIS_HOST:-redis}:6379/0",
    "FLEET_MODELS_DIR": "/models",
    "FLEET_AUDIO_ROOT": "/audio",
}
# The secrets .env may hold. Compose gives every fleet container of
# docker-compose.yml the whole .env (env_file: it carries the fleet settings);
# `environment` wins over it, so each service blanks the secrets it does not
# need (COMPOSE_BLANKED). Every SecretStr setting but the two URLs is here
# (tests/unit/fleet/ops/test_deploy_manifests.py checks), with the raw passwords the URLs
# are built from and the Hugging Face token.
ENV_SECRETS = (
    "POSTGRES_PASSWORD",
    "REDIS_PASSWORD",
    "FLEET_FLOWER_PASSWORD",
    "FLEET_SOURCE_DATABASE_URL",
    "HF_TOKEN",
)
# What each compose service keeps of ENV_SECRETS (DATABASE_URL and BROKER_URL,
# built from the passwords, reach every one); `cli` runs any command and keeps all.
COMPOSE_SECRETS_NEEDED: dict[str, tuple[str, ...]] = {
    "worker": (),  # workers load models with local files only
    "migrate": (),
    "models": ("HF_TOKEN",),
    "flower": ("FLEET_FLOWER_PASSWORD",),
    "beat": ("FLEET_SOURCE_DATABASE_URL",),  # beat syncs the [sources.*]
    "metrics": (),
    "cli": ENV_SECRETS,
}


def blanked_secrets(service: str) -> tuple[str, ...]:
    """The .env secrets compose service `service` (a worker: "worker") does not need."""
    keep = COMPOSE_SECRETS_NEEDED[service]
    return tuple(k for k in ENV_SECRETS if k not in keep)


WORKER_BLANKED_SECRETS = blanked_secrets("worker")
COMPOSE_WORKER_VOLUMES = ["models:/models:ro", "${AUDIO_DIR:-./audio}:/audio:ro"]
COMPOSE_WORKER_DEPENDS_ON = {
    "postgres": {"condition": "service_healthy"},
    "redis": {"condition": "service_healthy"},
    "migrate": {"condition": "service_completed_successfully"},
    "models": {"condition": "service_completed_successfully"},
}
# A stopping worker finishes its batch first (warm shutdown); past this it is killed
# and the batch comes back through the lease (FLEET_LEASE_SECONDS).
STOP_GRACE = "10m"


# Where a generated worker finds the user's task config (FLEET_CONFIG_FILE).
CONFIG_MOUNT = "/etc/fleet/tasks.toml"


class DeployError(ValueError):
    pass


def redis_database(broker_url: str | None) -> int:
    """The Redis database index of a broker URL (`redis://h:6379/7` -> 7); 0 when
    the URL names none or is not given. Raises DeployError for a path that is
    not a number (KEDA would watch the wrong database)."""
    if not broker_url:
        return 0
    from urllib.parse import urlsplit

    path = urlsplit(broker_url).path.strip("/")
    if not path:
        return 0
    if not path.isdigit():
        raise DeployError(
            f"BROKER_URL names Redis database {path!r}: give a number, e.g. redis://host:6379/0"
        )
    return int(path)


@dataclass(frozen=True)
class Assignment:
    task: str
    gpu: int  # host GPU index


def parse_task_option(value: str) -> tuple[str, list[int] | None]:
    """'intent' -> ('intent', None); 'intent=0,1' -> ('intent', [0, 1])."""
    name, sep, gpus = value.partition("=")
    name = name.strip()
    if not name:
        raise DeployError(f"--task takes a task name or TASK=GPU,GPU; got {value!r}")
    if not sep:
        return name, None
    try:
        indexes = [int(g) for g in gpus.split(",") if g.strip()]
    except ValueError:
        raise DeployError(f"--task {value!r}: GPUs must be indexes like 0,1") from None
    if not indexes or min(indexes) < 0 or len(set(indexes)) != len(indexes):
        raise DeployError(f"--task {value!r}: needs distinct non-negative GPU indexes")
    return name, indexes


def assign_gpus(gpus: Sequence[int], tasks: Sequence[str]) -> list[Assignment]:
    """One task per GPU. `tasks` are names or NAME=GPU,GPU; GPUs not named are
    split among the tasks without GPUs in contiguous blocks, in order."""
    if not gpus:
        raise DeployError("--gpus names no GPU")
    parsed = [parse_task_option(t) for t in tasks] or [("intent", None)]
    names = [n for n, _ in parsed]
    if len(set(names)) != len(names):
        raise DeployError(f"a task is named twice in --task: {', '.join(names)}")
    owner: dict[int, str] = {}
    for name, explicit in parsed:
        for g in explicit or []:
            if g not in gpus:
                raise DeployError(f"--task {name}: GPU {g} is not in --gpus {_csv(gpus)}")
            if g in owner:
                raise DeployError(
                    f"GPU {g} is given to both {owner[g]} and {name}: one GPU holds one model"
                )
            owner[g] = name
    free = [g for g in gpus if g not in owner]
    implicit = [n for n, explicit in parsed if explicit is None]
    if implicit and len(free) < len(implicit):
        raise DeployError(
            f"{len(implicit)} task(s) without GPUs ({', '.join(implicit)}) but only "
            f"{len(free)} GPU(s) left ({_csv(free) or 'none'}): each GPU holds one model; "
            "add GPUs or assign them with --task T=0,1"
        )
    if free and not implicit:
        raise DeployError(
            f"GPU(s) {_csv(free)} have no task: name them in a --task T={_csv(free)} "
            "or leave them out of --gpus"
        )
    start = 0
    for i, name in enumerate(implicit):
        size = len(free) // len(implicit) + (1 if i < len(free) % len(implicit) else 0)
        for g in free[start : start + size]:
            owner[g] = name
        start += size
    return [Assignment(owner[g], g) for g in sorted(owner)]


def _csv(values: Sequence[int]) -> str:
    return ",".join(str(v) for v in values)


# -- compose ---------------------------------------------------------------------


def compose_worker(
    task: str, gpu: int | None, *, config_file: Path | None = None
) -> dict[str, Any]:
    """One worker service. With a GPU it reserves exactly that host GPU; inside its
    container that GPU is the only one, index 0, hence `--gpu 0`. `config_file`:
    the user's task config, mounted read-only at CONFIG_MOUNT (FLEET_CONFIG_FILE)."""
    environment = dict(COMPOSE_ENVIRONMENT) | {k: "" for k in WORKER_BLANKED_SECRETS}
    volumes = list(COMPOSE_WORKER_VOLUMES)
    if config_file is not None:
        environment["FLEET_CONFIG_FILE"] = CONFIG_MOUNT
        volumes.append(f"{config_file.resolve()}:{CONFIG_MOUNT}:ro")
    service: dict[str, Any] = {
        "image": IMAGE,
        "build": dict(COMPOSE_BUILD),
        "env_file": ".env",
        "environment": environment,
        "volumes": volumes,
        "depends_on": {k: dict(v) for k, v in COMPOSE_WORKER_DEPENDS_ON.items()},
        "restart": "unless-stopped",
        "stop_grace_period": STOP_GRACE,
    }
    if gpu is None:
        service["command"] = ["worker", "--task", task]
        return service
    service["hostname"] = "${NODE_NAME:-fleet}-gpu" + str(gpu)
    service["command"] = ["worker", "--task", task, "--gpu", "0"]
    service["deploy"] = {
        "resources": {
            "reservations": {
                "devices": [{"driver": "nvidia", "device_ids": [str(gpu)], "capabilities": ["gpu"]}]
            }
        }
    }
    return service


def compose_override(
    assignments: Sequence[Assignment],
    *,
    config_file: Path | None = None,
    source_database: bool = False,
) -> dict[str, Any]:
    """The override: one worker per assignment; with the user's task config or a
    source database, beat (which syncs the sources) and cli get them too. The
    source URL is never written into the file: it is read from .env."""
    services: dict[str, Any] = {
        f"worker-{a.task}-gpu{a.gpu}": compose_worker(a.task, a.gpu, config_file=config_file)
        for a in assignments
    }
    extra: dict[str, Any] = {}
    if config_file is not None:
        extra["environment"] = {"FLEET_CONFIG_FILE": CONFIG_MOUNT}
        extra["volumes"] = [f"{config_file.resolve()}:{CONFIG_MOUNT}:ro"]
    if source_database:
        extra.setdefault("environment", {})["FLEET_SOURCE_DATABASE_URL"] = (
            "${FLEET_SOURCE_DATABASE_URL:?set FLEET_SOURCE_DATABASE_URL in .env}"
        )
    if extra:
        for name in ("beat", "cli"):
            services[name] = {
                k: (dict(v) if isinstance(v, dict) else list(v)) for k, v in extra.items()
            }
    return {"services": services}


def compose_header(argv: Sequence[str], assignments: Sequence[Assignment]) -> str:
    by_task: dict[str, list[int]] = {}
    for a in assignments:
        by_task.setdefault(a.task, []).append(a.gpu)
    plan = "; ".join(f"{t}: GPU {_csv(g)}" for t, g in by_task.items())
    return (
        f"# Generated by `fleet deploy compose {' '.join(argv)}`; regenerate rather than edit.\n"
        f"# One worker per GPU, one model each ({plan}).\n"
        "# Next to docker-compose.yml as docker-compose.override.yml, `docker compose up -d`\n"
        "# starts these with the rest. Leave out `--profile gpu`: its worker-gpu0/worker-gpu1\n"
        "# would put a second worker (and model) on GPUs 0 and 1.\n"
    )


# -- YAML --------------------------------------------------------------------------


class _Dumper(yaml.SafeDumper):
    """Block style, keys in insertion order, lists indented under their key, no
    anchors (a shared dict is written out at each place)."""

    def ignore_aliases(self, data: Any) -> bool:
        return True

    def increase_indent(self, flow: bool = False, indentless: bool = False) -> None:
        super().increase_indent(flow, False)


def dump_yaml(docs: Sequence[dict[str, Any]], header: str = "") -> str:
    body = "---\n".join(
        yaml.dump(d, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=100)
        for d in docs
    )
    return header + body


# -- commands (the click wrappers in fleet/cli/deploy.py call these) -----------------------


def host_gpus(spec: str) -> list[int]:
    """'0,1,3' -> those indexes; 'all' -> every GPU nvidia-smi shows on this machine."""
    from fleet.ops.gpus import parse_gpus, visible_gpus

    available = visible_gpus() if spec.strip() == "all" else 0
    if spec.strip() == "all" and available == 0:
        raise DeployError(
            "--gpus all: no GPU is visible here (nvidia-smi); name the target host's GPU "
            "indexes instead, e.g. --gpus 0,1,2,3"
        )
    return parse_gpus(spec, available=available)


def compose_command(
    tasks: dict[str, TaskSpec],
    gpus_spec: str,
    task_options: Sequence[str],
    *,
    config_file: Path | None = None,
    source_database: bool = False,
) -> tuple[str, list[Assignment]]:
    """YAML text of the compose override and the plan it holds. `config_file`
    and `source_database`: the generator's own FLEET_CONFIG_FILE and whether
    FLEET_SOURCE_DATABASE_URL is set (see compose_override). Raises DeployError
    for a task the config in force does not define."""
    gpus = host_gpus(gpus_spec)
    assignments = assign_gpus(gpus, task_options)
    for name in dict.fromkeys(a.task for a in assignments):
        if name not in tasks:
            raise DeployError(
                f"unknown task {name!r}; configured tasks: {', '.join(sorted(tasks)) or 'none'}"
            )
    argv = [f"--gpus {_csv(gpus)}", *(f"--task {t}" for t in task_options)]
    override = compose_override(
        assignments, config_file=config_file, source_database=source_database
    )
    text = dump_yaml([override], compose_header(argv, assignments))
    return text, assignments
