"""Test-only fault injection: crash the process (SIGKILL) at a named point.

Off unless ``COST_WORKER_FAULT_POINTS`` names points, e.g. ``before_db_commit@3`` (the third time the
worker gets there). The fault suite uses it to prove the delivery guarantees hold at the worst moments.
"""

from __future__ import annotations

import os
import signal
import sys

from worker.config import split_list


class Faults:
    def __init__(self, spec: str = "") -> None:
        self._remaining: dict[str, int] = {}
        for point in split_list(spec):
            name, _, nth = point.partition("@")
            self._remaining[name] = int(nth) if nth else 1

    def __bool__(self) -> bool:
        return bool(self._remaining)

    def hit(self, name: str) -> None:
        remaining = self._remaining.get(name)
        if remaining is None:
            return
        remaining -= 1
        self._remaining[name] = remaining
        if remaining == 0:
            print(f"cost-worker: fault injection: SIGKILL at {name}", file=sys.stderr, flush=True)
            os.kill(os.getpid(), signal.SIGKILL)


NO_FAULTS = Faults()
