"""When the collector sends a refused admin key again (``worker.collect.refusals.Refusals``)."""

from __future__ import annotations

from worker.collect.refusals import Refusals
from worker.config import COLLECT_AUTH_RETRY_INTERVAL, Settings

OA = ("openai", "org-oa")
AN = ("anthropic", "org-an")


def test_a_refused_key_waits_the_interval_then_is_tried_again() -> None:
    refusals = Refusals(1800.0)
    assert refusals.waiting(OA, "sha256:a", 0.0) is None  # never refused: polled
    refusals.refuse(OA, "sha256:a", 100.0)
    assert refusals.waiting(OA, "sha256:a", 100.0) == 1800.0
    assert refusals.waiting(OA, "sha256:a", 1000.0) == 900.0
    assert refusals.waiting(OA, "sha256:a", 1899.9) is not None
    assert refusals.waiting(OA, "sha256:a", 1900.0) is None  # the one try after the interval
    assert refusals.waiting(AN, "sha256:a", 200.0) is None  # only that account waits
    # Refused again on that try: another whole interval from then.
    refusals.refuse(OA, "sha256:a", 1900.0)
    assert refusals.waiting(OA, "sha256:a", 2000.0) == 1700.0


def test_a_changed_key_is_tried_at_once() -> None:
    refusals = Refusals(1800.0)
    refusals.refuse(OA, "sha256:old", 0.0)
    assert refusals.waiting(OA, "sha256:new", 1.0) is None  # keys rotate, or a new secret file


def test_a_successful_poll_or_a_deactivation_forgets_the_refusal() -> None:
    refusals = Refusals(1800.0)
    assert refusals.accept(OA) is False  # nothing to forget: no "resumed" line
    refusals.refuse(OA, "sha256:a", 0.0)
    assert refusals.accept(OA) is True
    assert refusals.waiting(OA, "sha256:a", 1.0) is None
    refusals.refuse(OA, "sha256:a", 0.0)
    refusals.refuse(AN, "sha256:b", 0.0)
    assert refusals.forget_all_but({AN}) == [OA]
    assert refusals.waiting(OA, "sha256:a", 1.0) is None
    assert refusals.waiting(AN, "sha256:b", 1.0) == 1799.0


def test_the_default_interval_is_half_an_hour() -> None:
    assert COLLECT_AUTH_RETRY_INTERVAL == 1800.0
    assert Settings.model_fields["collect_auth_retry_interval"].default == COLLECT_AUTH_RETRY_INTERVAL
