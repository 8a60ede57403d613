"""The completions partition and its price, through the pipeline into the database, against a plain Decimal
model: for any combination of the documented token fields, the stored token lines of one result add up to
input_tokens + output_tokens, and their amounts to the plain sum of count x price."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import asyncpg
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.factories import add_price, envelope, make_org
from tests.feeding import Feeder
from worker.providers import COMPLETION_TOKEN_TYPES

CATEGORIES = [name for name, _ in COMPLETION_TOKEN_TYPES]
# The model's overrides (USD per million tokens), one per category: no catalogue price is involved.
PRICES = {name: Decimal(index + 1) / 4 for index, name in enumerate(CATEGORIES)}
START = datetime(2026, 10, 1, tzinfo=UTC)
HOURS = 24 * 28  # each example's bucket is an hour of October 2026: never in the future, however many examples run
_hours = itertools.count()


def documented(truth: dict[str, int]) -> dict[str, int]:
    uncached = truth["input_text_tokens"] + truth["input_audio_tokens"] + truth["input_image_tokens"]
    cached = truth["input_cached_text_tokens"] + truth["input_cached_audio_tokens"] + truth["input_cached_image_tokens"]
    return truth | {
        "input_uncached_tokens": uncached,
        "input_cached_tokens": cached,
        "input_tokens": uncached + cached + truth["input_cache_write_tokens"],
        "output_tokens": truth["output_text_tokens"] + truth["output_audio_tokens"] + truth["output_image_tokens"],
    }


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    truth=st.fixed_dictionaries({name: st.integers(0, 10**9) for name in CATEGORIES}),
    dropped=st.sets(st.sampled_from([*CATEGORIES, "input_cached_tokens", "input_uncached_tokens"])),
)
async def test_stored_token_lines_partition_and_amount_to_the_plain_sum(
    db: asyncpg.Connection, feeder: Feeder, truth: dict[str, int], dropped: set[str]
) -> None:
    org = await make_org(db, ai_org=f"org-partition-{next(_hours)}")
    if not await db.fetchval("SELECT count(*) FROM model_prices WHERE model = 'acme-partition'"):  # once per test
        for name, price in PRICES.items():
            await add_price(db, "openai", "acme-partition", name, str(price))
    fields = documented(truth)
    result = {name: value for name, value in fields.items() if name not in dropped}
    start = START + timedelta(hours=next(_hours) % HOURS)  # an organization of its own: hours may repeat
    bucket = {
        "object": "bucket",
        "start_time": int(start.timestamp()),
        "end_time": int((start + timedelta(hours=1)).timestamp()),
        "results": [
            {"object": "organization.usage.completions.result", "model": "acme-partition", "project_id": "proj_a"}
            | result
        ],
    }
    outcome = await feeder.buckets(envelope("openai", org.ai_org, "usage_v1", [bucket]))
    assert not outcome.quarantine, outcome.quarantine
    rows = await db.fetch(
        "SELECT line_item, quantity, amount FROM cost_data WHERE organization_id = $1 AND bucket_start_time = $2",
        org.id,
        start,
    )
    stored = {row["line_item"].split(":")[1]: (row["quantity"], row["amount"]) for row in rows}
    assert set(stored) == set(CATEGORIES)
    assert sum(quantity for quantity, _ in stored.values()) == fields["input_tokens"] + fields["output_tokens"]
    # the independent model: reported categories keep their counts; the price is count x price per million
    for name in CATEGORIES:
        if name not in dropped:
            assert stored[name][0] == fields[name]
    plain = sum((stored[name][0] * PRICES[name] for name in CATEGORIES), Decimal(0)) / 1_000_000
    assert sum(amount for _, amount in stored.values()) == plain
    if not dropped:
        assert plain == sum((truth[name] * PRICES[name] for name in CATEGORIES), Decimal(0)) / 1_000_000
