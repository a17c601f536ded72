"""Exit statuses shared by the `fleet` command and the worker processes.

One definition, read by the CLI (`fleet.cli.context`), the supervisors that
decide whether to restart a worker (`fleet.ops.supervisor`,
`fleet.ops.localworkers`), the worker that cannot start
(`workers.lifecycle`) and the status views.
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """The `fleet` command's (and a worker process's) exit status.

    OK: done. FAILED_ITEMS: the work finished with items that failed or died in
    this run (`run`, `nightly`; older failed items do not count). CONFIG: bad usage or configuration; for a worker, a model it
    cannot load or a bad task config, which a restart cannot fix. SERVICE:
    Postgres or Redis unreachable, or the schema not migrated. TIMEOUT: `run`
    or `watch --until-done` gave up with work unfinished.
    """

    OK = 0
    FAILED_ITEMS = 1
    CONFIG = 2
    SERVICE = 3
    TIMEOUT = 4
