"""`fleet deploy k8s`: a task's worker Deployment (one GPU per pod) and the KEDA
ScaledObject that scales it on the length of the task's Redis list, generated
from the task config so they cannot drift from it (deploy/k8s/workers/ holds
the output; tests/unit/fleet/ops/test_deploy_manifests.py checks that they agree).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from config.taskconfig import TaskSpec
from fleet.ops.deploy import (
    CONFIG_MOUNT,
    K8S_IMAGE,
    UID,
    DeployError,
    dump_yaml,
    redis_database,
)


def k8s_worker(
    spec: TaskSpec,
    *,
    max_replicas: int = 4,
    list_length: int = 4,
    redis_db: int = 0,
    config_text: str | None = None,
) -> list[dict[str, Any]]:
    """A task's worker Deployment (one GPU per pod, one pod per GPU) and its KEDA
    ScaledObject on the Redis list of the task's queue, in database `redis_db`
    (the broker's). With `config_text` (the user's task config) also the
    ConfigMap fleet-tasks holding it, mounted at CONFIG_MOUNT (FLEET_CONFIG_FILE)."""
    if max_replicas < 1 or list_length < 1:
        raise DeployError("--max-replicas and --list-length must be at least 1")
    name = f"fleet-worker-{spec.name.replace('_', '-')}"
    labels = {
        "app.kubernetes.io/name": "gpu-fleet",
        "app.kubernetes.io/component": "worker",
        "gpu-fleet/task": spec.name,
    }
    mounts: list[dict[str, Any]] = [
        {"name": "models", "mountPath": "/models", "readOnly": True},
        {"name": "state", "mountPath": "/var/lib/fleet"},
    ]
    volumes: list[dict[str, Any]] = [
        {
            "name": "models",
            "persistentVolumeClaim": {"claimName": "fleet-models", "readOnly": True},
        },
        {"name": "state", "emptyDir": {}},
    ]
    env: list[dict[str, Any]] = [_secret_env("DATABASE_URL"), _secret_env("BROKER_URL")]
    if config_text is not None:
        mounts.append(
            {"name": "tasks", "mountPath": CONFIG_MOUNT, "subPath": "tasks.toml", "readOnly": True}
        )
        volumes.append({"name": "tasks", "configMap": {"name": "fleet-tasks"}})
        env.append({"name": "FLEET_CONFIG_FILE", "value": CONFIG_MOUNT})
    if spec.source == "audio" and spec.input_from is None:
        mounts.append({"name": "audio", "mountPath": "/audio", "readOnly": True})
        volumes.append(
            {
                "name": "audio",
                "persistentVolumeClaim": {"claimName": "fleet-audio", "readOnly": True},
            }
        )
    container = {
        "name": "worker",
        "image": K8S_IMAGE,
        "imagePullPolicy": "IfNotPresent",
        # The device plugin gives the pod one GPU, which it sees as index 0.
        "args": ["worker", "--task", spec.name, "--gpu", "0"],
        "envFrom": [{"configMapRef": {"name": "fleet-config"}}],
        "env": env,
        "resources": {
            "requests": {"cpu": "2", "memory": "8Gi"},
            "limits": {"memory": "16Gi", "nvidia.com/gpu": 1},
        },
        "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
        "volumeMounts": mounts,
    }
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            # No `replicas`: KEDA owns it (0 while the queue is empty).
            "selector": {"matchLabels": {"app.kubernetes.io/component": "worker", **_task(spec)}},
            # Replace pods one at a time without a spare GPU.
            "strategy": {
                "type": "RollingUpdate",
                "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1},
            },
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    # Warm shutdown: the batch in hand finishes before the pod goes.
                    "terminationGracePeriodSeconds": 600,
                    "securityContext": _pod_security(),
                    "tolerations": [
                        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
                    ],
                    "containers": [container],
                    "volumes": volumes,
                },
            },
        },
    }
    scaled = {
        "apiVersion": "keda.sh/v1alpha1",
        "kind": "ScaledObject",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "scaleTargetRef": {"name": name},
            "minReplicaCount": 0,
            "maxReplicaCount": max_replicas,
            "pollingInterval": 15,
            # A worker that has just taken the last batch leaves the list empty while
            # it runs: wait before scaling to zero so its batch can finish.
            "cooldownPeriod": 600,
            "advanced": {
                "horizontalPodAutoscalerConfig": {
                    "behavior": {"scaleDown": {"stabilizationWindowSeconds": 600}}
                }
            },
            "triggers": [
                {
                    "type": "redis",
                    "metadata": {
                        "listName": spec.queue,
                        "listLength": str(list_length),
                        "activationListLength": "0",
                        "databaseIndex": str(redis_db),
                    },
                    "authenticationRef": {"name": "fleet-redis"},
                }
            ],
        },
    }
    if config_text is None:
        return [deployment, scaled]
    tasks_map = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "fleet-tasks", "labels": {"app.kubernetes.io/name": "gpu-fleet"}},
        "data": {"tasks.toml": config_text},
    }
    return [tasks_map, deployment, scaled]


def _task(spec: TaskSpec) -> dict[str, str]:
    return {"gpu-fleet/task": spec.name}


def _secret_env(key: str) -> dict[str, Any]:
    return {"name": key, "valueFrom": {"secretKeyRef": {"name": "fleet-secrets", "key": key}}}


def _pod_security() -> dict[str, Any]:
    return {"runAsNonRoot": True, "runAsUser": UID, "runAsGroup": UID, "fsGroup": UID}


def k8s_header(spec: TaskSpec, options: str = "") -> str:
    return (
        f"# Generated by `fleet deploy k8s --task {spec.name}{options}`; regenerate rather "
        "than edit.\n"
        f"# Workers for task {spec.name} (queue {spec.queue}): one GPU per pod, scaled by KEDA\n"
        "# on the number of batches waiting in the queue's Redis list.\n"
    )


def k8s_command(
    spec: TaskSpec,
    *,
    max_replicas: int = 4,
    list_length: int = 4,
    broker_url: str | None = None,
    config_file: Path | None = None,
) -> str:
    """YAML of `fleet deploy k8s`: KEDA watches the Redis database of `broker_url`
    (the generator's BROKER_URL; 0 without one), and the user's task config
    `config_file` travels in a ConfigMap. Raises DeployError for a bad broker URL."""
    options = "".join(
        f" --{flag} {value}"
        for flag, value, default in (
            ("max-replicas", max_replicas, 4),
            ("list-length", list_length, 4),
        )
        if value != default
    )
    config_text = config_file.read_text("utf-8") if config_file is not None else None
    docs = k8s_worker(
        spec,
        max_replicas=max_replicas,
        list_length=list_length,
        redis_db=redis_database(broker_url),
        config_text=config_text,
    )
    return dump_yaml(docs, k8s_header(spec, options))
