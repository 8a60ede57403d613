"""The circuit breaker without servers: it opens on a bad window, judges a retried batch the same way, and
forgets a batch that was rolled back."""

from __future__ import annotations

import pytest

from worker.breaker import CircuitBreaker
from worker.errors import CircuitOpen
from worker.metrics import CIRCUIT_INVALID_RATIO


def ratio() -> float:
    return float(CIRCUIT_INVALID_RATIO._value.get())


def test_a_window_of_mostly_invalid_messages_opens_it_and_restores_the_window() -> None:
    breaker = CircuitBreaker(window=10, min_messages=5, invalid_ratio=0.9)
    breaker.check(1, ["not_json"])
    assert ratio() == 0.5
    with pytest.raises(CircuitOpen, match="10 of the last 10 messages were invalid"):
        breaker.check(0, ["not_json"] * 9)
    assert ratio() >= 0.9
    with pytest.raises(CircuitOpen):  # the same batch again: the same verdict
        breaker.check(0, ["not_json"] * 9)


def test_too_few_messages_never_open_it() -> None:
    breaker = CircuitBreaker(window=100, min_messages=50, invalid_ratio=0.5)
    breaker.check(0, ["schema_violation"] * 49)
    assert ratio() == 1.0


def test_forget_undoes_a_rolled_back_batch() -> None:
    breaker = CircuitBreaker(window=10, min_messages=1, invalid_ratio=0.9)
    breaker.check(4, [])
    breaker.check(0, ["not_json"] * 2)
    breaker.forget(0, 2)
    assert ratio() == 0.0
    breaker.forget(10, 0)  # more than it holds: empty, not an error
    assert ratio() == 0.0
