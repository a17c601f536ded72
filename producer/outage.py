"""Riding out Postgres or Redis going away while a run is driven or recorded."""

from __future__ import annotations

import logging
import time

from wire.retry import backoff, transient_service

log = logging.getLogger("fleet.run")


class Outage:
    """Rides out Postgres or Redis going away during a run.

    The ledger keeps every item safe while a service is down (leases expire,
    the reconciler returns them), so the run waits with capped exponential
    backoff (`base` seconds doubling up to `cap` seconds) and says so, instead
    of dying with a traceback. Errors that are not a lost connection are raised
    again.
    """

    def __init__(self, *, base: float = 0.5, cap: float = 10.0) -> None:
        self.base, self.cap = base, cap
        self.failures = 0
        self.since = 0.0
        self.service = ""

    def failed(self, exc: BaseException) -> float:
        """Log the outage and return how many seconds to wait before the next try.

        Raises `exc` again when it is not a lost Postgres or Redis connection."""
        service = transient_service(exc)
        if service is None:
            raise exc
        if self.failures == 0:
            self.since = time.monotonic()
        self.failures += 1
        self.service = service
        delay = backoff(self.failures - 1, base=self.base, cap=self.cap, jitter=False)
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        log.warning(
            "%s unreachable (%s: %s); retrying in %.1fs (try %d, down %.0fs). "
            "Items stay safe in the ledger; check that %s is running.",
            service,
            type(exc).__name__,
            detail[:300],
            delay,
            self.failures,
            time.monotonic() - self.since,
            service,
        )
        return delay

    def recovered(self) -> None:
        """Say the service is back (once per outage) and reset the backoff."""
        if self.failures:
            log.warning(
                "%s reachable again after %.0fs and %d failed tries; the run goes on",
                self.service,
                time.monotonic() - self.since,
                self.failures,
            )
            self.failures = 0
