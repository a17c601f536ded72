"""Settings: one pydantic-settings class, read once at the entry point and passed in.

Every field documents itself; `fleet settings` prints them (secrets masked).
`DATABASE_URL` and `BROKER_URL` are read without prefix because every other
tool (docker-compose, Alembic, Flower) uses those names; the rest use `FLEET_`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


def default_state_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(Path.home(), ".local", "share")
    return Path(base) / "fleet"


def normalize_database_url(url: str) -> str:
    """Make any Postgres URL use the psycopg 3 driver."""
    for prefix in ("postgres://", "postgresql://", "postgresql+psycopg2://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FLEET_", extra="ignore", populate_by_name=True)

    database_url: SecretStr | None = Field(
        default=None,
        validation_alias=AliasChoices("DATABASE_URL", "FLEET_DATABASE_URL"),
        description="Postgres URL. Unset: an embedded Postgres under state_dir is started.",
    )
    broker_url: SecretStr | None = Field(
        default=None,
        validation_alias=AliasChoices("BROKER_URL", "FLEET_BROKER_URL"),
        description="Redis URL for Celery. Unset: an embedded Redis under state_dir is started.",
    )
    state_dir: Path = Field(
        default_factory=default_state_dir,
        description="Folder for the embedded servers' data and the prepared model cache.",
    )
    models_dir: Path | None = Field(
        default=None,
        description="Folder of prepared models (`fleet models prepare`). Default: state_dir/models.",
    )
    config_file: Path | None = Field(
        default=None,
        description="TOML file with the tasks and their model ladders. Default: the bundled tasks.toml.",
    )
    audio_root: Path | None = Field(
        default=None,
        description="Audio files must resolve inside this folder. Default: state_dir/audio.",
    )
    batch_size: int = Field(
        default=32,
        ge=1,
        description="Items per batch message sent to Redis: the size of the first batches of a "
        "run, and the least once the size adapts (FLEET_BATCH_SECONDS).",
    )
    batch_seconds: float = Field(
        default=1.0,
        ge=0,
        description="Aim each batch message at this many seconds of worker time: `fleet run` "
        "sizes batches from each task's measured items/s per worker, between FLEET_BATCH_SIZE "
        "and FLEET_MAX_BATCH_SIZE (and at most a quarter of the lease). 0: always FLEET_BATCH_SIZE.",
    )
    max_batch_size: int = Field(
        default=8192, ge=1, description="Most items in one batch message when sizes adapt."
    )
    max_inflight_batches: int = Field(
        default=64, ge=1, description="Backpressure: most batches waiting in one task queue."
    )
    lease_seconds: int = Field(
        default=900,
        ge=5,
        description="How long a claimed item may stay queued or running before the reconciler "
        "returns it to pending. Longer than the slowest batch plus its queue wait.",
    )
    max_attempts: int = Field(
        default=5, ge=1, description="Claims of one item before the reconciler marks it dead."
    )
    poison_crashes: int = Field(
        default=2,
        ge=1,
        description="Worker deaths a single-item batch may cause before the item is marked dead.",
    )
    visibility_timeout: int = Field(
        default=3600,
        ge=5,
        description="Redis redelivers an unacknowledged batch after this many seconds. "
        "Must exceed the longest batch.",
    )
    step_up_after: int | None = Field(
        default=None,
        ge=1,
        description="After this many clean batches on a lower tier, a worker tries the next "
        "larger model again. Unset: it stays where OOM put it.",
    )
    start_tier: int | None = Field(
        default=None,
        ge=0,
        description="Force a worker to load this tier of its ladder (0 = largest) instead of "
        "choosing by free device memory.",
    )
    restart_backoff: float = Field(
        default=1.0,
        gt=0,
        description="`fleet workers`: first restart delay of a dead worker in seconds; doubles "
        "per quick death, up to 60.",
    )
    local_workers: Literal["auto", "on", "off"] = Field(
        default="auto",
        description="`fleet run` and `fleet nightly` start, supervise and stop the workers "
        "they need on this machine (one per task per visible GPU, or one per task on the CPU): "
        "on, off, or auto (on with the embedded servers, i.e. DATABASE_URL and BROKER_URL "
        "unset). --local-workers / --no-local-workers overrides it.",
    )
    local_workers_mode: Literal["auto", "parallel", "sequential"] = Field(
        default="auto",
        description="Local workers: parallel (every task's worker at once), sequential (one "
        "task at a time: its worker starts when its queue has work and stops when it is "
        "drained; follow-ups after the task they follow), or auto (sequential when the "
        "estimated memory of every task's worker at once does not fit local_workers_memory_mb).",
    )
    local_workers_memory_mb: int | None = Field(
        default=None,
        ge=1,
        description="Local workers: memory (MiB) the workers (models and processes) may take, "
        "per GPU or on the CPU. "
        "Unset: 85 % of the free GPU memory, or of MemAvailable on a CPU-only machine.",
    )
    local_workers_stop_grace: float = Field(
        default=60.0,
        gt=0,
        description="Local workers: seconds a stopping worker has to finish its batch (warm "
        "shutdown) before it is killed; a killed batch goes back to pending when its lease expires.",
    )
    parent_pid: int | None = Field(
        default=None,
        ge=1,
        description="Set by local workers: the worker stops itself (warm shutdown) when the "
        "`fleet` process with this pid is gone, even killed with SIGKILL, so none is orphaned.",
    )
    torch_threads: int | None = Field(
        default=None,
        ge=1,
        description="A worker calls torch.set_num_threads with this (and starts with "
        "OMP_NUM_THREADS set to it). Local workers on the CPU set it to the cores divided by "
        "the workers running at once. Unset: torch's default (every core).",
    )
    reconcile_interval: float = Field(
        default=30.0, gt=0, description="Seconds between reconciler passes in `fleet run`."
    )
    max_text_chars: int = Field(
        default=1_000_000,
        ge=1,
        description="A conversation whose text is longer is failed with a clear reason.",
    )
    simulate_memory: str | None = Field(
        default=None,
        description="Memory-budget simulator for CPU tests: 'TIER:TOKENS,...', e.g. '0:0,1:4096'. "
        "A sub-batch whose padded token cost exceeds its tier's budget raises a real OOM error.",
    )
    crash_on: str | None = Field(
        default=None,
        description="Testing aid: the worker process dies (os._exit) when a batch holds an item "
        "whose conversation external_id is listed here (comma separated).",
    )
    # -- operations: schedule, Flower, metrics ----------------------------------
    nightly_crontab: str = Field(
        default="0 2 * * *",
        description="When `fleet beat` runs the nightly discover + enqueue of every task "
        "(crontab: minute hour day-of-month month day-of-week).",
    )
    timezone: str = Field(default="UTC", description="Time zone of nightly_crontab.")
    nightly_tasks: str | None = Field(
        default=None,
        description="Comma-separated tasks a nightly run covers (their follow-up tasks are added). "
        "Unset: every configured task; list only the tasks that have workers, or a run waits "
        "for items nobody serves.",
    )
    beat_reconcile_seconds: float = Field(
        default=300.0, gt=0, description="Seconds between reconciler passes under `fleet beat`."
    )
    beat_feed_seconds: float = Field(
        default=10.0,
        gt=0,
        description="Seconds between feed ticks under `fleet beat`: top up the task queues of "
        "the open nightly run (backpressure) and close the run when its work is finished.",
    )
    flower_address: str = Field(default="127.0.0.1", description="`fleet flower` listens here.")
    flower_port: int = Field(default=5555, ge=1, le=65535, description="`fleet flower` port.")
    flower_user: str = Field(default="fleet", description="Flower basic-auth user name.")
    flower_password: SecretStr | None = Field(
        default=None,
        description="Flower basic-auth password. Unset: `fleet flower` generates one and keeps "
        "it in state_dir/flower-password (mode 0600).",
    )
    metrics_address: str = Field(
        default="127.0.0.1", description="`fleet metrics` (Prometheus exporter) listens here."
    )
    metrics_port: int = Field(
        default=9808, ge=1, le=65535, description="`fleet metrics` (Prometheus exporter) port."
    )
    # -- sources and model versions (db.sync, fleet sync, fleet rerun) ------------
    source_database_url: SecretStr | None = Field(
        default=None,
        description="Postgres URL of the application database the `[sources.*]` of the task "
        "config read from. Unset: they read from DATABASE_URL (the fleet's own database).",
    )
    sync_seconds: float | None = Field(
        default=None,
        gt=0,
        description="`fleet beat` runs `fleet sync` (incremental) every this many seconds; with "
        "`fleet sync --install-triggers` a tick with no change marked costs one query. "
        "Unset: sources sync only at the start of each nightly run.",
    )
    rerun_stale: bool = Field(
        default=False,
        description="A nightly run first puts back, for every task, the items whose result "
        "came from a model revision no tier of the task's ladder has now (`fleet rerun`).",
    )
    log_level: str = Field(default="INFO", description="Logging level.")
    log_json: bool = Field(default=False, description="Log one JSON object per line.")

    @field_validator("database_url", "source_database_url", mode="before")
    @classmethod
    def _driver(cls, v: object) -> object:
        if isinstance(v, str) and v:
            return normalize_database_url(v)
        return v or None

    @field_validator("broker_url", mode="before")
    @classmethod
    def _empty_broker(cls, v: object) -> object:
        return v or None

    def nightly_task_names(self) -> list[str]:
        """`nightly_tasks` as a list (empty: every configured task)."""
        return [n.strip() for n in (self.nightly_tasks or "").split(",") if n.strip()]

    @property
    def resolved_models_dir(self) -> Path:
        return self.models_dir or self.state_dir / "models"

    @property
    def resolved_audio_root(self) -> Path:
        return self.audio_root or self.state_dir / "audio"

    @property
    def embedded(self) -> bool:
        return self.database_url is None or self.broker_url is None

    def db_url(self) -> str:
        if self.database_url is None:
            raise RuntimeError(
                "DATABASE_URL is not set; call fleet.ops.services.ensure_services first"
            )
        return self.database_url.get_secret_value()

    def source_db_url(self) -> str:
        """Where `[sources.*]` are read: FLEET_SOURCE_DATABASE_URL, else the fleet's database."""
        if self.source_database_url is not None:
            return self.source_database_url.get_secret_value()
        return self.db_url()

    def redis_url(self) -> str:
        if self.broker_url is None:
            raise RuntimeError(
                "BROKER_URL is not set; call fleet.ops.services.ensure_services first"
            )
        return self.broker_url.get_secret_value()

    def child_env(self) -> dict[str, str]:
        """Environment for a subprocess (worker) that must see the same services."""
        env = {"FLEET_STATE_DIR": str(self.state_dir)}
        if self.database_url is not None:
            env["DATABASE_URL"] = self.db_url()
        if self.broker_url is not None:
            env["BROKER_URL"] = self.redis_url()
        for name in (
            "models_dir",
            "config_file",
            "audio_root",
            "simulate_memory",
            "crash_on",
            "step_up_after",
            "start_tier",
            "torch_threads",
        ):
            value = getattr(self, name)
            if value is not None:
                env[f"FLEET_{name.upper()}"] = str(value)
        for name in (
            "lease_seconds",
            "max_attempts",
            "poison_crashes",
            "visibility_timeout",
            "max_text_chars",
            "log_level",
        ):
            env[f"FLEET_{name.upper()}"] = str(getattr(self, name))
        env["FLEET_LOG_JSON"] = "1" if self.log_json else "0"
        return env


def redact(url: str) -> str:
    """Hide the password in a URL for display: `scheme://user:***@host/...`.

    A URL without credentials (e.g. `redis+socket:///tmp/r.sock`) comes back
    unchanged; the query string is kept (no secrets go there in this project).
    """
    if "://" not in url:
        return url
    scheme, rest = url.split("://", 1)
    netloc, sep, path = rest.partition("/")
    if "@" not in netloc:
        return url
    creds, host = netloc.rsplit("@", 1)
    user, has_password, _ = creds.partition(":")
    shown = f"{user}:***" if has_password else user
    return f"{scheme}://{shown}@{host}{sep}{path}"
