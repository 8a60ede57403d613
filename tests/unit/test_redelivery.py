"""Later deliveries of an event key within one batch (``worker.redelivery``), without servers: what is decided
from the delivery before, and what goes to the database in a next round."""

from __future__ import annotations

from typing import Any

from tests.factories import FakeRecord, dumps
from tests.unit.test_batch import SETTINGS, event
from worker.batch import decode_batch
from worker.decode import ApiEvent
from worker.quarantine import Reason
from worker.redelivery import judge, pending


def deliveries(*bodies: dict[str, Any]) -> tuple[list[ApiEvent], list[ApiEvent]]:
    batch = decode_batch([FakeRecord("usage", 0, offset, dumps(body)) for offset, body in enumerate(bodies)], SETTINGS)
    return batch.events, batch.later


def test_after_an_applied_delivery_the_same_content_is_a_duplicate_and_other_content_a_conflict() -> None:
    first, later = deliveries(event(), event(status_code=500), event(), event(status_code=500))
    waiting = pending(later)
    judged = judge(first, waiting, quarantined=set())
    assert [e.source.offset for e in judged.duplicates] == [2]
    assert [(q.reason, q.source.offset) for q in judged.conflicts] == [
        (Reason.CONFLICTING_DUPLICATE, 1),
        (Reason.CONFLICTING_DUPLICATE, 3),
    ]
    assert "offset 0" in judged.conflicts[0].detail
    assert judged.next_round == []
    assert waiting == {}


def test_after_a_quarantined_delivery_the_next_one_goes_to_the_database_and_the_rest_waits_for_it() -> None:
    first, later = deliveries(event(status_code=500), event(), event(), event(event_id="e-2"), event(event_id="e-2"))
    waiting = pending(later)
    quarantined = {first[0].source}  # e-1 at offset 0 conflicted with what was stored; e-2 was applied
    judged = judge(first, waiting, quarantined)
    assert [e.source.offset for e in judged.next_round] == [1]
    assert [e.source.offset for e in judged.duplicates] == [4]
    assert judged.conflicts == []
    # the database applied offset 1 (an exact re-send of the stored event): offset 2, the same, is a duplicate
    judged = judge(judged.next_round, waiting, quarantined)
    assert [e.source.offset for e in judged.duplicates] == [2]
    assert judged.next_round == []
    assert waiting == {}


def test_a_key_whose_delivery_is_not_in_the_round_sends_its_next_one() -> None:
    _, later = deliveries(event(), event(), event())
    waiting = pending(later)
    judged = judge([], waiting, quarantined=set())
    assert [e.source.offset for e in judged.next_round] == [1]
    assert [e.source.offset for e in waiting[next(iter(waiting))]] == [2]


def test_other_content_with_other_references_after_an_applied_delivery_is_checked_by_the_database() -> None:
    other_project = "6f1c1d6e-0000-4000-8000-0000000000ff"
    first, later = deliveries(event(), event(project_id=other_project), event(status_code=500), event())
    waiting = pending(later)
    judged = judge(first, waiting, quarantined=set())
    assert [e.source.offset for e in judged.duplicates] == [3]
    assert [q.source.offset for q in judged.conflicts] == [2]
    assert [e.source.offset for e in judged.next_round] == [1]  # its project is checked first, as on its own
    assert waiting == {}
