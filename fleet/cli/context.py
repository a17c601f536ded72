"""What every `fleet` command shares: the exit codes, `fail`, and the context
that reads the settings once and resolves services only for commands that
need them.
"""

from __future__ import annotations

import atexit
from typing import TYPE_CHECKING, NoReturn

import click

from config.exitcodes import ExitCode
from config.settings import Settings, redact

if TYPE_CHECKING:
    from celery import Celery

    from config.taskconfig import SourceSpec, TaskSpec


class FleetError(click.ClickException):
    """A ClickException that exits with one of the `ExitCode`s (click prints `Error: message`)."""

    def __init__(self, message: str, code: ExitCode) -> None:
        super().__init__(message)
        self.exit_code = int(code)  # type: ignore[misc]  # click declares it on the class


def fail(message: str, code: ExitCode = ExitCode.CONFIG) -> NoReturn:
    """End the command: print `Error: message` to stderr and exit with `code`.

    Raises:
        FleetError: always (click turns it into the message and the exit code).
    """
    raise FleetError(message, code)


class FleetContext:
    """The `fleet` group's context object: settings read once; the services
    (embedded or configured Postgres and Redis), the Celery app and the task
    config resolved only by the commands that need them.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._ready = False
        self._app: Celery | None = None

    def services(self) -> Settings:
        """The settings with the services resolved (URLs filled in), started and checked.

        Starts the embedded servers when no URL is set, checks that the database
        answers and is migrated. Exits with SERVICE when it is not.
        """
        if not self._ready:
            from fleet.ops.services import (
                EmbeddedServerError,
                SchemaNotReady,
                check_schema,
                ensure_services,
            )

            try:
                self.settings = ensure_services(self.settings)
                check_schema(self.settings.db_url())
            except (SchemaNotReady, EmbeddedServerError) as e:
                fail(str(e), ExitCode.SERVICE)
            except click.ClickException:
                raise
            except Exception as e:
                where = redact(self.settings.db_url()) if self.settings.database_url else "embedded"
                fail(
                    f"cannot reach the database ({type(e).__name__}: {str(e).splitlines()[0]}). "
                    f"Check DATABASE_URL ({where}) and that Postgres is running.",
                    ExitCode.SERVICE,
                )
            self._ready = True
        return self.settings

    def url(self) -> str:
        """The database URL, once the services are resolved (`services()`)."""
        return self.services().db_url()

    def app(self) -> Celery:
        """One Celery app per command, on the resolved services.

        Its broker connections are closed at exit (atexit runs this before the
        embedded Redis' own check, which only stops the server when no client is
        left connected).
        """
        if self._app is None:
            from wire.app import create_app

            self._app = create_app(self.services())
            atexit.register(self._app.pool.force_close_all)
        return self._app

    def tasks(self) -> dict[str, TaskSpec]:
        """Every task of the task config, by name. Exits with CONFIG on a bad config."""
        from config.taskconfig import ConfigError, load_tasks

        try:
            return load_tasks(self.settings.config_file)
        except ConfigError as e:
            fail(str(e), ExitCode.CONFIG)

    def task(self, name: str) -> TaskSpec:
        """One task of the task config. Exits with CONFIG, listing the tasks, on an unknown name."""
        from config.taskconfig import ConfigError, get_task

        try:
            return get_task(self.tasks(), name)
        except ConfigError as e:
            fail(str(e), ExitCode.CONFIG)

    def sources(self) -> dict[str, SourceSpec]:
        """The [sources.*] of the task config, by name. Exits with CONFIG on a bad config."""
        from config.taskconfig import ConfigError, load_sources

        try:
            return load_sources(self.settings.config_file)
        except ConfigError as e:
            fail(str(e), ExitCode.CONFIG)


pass_fleet = click.make_pass_decorator(FleetContext)
