"""Positions at assignment: what the topic's retention deleted before the worker consumed it is counted."""

from __future__ import annotations

from worker.consumer import lost_to_retention


def test_a_stored_position_below_the_first_offset_is_that_many_messages_lost() -> None:
    stored = {("usage", 0): 100, ("usage", 1): 500, ("usage", 2): 7, ("costs", 0): 0}
    first = {("usage", 0): 130, ("usage", 1): 500, ("usage", 2): 0, ("costs", 0): 0}
    assert lost_to_retention(stored, first) == {("usage", 0): 30}


def test_a_partition_the_broker_did_not_answer_for_is_not_reported() -> None:
    assert lost_to_retention({("usage", 0): 5}, {}) == {}
