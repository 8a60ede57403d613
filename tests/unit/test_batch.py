"""Batch assembly without servers: decoding records into a batch, later deliveries of a key, the hostile corpus's decode
outcomes, and the API-usage row the store takes."""

from __future__ import annotations

import json
import re
import uuid
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from tests.factories import FakeRecord, dumps, envelope, openai_cost_bucket
from tests.hostile import corpus
from worker.batch import Batch, decode_batch, decode_into, finish_batch
from worker.config import Settings
from worker.decode import ApiEvent, decode_api_event, decode_provider_message
from worker.quarantine import Quarantined, Reason, Source
from worker.rows import UsageRows
from worker.usage import usage_rows

SETTINGS = Settings(topic_api_usage="usage", topic_provider_buckets="buckets")
# Reasons only the database can give: references, attribution, a conflict with a stored event, and two
# currencies summed into one ledger row (the ledger reduction's).
LATER = {
    Reason.UNKNOWN_ORGANIZATION,
    Reason.UNKNOWN_PROJECT,
    Reason.UNKNOWN_USER,
    Reason.UNATTRIBUTED,
    Reason.AMBIGUOUS_ATTRIBUTION,
    Reason.CONFLICTING_DUPLICATE,
    Reason.INCONSISTENT_DATA,
    Reason.OVERLAPPING_WINDOW,  # decided against the stored windows, in the transaction
}
# Valid counts the prices make absurd: invalid_number once priced (the catalogue's estimate, the line's price),
# which happens after decoding.
PRICED_LATER = {"api_usage/estimate-beyond-1e9.json", "provider_buckets/openai-usage-priced-beyond-1e12.json"}


def event(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "event_id": "e-1",
        "occurred_at": "2026-11-21T10:00:00.123Z",
        "organization_id": "6f1c1d6e-0000-4000-8000-000000000001",
        "project_id": None,
        "user_id": None,
        "endpoint": "/v1/chat",
        "method": "POST",
        "status_code": 200,
        "response_time_ms": 840,
        "token_usage": {
            "prompt_tokens": 150,
            "completion_tokens": 800,
            "total_tokens": 950,
            "model": "gpt-4o",
            "cost_usd": "0.028",
        },
    }
    body.update(overrides)
    return body


def records(*bodies: dict[str, Any], topic: str = "usage") -> list[FakeRecord]:
    return [FakeRecord(topic, 0, offset, dumps(body)) for offset, body in enumerate(bodies)]


def test_later_deliveries_of_a_key_are_set_apart_unjudged_and_another_instant_is_another_key() -> None:
    batch = decode_batch(
        records(
            event(),
            event(),
            event(status_code=500),
            event(event_id="e-0"),
            event(occurred_at="2026-11-21T09:00:00Z"),  # the same id at another instant: another event
            event(occurred_at="2026-11-21T09:00:00+00:00"),  # and its repeat (the same instant)
        ),
        SETTINGS,
    )
    # lock order (organization, event_id, occurred_at), the first delivery of each key kept
    assert [(e.event_id, e.source.offset) for e in batch.events] == [("e-0", 3), ("e-1", 4), ("e-1", 0)]
    assert [e.source.offset for e in batch.later] == [1, 2, 5]  # repeats and a changed copy: judged later
    assert batch.quarantined == []
    assert batch.last_offsets == {("usage", 0): 5}
    assert len(batch) == 6


def test_without_promotes_a_later_delivery_whose_first_was_revoked() -> None:
    batch = decode_batch(
        [FakeRecord("usage", 1, 5, dumps(event())), *records(event(event_id="e-0"), event())], SETTINGS
    )
    assert [(e.source.partition, e.source.offset) for e in batch.later] == [(0, 1)]
    batch.usage = usage_rows(batch.events)
    rest = batch.without({("usage", 1)})
    assert [(e.event_id, e.source.offset) for e in rest.events] == [("e-0", 0), ("e-1", 1)]
    assert rest.later == []
    assert rest.usage is None  # the events changed: priced again
    assert len(rest) == 2


def test_decoding_in_time_slices_stops_at_the_deadline_and_resumes_where_it_stopped() -> None:
    bodies = [event(event_id=f"e-{n}") for n in range(5)]
    pending = iter(records(*bodies))
    batch = Batch()
    assert decode_into(batch, pending, SETTINGS, until=0.0)  # a deadline already past: one record, then stop
    assert [e.event_id for e in batch.events] == ["e-0"]
    assert not decode_into(batch, pending, SETTINGS)  # no deadline: the rest, and nothing is left
    finish_batch(batch)
    whole = decode_batch(records(*bodies), SETTINGS)
    assert batch.events == whole.events
    assert batch.last_offsets == whole.last_offsets == {("usage", 0): 4}
    assert len(batch) == len(whole) == 5


def test_without_drops_a_partitions_messages_and_counts() -> None:
    mixed = [
        *records(event()),
        FakeRecord("usage", 1, 7, dumps(event(event_id="e-2"))),
        FakeRecord("usage", 1, 8, b"not json"),
    ]
    batch = decode_batch(mixed, SETTINGS)
    batch.usage = usage_rows(batch.events)  # prepared: rows stay paired with their events
    rest = batch.without({("usage", 1)})
    assert [e.event_id for e in rest.events] == ["e-1"]
    assert rest.usage is not None
    assert [e.event_id for e in rest.usage.events] == ["e-1"]
    assert len(rest.usage.providers) == len(rest.usage.estimates) == len(rest.usage.estimate_sources) == 1
    assert rest.ledger is None
    assert rest.quarantined == []
    assert rest.last_offsets == {("usage", 0): 0}
    assert len(rest) == 1


def test_every_hostile_message_decodes_to_its_reason_or_passes_to_the_database() -> None:
    ids = {name: str(uuid.uuid4()) for name in ("ORG_ID", "PROJECT_ID", "USER_ID", "OTHER_ORG_ID")}
    ids |= {name: str(uuid.uuid4()) for name in ("OTHER_PROJECT_ID", "OTHER_USER_ID", "MISSING_ORG_ID")}
    ids |= {"MISSING_PROJECT_ID": str(uuid.uuid4()), "MISSING_USER_ID": str(uuid.uuid4())}
    ids |= {"OPENAI_ORG": "org-a", "ANTHROPIC_ORG": "org-b", "SHARED_OPENAI_ORG": "org-s"}
    messages = corpus.load(ids)
    assert len(messages) > 50
    for message in messages:
        topic = "usage" if message.topic == "api_usage" else "buckets"
        batch = decode_batch([FakeRecord(topic, 0, 0, message.value, message.key, message.headers)], SETTINGS)
        if batch.quarantined:
            assert [q.reason.value for q in batch.quarantined] == [message.reason], message.name
            assert len(batch.quarantined[0].detail) <= 500, message.name
        else:
            assert Reason(message.reason) in LATER or message.name in PRICED_LATER, message.name


def test_the_usage_row_has_exactly_the_fields_of_insert_api_usage_s_row_type() -> None:
    root = Path(__file__).parents[2]
    sql = (root / "worker" / "sql" / "queries.sql").read_text()
    block = sql.split("-- name: insert_api_usage", 1)[1].split("-- name:", 1)[0]
    assert sorted(set(re.findall(r"\$(\d+)", block))) == ["1"]
    migration = (root / "schema" / "migrations" / "0015_api_usage_input.sql").read_text()
    body = migration.split("CREATE TYPE cost_worker_api_usage_input AS (", 1)[1].split(");", 1)[0]
    attributes = tuple(line.split()[0] for line in body.strip().splitlines())
    assert attributes == (*UsageRows.EVENT_FIELDS, "provider", "catalogue_cost_usd", "price_source")
    assert ApiEvent._fields[: len(UsageRows.EVENT_FIELDS)] == UsageRows.EVENT_FIELDS

    decoded = decode_api_event(dumps(event(token_usage=None)), Source("usage", 3, 9), max_bytes=1 << 20)
    assert isinstance(decoded, ApiEvent)
    rows = usage_rows([decoded])
    assert (rows.providers, rows.estimates, rows.estimate_sources) == ([None], [None], [None])
    assert rows.only([]).events == []


@pytest.mark.parametrize(
    ("cost", "estimated"),
    [("0.028", False), (None, True)],
)
def test_only_events_without_a_cost_are_estimated_from_the_catalogue(cost: str | None, estimated: bool) -> None:
    body = event()
    body["token_usage"]["cost_usd"] = cost
    decoded = decode_api_event(json.dumps(body).encode(), Source("usage", 0, 0), max_bytes=1 << 20)
    assert isinstance(decoded, ApiEvent)
    rows = usage_rows([decoded])
    assert rows.providers == ["openai"]
    [estimate], [source] = rows.estimates, rows.estimate_sources
    assert (estimate is not None, source is not None) == (estimated, estimated)
    if estimated:
        assert estimate is not None
        assert estimate > 0
        assert source is not None
        assert source.startswith("genai-prices")


@pytest.mark.parametrize("model", ["gpt-4o", " gpt-4o", "gpt-4o\n", "GPT-4o "])
def test_a_model_the_catalogue_maps_to_a_provider_is_estimated_by_the_same_name(model: str) -> None:
    """provider_of reads the model name trimmed: an event it gives a provider (so that provider's data replaces
    its estimate) must be estimated by that same name, not left at zero because of surrounding whitespace."""
    body = event()
    body["token_usage"] |= {"model": model, "cost_usd": None, "prompt_tokens": 1_000_000, "completion_tokens": 0}
    decoded = decode_api_event(json.dumps(body).encode(), Source("usage", 0, 0), max_bytes=1 << 20)
    assert isinstance(decoded, ApiEvent)
    rows = usage_rows([decoded])
    assert (rows.providers, rows.estimates) == (["openai"], [Decimal("2.50")])


def test_an_event_that_reports_only_total_tokens_is_estimated_not_counted_zero() -> None:
    body = event()
    body["token_usage"] = {"model": "gpt-4o", "total_tokens": 1_000_000}  # no split, no cost
    decoded = decode_api_event(json.dumps(body).encode(), Source("usage", 0, 0), max_bytes=1 << 20)
    assert isinstance(decoded, ApiEvent)
    rows = usage_rows([decoded])
    assert (rows.providers, rows.estimates) == (["openai"], [Decimal("10.00")])  # all of it at $10 output


def test_a_message_in_schema_registry_framing_decodes_as_its_json() -> None:
    """Producers using Confluent's JSON Schema serializer put a zero magic byte and a 4-byte schema id before the
    JSON. Read as JSON, every such message was not_json: the whole stream quarantined and the breaker open."""

    source = Source("usage", 0, 0)
    plain = dumps(event())
    framed = b"\x00" + (1234).to_bytes(4, "big") + plain
    decoded = decode_api_event(framed, source, max_bytes=SETTINGS.max_message_bytes)
    assert isinstance(decoded, ApiEvent)
    expected = decode_api_event(plain, source, max_bytes=SETTINGS.max_message_bytes)
    assert isinstance(expected, ApiEvent)
    assert decoded[:-1] == expected[:-1]  # the same event; only the payload kept for the quarantine differs
    assert decoded.payload == framed  # kept as it came, so a replay reads it the same way
    costs = openai_cost_bucket("2026-11-20T00:00:00Z", "2026-11-21T00:00:00Z", [("proj_a", "gpt-4o", "1.25")])
    bucket = dumps(envelope("openai", "org-abc", "costs_v1", [costs]))
    provider = decode_provider_message(
        b"\x00\x00\x00\x00\x07" + bucket, source, max_bytes=SETTINGS.max_message_bytes, max_results=100
    )
    assert not isinstance(provider, Quarantined)
    assert [line.amount for line in provider.lines] == [Decimal("1.25")]
    # A zero byte that frames no JSON is still what it is.
    for bad in (b"\x00\x00\x00\x00\x07{not json", b"\x00"):
        outcome = decode_api_event(bad, source, max_bytes=SETTINGS.max_message_bytes)
        assert isinstance(outcome, Quarantined)
        assert outcome.reason is Reason.NOT_JSON
