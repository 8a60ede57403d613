"""A seeded stream with known content: organizations, budgets, API-usage events and provider buckets.

Every message carries its *truth* (what it means, in plain Python values) next to the bytes a producer
sends; ``tests.faults.expectation`` derives the expected end state from the truths alone, never from worker
code. The stream has what production has: several organizations and partitions, both providers, costs and
usage buckets, revisions arriving out of order (stale ones), exact re-sends, an event id reused with other
content, late data for the previous month, and bad input of several kinds.

Design rule that keeps the expected alerts independent of delivery order: spend only ever grows, whatever
subset of the stream has been applied. Revisions of a bucket never shrink; a provider window is always worth
more than the platform estimates it replaces (costs lines >= 1 USD, usage windows >= 0.15 USD, estimates
<= 0.002 USD per event); costs lines are worth more than the usage lines of the same window. So the alerts
raised are exactly the thresholds the final spend crosses, in any order, with any crash.
"""

from __future__ import annotations

import json
import random
import uuid
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, Literal

Kind = Literal["event", "bucket"]

MONTH = datetime(2026, 3, 1, tzinfo=UTC)  # the main month (in the past: the sweep's "now" never meets it)
LATE_MONTH = datetime(2026, 2, 1, tzinfo=UTC)  # late data arrives for this one
MODEL = "gpt-4o"
THRESHOLDS = (Decimal(50), Decimal(80), Decimal(100))

# Prices of the usage lines (USD per million tokens, overrides of the catalogue); lines of the other token types
# report 0 tokens (and cost 0 whatever the catalogue's price).
PRICES: dict[str, Decimal] = {
    "input_text_tokens": Decimal("1"),
    "input_cached_text_tokens": Decimal("0.5"),
    "output_text_tokens": Decimal("2"),
}
# The completions token categories (worker.providers.COMPLETION_TOKEN_TYPES), in order.
OPENAI_TOKEN_TYPES = (
    "input_text_tokens",
    "input_audio_tokens",
    "input_image_tokens",
    "input_cached_text_tokens",
    "input_cached_audio_tokens",
    "input_cached_image_tokens",
    "input_cache_write_tokens",
    "output_text_tokens",
    "output_audio_tokens",
    "output_image_tokens",
)


def _uuid(rng: random.Random) -> uuid.UUID:
    return uuid.UUID(int=rng.getrandbits(128), version=4)


@dataclass(frozen=True)
class OrgSpec:
    id: uuid.UUID
    provider: str
    ai_org: str
    projects: dict[str, uuid.UUID]  # provider project (workspace) id -> project
    users: tuple[uuid.UUID, ...]


@dataclass(frozen=True)
class BudgetSpec:
    id: uuid.UUID
    scope: str  # organization | project | user
    organization_id: uuid.UUID
    project_id: uuid.UUID | None
    user_id: uuid.UUID | None
    amount: Decimal
    period: str  # monthly | daily (UTC)
    thresholds: tuple[Decimal, ...] = THRESHOLDS


@dataclass(frozen=True)
class EventTruth:
    """An API-usage event as ``api_usage`` stores it."""

    organization_id: uuid.UUID
    event_id: str
    project_id: uuid.UUID | None
    user_id: uuid.UUID | None
    status_code: int
    response_time_ms: int
    occurred_at: datetime
    prompt_tokens: int
    completion_tokens: int
    model: str
    cost_usd: Decimal

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def payload(self) -> dict[str, Any]:
        return {
            "event_id": self.event_id,
            "occurred_at": self.occurred_at.isoformat().replace("+00:00", "Z"),
            "organization_id": str(self.organization_id),
            "project_id": str(self.project_id) if self.project_id else None,
            "user_id": str(self.user_id) if self.user_id else None,
            "endpoint": "/v1/orchestrations",
            "method": "POST",
            "status_code": self.status_code,
            "response_time_ms": self.response_time_ms,
            "token_usage": {
                "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens,
                "total_tokens": self.total_tokens,
                "model": self.model,
                "cost_usd": str(self.cost_usd),
            },
        }


LedgerKey = tuple[uuid.UUID, uuid.UUID | None, str, str, str, datetime, datetime, str]


@dataclass(frozen=True)
class LineTruth:
    """One ledger row as ``cost_data`` stores it (already attributed and priced)."""

    organization_id: uuid.UUID
    project_id: uuid.UUID | None
    provider: str
    ai_organization_id: str
    ai_project_id: str | None
    api_version: str
    bucket_start: datetime
    bucket_end: datetime
    line_item: str
    currency: str
    amount: Decimal
    quantity: Decimal | None

    @property
    def key(self) -> LedgerKey:
        return (
            self.organization_id,
            self.project_id,
            self.provider,
            self.ai_organization_id,
            self.api_version,
            self.bucket_start,
            self.bucket_end,
            self.line_item,
        )


@dataclass(frozen=True)
class Message:
    kind: Kind
    key: bytes
    value: bytes
    partition: int
    event: EventTruth | None = None  # a well-formed event whose references exist
    lines: tuple[LineTruth, ...] = ()  # a well-formed, attributable provider message
    collected_at: datetime | None = None
    bad: str | None = None  # the quarantine reason of a message that is bad by itself


@dataclass(repr=False)
class Stream:
    seed: int
    partitions: int
    orgs: list[OrgSpec]
    messages: list[Message]
    budgets: list[BudgetSpec] = field(default_factory=list)
    prices: dict[tuple[str, str, str], Decimal] = field(default_factory=dict)

    def count(self, kind: Kind | None = None) -> int:
        return sum(1 for m in self.messages if kind is None or m.kind == kind)

    @property
    def bad_inputs(self) -> int:
        """Messages that must end in quarantine (bad by themselves, or reusing an event id)."""
        return sum(1 for m in self.messages if m.bad is not None) + self.conflicts

    conflicts: int = 0

    def __repr__(self) -> str:  # short: hypothesis prints it with a falsifying example
        return f"Stream(seed={self.seed}, messages={len(self.messages)}, budgets={len(self.budgets)})"


def dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def partition_of(key: bytes, partitions: int) -> int:
    return zlib.crc32(key) % partitions


def _unix(moment: datetime) -> int:
    return int(moment.timestamp())


def _iso(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


class _Builder:
    def __init__(self, seed: int, partitions: int) -> None:
        self.rng = random.Random(seed)
        self.partitions = partitions

    def orgs(self) -> list[OrgSpec]:
        rng = self.rng
        made = []
        for index in range(4):
            provider = "anthropic" if index == 3 else "openai"
            prefix = "wrkspc" if provider == "anthropic" else "proj"
            projects = {f"{prefix}_{index}_{p}": _uuid(rng) for p in ("a", "b")}
            users = tuple(_uuid(rng) for _ in range(2))
            made.append(
                OrgSpec(_uuid(rng), provider, f"{provider}-org-{index}-{rng.getrandbits(32):08x}", projects, users)
            )
        return made

    def event(self, org: OrgSpec, event_id: str, day: datetime, *, cost_scale: int = 1) -> EventTruth:
        rng = self.rng
        projects = list(org.projects.values())
        return EventTruth(
            organization_id=org.id,
            event_id=event_id,
            project_id=rng.choice(projects) if rng.random() < 0.9 else None,
            user_id=rng.choice(org.users) if rng.random() < 0.8 else None,
            status_code=500 if rng.random() < 0.1 else 200,
            response_time_ms=rng.randint(20, 5_000),
            occurred_at=day + timedelta(seconds=rng.randint(0, 86_399), microseconds=rng.randint(0, 999) * 1000),
            prompt_tokens=rng.randint(0, 4_000),
            completion_tokens=rng.randint(0, 2_000),
            model=MODEL,
            cost_usd=Decimal(rng.randint(1, 2_000) * cost_scale).scaleb(-6),
        )

    def event_message(self, truth: EventTruth, *, valid: bool = True, bad: str | None = None) -> Message:
        key = truth.event_id.encode()
        return Message(
            "event",
            key,
            dumps(truth.payload()),
            partition_of(key, self.partitions),
            event=truth if valid else None,
            bad=bad,
        )

    # -- provider buckets -------------------------------------------------------------------------------

    def openai_costs(self, org: OrgSpec, day: datetime, revisions: int, *, scale: int = 1) -> list[Message]:
        rng = self.rng
        end = day + timedelta(days=1)
        items: list[tuple[str | None, str, Decimal]] = []
        for pid in org.projects:
            for item in ("GPT-4o input", "GPT-4o output"):
                items.append((pid, item, Decimal(rng.randint(100, 900) * scale).scaleb(-2)))
        items.append((None, "support", Decimal(rng.randint(100, 500) * scale).scaleb(-2)))
        messages = []
        amounts = [amount for _, _, amount in items]
        for revision in range(revisions):
            if revision:  # a later revision never reports less
                amounts = [a + Decimal(rng.randint(0, 300)).scaleb(-2) for a in amounts]
            collected = end + timedelta(hours=1 + revision, seconds=rng.randint(0, 3_599))
            results = [
                {
                    "object": "organization.costs.result",
                    "amount": {"value": str(amount), "currency": "usd"},
                    "line_item": item,
                    "project_id": pid,
                }
                for (pid, item, _), amount in zip(items, amounts, strict=True)
            ]
            body = {
                "provider": "openai",
                "ai_organization_id": org.ai_org,
                "api_version": "costs_v1",
                "collected_at": _iso(collected),
                "page": {
                    "object": "page",
                    "data": [
                        {"object": "bucket", "start_time": _unix(day), "end_time": _unix(end), "results": results}
                    ],
                    "has_more": False,
                    "next_page": None,
                },
            }
            lines = tuple(
                LineTruth(
                    organization_id=org.id,
                    project_id=org.projects[pid] if pid else None,
                    provider="openai",
                    ai_organization_id=org.ai_org,
                    ai_project_id=pid,
                    api_version="costs_v1",
                    bucket_start=day,
                    bucket_end=end,
                    line_item=item,
                    currency="USD",
                    amount=amount,
                    quantity=None,
                )
                for (pid, item, _), amount in zip(items, amounts, strict=True)
            )
            messages.append(self._bucket_message(org.ai_org, body, lines, collected))
        return messages

    def openai_usage(self, org: OrgSpec, day: datetime, revisions: int) -> list[Message]:
        rng = self.rng
        end = day + timedelta(days=1)
        counts = {
            pid: [rng.randint(150_000, 300_000), rng.randint(0, 50_000), rng.randint(50_000, 100_000)]
            for pid in org.projects
        }
        messages = []
        for revision in range(revisions):
            if revision:
                counts = {pid: [c + rng.randint(0, 20_000) for c in values] for pid, values in counts.items()}
            collected = end + timedelta(hours=1 + revision, seconds=rng.randint(0, 3_599))
            results = []
            lines = []
            for pid, (uncached, cached, output) in counts.items():
                results.append(
                    {
                        "object": "organization.usage.completions.result",
                        "input_tokens": uncached + cached,
                        "input_cached_tokens": cached,
                        "output_tokens": output,
                        "input_audio_tokens": 0,
                        "output_audio_tokens": 0,
                        "num_model_requests": rng.randint(1, 500),
                        "project_id": pid,
                        "user_id": None,
                        "api_key_id": None,
                        "model": MODEL,
                        "batch": None,
                    }
                )
                quantities = dict.fromkeys(OPENAI_TOKEN_TYPES, 0) | {
                    "input_text_tokens": uncached,
                    "input_cached_text_tokens": cached,
                    "output_text_tokens": output,
                }
                for token_type, quantity in quantities.items():
                    price = PRICES.get(token_type, Decimal(0))
                    lines.append(
                        LineTruth(
                            organization_id=org.id,
                            project_id=org.projects[pid],
                            provider="openai",
                            ai_organization_id=org.ai_org,
                            ai_project_id=pid,
                            api_version="usage_v1",
                            bucket_start=day,
                            bucket_end=end,
                            line_item=f"{MODEL}:{token_type}",
                            currency="USD",
                            amount=Decimal(quantity) * price / Decimal(1_000_000),
                            quantity=Decimal(quantity),
                        )
                    )
            body = {
                "provider": "openai",
                "ai_organization_id": org.ai_org,
                "api_version": "usage_v1",
                "collected_at": _iso(collected),
                "bucket": {"object": "bucket", "start_time": _unix(day), "end_time": _unix(end), "results": results},
            }
            messages.append(self._bucket_message(org.ai_org, body, tuple(lines), collected))
        return messages

    def anthropic_costs(self, org: OrgSpec, day: datetime, revisions: int) -> list[Message]:
        rng = self.rng
        end = day + timedelta(days=1)
        items: list[tuple[str | None, str]] = [(w, "Claude usage") for w in org.projects] + [(None, "Web search")]
        cents = [Decimal(f"{rng.randint(100, 900)}.{rng.randint(0, 99):02d}") for _ in items]
        messages = []
        for revision in range(revisions):
            if revision:
                cents = [c + Decimal(rng.randint(0, 300)) for c in cents]
            collected = end + timedelta(hours=1 + revision, seconds=rng.randint(0, 3_599))
            results: list[dict[str, Any]] = []
            for (workspace, description), amount in zip(items, cents, strict=True):
                result: dict[str, Any] = {"amount": str(amount), "currency": "USD", "description": description}
                if workspace:
                    result["workspace_id"] = workspace
                results.append(result)
            body = {
                "provider": "anthropic",
                "ai_organization_id": org.ai_org,
                "api_version": "costs_v1",
                "collected_at": _iso(collected),
                "page": {
                    "data": [{"starting_at": _iso(day), "ending_at": _iso(end), "results": results}],
                    "has_more": False,
                    "next_page": None,
                },
            }
            lines = tuple(
                LineTruth(
                    organization_id=org.id,
                    project_id=org.projects[workspace] if workspace else None,
                    provider="anthropic",
                    ai_organization_id=org.ai_org,
                    ai_project_id=workspace,
                    api_version="costs_v1",
                    bucket_start=day,
                    bucket_end=end,
                    line_item=description,
                    currency="USD",
                    amount=amount.scaleb(-2),
                    quantity=None,
                )
                for (workspace, description), amount in zip(items, cents, strict=True)
            )
            messages.append(self._bucket_message(org.ai_org, body, lines, collected))
        return messages

    def _bucket_message(
        self, account: str, body: dict[str, Any], lines: tuple[LineTruth, ...], collected: datetime
    ) -> Message:
        key = account.encode()
        return Message(
            "bucket", key, dumps(body), partition_of(key, self.partitions), lines=lines, collected_at=collected
        )

    def unattributed(self) -> Message:
        account = f"openai-org-unknown-{self.rng.getrandbits(32):08x}"
        day = MONTH
        body = {
            "provider": "openai",
            "ai_organization_id": account,
            "api_version": "costs_v1",
            "collected_at": _iso(day + timedelta(days=1, hours=2)),
            "bucket": {
                "object": "bucket",
                "start_time": _unix(day),
                "end_time": _unix(day + timedelta(days=1)),
                "results": [{"amount": {"value": "1.50", "currency": "usd"}, "line_item": "x", "project_id": None}],
            },
        }
        key = account.encode()
        return Message("bucket", key, dumps(body), partition_of(key, self.partitions), bad="unattributed")


def generate(seed: int, *, n_events: int = 1_200, days: int = 8, partitions: int = 3) -> Stream:
    """The stream for ``seed``: about ``n_events`` API events plus provider buckets, in production order."""
    b = _Builder(seed, partitions)
    rng = b.rng
    orgs = b.orgs()
    day_starts = [MONTH + timedelta(days=d) for d in range(days)]

    # API-usage events, spread over organizations and days; a few exact re-sends and one reused id.
    events: list[Message] = []
    originals: list[EventTruth] = []
    for index in range(n_events):
        org = orgs[rng.randrange(len(orgs))]
        truth = b.event(org, f"ev-{seed}-{index}", rng.choice(day_starts))
        originals.append(truth)
        events.append(b.event_message(truth))

    # Provider buckets: every account, every day, 1-3 revisions of costs; usage for the OpenAI accounts.
    buckets: list[Message] = []
    for org in orgs:
        for day in day_starts:
            if org.provider == "openai":
                buckets += b.openai_costs(org, day, rng.randint(1, 3))
                if rng.random() < 0.6:
                    buckets += b.openai_usage(org, day, rng.randint(1, 2))
            else:
                buckets += b.anthropic_costs(org, day, rng.randint(1, 3))
    rng.shuffle(buckets)  # revisions out of order: stale revisions arrive after newer ones
    resends = rng.sample(buckets, max(1, len(buckets) // 12))

    body: list[Message] = events + buckets
    rng.shuffle(body)

    # Duplicates come after their original (a producer retry), anywhere later in the stream.
    def insert_after(original_index: int, message: Message) -> None:
        position = rng.randint(original_index + 1, len(body))
        body.insert(position, message)

    for truth in rng.sample(originals, max(1, n_events // 10)):
        original = next(i for i, m in enumerate(body) if m.event is truth)
        insert_after(original, b.event_message(truth))
    conflicts = 0
    for truth in rng.sample(originals, max(1, n_events // 150)):
        original = next(i for i, m in enumerate(body) if m.event is truth)
        changed = replace(truth, cost_usd=truth.cost_usd + Decimal("0.000001"))
        insert_after(original, b.event_message(changed))  # same id, other content: quarantined
        conflicts += 1
    for message in resends:
        original = body.index(message)
        insert_after(original, message)

    # Bad input of several kinds.
    stranger = OrgSpec(_uuid(rng), "openai", "nobody", {"proj_x": _uuid(rng)}, (_uuid(rng),))
    bad: list[Message] = []
    for index in range(max(1, n_events // 100)):
        broken = b.event(orgs[0], f"bad-{seed}-{index}", MONTH)
        kind = index % 4
        if kind == 0:
            key = broken.event_id.encode()
            bad.append(Message("event", key, b'{"event_id": "' + key, partition_of(key, partitions), bad="not_json"))
        elif kind == 1:
            payload = broken.payload()
            del payload["status_code"]
            key = broken.event_id.encode()
            bad.append(Message("event", key, dumps(payload), partition_of(key, partitions), bad="schema_violation"))
        elif kind == 2:
            bad.append(
                b.event_message(replace(broken, organization_id=stranger.id), valid=False, bad="unknown_organization")
            )
        else:
            foreign = replace(broken, project_id=stranger.projects["proj_x"])
            bad.append(b.event_message(foreign, valid=False, bad="unknown_project"))
    bad.append(b.unattributed())
    for message in bad:
        body.insert(rng.randint(0, len(body)), message)

    # Late data: last month's events and one account's costs for its last days, after everything else.
    late: list[Message] = []
    late_days = [LATE_MONTH + timedelta(days=d) for d in (24, 25, 26, 27)]
    for index in range(max(4, n_events // 20)):
        org = orgs[rng.randrange(len(orgs))]
        late.append(b.event_message(b.event(org, f"late-{seed}-{index}", rng.choice(late_days), cost_scale=50)))
    for day in late_days:
        late += b.openai_costs(orgs[0], day, rng.randint(1, 2), scale=3)
    rng.shuffle(late)
    body += late

    # A big spender first: the very first batch crosses a budget, so an alert is in the outbox from the
    # first round on (the fault point between the alert insert and the publish needs one there).
    spender = replace(
        b.event(orgs[0], f"first-{seed}", MONTH), user_id=orgs[0].users[0], project_id=None, cost_usd=Decimal("0.05")
    )
    body.insert(0, b.event_message(spender))

    stream = Stream(seed=seed, partitions=partitions, orgs=orgs, messages=body)
    stream.conflicts = conflicts
    stream.prices = {("openai", MODEL, token_type): price for token_type, price in PRICES.items()}
    return stream


def choose_budgets(stream: Stream, spend: Any) -> list[BudgetSpec]:
    """Budgets sized from the expected spend so that some thresholds are crossed and some are not.

    ``spend(scope, org, project, user, period_start, period_end) -> Decimal`` is the expectation's spend.
    """
    rng = random.Random(stream.seed * 7919 + 1)
    budgets: list[BudgetSpec] = []
    month_end = datetime(2026, 4, 1, tzinfo=UTC)
    used = [Decimal(35), Decimal(65), Decimal(90), Decimal(130)]  # percent of the budget the month will use
    for index, org in enumerate(stream.orgs):
        first_project = next(iter(org.projects.values()))
        for scope, project in (("organization", None), ("project", first_project)):
            total = spend(scope, org.id, project, None, MONTH, month_end)
            percent = used[(index + (scope == "project")) % len(used)]
            amount = max(Decimal("0.01"), (total * 100 / percent).quantize(Decimal("0.01")))
            budgets.append(BudgetSpec(_uuid(rng), scope, org.id, project, None, amount, "monthly"))
        # A daily user budget: about the median day's spend, so some days cross and some do not.
        user = org.users[0]
        daily = sorted(
            spend("user", org.id, None, user, MONTH + timedelta(days=d), MONTH + timedelta(days=d + 1))
            for d in range(31)
        )
        nonzero = [value for value in daily if value > 0] or [Decimal("0.01")]
        amount = max(Decimal("0.000001"), nonzero[len(nonzero) // 2].quantize(Decimal("0.000001")))
        budgets.append(BudgetSpec(_uuid(rng), "user", org.id, None, user, amount, "daily"))
    return budgets


def partition_ends(deliveries: Iterable[tuple[Kind, int, int]]) -> dict[tuple[Kind, int], int]:
    """(kind, partition) -> next offset after the last delivered message."""
    ends: dict[tuple[Kind, int], int] = {}
    for kind, partition, offset in deliveries:
        ends[(kind, partition)] = max(ends.get((kind, partition), 0), offset + 1)
    return ends


def lowered(stream: Stream, org: OrgSpec, *, later: timedelta = timedelta(days=10)) -> list[Message]:
    """A newer revision of each of the organization's cost windows of the main month, every line at 0: the
    provider corrected them. Produced only after the stream was fully applied (and its alerts raised), it only
    lowers spend, in any order: the alerts whose level the final spend no longer reaches are each resolved once,
    and none is raised again (issue 12)."""
    newest: dict[tuple[datetime, datetime], Message] = {}
    for message in stream.messages:
        if message.bad is not None or not message.lines or message.collected_at is None:
            continue
        first = message.lines[0]
        if first.organization_id != org.id or first.api_version != "costs_v1" or first.bucket_start < MONTH:
            continue
        window = (first.bucket_start, first.bucket_end)
        current = newest.get(window)
        if current is None or (current.collected_at is not None and message.collected_at > current.collected_at):
            newest[window] = message
    revisions = []
    for _window, message in sorted(newest.items()):
        assert message.collected_at is not None
        collected = message.collected_at + later
        body = json.loads(message.value)
        body["collected_at"] = _iso(collected)
        for bucket in body["page"]["data"]:
            for result in bucket["results"]:
                if isinstance(result["amount"], dict):  # OpenAI: {"value": ..., "currency": "usd"}
                    result["amount"]["value"] = "0"
                else:  # Anthropic: a decimal string of cents
                    result["amount"] = "0"
        lines = tuple(replace(line, amount=Decimal(0)) for line in message.lines)
        revisions.append(replace(message, value=dumps(body), lines=lines, collected_at=collected))
    return revisions
