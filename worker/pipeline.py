"""One batch, from Kafka records to one committed PostgreSQL transaction.

``decode_batch`` is pure: bytes become validated messages or quarantine outcomes. ``Pipeline.apply`` does
everything else inside ONE transaction: the offset compare-and-set, attribution, pricing, the ledger upsert,
API-usage inserts with their rollups, quarantine rows with their dead letters, budget alerts with their
outbox rows. Either all of a batch lands, with the offsets that say it did, or none of it does.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal, localcontext
from typing import Any, Protocol
from uuid import UUID

from worker import partitions
from worker.breaker import CircuitBreaker
from worker.config import Settings
from worker.decode import API_USAGE_COLUMNS, ApiEvent, ProviderMessage, decode_api_event, decode_provider_message
from worker.errors import StaleOffsets
from worker.faults import NO_FAULTS, Faults
from worker.model_providers import provider_of
from worker.pricing import Price, PriceBook, estimate_request, price_keys
from worker.providers import EXACT, LedgerLine
from worker.quarantine import Quarantined, Reason, Source
from worker.store import Database, Tx

# Message outcomes, best first: a message that inserted anything counts as inserted.
INSERTED, UPDATED, UNCHANGED, STALE, DUPLICATE, QUARANTINED = (
    "inserted",
    "updated",
    "unchanged",
    "stale_revision",
    "duplicate",
    "quarantined",
)
SUPERSEDED = "superseded"  # a stored line a newer snapshot of its window no longer has (ledger lines only)
_RANK = {INSERTED: 0, UPDATED: 1, UNCHANGED: 2, STALE: 3}


def _note(best: dict[int, str], message: int, result: str) -> None:
    """Remember the best outcome among a provider message's lines."""
    if message not in best or _RANK[result] < _RANK[best[message]]:
        best[message] = result


class KafkaRecord(Protocol):
    """The part of aiokafka's ConsumerRecord the pipeline reads."""

    @property
    def topic(self) -> str: ...
    @property
    def partition(self) -> int: ...
    @property
    def offset(self) -> int: ...
    @property
    def key(self) -> bytes | None: ...
    @property
    def value(self) -> bytes | None: ...
    @property
    def headers(self) -> Sequence[tuple[str, bytes | None]]: ...


@dataclass(frozen=True, slots=True)
class Touch:
    """A scope whose spend changed, and when: budgets evaluate the period that contains ``at`` (an estimate's
    hour; a provider row's window midpoint, the period the row counts in) and, for a provider row, every other
    period its window ``[span_start, span_end)`` overlaps (the hours it covers, or stops covering, may be there)."""

    organization_id: UUID
    project_id: UUID | None
    user_id: UUID | None
    at: datetime
    span_start: datetime | None = None
    span_end: datetime | None = None


def midpoint(start: datetime, end: datetime) -> datetime:
    """The instant that decides the budget period of a provider row (README "What counts as spend")."""
    return start + (end - start) / 2


class BudgetEvaluator(Protocol):
    """Evaluates the budgets whose scope a batch touched, inside the batch's transaction.

    Inserts one ``budget_alerts`` row per new crossing (budget, period start, threshold, amount, currency,
    crossing) with ``ON CONFLICT DO NOTHING`` and an outbox row for each inserted alert; resolves open alerts
    whose level the spend fell below (once: only alerts not yet resolved) with an outbox row each; returns the
    alerts raised and resolved (every outbox row it wrote).
    """

    async def evaluate(self, tx: Tx, touched: Iterable[Touch]) -> list[Any]: ...


@dataclass
class Batch:
    events: list[ApiEvent] = field(default_factory=list)  # one per (organization, event_id), in key order
    duplicates: list[ApiEvent] = field(default_factory=list)  # identical re-deliveries within the batch
    messages: list[ProviderMessage] = field(default_factory=list)
    quarantined: list[Quarantined] = field(default_factory=list)
    last_offsets: dict[tuple[str, int], int] = field(default_factory=dict)
    sizes: Counter[str] = field(default_factory=Counter)

    def __len__(self) -> int:
        return sum(self.sizes.values())

    def without(self, partitions: set[tuple[str, int]]) -> Batch:
        """This batch minus the messages of some partitions (revoked while the batch was prepared)."""

        def kept(item: ApiEvent | ProviderMessage | Quarantined) -> bool:
            return (item.source.topic, item.source.partition) not in partitions

        rest = Batch(
            events=[e for e in self.events if kept(e)],
            duplicates=[e for e in self.duplicates if kept(e)],
            messages=[m for m in self.messages if kept(m)],
            quarantined=[q for q in self.quarantined if kept(q)],
            last_offsets={tp: o for tp, o in self.last_offsets.items() if tp not in partitions},
        )
        items: list[ApiEvent | ProviderMessage | Quarantined] = [
            *rest.events,
            *rest.duplicates,
            *rest.messages,
            *rest.quarantined,
        ]
        rest.sizes.update(item.source.topic for item in items)
        return rest


@dataclass
class Outcome:
    """What a committed batch did (metrics and the canonical log line are recorded from it)."""

    messages: Counter[tuple[str, str]] = field(default_factory=Counter)  # (topic, outcome)
    quarantined: Counter[tuple[str, str]] = field(default_factory=Counter)  # (topic, reason)
    ledger_lines: Counter[tuple[str, str]] = field(default_factory=Counter)  # (api_version, outcome)
    unpriced: Counter[str] = field(default_factory=Counter)  # provider
    unknown_models: int = 0  # API-usage events whose model has no known provider (their estimate always counts)
    catalogue_estimates: int = 0  # API-usage events without cost_usd that the price catalogue estimated
    new_quarantine_rows: int = 0
    alerts: list[Any] = field(default_factory=list)
    quarantine: list[Quarantined] = field(default_factory=list)  # every message quarantined by this batch

    @property
    def outbox_rows(self) -> int:
        return self.new_quarantine_rows + len(self.alerts)


def _source(record: KafkaRecord) -> Source:
    return Source(record.topic, record.partition, record.offset, record.key, tuple(record.headers or ()))


def decode_batch(records: Iterable[KafkaRecord], settings: Settings) -> Batch:
    """Validate every record; bad ones become quarantine outcomes. Pure and CPU-bound."""
    batch = Batch()
    decode_into(batch, records, settings)
    finish_batch(batch)
    return batch


def decode_into(batch: Batch, records: Iterable[KafkaRecord], settings: Settings) -> None:
    """Decode more records into a batch (the consumer feeds it in slices, yielding to the event loop between
    them so that the batch in flight keeps talking to PostgreSQL meanwhile)."""
    for record in records:
        source = _source(record)
        payload = record.value if record.value is not None else b""
        batch.sizes[record.topic] += 1
        tp = (record.topic, record.partition)
        batch.last_offsets[tp] = max(record.offset, batch.last_offsets.get(tp, -1))
        decoded: ApiEvent | ProviderMessage | Quarantined
        if record.topic == settings.topic_api_usage:
            decoded = decode_api_event(payload, source, max_bytes=settings.max_message_bytes)
        else:
            decoded = decode_provider_message(
                payload, source, max_bytes=settings.max_message_bytes, max_results=settings.max_results_per_message
            )
        if isinstance(decoded, ApiEvent):
            batch.events.append(decoded)
        elif isinstance(decoded, ProviderMessage):
            batch.messages.append(decoded)
        else:
            batch.quarantined.append(decoded)


def finish_batch(batch: Batch) -> None:
    """First delivery of an event id wins within the batch; an identical repeat is a duplicate, a different
    one is quarantined. Leaves the events in key order (the order rows are locked in, across workers).

    Pure, so it runs while the previous batch is in the database. Keys hash ``UUID.int``: hashing a UUID
    object runs Python code, hashing its int does not.
    """
    unique: dict[tuple[int, str], ApiEvent] = {}
    for event in batch.events:
        key = (event.organization_id.int, event.event_id)
        first = unique.get(key)
        if first is None:
            unique[key] = event
        elif first.content() == event.content():
            batch.duplicates.append(event)
        else:
            batch.quarantined.append(_conflict(event, first.source))
    batch.events = [unique[key] for key in sorted(unique)]  # sorting the keys: no Python call per comparison


# ---------------------------------------------------------------------------------------- attribution


class _Attribution:
    """Provider ids -> (organization, project), from the projects table rows a batch needs."""

    def __init__(self, rows: Iterable[Any]) -> None:
        self.projects: dict[tuple[str, str, str], set[tuple[UUID, UUID]]] = defaultdict(set)
        self.legacy: dict[str, tuple[UUID, UUID]] = {}
        self.organizations: dict[tuple[str, str], set[UUID]] = defaultdict(set)
        for row in rows:
            target = (row["organization_id"], row["id"])
            if row["ai_provider"] and row["ai_organization_id"]:
                self.organizations[(row["ai_provider"], row["ai_organization_id"])].add(row["organization_id"])
                if row["ai_project_id"]:
                    self.projects[(row["ai_provider"], row["ai_organization_id"], row["ai_project_id"])].add(target)
            if row["openai_project_id"]:
                self.legacy[row["openai_project_id"]] = target

    def resolve(self, line: LedgerLine) -> tuple[UUID, UUID | None] | tuple[Reason, str]:
        owners = self.organizations.get((line.provider, line.ai_organization_id), set())
        if line.ai_project_id is None:
            if len(owners) == 1:
                return next(iter(owners)), None
            if not owners:
                return (
                    Reason.UNATTRIBUTED,
                    f"{line.provider} organization {line.ai_organization_id!r} maps to no organization",
                )
            return (
                Reason.AMBIGUOUS_ATTRIBUTION,
                f"{line.provider} organization {line.ai_organization_id!r} maps to {len(owners)} organizations",
            )
        candidates = set(self.projects.get((line.provider, line.ai_organization_id, line.ai_project_id), set()))
        if line.provider == "openai" and line.ai_project_id in self.legacy:
            legacy = self.legacy[line.ai_project_id]
            if owners and legacy[0] not in owners:
                return (
                    Reason.AMBIGUOUS_ATTRIBUTION,
                    f"legacy project {line.ai_project_id!r} belongs to another organization than "
                    f"{line.ai_organization_id!r}",
                )
            candidates.add(legacy)
        if len(candidates) == 1:
            organization, project = next(iter(candidates))
            return organization, project
        if not candidates:
            return (
                Reason.UNATTRIBUTED,
                f"{line.provider} project {line.ai_project_id!r} of {line.ai_organization_id!r} maps to no project",
            )
        return Reason.AMBIGUOUS_ATTRIBUTION, f"{line.provider} project {line.ai_project_id!r} maps to several projects"


# ---------------------------------------------------------------------------------------- ledger rows

_LedgerKey = tuple[UUID, UUID | None, str, str, str, datetime, datetime, str]  # org, project, provider, account,
# report, window start, window end, line item
_WindowKey = tuple[str, str, str, datetime, datetime]  # provider, account, report, window start, window end


@dataclass(slots=True)
class _Row:
    key: _LedgerKey
    line: LedgerLine
    message: int  # index of the message in the batch
    collected_at: datetime
    source: Source


def _sort_key(key: _LedgerKey) -> tuple[Any, ...]:
    organization, project, *rest = key
    return (project.int if project else -1, *rest, organization.int)


def _sum_lines(a: LedgerLine, b: LedgerLine) -> LedgerLine | None:
    if a.currency != b.currency:
        return None
    with localcontext(EXACT):  # money has up to 46 significant digits; the default context keeps 28
        a.amount = None if a.amount is None or b.amount is None else a.amount + b.amount
        if a.quantity is not None or b.quantity is not None:
            a.quantity = (a.quantity or Decimal(0)) + (b.quantity or Decimal(0))
    a.metadata["results"] = a.metadata.get("results", 1) + b.metadata.get("results", 1)
    return a


# ---------------------------------------------------------------------------------------- the pipeline


class Pipeline:
    def __init__(
        self,
        db: Database,
        settings: Settings,
        *,
        budgets: BudgetEvaluator | None = None,
        breaker: CircuitBreaker | None = None,
        faults: Faults = NO_FAULTS,
    ) -> None:
        self.db = db
        self.settings = settings
        self.budgets = budgets
        self.breaker = breaker
        self.faults = faults

    async def apply(self, batch: Batch, expected: dict[tuple[str, int], int | None]) -> Outcome:
        """Apply a batch and advance the stored offsets of its partitions, atomically.

        Delivery guarantee, enforced here: the data of a batch and the offsets that cover it commit in
        one PostgreSQL transaction, and the offsets move only by compare-and-set from the position this
        worker last saw. So a batch is applied at most once even if the broker redelivers it, the worker
        crashes anywhere, or a zombie consumer wakes up (it fails the compare-and-set: ``StaleOffsets``);
        and every offset is either applied-and-stored or neither, so nothing is lost.
        """
        moves = [
            (topic, partition, expected.get((topic, partition)), last + 1)
            for (topic, partition), last in batch.last_offsets.items()
        ]
        checked = False
        try:
            async with self.db.transaction() as tx:
                if moves and not await tx.advance_offsets(self.settings.kafka_group_id, moves):
                    raise StaleOffsets()
                outcome = await self.write(tx, batch)
                if self.breaker is not None:
                    bad = [reason for (_, reason), n in outcome.quarantined.items() for _ in range(n)]
                    self.breaker.check(len(batch) - len(bad), bad)
                    checked = True
                self.faults.hit("before_db_commit")
        except BaseException:
            if checked and self.breaker is not None:
                self.breaker.forget(len(batch), 0)
            raise
        return outcome

    async def write(self, tx: Tx, batch: Batch, *, tenants: set[UUID] | None = None) -> Outcome:
        """Every write of a batch, inside the caller's transaction."""
        outcome = Outcome()
        quarantine = list(batch.quarantined)
        touched: list[Touch] = []

        best: dict[int, str] = {}
        for duplicate in batch.duplicates:
            outcome.messages[(duplicate.source.topic, DUPLICATE)] += 1
        events = await self._checked_events(tx, batch.events, quarantine, outcome)
        ledger = await self._ledger_rows(tx, batch.messages, quarantine, outcome, best)

        organizations = {event.organization_id.int: event.organization_id for event in events}
        organizations.update((r.key[0].int, r.key[0]) for r in ledger.rows)
        organizations.update((o.int, o) for owners in ledger.owners.values() for o in owners)
        organizations.update((t.int, t) for t in tenants or ())
        if organizations:
            await tx.set_tenants(set(organizations.values()))
        if ledger.windows:
            touched.extend(await self._upsert_ledger(tx, ledger, organizations, outcome, best))
        flagged = {q.source for q in quarantine}
        for index, message in enumerate(batch.messages):
            if message.source not in flagged:  # quarantined messages are counted as such below
                outcome.messages[(message.source.topic, best.get(index, UNCHANGED))] += 1
        events = await partitions.admit(tx, events, quarantine)  # monthly partitions, retention (issue 18)
        if events:
            touched.extend(await self._insert_events(tx, events, quarantine, outcome))
        for item in quarantine:
            outcome.quarantined[(item.source.topic, item.reason.value)] += 1
            outcome.messages[(item.source.topic, QUARANTINED)] += 1
        outcome.quarantine = quarantine
        if quarantine:
            outcome.new_quarantine_rows = await tx.insert_quarantine(
                _quarantine_columns(quarantine),
                dead_letter_topic=self.settings.topic_dead_letter,
                max_bytes=self.settings.dead_letter_max_bytes,
            )
        if touched and self.budgets is not None:
            outcome.alerts = await self.budgets.evaluate(tx, touched)
        return outcome

    # -- API-usage events ------------------------------------------------------------------------------

    async def _checked_events(
        self, tx: Tx, events: list[ApiEvent], quarantine: list[Quarantined], outcome: Outcome
    ) -> list[ApiEvent]:
        """Reference checks against the platform tables (the batch is already deduplicated and in key order)."""
        if not events:
            return []
        organizations: dict[int, UUID] = {}
        projects: dict[int, UUID] = {}
        users: dict[int, UUID] = {}
        for event in events:
            organizations[event.organization_id.int] = event.organization_id
            if event.project_id is not None:
                projects[event.project_id.int] = event.project_id
            if event.user_id is not None:
                users[event.user_id.int] = event.user_id
        rows = await tx.lookup_event_references(
            set(organizations.values()), set(projects.values()), set(users.values())
        )
        known = {(row["kind"], row["id"].int): row["organization_id"] for row in rows}
        checked = []
        for event in events:
            problem = None
            if ("organization", event.organization_id.int) not in known:
                problem = Reason.UNKNOWN_ORGANIZATION, f"organization {event.organization_id} does not exist"
            elif event.project_id and known.get(("project", event.project_id.int)) != event.organization_id:
                problem = Reason.UNKNOWN_PROJECT, f"project {event.project_id} is not a project of the organization"
            elif event.user_id and known.get(("user", event.user_id.int)) != event.organization_id:
                problem = Reason.UNKNOWN_USER, f"user {event.user_id} is not a user of the organization"
            if problem is None:
                checked.append(event)
            else:
                quarantine.append(Quarantined(event.source, event.payload, *problem, event.organization_id))
        return checked

    async def _insert_events(
        self, tx: Tx, events: list[ApiEvent], quarantine: list[Quarantined], outcome: Outcome
    ) -> list[Touch]:
        providers = [provider_of(event.model) for event in events]
        outcome.unknown_models += providers.count(None)
        # Events the platform did not price are estimated from the catalogue (kept apart from cost_usd).
        estimates = [
            None
            if event.cost_usd is not None
            else estimate_request(
                provider, event.model, event.prompt_tokens, event.completion_tokens, event.occurred_at
            )
            for event, provider in zip(events, providers, strict=True)
        ]
        outcome.catalogue_estimates += sum(1 for estimate in estimates if estimate is not None)
        columns = [
            *list(zip(*events, strict=True))[:API_USAGE_COLUMNS],
            providers,
            [None if e is None else e.amount for e in estimates],
            [None if e is None else e.source for e in estimates],
        ]
        result = await tx.insert_api_usage(columns)
        touched = []
        inserted = 0
        conflicts = []
        for row in result:
            if row["kind"] == "conflict":
                conflicts.append((row["organization_id"], row["event_id"]))
            else:
                inserted += row["requests"]
                touched.append(Touch(row["organization_id"], row["project_id"], row["user_id"], row["hour"]))
        if conflicts:
            by_key = {(e.organization_id, e.event_id): e for e in events}
            for key in conflicts:
                event = by_key[key]
                quarantine.append(
                    Quarantined(
                        event.source,
                        event.payload,
                        Reason.CONFLICTING_DUPLICATE,
                        f"event {event.event_id} was stored before with different content",
                        event.organization_id,
                    )
                )
        topic = self.settings.topic_api_usage
        outcome.messages[(topic, INSERTED)] += inserted
        outcome.messages[(topic, DUPLICATE)] += len(events) - inserted - len(conflicts)
        return touched

    # -- provider messages -----------------------------------------------------------------------------

    async def _ledger_rows(
        self,
        tx: Tx,
        messages: list[ProviderMessage],
        quarantine: list[Quarantined],
        outcome: Outcome,
        best: dict[int, str],
    ) -> _Ledger:
        """Attribute and price every line, sum lines that share a key within a message, then keep, per window of
        a report, the lines of the batch's newest revision of it (a bucket is a snapshot: older revisions in the
        batch are stale as a whole)."""
        ledger = _Ledger()
        if not messages:
            return ledger
        lines = [line for message in messages for line in message.lines]
        provider_orgs = {(line.provider, line.ai_organization_id) for line in lines}
        provider_orgs.update((m.provider, m.ai_organization_id) for m in messages if m.windows)
        legacy = {line.ai_project_id for line in lines if line.provider == "openai" and line.ai_project_id}
        attribution = _Attribution(await tx.lookup_provider_projects(provider_orgs, legacy) if provider_orgs else [])
        keys = price_keys(lines)
        book = PriceBook(
            Price(
                r["provider"],
                r["model"],
                r["token_type"],
                r["price_per_million"],
                r["currency"],
                r["effective_from"],
                r["id"],
            )
            for r in (await tx.lookup_prices(keys) if keys else [])
        )
        for index, message in enumerate(messages):
            account = (message.provider, message.ai_organization_id)
            for report, start, end in message.windows:
                window = (*account, report, start, end)
                if window not in ledger.windows or message.collected_at > ledger.windows[window]:
                    ledger.windows[window] = message.collected_at
                ledger.owners[window] = attribution.organizations.get(account, set())
                ledger.messages.setdefault(window, []).append(index)

        newest: dict[_LedgerKey, _Row] = {}
        for index, message in enumerate(messages):
            summed: dict[_LedgerKey, LedgerLine] = {}
            problems: list[str] = []
            problem_reason: Reason | None = None
            for line in message.lines:
                resolved = attribution.resolve(line)
                if isinstance(resolved[0], Reason):
                    problem_reason = problem_reason or resolved[0]
                    problems.append(str(resolved[1]))
                    continue
                organization, project = resolved
                assert isinstance(organization, UUID)
                if line.price_model is not None and not book.price(line):
                    outcome.unpriced[line.provider] += 1
                key = (
                    organization,
                    project,
                    line.provider,
                    line.ai_organization_id,
                    line.report,
                    line.bucket_start,
                    line.bucket_end,
                    line.line_item,
                )
                earlier = summed.get(key)
                if earlier is None:
                    summed[key] = line
                elif _sum_lines(earlier, line) is None:
                    problem_reason, summed = Reason.INCONSISTENT_DATA, {}
                    problems = [f"line item {line.line_item!r} is reported in two currencies"]
                    break
            if problem_reason is not None:
                detail = "; ".join(sorted(set(problems))[:5])
                quarantine.append(Quarantined(message.source, message.payload, problem_reason, detail[:500]))
            for key, line in summed.items():
                if message.collected_at < ledger.windows[_window(key)]:  # a newer snapshot of its window is here
                    outcome.ledger_lines[(line.api_version, STALE)] += 1
                    _note(best, index, STALE)
                elif key in newest:  # the same revision again (a second part or a copy of the snapshot)
                    outcome.ledger_lines[(line.api_version, UNCHANGED)] += 1
                    _note(best, index, UNCHANGED)
                else:
                    newest[key] = _Row(key, line, index, message.collected_at, message.source)
        ledger.rows = sorted(newest.values(), key=lambda r: _sort_key(r.key))
        return ledger

    async def _upsert_ledger(
        self, tx: Tx, ledger: _Ledger, tenants: dict[int, UUID], outcome: Outcome, best: dict[int, str]
    ) -> list[Touch]:
        """Advance the windows' revisions, upsert the lines of current revisions, retire the lines their new
        snapshots no longer have; record each line's outcome and, per message, the best outcome of its lines."""
        windows = sorted(ledger.windows)
        organizations_of: dict[_WindowKey, set[UUID]] = defaultdict(set)
        for row in ledger.rows:
            organizations_of[_window(row.key)].add(row.key[0])
        states = await tx.upsert_cost_windows(
            [
                [w[0] for w in windows],
                [w[1] for w in windows],
                [w[2] for w in windows],
                [w[3] for w in windows],
                [w[4] for w in windows],
                [ledger.windows[w] for w in windows],
                ["{" + ",".join(sorted(str(o) for o in organizations_of[w])) + "}" for w in windows],
            ]
        )
        state = {windows[r["ord"] - 1]: r["state"] for r in states}
        # Retiring must see every organization that ever had lines in the window (a line may have moved away).
        seen = {o.int: o for r in states for o in r["organization_ids"]}
        if seen.keys() - tenants.keys():
            tenants.update(seen)
            await tx.set_tenants(set(tenants.values()))

        touched = []
        rows = []
        for row in ledger.rows:
            if state[_window(row.key)] == "stale":
                outcome.ledger_lines[(row.line.api_version, STALE)] += 1
                _note(best, row.message, STALE)
            else:
                rows.append(row)
        written = (
            {
                record["ord"]: (record["result"], record["kept_revision"])
                for record in await tx.upsert_cost_data(_ledger_columns(rows))
            }
            if rows
            else {}
        )
        for ord_, row in enumerate(rows, start=1):
            done, kept = written[ord_]
            if done is not None:
                result = INSERTED if done == "inserted" else UPDATED
            elif kept is not None and kept > row.collected_at:
                result = STALE
            else:  # the same revision was there (or a concurrent writer just stored one)
                result = UNCHANGED
            outcome.ledger_lines[(row.line.api_version, result)] += 1
            if result in (INSERTED, UPDATED):
                organization, project = row.key[0], row.key[1]
                touched.extend(
                    ledger.touches(
                        organization,
                        project,
                        (row.line.provider, row.line.ai_organization_id),
                        row.line.bucket_start,
                        row.line.bucket_end,
                    )
                )
            _note(best, row.message, result)
        advanced = [w for w in windows if state[w] == "advanced"]
        if advanced:
            retired = await tx.retire_cost_data(
                [
                    [w[0] for w in advanced],
                    [w[1] for w in advanced],
                    [w[2] for w in advanced],
                    [w[3] for w in advanced],
                    [w[4] for w in advanced],
                    [ledger.windows[w] for w in advanced],
                ]
            )
            for record in retired:
                outcome.ledger_lines[(record["api_version"], SUPERSEDED)] += 1
                touched.extend(
                    ledger.touches(
                        record["organization_id"],
                        record["project_id"],
                        (record["provider"], record["ai_organization_id"]),
                        record["bucket_start_time"],
                        record["bucket_end_time"],
                    )
                )
                window = (
                    record["provider"],
                    record["ai_organization_id"],
                    record["report"],
                    record["bucket_start_time"],
                    record["bucket_end_time"],
                )
                for index in ledger.messages.get(window, []):
                    _note(best, index, UPDATED)
        return touched


def _window(key: _LedgerKey) -> _WindowKey:
    return (key[2], key[3], key[4], key[5], key[6])


@dataclass
class _Ledger:
    """A batch's provider data: rows at the batch's newest revision of their window, and the windows."""

    rows: list[_Row] = field(default_factory=list)
    windows: dict[_WindowKey, datetime] = field(default_factory=dict)  # window -> newest revision in the batch
    owners: dict[_WindowKey, set[UUID]] = field(default_factory=dict)  # organizations owning the window's account
    messages: dict[_WindowKey, list[int]] = field(default_factory=dict)  # messages carrying each window

    def touches(
        self, organization: UUID, project: UUID | None, account: tuple[str, str], start: datetime, end: datetime
    ) -> list[Touch]:
        """The scopes a provider row's change touches: its own (and its organization's). A row without a project
        touches only the organization: project budgets see their projects' own rows."""
        return [Touch(organization, project, None, midpoint(start, end), start, end)]


# ---------------------------------------------------------------------------------------- columns


def _conflict(event: ApiEvent, first: Source) -> Quarantined:
    return Quarantined(
        event.source,
        event.payload,
        Reason.CONFLICTING_DUPLICATE,
        f"event {event.event_id} was delivered earlier (offset {first.offset}) with different content",
        event.organization_id,
    )


def _ledger_columns(rows: list[_Row]) -> list[list[Any]]:
    return [
        [r.key[0] for r in rows],
        [r.key[1] for r in rows],
        [r.line.provider for r in rows],
        [r.line.ai_organization_id for r in rows],
        [r.line.ai_project_id for r in rows],
        [r.line.api_version for r in rows],
        [r.line.bucket_start for r in rows],
        [r.line.bucket_end for r in rows],
        [r.line.line_item for r in rows],
        [r.line.currency for r in rows],
        [r.line.amount for r in rows],
        [r.line.quantity for r in rows],
        [r.line.unit for r in rows],
        [json.dumps(r.line.metadata, sort_keys=True, default=str) for r in rows],
        [r.collected_at for r in rows],
        [r.source.partition for r in rows],
        [r.source.offset for r in rows],
        [r.line.report for r in rows],
        [r.line.outside_cost_report for r in rows],
    ]


def _quarantine_columns(items: list[Quarantined]) -> list[list[Any]]:
    items = sorted(items, key=lambda q: (q.source.topic, q.source.partition, q.source.offset))
    return [
        [q.reason.value for q in items],
        [q.detail for q in items],
        [q.source.topic for q in items],
        [q.source.partition for q in items],
        [q.source.offset for q in items],
        [q.source.key for q in items],
        [q.payload for q in items],
        [json.dumps({_text(k): _header_value(v) for k, v in q.source.headers}) for q in items],
        [q.organization_id for q in items],
    ]


def _text(value: str) -> str:
    """Header text as jsonb can hold it: jsonb refuses \\u0000, which a producer may well send."""
    return value.replace("\x00", "\ufffd")


def _header_value(value: bytes | None) -> str | None:
    """A Kafka header value for the quarantine row: any bytes, or null (Kafka allows a header without one)."""
    return None if value is None else _text(value.decode("utf-8", "replace"))
