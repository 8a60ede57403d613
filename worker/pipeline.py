"""One batch, from decoded messages to one committed PostgreSQL transaction.

The steps, in the order data flows (each in its own module):
  ``worker.batch``        records -> a batch: decode, later deliveries of a key set apart (pure, before the
                          transaction)
  ``worker.attribution``  provider ids -> (organization, project)
  ``worker.ledger``       provider lines -> attributed, priced, reduced ``cost_data`` rows (pure)
  ``worker.ledger_write`` those rows -> windows advanced, lines upserted, superseded lines retired
  ``worker.usage``        API-usage events -> checked, priced ``api_usage`` rows with their rollups
  ``worker.redelivery``   later deliveries of a key in the batch -> duplicates, conflicts, or a next round
  quarantine rows with their dead letters (``worker.store``), then budgets (``worker.budgets``)
``Pipeline.apply`` runs them inside ONE transaction with the offset compare-and-set: either all of a batch
lands, with the offsets that say it did, or none of it does.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol
from uuid import UUID

from worker import partitions, redelivery
from worker.alerts import Alert, Resolution
from worker.attribution import Attribution, accounts
from worker.batch import TP, Batch, decode_batch
from worker.breaker import CircuitBreaker
from worker.config import Settings
from worker.decode import ProviderMessage
from worker.errors import StaleOffsets
from worker.faults import NO_FAULTS, FaultPoint, Faults
from worker.ledger import Ledger, reduce_ledger
from worker.ledger_write import write_ledger
from worker.outcome import BestResults, Outcome, Result
from worker.pricing import PriceBook, price_keys
from worker.quarantine import Quarantined, Reason
from worker.rows import ProjectLink, UsageRows
from worker.store import Database, Tx
from worker.touches import Touch, midpoint
from worker.usage import checked_events, usage_rows, write_usage

__all__ = ["BudgetEvaluator", "Pipeline", "Touch", "decode_batch", "midpoint"]  # the last three: bench/ imports


class BudgetEvaluator(Protocol):
    """Evaluates the budgets whose scope a batch touched, inside the batch's transaction.

    Inserts one ``budget_alerts`` row per new crossing (budget, period start, threshold, amount, currency,
    crossing) with ``ON CONFLICT DO NOTHING`` and an outbox row for each inserted alert; resolves open alerts
    whose level the spend fell below (once: only alerts not yet resolved) with an outbox row each; returns the
    alerts raised and resolved (every outbox row it wrote).
    """

    async def evaluate(self, tx: Tx, touched: Iterable[Touch]) -> list[Alert | Resolution]: ...


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

    async def apply(self, batch: Batch, expected: dict[TP, int | None]) -> Outcome:
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
        await self.prepare(batch)
        try:
            async with self.db.transaction() as tx:
                if moves and not await tx.advance_offsets(self.settings.kafka_group_id, moves):
                    raise StaleOffsets()
                outcome = await self.write(tx, batch)
                if self.breaker is not None:
                    quarantined = outcome.quarantined.copy()
                    quarantined[(self.settings.topic_api_usage, Reason.INVALID_TIMESTAMP.value)] -= outcome.retained_out
                    bad = [reason for (_, reason), n in quarantined.items() for _ in range(n)]
                    self.breaker.check(len(batch) - len(bad), bad)
                    checked = True
                self.faults.hit(FaultPoint.BEFORE_DB_COMMIT)
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

        checked, unknown = await checked_events(
            tx, batch.usage if batch.usage is not None else usage_rows(batch.events)
        )
        quarantine.extend(unknown)
        ledger = batch.ledger
        if ledger is None or not await self._attribution_holds(tx, ledger, batch.messages):
            ledger = await self._reduce(tx, batch.messages)
        quarantine.extend(ledger.quarantined)
        outcome.ledger_lines.update(ledger.lines)
        outcome.unpriced.update(ledger.unpriced)

        organizations = {event.organization_id.int: event.organization_id for event in checked.events}
        organizations.update((e.organization_id.int, e.organization_id) for e in batch.later)  # later rounds'
        organizations.update((o.int, o) for o in ledger.organizations())
        organizations.update((t.int, t) for t in tenants or ())
        if organizations:
            await tx.set_tenants(set(organizations.values()))
        best = BestResults(ledger.best)  # a copy: a retried transaction starts from the prepared ledger again
        if ledger.windows:
            written = await write_ledger(tx, ledger, organizations, best, batch.messages)
            quarantine.extend(written.quarantined)
            outcome.ledger_lines.update(written.lines)
            touched.extend(written.touched)
        flagged = {q.source for q in quarantine}
        for index, message in enumerate(batch.messages):
            if message.source not in flagged:  # quarantined messages are counted as such below
                outcome.messages[(message.source.topic, best.get(index, Result.UNCHANGED))] += 1
        await self._write_events(tx, checked, quarantine, outcome, touched)
        if batch.later:
            await self._write_later(tx, batch, quarantine, outcome, touched)
        for item in quarantine:
            outcome.quarantined[(item.source.topic, item.reason.value)] += 1
            outcome.messages[(item.source.topic, Result.QUARANTINED)] += 1
        outcome.quarantine = quarantine
        if quarantine:
            outcome.new_quarantine_rows = await tx.insert_quarantine(
                quarantine,
                dead_letter_topic=self.settings.topic_dead_letter,
                max_bytes=self.settings.dead_letter_max_bytes,
            )
        if touched and self.budgets is not None:
            outcome.alerts = await self.budgets.evaluate(tx, touched)
        return outcome

    async def _write_events(
        self, tx: Tx, checked: UsageRows, quarantine: list[Quarantined], outcome: Outcome, touched: list[Touch]
    ) -> None:
        """Checked API-usage rows into their partitions (a month retention dropped is quarantined), counted."""
        before = len(quarantine)
        checked = await partitions.admit(tx, checked, quarantine)  # monthly partitions, retention (issue 18)
        outcome.retained_out += len(quarantine) - before
        if not checked.events:
            return
        usage = await write_usage(tx, checked)
        quarantine.extend(usage.quarantined)
        touched.extend(usage.touched)
        outcome.unknown_models += usage.unknown_models
        outcome.catalogue_estimates += usage.catalogue_estimates
        topic = self.settings.topic_api_usage
        outcome.messages[(topic, Result.INSERTED)] += usage.inserted
        outcome.messages[(topic, Result.DUPLICATE)] += usage.duplicates

    async def _write_later(
        self, tx: Tx, batch: Batch, quarantine: list[Quarantined], outcome: Outcome, touched: list[Touch]
    ) -> None:
        """The batch's later deliveries of its event keys, judged as if each came in a batch of its own
        (``worker.redelivery``): decided from the delivery before when that one was applied, else written in
        a next round."""
        waiting = redelivery.pending(batch.later)
        applied = batch.events
        while waiting:
            judged = redelivery.judge(applied, waiting, {q.source for q in quarantine})
            for duplicate in judged.duplicates:
                outcome.messages[(duplicate.source.topic, Result.DUPLICATE)] += 1
            quarantine.extend(judged.conflicts)
            if not judged.next_round:
                return
            checked, unknown = await checked_events(tx, usage_rows(judged.next_round))
            quarantine.extend(unknown)
            await self._write_events(tx, checked, quarantine, outcome, touched)
            applied = judged.next_round

    async def prepare(self, batch: Batch) -> None:
        """Everything that needs no write, done before the batch's transaction opens, so that it does not hold
        the transaction (the consumer calls it while the previous batch is still in the database): the API-usage
        rows priced, the provider messages attributed, priced and reduced, their lookups in a short transaction
        of their own (projects and prices are never written by batches; the platform's changes to projects since
        are caught by the batch's transaction, which attributes the lines again then: ``_attribution_holds``).
        Idempotent."""
        if batch.usage is None:
            batch.usage = usage_rows(batch.events)
        if batch.ledger is None and batch.messages:
            async with self.db.transaction() as tx:
                batch.ledger = await self._reduce(tx, batch.messages)

    @staticmethod
    async def _links(tx: Tx, messages: list[ProviderMessage]) -> list[ProjectLink]:
        """The projects attribution needs: those of the messages' provider accounts and legacy project ids."""
        provider_orgs, legacy = accounts(line for message in messages for line in message.lines)
        provider_orgs.update((m.provider, m.ai_organization_id) for m in messages if m.windows)
        return await tx.lookup_provider_projects(provider_orgs, legacy) if provider_orgs else []

    @classmethod
    async def _reduce(cls, tx: Tx, messages: list[ProviderMessage]) -> Ledger:
        """Look up what attribution and pricing need, then reduce the messages to ledger rows."""
        if not messages:
            return Ledger()
        links = await cls._links(tx, messages)
        keys = price_keys(line for message in messages for line in message.lines)
        book = PriceBook(await tx.lookup_prices(keys) if keys else [])
        ledger = reduce_ledger(messages, Attribution(links), book)
        ledger.links = frozenset(links)
        return ledger

    @classmethod
    async def _attribution_holds(cls, tx: Tx, ledger: Ledger, messages: list[ProviderMessage]) -> bool:
        """Whether the projects a prepared ledger was attributed by are still what the batch's transaction sees.
        The platform may delete, move or remap a project between ``prepare`` and the transaction (the consumer
        prepares a batch while the one before it is in the database): lines written as prepared would then name a
        deleted project or organization (a foreign-key violation, which stops the worker) or the organization a
        project has left. One lookup of the projects; the ledger is reduced again, in the transaction, when they
        changed (README "What counts as spend", rule 4)."""
        if not messages:
            return True
        return frozenset(await cls._links(tx, messages)) == ledger.links
