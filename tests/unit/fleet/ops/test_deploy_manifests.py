"""The deployment files agree with the code: docker-compose.yml, the generated
compose override, every Kubernetes document in deploy/k8s, every systemd unit
in deploy/systemd, the Dockerfile and the docs that show commands.

Checked against the code, so they cannot drift from it: each environment
variable is a setting (or a documented non-fleet variable), each `fleet ...`
command line parses with the real click CLI, each queue is a configured task's,
each GPU worker reserves exactly one GPU, ports and schedules equal the
settings' defaults, and every name one file refers to exists in another.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import click
import pytest
import yaml

from config.settings import Settings
from config.taskconfig import load_tasks
from fleet.cli import main
from fleet.ops import deploy, k8s
from tests.support import REPO

ROOT = REPO
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
SYSTEMD = DEPLOY / "systemd"
COMPOSE = ROOT / "docker-compose.yml"
DOCS = [DEPLOY / "README.md", ROOT / "docs" / "scaling.md"]

TASKS = load_tasks()
DEFAULTS = Settings.model_construct()  # field defaults, without reading the environment
SETTING_VARS = {"DATABASE_URL", "BROKER_URL"} | {
    f"FLEET_{n.upper()}" for n in Settings.model_fields
}

# Variables the deployment files name that are not fleet settings, and why.
NON_FLEET_VARS = {
    # compose: values filled in from .env (each documented in deploy/env.example)
    "POSTGRES_PASSWORD": "password of the fleet role, in DATABASE_URL",
    "POSTGRES_HOST": "host in DATABASE_URL (another machine's for worker-only hosts)",
    "REDIS_HOST": "host in BROKER_URL (another machine's for worker-only hosts)",
    "REDIS_PASSWORD": "redis --requirepass, in BROKER_URL; KEDA reads it too",
    "WORKER_TASK": "the task a worker unit or service serves",
    "NODE_NAME": "the host's name in worker container hostnames",
    "AUDIO_DIR": "host folder mounted at /audio",
    "PUBLISH_ADDRESS": "host address Flower and the exporter are published on",
    # the postgres and redis images
    "POSTGRES_USER": "postgres image",
    "POSTGRES_DB": "postgres image",
    "REDISCLI_AUTH": "redis-cli password, for the redis healthcheck",
    # KEDA's TriggerAuthentication
    "REDIS_ADDRESS": "the broker's host:port, for KEDA",
    # process environment
    "CUDA_VISIBLE_DEVICES": "pins a worker to its GPU",
    "HF_HUB_OFFLINE": "models load from local folders only",
    "TRANSFORMERS_OFFLINE": "models load from local folders only",
    "HF_TOKEN": "Hugging Face token for `fleet models pull` (blanked for workers)",
    "DEBIAN_FRONTEND": "image build",
    "PIP_DISABLE_PIP_VERSION_CHECK": "image build",
    "PIP_NO_CACHE_DIR": "image build",
    "PYTHONUNBUFFERED": "logs reach `docker logs` at once",
    "VIRTUAL_ENV": "the image's virtualenv",
    "PATH": "the image's virtualenv first",
}
# Stand-ins for placeholders in command lines, to parse them with the real CLI.
PLACEHOLDERS = {"${WORKER_TASK:-intent}": "intent", "${WORKER_TASK}": "intent", "%i": "0"}
FLEET_IMAGE = "gpu-fleet"


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def k8s_docs() -> list[tuple[str, dict[str, Any]]]:
    docs = []
    for path in sorted(K8S.rglob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("kind") != "Kustomization":
                docs.append((str(path.relative_to(ROOT)), doc))
    return docs


def by_kind(kind: str) -> list[dict[str, Any]]:
    return [d for _, d in k8s_docs() if d.get("kind") == kind]


def pod_spec(doc: dict[str, Any]) -> dict[str, Any]:
    spec = doc["spec"]
    if doc["kind"] == "CronJob":
        spec = spec["jobTemplate"]["spec"]
    return spec["template"]["spec"]


def workloads() -> list[dict[str, Any]]:
    return [d for _, d in k8s_docs() if d["kind"] in ("Deployment", "Job", "CronJob")]


def fleet_containers() -> Iterator[tuple[str, dict[str, Any]]]:
    for doc in workloads():
        for c in pod_spec(doc)["containers"]:
            yield doc["metadata"]["name"], c


def parse_unit(path: Path) -> dict[str, list[tuple[str, str]]]:
    """systemd unit -> {section: [(key, value), ...]} (keys may repeat)."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current = None
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = line[1:-1]
            sections.setdefault(current, [])
            continue
        assert current is not None, f"{path.name}: {line!r} outside a section"
        key, sep, value = line.partition("=")
        assert sep, f"{path.name}: {line!r} is not KEY=VALUE"
        sections[current].append((key.strip(), value.strip()))
    return sections


def unit_values(unit: dict[str, list[tuple[str, str]]], section: str, key: str) -> list[str]:
    return [v for k, v in unit.get(section, []) if k == key]


def env_file(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip()
    return out


def settings_from(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Settings:
    for var in SETTING_VARS | {"FLEET_DATABASE_URL", "FLEET_BROKER_URL"}:
        monkeypatch.delenv(var, raising=False)
    for key, value in env.items():
        if key in SETTING_VARS:
            monkeypatch.setenv(key, value)
    return Settings()


def resolve_command(argv: list[str]) -> tuple[list[str], click.Command]:
    """Walk the real click groups: ('models', 'prepare', ...) -> the leaf command."""
    cmd: click.Command = main
    path: list[str] = []
    args = list(argv)
    while isinstance(cmd, click.Group):
        assert args, f"`fleet {' '.join(path)}` needs a subcommand"
        name = args.pop(0)
        sub = cmd.commands.get(name)
        assert sub is not None, (
            f"`fleet {' '.join([*path, name])}` is not a command of fleet.cli.main "
            f"(has: {', '.join(sorted(cmd.commands))})"
        )
        path.append(name)
        cmd = sub
    return [*path, *args], cmd


def check_fleet_argv(argv: list[str], where: str) -> dict[str, Any]:
    """Parse a `fleet` command line with the real CLI; return its parameters."""
    concrete = [PLACEHOLDERS.get(a, a) for a in argv]
    depth = command_depth(concrete)
    _, cmd = resolve_command(concrete[:depth])
    try:
        ctx = cmd.make_context(f"fleet {' '.join(concrete[:depth])}", concrete[depth:])
    except click.UsageError as e:
        raise AssertionError(f"{where}: `fleet {' '.join(argv)}`: {e.format_message()}") from e
    params = dict(ctx.params)
    task = params.get("task_name")
    if task is not None:
        assert task in TASKS, f"{where}: --task {task} is not a task in config/data/tasks.toml"
    return params


def command_depth(words: list[str]) -> int:
    """How many leading words name groups and the command (the rest are its arguments)."""
    cmd: click.Command = main
    depth = 0
    for w in words:
        if not isinstance(cmd, click.Group):
            break
        depth += 1  # a word that is no command still counts: resolve_command says so
        if w not in cmd.commands:
            break
        cmd = cmd.commands[w]
    return depth


def compose() -> dict[str, Any]:
    return load_yaml(COMPOSE)


def fleet_services(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {n: s for n, s in doc["services"].items() if s.get("image", "").startswith(FLEET_IMAGE)}


def deploy_texts() -> list[tuple[Path, str]]:
    files = [COMPOSE, *DOCS, *(p for p in DEPLOY.rglob("*") if p.is_file())]
    return [
        (p, p.read_text())
        for p in files
        if p.exists() and "grafana" not in p.parts and p.suffix not in (".json",)
    ]


# -- environment variables -------------------------------------------------------------


def test_every_fleet_variable_named_anywhere_is_a_setting():
    named = {
        (m.group(0), str(path.relative_to(ROOT)))
        for path, text in deploy_texts()
        for m in re.finditer(r"\bFLEET_[A-Z0-9_]+\b", text)
    }
    assert named, "no FLEET_ variable found: the scan is broken"
    unknown = sorted((v, f) for v, f in named if v not in SETTING_VARS)
    assert not unknown, f"not a field of config.settings.Settings: {unknown}"


def _defined_vars() -> list[tuple[str, str]]:
    """(variable, where) for every variable a deployment file sets."""
    out: list[tuple[str, str]] = []
    for name, svc in compose()["services"].items():
        env = svc.get("environment") or {}
        out += [(k, f"compose {name}") for k in env]
    out += [(k, "deploy/env.example") for k in env_file(DEPLOY / "env.example")]
    out += [(k, "fleet.env.example") for k in env_file(SYSTEMD / "fleet.env.example")]
    for where, doc in k8s_docs():
        if doc["kind"] in ("ConfigMap", "Secret"):
            data = doc.get("data") or doc.get("stringData") or {}
            out += [(k, where) for k in data]
    for name, c in fleet_containers():
        out += [(e["name"], f"k8s {name}") for e in c.get("env", [])]
    for unit in SYSTEMD.glob("*.service"):
        for value in unit_values(parse_unit(unit), "Service", "Environment"):
            out.append((value.split("=", 1)[0], unit.name))
    dockerfile = (DEPLOY / "Dockerfile").read_text().replace("\\\n", " ")
    for line in dockerfile.splitlines():
        if line.startswith("ENV "):
            out += [(m, "deploy/Dockerfile") for m in re.findall(r"([A-Z_][A-Z0-9_]*)=", line)]
    return out


def test_every_variable_set_is_a_setting_or_a_documented_outside_variable():
    defined = _defined_vars()
    assert len(defined) > 30, defined
    bad = sorted({(v, w) for v, w in defined if v not in SETTING_VARS and v not in NON_FLEET_VARS})
    assert not bad, f"neither a fleet setting nor a documented non-fleet variable: {bad}"


def test_compose_interpolations_are_documented_in_env_example():
    example = env_file(DEPLOY / "env.example")
    used = set(re.findall(r"\$\{([A-Z_][A-Z0-9_]*)", COMPOSE.read_text()))
    assert used >= {"POSTGRES_PASSWORD", "REDIS_PASSWORD", "FLEET_FLOWER_PASSWORD"}
    assert not used - set(example), f"set these in deploy/env.example: {used - set(example)}"
    # Secrets are required (`:?`), never defaulted in the compose file.
    for secret in ("POSTGRES_PASSWORD", "REDIS_PASSWORD", "FLEET_FLOWER_PASSWORD"):
        uses = re.findall(r"\$\{" + secret + r"([^}]*)\}", COMPOSE.read_text())
        assert uses and all(u.startswith(":?") for u in uses), (secret, uses)
    assert example["WORKER_TASK"] in TASKS


def test_setting_values_in_the_manifests_parse(monkeypatch):
    envs = {
        "env.example": env_file(DEPLOY / "env.example"),
        "fleet.env.example": env_file(SYSTEMD / "fleet.env.example"),
        "configmap": next(
            d for d in by_kind("ConfigMap") if d["metadata"]["name"] == "fleet-config"
        )["data"],
        "secret": by_kind("Secret")[0]["stringData"],
    }
    for name, svc in fleet_services(compose()).items():
        envs[f"compose {name}"] = {
            k: re.sub(r"\$\{[^}]*\}", "x", str(v)) for k, v in svc["environment"].items()
        }
    for where, env in envs.items():
        s = settings_from({k: str(v) for k, v in env.items()}, monkeypatch)
        if "DATABASE_URL" in env:
            assert s.db_url().startswith("postgresql+psycopg://"), where
            assert urlsplit(env["DATABASE_URL"]).hostname, where


# -- command lines -------------------------------------------------------------------


def _compose_commands(doc: dict[str, Any], where: str) -> list[tuple[list[str], str]]:
    out = []
    for name, svc in fleet_services(doc).items():
        assert "entrypoint" not in svc, f"{where} {name}: the image's entrypoint is `fleet`"
        out.append(([str(a) for a in svc["command"]], f"{where} {name}"))
    return out


def _unit_commands() -> list[tuple[list[str], str]]:
    out = []
    for unit in sorted(SYSTEMD.glob("*.service")):
        for exec_start in unit_values(parse_unit(unit), "Service", "ExecStart"):
            argv = shlex.split(exec_start)
            assert Path(argv[0]).name == "fleet", f"{unit.name}: ExecStart runs {argv[0]}"
            out.append((argv[1:], unit.name))
    return out


def _k8s_commands() -> list[tuple[list[str], str]]:
    out = []
    for name, c in fleet_containers():
        assert c["image"] == FLEET_IMAGE, f"{name}: image {c['image']}"
        assert "command" not in c, f"{name}: the image's entrypoint is `fleet`; use args"
        out.append(([str(a) for a in c["args"]], f"k8s {name}"))
    return out


def _generated() -> dict[str, Any]:
    text, _ = deploy.compose_command(TASKS, "0,1,2,3", ["intent=0,1", "transcribe"])
    return yaml.safe_load(text)


def all_commands() -> list[tuple[list[str], str]]:
    return [
        *_compose_commands(compose(), "docker-compose.yml"),
        *_compose_commands(_generated(), "generated override"),
        *_k8s_commands(),
        *_unit_commands(),
    ]


def test_every_fleet_command_line_parses_with_the_real_cli():
    cmds = all_commands()
    names = {argv[0] for argv, _ in cmds}
    # what the deployment runs, at least
    assert names >= {
        "migrate",
        "models",
        "worker",
        "beat",
        "flower",
        "metrics",
        "nightly",
        "status",
    }
    for argv, where in cmds:
        check_fleet_argv(argv, where)


def doc_command_lines() -> Iterator[tuple[str, list[str]]]:
    """(line, fleet argv) for each command line in the docs' code blocks that runs
    `fleet` directly, by path, or as the compose `cli` service."""
    for doc in DOCS:
        in_code = False
        for line in doc.read_text().splitlines():
            if line.lstrip().startswith("```"):
                in_code = not in_code
                continue
            if not in_code:
                continue
            text = line.split(" #", 1)[0].strip()
            words = shlex.split(text) if text else []
            for i, w in enumerate(words):
                direct = (w == "fleet" and i == 0) or w.endswith("/bin/fleet")
                if direct or (w == "cli" and "run" in words[:i]):
                    yield f"{doc.name}: {text}", words[i + 1 :]
                    break


def test_command_lines_in_the_docs_name_real_commands_and_options():
    seen = 0
    for where, words in doc_command_lines():
        depth = command_depth(words)
        _, cmd = resolve_command(words[:depth])
        options = {o for p in cmd.params for o in (*p.opts, *p.secondary_opts)}
        for w in words[depth:]:
            flag = w.split("=", 1)[0]
            if flag.startswith("-"):
                assert flag in options, f"{where}: {flag} is not an option of this command"
        seen += 1
    assert seen >= 10, "the docs show fewer fleet commands than expected: is the scan broken?"


# -- compose --------------------------------------------------------------------------


def _gpu_devices(svc: dict[str, Any]) -> list[dict[str, Any]]:
    return svc.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])


def _check_gpu_workers(services: dict[str, dict[str, Any]], where: str) -> list[str]:
    pinned = []
    for name, svc in services.items():
        argv = [str(a) for a in svc["command"]]
        if argv[0] != "worker":
            assert not _gpu_devices(svc), f"{where} {name}: only workers reserve GPUs"
            continue
        devices = _gpu_devices(svc)
        if "--gpu" not in argv:
            assert not devices, f"{where} {name}: a CPU worker reserves no GPU"
            continue
        assert len(devices) == 1, f"{where} {name}: one device request, got {devices}"
        (dev,) = devices
        assert dev["driver"] == "nvidia" and dev["capabilities"] == ["gpu"], (where, name, dev)
        assert "count" not in dev and len(dev["device_ids"]) == 1, f"{where} {name}: one GPU"
        # The container sees its one GPU as index 0.
        assert argv[argv.index("--gpu") + 1] == "0", f"{where} {name}: --gpu must be 0"
        pinned.append(dev["device_ids"][0])
    assert len(pinned) == len(set(pinned)), f"{where}: two workers on one GPU: {pinned}"
    return pinned


def test_compose_gpu_workers_reserve_one_gpu_each():
    doc = compose()
    pinned = _check_gpu_workers(fleet_services(doc), "docker-compose.yml")
    assert pinned == ["0", "1"]
    gpu = {n for n, s in doc["services"].items() if "gpu" in s.get("profiles", [])}
    cpu = {n for n, s in doc["services"].items() if "cpu" in s.get("profiles", [])}
    assert gpu == {"worker-gpu0", "worker-gpu1"} and cpu == {"worker-cpu"}
    assert _check_gpu_workers(_generated()["services"], "override") == ["0", "1", "2", "3"]


def test_compose_workers_are_what_the_generator_writes():
    """docker-compose.yml's workers and `fleet deploy compose` output share one shape."""
    services = compose()["services"]
    for gpu in (0, 1):
        svc = dict(services[f"worker-gpu{gpu}"])
        assert svc.pop("profiles") == ["gpu"]
        assert svc == deploy.compose_worker("${WORKER_TASK:-intent}", gpu)
    cpu = dict(services["worker-cpu"])
    assert cpu.pop("profiles") == ["cpu"]
    assert cpu == deploy.compose_worker("${WORKER_TASK:-intent}", None)
    # every fleet service shares image, build, env file and the core environment
    for name, svc in fleet_services({"services": services}).items():
        assert svc["image"] == deploy.IMAGE and svc["build"] == deploy.COMPOSE_BUILD, name
        assert svc["env_file"] == ".env", name
        for key, value in deploy.COMPOSE_ENVIRONMENT.items():
            assert svc["environment"][key] == value, (name, key)


def test_compose_depends_on_and_healthchecks():
    doc = compose()
    services = doc["services"]
    merged = {**services, **_generated()["services"]}
    for name, svc in merged.items():
        for dep, cond in (svc.get("depends_on") or {}).items():
            assert dep in services, f"{name} depends on {dep}, which is not a service"
            condition = cond["condition"]
            if condition == "service_healthy":
                assert "healthcheck" in services[dep], f"{name} waits for {dep}'s healthcheck"
            elif condition == "service_completed_successfully":
                assert services[dep].get("restart") == "no", f"{dep} runs once"
            else:
                raise AssertionError(f"{name} -> {dep}: unexpected condition {condition}")
        for volume in svc.get("volumes", []):
            source = str(volume).split(":", 1)[0]
            if not source.startswith(("$", ".", "/")):
                assert source in doc["volumes"], f"{name}: volume {source} is not declared"
    assert services["migrate"]["command"] == ["migrate"]
    assert services["models"]["command"] == ["models", "prepare"]
    for name in ("postgres", "redis", "flower", "metrics"):
        assert "healthcheck" in services[name], name


def test_compose_ports_are_the_settings_defaults():
    services = compose()["services"]
    for name, port in (("flower", DEFAULTS.flower_port), ("metrics", DEFAULTS.metrics_port)):
        svc = services[name]
        prefix = name.upper()
        assert svc["environment"][f"FLEET_{prefix}_PORT"] == str(port)
        assert svc["environment"][f"FLEET_{prefix}_ADDRESS"] == "0.0.0.0"
        (published,) = svc["ports"]
        assert published.rsplit(":", 2)[-2:] == [str(port), str(port)], published
        assert f"127.0.0.1:{port}/" in " ".join(svc["healthcheck"]["test"])
    assert services["flower"]["environment"]["FLEET_FLOWER_PASSWORD"].startswith(
        "${FLEET_FLOWER_PASSWORD:?"
    )
    flower_argv = services["flower"]["command"]
    assert "--no-auth" not in flower_argv


def test_generator_plans_one_task_per_gpu():
    plan = deploy.assign_gpus([0, 1, 2, 3], ["intent", "transcribe"])
    assert [(a.task, a.gpu) for a in plan] == [
        ("intent", 0),
        ("intent", 1),
        ("transcribe", 2),
        ("transcribe", 3),
    ]
    plan = deploy.assign_gpus([0, 1, 2], ["topic=2", "intent"])
    assert [(a.task, a.gpu) for a in plan] == [("intent", 0), ("intent", 1), ("topic", 2)]
    for gpus, tasks, message in [
        ([0], ["intent", "topic"], "only 1 GPU"),
        ([0, 1], ["intent=0", "topic=0"], "one GPU holds one model"),
        ([0, 1], ["intent=0"], "have no task"),
        ([0], ["intent=3"], "not in --gpus"),
        ([0, 1], ["intent", "intent"], "named twice"),
    ]:
        with pytest.raises(deploy.DeployError, match=message):
            deploy.assign_gpus(gpus, tasks)


def test_generator_output_is_deterministic_and_checks_task_names():
    a, _ = deploy.compose_command(TASKS, "0,1,2,3", ["intent=0,1", "transcribe"])
    b, _ = deploy.compose_command(TASKS, "0,1,2,3", ["intent=0,1", "transcribe"])
    assert a == b and a.startswith("# Generated by `fleet deploy compose --gpus 0,1,2,3")
    assert list(yaml.safe_load(a)["services"]) == [
        "worker-intent-gpu0",
        "worker-intent-gpu1",
        "worker-transcribe-gpu2",
        "worker-transcribe-gpu3",
    ]
    with pytest.raises(deploy.DeployError, match="unknown task 'nope'"):
        deploy.compose_command(TASKS, "0", ["nope"])


def test_deploy_compose_cli_writes_the_override(tmp_path, monkeypatch):
    from click.testing import CliRunner

    monkeypatch.setenv("FLEET_STATE_DIR", str(tmp_path / "state"))
    out = tmp_path / "docker-compose.override.yml"
    result = CliRunner().invoke(
        main, ["deploy", "compose", "--gpus", "0,1", "--task", "topic", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert "2 worker(s)" in result.output
    services = yaml.safe_load(out.read_text())["services"]
    assert list(services) == ["worker-topic-gpu0", "worker-topic-gpu1"]
    bad = CliRunner().invoke(main, ["deploy", "compose", "--gpus", "0", "--task", "a", "-t", "b"])
    assert bad.exit_code == 2 and "each GPU holds one model" in bad.output


def _compose_command() -> list[str] | None:
    """`docker compose` (the v2 plugin) where it works, else Debian's
    `docker-compose` (installed by scripts/install.sh), which validates the same
    file against its schema; neither needs a Docker engine for `config`."""
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=30)
        if probe.returncode == 0:
            return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


def test_docker_compose_config_accepts_the_files(tmp_path):
    compose = _compose_command()
    if compose is None:
        pytest.skip(
            "neither `docker compose` nor `docker-compose` is installed (scripts/install.sh "
            "installs Debian's docker-compose): the compose files are checked structurally above"
        )
    project = tmp_path / "project"
    project.mkdir()
    shutil.copy(COMPOSE, project / "docker-compose.yml")
    shutil.copy(DEPLOY / "env.example", project / ".env")
    text, _ = deploy.compose_command(TASKS, "0,1,2,3", ["intent=0,1", "transcribe"])
    (project / "docker-compose.override.yml").write_text(text)
    for args in (["--profile", "gpu", "--profile", "cpu", "--profile", "tools"], []):
        run = subprocess.run(
            [*compose, *args, "config", "--quiet"],
            cwd=project,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert run.returncode == 0, run.stderr
    # The validator is real: a wrongly typed device list is refused.
    broken = (project / "docker-compose.override.yml").read_text()
    broken = broken.replace("device_ids:\n                - '0'", "device_ids: '0'", 1)
    assert broken != (project / "docker-compose.override.yml").read_text()
    (project / "docker-compose.override.yml").write_text(broken)
    run = subprocess.run(
        [*compose, "config", "--quiet"], cwd=project, capture_output=True, text=True, timeout=60
    )
    assert run.returncode != 0, "the compose validator accepted a broken file"


# -- kubernetes ---------------------------------------------------------------------------


def test_k8s_builtin_kinds_validate_against_the_kubernetes_schemas():
    kv = pytest.importorskip("kubernetes_validate", reason="install the dev extras")
    checked = 0
    for where, doc in k8s_docs():
        if doc["apiVersion"].startswith("keda.sh/"):
            continue
        try:
            kv.validate(doc, "1.30", strict=True)
        except kv.ValidationError as e:
            at = ".".join(str(p) for p in e.absolute_path)
            raise AssertionError(
                f"{where} {doc['kind']} {doc['metadata']['name']} at {at}: {e.message}"
            ) from None
        checked += 1
    assert checked >= 15


def test_k8s_kustomization_lists_every_manifest():
    kust = load_yaml(K8S / "kustomization.yaml")
    listed = set(kust["resources"])
    present = {str(p.relative_to(K8S)) for p in K8S.rglob("*.yaml")}
    assert listed <= present, f"listed but missing: {listed - present}"
    # the Secret example is applied by hand, after editing
    assert present - listed == {"kustomization.yaml", "secret.example.yaml"}
    assert [i["name"] for i in kust["images"]] == [FLEET_IMAGE]
    if shutil.which("kubectl"):
        built = subprocess.run(
            ["kubectl", "kustomize", str(K8S)], capture_output=True, text=True, timeout=60
        )
        assert built.returncode == 0, built.stderr
        docs = [d for d in yaml.safe_load_all(built.stdout) if d]
        assert {d["metadata"].get("namespace") for d in docs if d["kind"] != "Namespace"} == {
            kust["namespace"]
        }


def test_k8s_workers_one_per_task_with_one_gpu_each():
    workers = {
        d["metadata"]["name"]: d
        for d in by_kind("Deployment")
        if d["metadata"]["labels"].get("app.kubernetes.io/component") == "worker"
    }
    tasks_served = {}
    for name, d in workers.items():
        spec = pod_spec(d)
        (c,) = spec["containers"]
        params = check_fleet_argv(c["args"], name)
        assert params["gpu"] == 0, f"{name}: the pod sees its one GPU as index 0"
        assert c["resources"]["limits"]["nvidia.com/gpu"] == 1, f"{name}: one GPU per pod"
        assert c["resources"].get("requests", {}).get("nvidia.com/gpu", 1) == 1
        assert "replicas" not in d["spec"], f"{name}: KEDA owns replicas"
        assert d["spec"]["strategy"]["rollingUpdate"]["maxSurge"] == 0, "no spare GPU needed"
        grace = spec["terminationGracePeriodSeconds"]
        assert grace < DEFAULTS.visibility_timeout, f"{name}: warm shutdown within visibility"
        tasks_served[params["task_name"]] = name
    assert set(tasks_served) == set(TASKS), "one worker Deployment per configured task"


def test_k8s_worker_files_are_the_generator_output():
    for name, spec in TASKS.items():
        path = K8S / "workers" / f"{name}.yaml"
        assert path.read_text() == k8s.k8s_command(spec), (
            f"{path} differs from `fleet deploy k8s --task {name}`: regenerate it"
        )


def test_keda_scales_each_worker_on_its_own_queue():
    deployments = {d["metadata"]["name"]: d for d in by_kind("Deployment")}
    auths = {d["metadata"]["name"]: d for d in by_kind("TriggerAuthentication")}
    secret = by_kind("Secret")[0]["stringData"]
    broker = urlsplit(secret["BROKER_URL"])
    scaled = by_kind("ScaledObject")
    assert len(scaled) == len(TASKS)
    for so in scaled:
        target = deployments[so["spec"]["scaleTargetRef"]["name"]]
        (c,) = pod_spec(target)["containers"]
        task = check_fleet_argv(c["args"], so["metadata"]["name"])["task_name"]
        (trigger,) = so["spec"]["triggers"]
        assert trigger["type"] == "redis"
        meta = trigger["metadata"]
        assert meta["listName"] == TASKS[task].queue == f"fleet.{task}"
        assert int(meta["listLength"]) >= 1 and int(meta["activationListLength"]) >= 0
        assert meta["databaseIndex"] == broker.path.lstrip("/"), "KEDA reads the broker's db"
        assert so["spec"]["minReplicaCount"] >= 0 and so["spec"]["maxReplicaCount"] >= 1
        assert trigger["authenticationRef"]["name"] in auths
    (auth,) = auths.values()
    params = {r["parameter"]: r for r in auth["spec"]["secretTargetRef"]}
    assert set(params) == {"address", "password"}
    for ref in params.values():
        assert ref["name"] == "fleet-secrets" and ref["key"] in secret
    assert secret[params["address"]["key"]] == f"{broker.hostname}:{broker.port}"
    assert secret[params["password"]["key"]] == broker.password


def test_k8s_references_resolve():
    names = {(d["kind"], d["metadata"]["name"]) for _, d in k8s_docs()}
    secret = by_kind("Secret")[0]
    config = next(d for d in by_kind("ConfigMap") if d["metadata"]["name"] == "fleet-config")
    for doc in workloads():
        spec = pod_spec(doc)
        where = doc["metadata"]["name"]
        sec = spec["securityContext"]
        assert sec["runAsNonRoot"] is True and sec["runAsUser"] == deploy.UID, where
        for vol in spec.get("volumes", []):
            claim = vol.get("persistentVolumeClaim")
            if claim:
                assert ("PersistentVolumeClaim", claim["claimName"]) in names, (where, claim)
        for c in spec["containers"]:
            for ref in c.get("envFrom", []):
                assert ref["configMapRef"]["name"] == config["metadata"]["name"], where
            for e in c.get("env", []):
                key = e["valueFrom"]["secretKeyRef"]
                assert key["name"] == secret["metadata"]["name"], where
                assert key["key"] in secret["stringData"] and key["key"] == e["name"], where
            env_names = {e["name"] for e in c.get("env", [])}
            assert {"DATABASE_URL", "BROKER_URL"} <= env_names or c["args"] == [
                "models",
                "prepare",
            ], f"{where}: without both URLs a fleet command starts embedded servers"
            assert c["securityContext"]["allowPrivilegeEscalation"] is False, where


def test_k8s_singletons_schedule_and_ports():
    deployments = {d["metadata"]["name"]: d for d in by_kind("Deployment")}
    services = {d["metadata"]["name"]: d for d in by_kind("Service")}
    config = next(d for d in by_kind("ConfigMap") if d["metadata"]["name"] == "fleet-config")[
        "data"
    ]
    beat = deployments["fleet-beat"]
    assert beat["spec"]["replicas"] == 1 and beat["spec"]["strategy"]["type"] == "Recreate"
    (cron,) = by_kind("CronJob")
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    assert cron["spec"]["schedule"] == DEFAULTS.nightly_crontab == config["FLEET_NIGHTLY_CRONTAB"]
    assert cron["spec"]["timeZone"] == DEFAULTS.timezone == config["FLEET_TIMEZONE"]
    assert pod_spec(cron)["containers"][0]["args"] == ["nightly"]
    (job,) = [d for d in by_kind("Job") if d["metadata"]["name"] == "fleet-migrate"]
    assert pod_spec(job)["containers"][0]["args"] == ["migrate"]
    for name, port, path in (
        ("flower", DEFAULTS.flower_port, "/healthcheck"),
        ("metrics", DEFAULTS.metrics_port, "/metrics"),
    ):
        d = deployments[f"fleet-{name}"]
        (c,) = pod_spec(d)["containers"]
        (cport,) = c["ports"]
        assert cport["containerPort"] == port == int(config[f"FLEET_{name.upper()}_PORT"])
        assert config[f"FLEET_{name.upper()}_ADDRESS"] == "0.0.0.0"
        assert c["readinessProbe"]["httpGet"] == {"path": path, "port": cport["name"]}
        (sport,) = services[f"fleet-{name}"]["spec"]["ports"]
        assert sport["port"] == port and sport["targetPort"] == cport["name"]
        selector = services[f"fleet-{name}"]["spec"]["selector"]
        assert selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()
    flower_env = {e["name"] for e in pod_spec(deployments["fleet-flower"])["containers"][0]["env"]}
    assert {"FLEET_FLOWER_USER", "FLEET_FLOWER_PASSWORD"} <= flower_env
    for obj in (deployments["fleet-metrics"]["spec"]["template"], services["fleet-metrics"]):
        ann = obj["metadata"]["annotations"]
        assert ann["prometheus.io/scrape"] == "true"
        assert ann["prometheus.io/port"] == str(DEFAULTS.metrics_port)
        assert ann["prometheus.io/path"] == "/metrics"


# -- systemd ------------------------------------------------------------------------------


def test_systemd_units_wiring():
    units = {p.name: parse_unit(p) for p in SYSTEMD.glob("*.service")}
    assert set(units) >= {
        "fleet-worker@.service",
        "fleet-beat.service",
        "fleet-flower.service",
        "fleet-metrics.service",
        "fleet-nightly.service",
    }
    for name, unit in units.items():
        (user,) = unit_values(unit, "Service", "User")
        assert user not in ("root", "0"), name
        files = unit_values(unit, "Service", "EnvironmentFile")
        assert files[0] == "/etc/fleet/fleet.env", name
    worker = units["fleet-worker@.service"]
    assert unit_values(worker, "Service", "Environment") == ["CUDA_VISIBLE_DEVICES=%i"]
    assert unit_values(worker, "Service", "Restart") == ["always"]
    (exec_start,) = unit_values(worker, "Service", "ExecStart")
    argv = shlex.split(exec_start)[1:]
    assert (
        argv[argv.index("--gpu") + 1] == "%i" and argv[argv.index("--task") + 1] == "${WORKER_TASK}"
    )
    stop = int(unit_values(worker, "Service", "TimeoutStopSec")[0])
    assert stop < DEFAULTS.visibility_timeout, "warm shutdown ends before Redis redelivers"
    timer = parse_unit(SYSTEMD / "fleet-nightly.timer")
    assert unit_values(timer, "Timer", "Unit") == ["fleet-nightly.service"]
    minute, hour, *rest = DEFAULTS.nightly_crontab.split()
    assert rest == ["*", "*", "*"]
    assert unit_values(timer, "Timer", "OnCalendar") == [
        f"*-*-* {int(hour):02d}:{int(minute):02d}:00 {DEFAULTS.timezone}"
    ]
    assert env_file(SYSTEMD / "fleet.env.example")["WORKER_TASK"] in TASKS


def test_systemd_analyze_verify_accepts_the_units(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed: units are checked structurally above")
    fleet_bin = Path(sys.executable).with_name("fleet")
    assert fleet_bin.is_file(), fleet_bin
    for unit in sorted([*SYSTEMD.glob("*.service"), *SYSTEMD.glob("*.timer")]):
        name = unit.name.replace("@.service", "@0.service")
        text = unit.read_text().replace("/opt/gpu-fleet/bin/fleet", str(fleet_bin))
        (tmp_path / name).write_text(text)
    files = sorted(str(p) for p in tmp_path.iterdir())
    run = subprocess.run(
        [analyze, "verify", "--man=no", *files],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "SYSTEMD_LOG_LEVEL": "warning"},
    )
    problems = [
        line
        for line in (run.stdout + run.stderr).splitlines()
        if line.strip() and "/etc/fleet/" not in line
    ]
    assert run.returncode == 0 and not problems, run.stdout + run.stderr


# -- Dockerfile ----------------------------------------------------------------------------


def test_dockerfile_cuda_runtime_base_non_root_and_every_package():
    text = (DEPLOY / "Dockerfile").read_text()
    base = re.search(r"^ARG BASE_IMAGE=(\S+)", text, re.M)
    assert base and re.fullmatch(r"nvidia/cuda:[\d.]+-(cudnn-)?runtime-ubuntu[\d.]+", base[1])
    assert re.search(r"^FROM \$\{BASE_IMAGE\}$", text, re.M)
    uid = re.search(r"^ARG APP_UID=(\d+)$", text, re.M)
    assert uid and int(uid[1]) == deploy.UID, "k8s runAsUser is the image's user"
    users = re.findall(r"^USER (\S+)$", text, re.M)
    assert users and users[-1] == "${APP_UID}:${APP_UID}", "numeric, so runAsNonRoot can verify"
    assert re.search(r'^ENTRYPOINT \["fleet"\]$', text, re.M)
    pyproject = (ROOT / "pyproject.toml").read_text()
    include = re.search(r"include = \[([^\]]*)\]", pyproject)
    assert include
    packages = [p.strip().strip('"').rstrip("*") for p in include[1].split(",")]
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
    for pkg in packages:
        assert re.search(rf"^COPY {pkg} {pkg}$", text, re.M), f"the image lacks {pkg}/"
        assert f"!{pkg}/" in ignore, f"Dockerfile.dockerignore keeps {pkg}/ out of the context"


@pytest.mark.parametrize(
    ("url", "db"),
    [
        (None, 0),
        ("redis://:pw@redis:6379", 0),
        ("redis://:pw@redis:6379/", 0),
        ("redis://:pw@redis:6379/7", 7),
        ("rediss://redis.example:6380/12", 12),
    ],
)
def test_redis_database_of_the_broker_url(url, db):
    assert deploy.redis_database(url) == db


def test_redis_database_must_be_a_number():
    with pytest.raises(deploy.DeployError, match="give a number"):
        deploy.redis_database("redis://redis:6379/queue")


def test_deploy_k8s_takes_the_brokers_database_and_the_users_task_config(tmp_path, monkeypatch):
    from click.testing import CliRunner

    config = tmp_path / "mine.toml"
    config.write_text(
        '[tasks.triage]\nkind = "sequence_classify"\nlabels = "sentiment"\n'
        '[[tasks.triage.ladder]]\npath = "triage-minilm"\n'
    )
    monkeypatch.setenv("FLEET_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("BROKER_URL", "redis://:pw@redis.gpu-fleet.svc:6379/7")
    monkeypatch.setenv("FLEET_CONFIG_FILE", str(config))
    result = CliRunner().invoke(main, ["deploy", "k8s", "--task", "triage"])
    assert result.exit_code == 0, result.output
    tasks_map, deployment, scaled = yaml.safe_load_all(result.output)
    assert scaled["spec"]["triggers"][0]["metadata"]["databaseIndex"] == "7"
    assert (
        tasks_map["kind"] == "ConfigMap" and tasks_map["data"]["tasks.toml"] == config.read_text()
    )
    (c,) = pod_spec(deployment)["containers"]
    assert {"name": "FLEET_CONFIG_FILE", "value": deploy.CONFIG_MOUNT} in c["env"]
    mount = next(m for m in c["volumeMounts"] if m["name"] == "tasks")
    assert mount["mountPath"] == deploy.CONFIG_MOUNT and mount["readOnly"] is True
    assert {"name": "tasks", "configMap": {"name": "fleet-tasks"}} in pod_spec(deployment)[
        "volumes"
    ]
    unknown = CliRunner().invoke(main, ["deploy", "k8s", "--task", "nope"])
    assert unknown.exit_code == 2 and "unknown task 'nope'" in unknown.output


def test_deploy_compose_carries_the_task_config_and_the_source_database(tmp_path, monkeypatch):
    from click.testing import CliRunner

    config = tmp_path / "mine.toml"
    config.write_text('[sources.app]\ntable = "app.conversations"\n')
    monkeypatch.setenv("FLEET_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("FLEET_CONFIG_FILE", str(config))
    monkeypatch.setenv("FLEET_SOURCE_DATABASE_URL", "postgresql://reader:s3cret@app-db/app")
    result = CliRunner().invoke(main, ["deploy", "compose", "--gpus", "0", "--task", "intent"])
    assert result.exit_code == 0, result.output
    assert "s3cret" not in result.output  # the URL is read from .env, never written here
    services = yaml.safe_load(result.output)["services"]
    worker = services["worker-intent-gpu0"]
    mount = f"{config.resolve()}:{deploy.CONFIG_MOUNT}:ro"
    assert (
        worker["environment"]["FLEET_CONFIG_FILE"] == deploy.CONFIG_MOUNT
        and mount in worker["volumes"]
    )
    assert worker["environment"]["FLEET_SOURCE_DATABASE_URL"] == ""  # workers do not sync
    for name in ("beat", "cli"):
        assert services[name]["environment"]["FLEET_SOURCE_DATABASE_URL"].startswith(
            "${FLEET_SOURCE_DATABASE_URL:?"
        )
        assert mount in services[name]["volumes"]


def test_compose_services_get_only_the_secrets_they_need():
    from pydantic import SecretStr

    secret_settings = {
        (f.validation_alias.choices[0] if f.validation_alias else f"FLEET_{name.upper()}")
        for name, f in Settings.model_fields.items()
        if "SecretStr" in str(f.annotation) or f.annotation is SecretStr
    }
    urls = {"DATABASE_URL", "BROKER_URL"}
    assert secret_settings - urls <= set(deploy.ENV_SECRETS)
    example = env_file(DEPLOY / "env.example")
    assert {k for k in example if "PASSWORD" in k} <= set(deploy.ENV_SECRETS)
    services = {**fleet_services(compose()), **_generated()["services"]}
    assert set(deploy.COMPOSE_SECRETS_NEEDED) == {
        "worker" if n.startswith("worker") else n for n in services
    }
    for name, svc in services.items():
        kind = "worker" if name.startswith("worker") else name
        env = svc["environment"]
        for key in deploy.blanked_secrets(kind):
            assert env.get(key) == "", (name, key)
        for key in deploy.COMPOSE_SECRETS_NEEDED[kind]:
            assert env.get(key) != "", (name, key)
        assert all(env[k] for k in urls), name
    assert deploy.WORKER_BLANKED_SECRETS == deploy.ENV_SECRETS
