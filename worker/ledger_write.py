"""Writing a reduced ledger (``worker.ledger``) in the batch's transaction: advance the windows' revisions,
upsert the lines of current revisions, retire the lines their new snapshots no longer have.

Returns each line's outcome and, per message, the best outcome of its lines, and the scopes whose spend
changed (for budgets).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from uuid import UUID

from worker.decode import ProviderMessage
from worker.ledger import Ledger
from worker.outcome import BestResults, Result
from worker.overlaps import quarantined, refused_windows
from worker.quarantine import Quarantined
from worker.rows import LedgerRow, WindowKey
from worker.store import Tx
from worker.touches import Touch, provider_touch

COSTS = "costs_v1"  # the api_version of provider cost lines (the rest is usage)


@dataclass
class LedgerWritten:
    lines: Counter[tuple[str, Result]] = field(default_factory=Counter)  # (api_version, outcome)
    touched: list[Touch] = field(default_factory=list)
    quarantined: list[Quarantined] = field(default_factory=list)  # messages bringing an overlapping window


async def write_ledger(
    tx: Tx, ledger: Ledger, tenants: dict[int, UUID], best: BestResults, messages: Sequence[ProviderMessage]
) -> LedgerWritten:
    """``tenants`` are the organizations the transaction may write for: widened (and set again) when a window
    held lines of other organizations before, which retiring must reach. ``best`` gets each message's outcome;
    ``messages`` are the batch's provider messages (``ledger``'s indices), for the quarantine of overlaps."""
    written = LedgerWritten()
    # A window overlapping another window of its report (stored, or of an earlier message) is not written at all:
    # not its revision, not its lines (worker.overlaps).
    refused = refused_windows(ledger, await tx.overlapping_cost_windows(sorted(ledger.windows)))
    written.quarantined = quarantined(ledger, refused, messages)
    revisions = [r for r in ledger.revisions() if r.window not in refused]
    windows = await tx.upsert_cost_windows(revisions)
    # Retiring must see every organization that ever had lines in the window (a line may have moved away).
    if windows.organizations.keys() - tenants.keys():
        tenants.update(windows.organizations)
        await tx.set_tenants(set(tenants.values()))

    # Changed lines that decide the usage beside them: cost lines, and usage lines that may be (or have been)
    # unpriced (README rule 2: an unpriced line's hours keep the estimate). (organization, project, window)
    costs: set[tuple[UUID, UUID | None, WindowKey]] = set()
    rows: list[LedgerRow] = []
    for row in ledger.rows:
        if row.key.window in refused:
            continue
        if windows.states[row.key.window] == "stale":
            written.lines[(row.line.api_version, Result.STALE)] += 1
            best.note(row.message, Result.STALE)
        else:
            rows.append(row)
    stored = await tx.upsert_cost_data(rows) if rows else []
    for row, (done, kept) in zip(rows, stored, strict=True):
        if done is not None:
            result = Result.INSERTED if done == "inserted" else Result.UPDATED
        elif kept is not None and kept > row.collected_at:
            result = Result.STALE
        else:  # the same revision was there (or a concurrent writer just stored one)
            result = Result.UNCHANGED
        written.lines[(row.line.api_version, result)] += 1
        if result in (Result.INSERTED, Result.UPDATED):
            written.touched.append(
                provider_touch(row.key.organization_id, row.key.project_id, row.line.bucket_start, row.line.bucket_end)
            )
            # A usage line updated may have been unpriced before (a price imported since): a superset is harmless.
            if row.line.api_version == COSTS or row.line.amount is None or result == Result.UPDATED:
                costs.add((row.key.organization_id, row.key.project_id, row.key.window))
        best.note(row.message, result)

    advanced = [r for r in revisions if windows.states[r.window] == "advanced"]
    for retired in await tx.retire_cost_data(advanced) if advanced else []:
        written.lines[(retired.api_version, Result.SUPERSEDED)] += 1
        window = retired.window
        written.touched.append(provider_touch(retired.organization_id, retired.project_id, window.start, window.end))
        costs.add((retired.organization_id, retired.project_id, window))  # a cost line, or usage (maybe unpriced)
        for index in ledger.messages.get(window, []):
            best.note(index, Result.UPDATED)
    # A cost line (or an unpriced usage line) that starts or stops counting releases or replaces the usage lines
    # beside it, which count in the periods of their own windows: those are touched too.
    for organization, project, start, end in await tx.usage_beside_costs(sorted(costs, key=str)) if costs else []:
        written.touched.append(provider_touch(organization, project, start, end))
    return written
