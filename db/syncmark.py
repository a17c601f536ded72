"""Where an incremental pass may start next time: the mark, held back so that no
committed edit is ever behind it.

An edit is missed when it commits *after* a pass read the source, with an
updated_at *below* the mark that pass saved. Its updated_at comes from its
transaction (`now()` is the transaction's start), so it can be no older than
the start of a transaction still open when the pass began. Each pass therefore
reads, on the source and before the statement that reads the rows:

    at           the source's clock
    oldest_open  the start of the oldest transaction open on the source database
                 (pg_stat_activity.xact_start of every other client session)
    hidden       sessions the source role may not see (without pg_read_all_stats
                 their xact_start reads NULL)
    prepared     prepared transactions (two-phase commit) on the source database

and saves as the mark the least of the greatest updated_at it read, `at` and
`oldest_open` (`next_mark`). An edit committed later either started after `at`
(its updated_at is past the mark) or was open at `at` (its updated_at is no
older than `oldest_open`). `overlap_seconds` stays as a margin for clock skew
between the application's clock and the source's, not as the argument.

Limits, said on the pass' report: with hidden sessions the mark cannot be held
for their transactions (grant the source role pg_read_all_stats, or pg_monitor);
with prepared transactions open the mark does not move.

This module imports nothing from the fleet.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from sqlalchemy import Connection, text

HORIZON_SQL = """
SELECT clock_timestamp() AS at,
       (SELECT min(xact_start) FROM pg_stat_activity
        WHERE datname = current_database() AND pid <> pg_backend_pid()
          AND backend_type = 'client backend' AND xact_start IS NOT NULL) AS oldest_open,
       (SELECT count(*) FROM pg_stat_activity
        WHERE datname = current_database() AND pid <> pg_backend_pid()
          AND backend_type = 'client backend' AND state IS NULL) AS hidden,
       (SELECT count(*) FROM pg_prepared_xacts WHERE database = current_database()) AS prepared
"""


@dataclass(frozen=True)
class Horizon:
    """What the source looked like just before a pass read it (see the module)."""

    at: dt.datetime
    oldest_open: dt.datetime | None = None
    hidden: int = 0
    prepared: int = 0


def read_horizon(conn: Connection) -> Horizon:
    """The horizon, read on the connection that then reads the rows (its first
    statement, so the rows' snapshot is taken after it)."""
    row = conn.execute(text(HORIZON_SQL)).one()
    return Horizon(row.at, row.oldest_open, int(row.hidden), int(row.prepared))


def next_mark(
    previous: dt.datetime | None, greatest_read: dt.datetime | None, horizon: Horizon
) -> tuple[dt.datetime | None, str | None]:
    """(the mark to save, a note when the guarantee is weaker than usual).

    The mark never moves back (the caller keeps the greater of the two)."""
    note = None
    if horizon.hidden:
        note = (
            f"{horizon.hidden} session(s) on the source are hidden from its role: an edit in "
            "a transaction of theirs open longer than overlap_seconds can be missed; grant the "
            "source role pg_read_all_stats"
        )
    if horizon.prepared:
        return previous, (
            f"{horizon.prepared} prepared transaction(s) open on the source: the mark stays "
            "where it was until they end"
        )
    if greatest_read is None:
        return previous, note
    bounds = [greatest_read, horizon.at]
    if horizon.oldest_open is not None:
        bounds.append(horizon.oldest_open)
    return min(bounds), note
