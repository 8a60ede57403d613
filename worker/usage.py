"""The API-usage step: checked events -> priced ``api_usage`` rows -> the store, in the batch's transaction.

Events whose organization, project or user the platform does not know are quarantined (replayable once it does).
Events the platform did not price (no ``cost_usd``) are estimated from the price catalogue, kept apart from
``cost_usd``. An event id stored before with different content is quarantined as a conflicting duplicate.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from uuid import UUID

from worker.decode import ApiEvent
from worker.model_providers import provider_of
from worker.models import MAX_REQUEST_COST
from worker.pricing import estimate_request
from worker.quarantine import Quarantined, Reason
from worker.rows import Scope, ScopeKey, UsageRows, scope_key
from worker.store import Tx
from worker.touches import Touch


@dataclass
class UsageWritten:
    inserted: int = 0
    duplicates: int = 0  # stored before with the same content: a redelivery, a no-op
    unknown_models: int = 0
    catalogue_estimates: int = 0
    touched: list[Touch] = field(default_factory=list)
    quarantined: list[Quarantined] = field(default_factory=list)


async def checked_events(tx: Tx, rows: UsageRows) -> tuple[UsageRows, list[Quarantined]]:
    """Reference checks against the platform tables (one delivery per key, in key order): the
    rows that pass, and the others' events quarantined. Checked per distinct (organization, project, user),
    prepared before the transaction; the events are walked only when one of those fails.

    An event the catalogue prices at ``MAX_REQUEST_COST`` or more (valid token counts, up to 1e15, at a model's
    price) is ``invalid_number``: api_usage's CHECK would reject it, failing the whole batch as fatal."""
    events = rows.events
    if not events:
        return rows, []
    absurd = {
        index: estimate
        for index, estimate in enumerate(rows.estimates)
        if estimate is not None and estimate >= MAX_REQUEST_COST
    }
    scopes = rows.scopes if rows.scopes is not None else event_scopes(events)
    known = await tx.lookup_event_references(
        {scope[0] for scope in scopes.values()},
        {scope[1] for scope in scopes.values() if scope[1] is not None},
        {scope[2] for scope in scopes.values() if scope[2] is not None},
    )
    problems = {key: problem for key, scope in scopes.items() if (problem := _problem(scope, known)) is not None}
    if not problems and not absurd:
        return rows, []
    # Dedupe comes before the reference checks: an event already stored is a redelivery (or a conflicting reuse of
    # its id, which the insert tells), whatever the platform's tables say now. A user or project moved to another
    # organization since (or a full replay after such moves) would otherwise quarantine events already counted.
    stored = await tx.stored_event_keys(
        [
            (event.organization_id, event.occurred_at, event.event_id)
            for event in events
            if scope_key(event) in problems and problems[scope_key(event)][0] in REFERENCE_REASONS
        ]
    )
    checked = []
    quarantined = []
    for index, event in enumerate(events):
        problem = problems.get(scope_key(event))
        if problem is not None and (event.organization_id, event.occurred_at, event.event_id) in stored:
            problem = None
        if index in absurd:
            detail = f"the catalogue prices this request at {absurd[index]:.3E} USD, {MAX_REQUEST_COST} or more"
            problem = Reason.INVALID_NUMBER, detail
        if problem is None:
            checked.append(index)
        else:
            quarantined.append(Quarantined(event.source, event.payload, *problem, event.organization_id))
    return rows.only(checked), quarantined


REFERENCE_REASONS = frozenset({Reason.UNKNOWN_PROJECT, Reason.UNKNOWN_USER})  # the organization exists


def event_scopes(events: list[ApiEvent]) -> dict[ScopeKey, Scope]:
    """The events' distinct (organization, project, user)."""
    scopes: dict[ScopeKey, Scope] = {}
    for event in events:
        key = scope_key(event)
        if key not in scopes:
            scopes[key] = (event.organization_id, event.project_id, event.user_id)
    return scopes


def _problem(scope: Scope, known: dict[tuple[str, int], UUID]) -> tuple[Reason, str] | None:
    organization, project, user = scope
    if ("organization", organization.int) not in known:
        return Reason.UNKNOWN_ORGANIZATION, f"organization {organization} does not exist"
    if project is not None and known.get(("project", project.int)) != organization:
        return Reason.UNKNOWN_PROJECT, f"project {project} is not a project of the organization"
    if user is not None and known.get(("user", user.int)) != organization:
        return Reason.UNKNOWN_USER, f"user {user} is not a user of the organization"
    return None


def usage_rows(events: list[ApiEvent]) -> UsageRows:
    """The events' rows, priced: each model's provider, and the catalogue's estimate of an event without a cost."""
    providers = [provider_of(event.model) for event in events]
    estimates = [
        None
        if event.cost_usd is not None
        else estimate_request(
            provider,
            event.model,
            event.prompt_tokens,
            event.completion_tokens,
            event.occurred_at,
            total_tokens=event.total_tokens,
        )
        for event, provider in zip(events, providers, strict=True)
    ]
    return UsageRows(
        events,
        providers,
        [None if e is None else e.amount for e in estimates],
        [None if e is None else e.source for e in estimates],
        event_scopes(events),
    )


async def write_usage(tx: Tx, rows: UsageRows) -> UsageWritten:
    events = rows.events
    written = UsageWritten(
        unknown_models=rows.providers.count(None),
        catalogue_estimates=sum(1 for source in rows.estimate_sources if source is not None),
    )
    stored = await tx.insert_api_usage(rows)
    written.inserted = stored.inserted
    written.touched = stored.touched
    if stored.conflicts:
        by_key = {(e.organization_id, e.occurred_at, e.event_id): e for e in events}
        for key in stored.conflicts:
            event = by_key[key]
            written.quarantined.append(
                Quarantined(
                    event.source,
                    event.payload,
                    Reason.CONFLICTING_DUPLICATE,
                    f"event {event.event_id} was stored before with different content",
                    event.organization_id,
                )
            )
    written.duplicates = len(events) - stored.inserted - len(stored.conflicts)
    return written
