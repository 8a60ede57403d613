"""The circuit breaker: when most recent messages are invalid, stop instead of quarantining the stream.

A bad producer deploy can turn every message into garbage. Quarantining all of it would "work" while the
ledger silently stops growing; stopping with a clear message (and a crash-looping pod, which alerts) is
what an operator wants. The breaker looks at a sliding window of the most recent messages.
"""

from __future__ import annotations

from collections import Counter, deque

from worker import metrics
from worker.errors import CircuitOpen


class CircuitBreaker:
    def __init__(self, *, window: int, min_messages: int, invalid_ratio: float) -> None:
        self.window = window
        self.min_messages = min_messages
        self.invalid_ratio = invalid_ratio
        self._recent: deque[str | None] = deque(maxlen=window)  # a reason, or None for a good message
        metrics.CIRCUIT_INVALID_RATIO.set(0.0)

    def check(self, good: int, bad_reasons: list[str]) -> None:
        """Record a batch's messages (before it commits) and raise ``CircuitOpen`` if the window is bad.

        When it raises, the caller rolls the batch back: nothing of it is quarantined or stored, and the
        worker stops. The window is restored so that a retry of the same batch judges the same way.
        """
        snapshot = list(self._recent)
        self._recent.extend([None] * good)
        self._recent.extend(bad_reasons)
        invalid = [r for r in self._recent if r is not None]
        total = len(self._recent)
        if total >= self.min_messages and len(invalid) >= self.invalid_ratio * total:
            top = ", ".join(f"{reason} x{count}" for reason, count in Counter(invalid).most_common(3))
            # The gauge shows the window that tripped, so the last scrape before the exit explains it.
            metrics.CIRCUIT_INVALID_RATIO.set(len(invalid) / total)
            self._recent = deque(snapshot, maxlen=self.window)
            raise CircuitOpen(
                f"circuit breaker open: {len(invalid)} of the last {total} messages were invalid ({top}). "
                "The producer looks broken; the worker stopped without "
                "quarantining this batch. Fix the producer (see `cost-worker quarantine list`), then restart."
            )
        self._show()

    def forget(self, good: int, bad: int) -> None:
        """Undo the last ``check`` (its batch was rolled back for another reason and will be seen again)."""
        for _ in range(good + bad):
            if self._recent:
                self._recent.pop()
        self._show()

    def _show(self) -> None:
        """Set the gauge to the window's share of invalid messages."""
        invalid = sum(1 for r in self._recent if r is not None)
        metrics.CIRCUIT_INVALID_RATIO.set(invalid / len(self._recent) if self._recent else 0.0)
