"""When a failed delivery is tried again, and when it is given up. Pure, so it is unit-tested alone."""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import datetime, timedelta

JITTER_FLOOR = 0.5  # the jittered delay is uniform in [JITTER_FLOOR, 1] x the exponential delay


@dataclass(frozen=True)
class Backoff:
    initial: float  # seconds before the first retry
    maximum: float  # seconds; the exponential delay is capped here
    max_age: float  # seconds after a delivery's creation it is given up

    def delay(self, attempts: int, rng: random.Random | None = None) -> float:
        """Seconds to wait after the ``attempts``-th failed attempt (1, 2, ...): initial x 2^(n-1), capped,
        with jitter so that retries of many deliveries do not arrive in lockstep."""
        exponent = min(max(attempts - 1, 0), 62)
        base = min(self.maximum, self.initial * 2.0**exponent)
        return base * (rng or random).uniform(JITTER_FLOOR, 1.0)

    def next_attempt(
        self,
        attempts: int,
        created_at: datetime,
        now: datetime,
        rng: random.Random | None = None,
        *,
        not_before: float | None = None,
    ) -> datetime | None:
        """When to try again after a failure, or None: the next attempt would be past the maximum age.
        ``not_before``: seconds the receiver asked to wait (``Retry-After``), the least delay."""
        at = now + timedelta(seconds=max(self.delay(attempts, rng), not_before or 0.0))
        if at > created_at + timedelta(seconds=self.max_age):
            return None
        return at
