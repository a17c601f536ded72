"""What `fleet flower` runs: Flower on the fleet's broker, behind basic auth by default.

The broker is resolved as every `fleet` command resolves it (BROKER_URL, or
the embedded Redis), so Flower watches the same queues as the workers. The
password is FLEET_FLOWER_PASSWORD, or one generated on first use and kept in
state_dir/flower-password (mode 0600). It reaches Flower through its
environment option FLOWER_BASIC_AUTH, never the command line, so `ps` does not
show it; it is never printed or logged, only where it is kept.
"""

from __future__ import annotations

import logging
import os
import secrets
import stat
import sys
from collections.abc import Callable
from pathlib import Path

from config.settings import Settings, redact

log = logging.getLogger(__name__)

PASSWORD_FILE = "flower-password"
ENV_AUTH = "FLOWER_BASIC_AUTH"


class FlowerConfigError(ValueError):
    """Flower cannot start as configured: bad credentials, or it cannot listen where asked."""


def password_file(settings: Settings) -> Path:
    """Where a generated Flower password is kept: state_dir/flower-password."""
    return settings.state_dir / PASSWORD_FILE


def stored_password(path: Path) -> str:
    """The password kept in `path`, generated (mode 0600) if the file does not exist."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            os.chmod(path, 0o600)
            log.warning("%s was readable by others (mode %o): now 0600", path, mode)
        password = path.read_text().strip()
        if not password:
            raise FlowerConfigError(
                f"{path} is empty: delete it to generate a new password, "
                "or set FLEET_FLOWER_PASSWORD"
            ) from None
        return password
    password = secrets.token_urlsafe(24)
    with os.fdopen(fd, "w") as f:
        f.write(password + "\n")
    return password


def credentials(settings: Settings) -> tuple[str, str]:
    """('user:password' for FLOWER_BASIC_AUTH, where the password is kept)."""
    user = settings.flower_user
    if settings.flower_password is not None:
        password, where = settings.flower_password.get_secret_value(), "FLEET_FLOWER_PASSWORD"
    else:
        path = password_file(settings)
        password, where = stored_password(path), str(path)
    if not user or ":" in user or "," in user:
        raise FlowerConfigError(
            f"FLEET_FLOWER_USER={user!r}: a user name must be non-empty, without ':' or ','"
        )
    if not password or "," in password:
        # Flower splits FLOWER_BASIC_AUTH on commas (several user:password pairs).
        raise FlowerConfigError(
            f"the Flower password from {where} must be non-empty and contain no ','"
        )
    return f"{user}:{password}", where


def run_flower(
    settings: Settings,
    *,
    address: str | None,
    port: int | None,
    no_auth: bool,
    echo: Callable[[str], None],
) -> int:
    """Serve Flower in this process until it stops; returns its exit status.

    `address` and `port` default to FLEET_FLOWER_ADDRESS and FLEET_FLOWER_PORT.
    Only the broker is resolved (embedded Redis or BROKER_URL): Flower comes up
    even while Postgres is down. `echo` gets the lines for the operator.

    Raises:
        FlowerConfigError: unusable credentials, or the address/port cannot be listened on.
    """
    from fleet.ops.services import ensure_services
    from wire.app import create_app

    s = settings
    address = address or s.flower_address
    port = port or s.flower_port
    if no_auth:
        os.environ.pop(ENV_AUTH, None)
        echo(
            "warning: Flower without authentication (--no-auth): anyone who can reach "
            f"{address}:{port} sees the fleet and can shut workers down. Flower's API stays "
            "closed unless FLOWER_UNAUTHENTICATED_API=true."
        )
    elif s.flower_password is None and os.environ.get(ENV_AUTH):
        echo(f"Flower credentials from {ENV_AUTH} (set by you)")
    else:
        auth, where = credentials(s)
        os.environ[ENV_AUTH] = auth  # read by Flower at start; not on the command line
        echo(f"Flower user {s.flower_user!r}; the password is in {where}")
    # Only the broker is needed: Flower comes up even while Postgres is down.
    s = ensure_services(s)
    app = create_app(s)
    host = f"[{address}]" if ":" in address else address
    echo(f"Flower on http://{host}:{port}/ watching {redact(s.redis_url())}")
    sys.stdout.flush()
    try:
        code = app.start(["flower", f"--address={address}", f"--port={port}"])
    except OSError as e:  # the port is taken, or the address is not this host's
        raise FlowerConfigError(
            f"Flower cannot listen on {host}:{port}: {e.strerror or e}. Pick another with "
            "--port/--address (FLEET_FLOWER_PORT, FLEET_FLOWER_ADDRESS)."
        ) from e
    return int(code or 0)
