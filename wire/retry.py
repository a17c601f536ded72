"""Retry and backoff: when a failed piece of work is worth another try, and
how long to wait first. Pure functions (plus `transient_service`, which only
inspects an exception), shared by the worker's batch task, the supervisors'
restarts and `fleet run`'s outage wait.
"""

from __future__ import annotations

import random
from dataclasses import dataclass


def backoff(
    attempt: int,
    *,
    base: float = 1.0,
    cap: float = 60.0,
    jitter: bool = True,
    rng: random.Random | None = None,
) -> float:
    """Exponential backoff with full jitter: uniform(0, min(cap, base * 2**attempt)).

    Full jitter spreads a fleet of workers that lost the database at the same
    moment, so they do not all reconnect at once.
    """
    ceiling = min(cap, base * 2.0 ** max(attempt, 0))
    if not jitter:
        return ceiling
    return (rng or random).uniform(0, ceiling)


@dataclass(frozen=True)
class RetryDecision:
    retry: bool
    countdown: float = 0.0


def retry_decision(
    *,
    transient: bool,
    attempt: int,
    max_retries: int,
    base: float = 1.0,
    cap: float = 60.0,
    rng: random.Random | None = None,
) -> RetryDecision:
    """Transient infrastructure errors retry with backoff; anything else does not
    (item errors are recorded on the item and never raise this far)."""
    if not transient or attempt >= max_retries:
        return RetryDecision(False)
    return RetryDecision(True, backoff(attempt, base=base, cap=cap, rng=rng))


def transient_service(exc: BaseException) -> str | None:
    """The service `exc` says is unreachable ("Postgres", "Redis"), or None.

    A lost database or broker connection is transient: the same work (a
    worker's batch, a `fleet run` pass) is worth retrying once it is back.

    Libraries are imported here, not at module level: the pure policy above
    stays importable anywhere.
    """
    import kombu.exceptions
    import redis.exceptions
    import sqlalchemy.exc

    if isinstance(
        exc,
        (
            sqlalchemy.exc.OperationalError,
            sqlalchemy.exc.InterfaceError,
            sqlalchemy.exc.DisconnectionError,
        ),
    ) or (isinstance(exc, sqlalchemy.exc.DBAPIError) and exc.connection_invalidated):
        return "Postgres"
    if isinstance(
        exc,
        (
            redis.exceptions.ConnectionError,
            redis.exceptions.TimeoutError,
            kombu.exceptions.OperationalError,
        ),
    ):
        return "Redis"
    if isinstance(exc, ConnectionError):  # a bare socket error: either one
        return "Postgres or Redis"
    if exc.__cause__ is not None:
        # Raised `from` a lost connection, e.g. kombu's BatchPublishError ("delivery
        # is uncertain") when Redis goes away in the middle of a pipelined publish.
        return transient_service(exc.__cause__)
    return None
