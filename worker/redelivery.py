"""Later deliveries of an event key within one batch: judged as if each had come in a batch of its own.

Across batches the rule is the database's: the first write of a key wins, a later delivery with the stored
content is a duplicate, one with other content is a ``conflicting_duplicate``. Within one batch the later
deliveries of a key are judged by the same rule, against what is stored once the deliveries before them were
applied, so batch boundaries never change an outcome:
- when a key's delivery was applied (inserted, or a duplicate of what was stored), the stored content is that
  delivery's, so the key's later deliveries are decided here: the same content is a duplicate, other content
  with the same organization, project and user a conflict (other references are checked first, by the database,
  as in a batch of their own: they go to a next round);
- when it was quarantined (a conflict with what was stored before, an unknown project, a month retention has
  dropped), the store is as it was, so the key's next delivery is written in a next round, in the same
  transaction, and judged by the database.
Rounds are rare (a key's first delivery quarantined and delivered again in the same batch); each is one more
pass of the events' statements.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from worker.batch import EventKey, event_key
from worker.decode import ApiEvent
from worker.quarantine import Quarantined, Reason, Source
from worker.rows import scope_key


@dataclass
class Judged:
    """One step's verdicts: later deliveries decided here, and those the database has to judge next."""

    next_round: list[ApiEvent] = field(default_factory=list)
    duplicates: list[ApiEvent] = field(default_factory=list)
    conflicts: list[Quarantined] = field(default_factory=list)


def pending(later: list[ApiEvent]) -> dict[EventKey, deque[ApiEvent]]:
    """Later deliveries by key, each key's in arrival order."""
    by_key: dict[EventKey, deque[ApiEvent]] = {}
    for event in later:
        by_key.setdefault(event_key(event), deque()).append(event)
    return by_key


def judge(applied: list[ApiEvent], waiting: dict[EventKey, deque[ApiEvent]], quarantined: set[Source]) -> Judged:
    """After a round of deliveries was written (``applied``; ``quarantined`` holds the sources refused so far),
    decide what can be decided of the ``waiting`` deliveries and take the rest's next round out of it. A key
    with no delivery in the round (its first was revoked) sends its next delivery to the next round."""
    judged = Judged()
    seen = set()
    for event in applied:
        key = event_key(event)
        seen.add(key)
        queue = waiting.get(key)
        if queue is None:
            continue
        if event.source in quarantined:  # the store holds what it held before this delivery
            judged.next_round.append(queue.popleft())
            if not queue:
                del waiting[key]
            continue
        content = event.content()  # stored: this delivery's content
        scope = scope_key(event)
        for later in list(queue):
            if later.content() == content:
                judged.duplicates.append(later)
            elif scope_key(later) == scope:  # references checked already, so nothing comes before the conflict
                judged.conflicts.append(_conflict(later, event.source))
            else:
                continue  # other references: checked first, as in a batch of its own (the next round does)
            queue.remove(later)
        if queue:
            judged.next_round.append(queue.popleft())
        if not queue:
            del waiting[key]
    for key in [key for key in waiting if key not in seen]:
        queue = waiting[key]
        judged.next_round.append(queue.popleft())
        if not queue:
            del waiting[key]
    judged.next_round.sort(key=lambda e: (e.organization_id.int, e.event_id, e.occurred_at))  # ``Batch.events``'s
    return judged


def _conflict(event: ApiEvent, stored: Source) -> Quarantined:
    return Quarantined(
        event.source,
        event.payload,
        Reason.CONFLICTING_DUPLICATE,
        f"event {event.event_id} was stored before with different content (as delivered at offset {stored.offset})",
        event.organization_id,
    )
