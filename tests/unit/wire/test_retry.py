"""wire.retry: backoff, the retry decision and which service an error says is lost."""

from __future__ import annotations

import random

import pytest

from wire.retry import backoff, retry_decision, transient_service


@pytest.mark.parametrize(("attempt", "expected"), [(0, 1.0), (1, 2.0), (3, 8.0), (10, 60.0)])
def test_backoff_without_jitter(attempt, expected):
    assert backoff(attempt, base=1.0, cap=60.0, jitter=False) == expected


def test_backoff_jitter_stays_in_range():
    rng = random.Random(0)
    values = [backoff(4, base=1.0, cap=60.0, rng=rng) for _ in range(200)]
    assert all(0 <= v <= 16 for v in values)
    assert len({round(v, 3) for v in values}) > 100  # actually spread


@pytest.mark.parametrize(
    ("transient", "attempt", "retry"),
    [(True, 0, True), (True, 7, True), (True, 8, False), (False, 0, False)],
)
def test_retry_decision(transient, attempt, retry):
    d = retry_decision(transient=transient, attempt=attempt, max_retries=8, rng=random.Random(1))
    assert d.retry is retry
    assert (d.countdown > 0) is retry or d.countdown == 0


def _raised_from(outer: Exception, cause: BaseException) -> Exception:
    try:
        raise outer from cause
    except Exception as e:
        return e


def _transient_cases() -> list[tuple[BaseException, str | None]]:
    import kombu.exceptions
    import redis.exceptions
    import sqlalchemy.exc

    lost_redis = redis.exceptions.ConnectionError("Connection closed by server.")
    return [
        (lost_redis, "Redis"),
        (redis.exceptions.TimeoutError("timed out"), "Redis"),
        (kombu.exceptions.OperationalError("no route"), "Redis"),
        (sqlalchemy.exc.OperationalError("SELECT 1", {}, Exception("down")), "Postgres"),
        (ConnectionResetError(104, "reset"), "Postgres or Redis"),
        # Redis went away mid-pipeline: kombu raises BatchPublishError from the cause.
        (
            _raised_from(
                kombu.exceptions.KombuError("Redis publish batch failed; delivery is uncertain"),
                lost_redis,
            ),
            "Redis",
        ),
        (ValueError("a bug"), None),
        (_raised_from(RuntimeError("wrapped"), ValueError("a bug")), None),
    ]


def test_transient_service_names_the_lost_service():
    for exc, service in _transient_cases():
        assert transient_service(exc) == service, exc
