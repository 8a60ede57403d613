"""Test-only fault injection: crash the process (SIGKILL) at a named point.

Off unless the environment variable ``COST_WORKER_FAULT_POINTS`` names points, e.g. ``before_db_commit@3`` (the
third time the process gets there). It is not an operator setting: only the fault suite sets it, to prove the
delivery guarantees hold at the worst moments.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Mapping
from enum import StrEnum

from worker.config import split_list
from worker.errors import ConfigError

ENV = "COST_WORKER_FAULT_POINTS"


class FaultPoint(StrEnum):
    BEFORE_DB_COMMIT = "before_db_commit"  # a batch's transaction is written, not committed
    AFTER_DB_COMMIT = "after_db_commit"  # committed, Kafka's offsets not yet mirrored
    BEFORE_OUTBOX_PUBLISH = "before_outbox_publish"  # outbox rows claimed, not yet sent
    NOTIFY_AFTER_SEND = "notify_after_send"  # a webhook delivered, its attempt not yet recorded


class Faults:
    def __init__(self, spec: str = "") -> None:
        """``spec``: points, comma-separated, each ``name`` or ``name@n`` (the n-th time); ConfigError if unknown."""
        self._remaining: dict[FaultPoint, int] = {}
        known = {p.value for p in FaultPoint}
        for point in split_list(spec):
            name, _, nth = point.partition("@")
            if name not in known or (nth and not nth.isdigit()):
                raise ConfigError([f"{ENV}: unknown fault point {point!r}; known: {', '.join(FaultPoint)}"])
            self._remaining[FaultPoint(name)] = int(nth) if nth else 1

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> Faults:
        return cls(environ.get(ENV, ""))

    def hit(self, point: FaultPoint) -> None:
        remaining = self._remaining.get(point)
        if remaining is None:
            return
        remaining -= 1
        self._remaining[point] = remaining
        if remaining == 0:
            print(f"cost-worker: fault injection: SIGKILL at {point}", file=sys.stderr, flush=True)
            os.kill(os.getpid(), signal.SIGKILL)


NO_FAULTS = Faults()
