"""The API-usage decoder's fast path (``ApiUsageFields``, plain dicts) against its strict path (``ApiUsageEvent``,
the contract's model): the same fields, and the same outcome for every message, good or hostile."""

from __future__ import annotations

import json
import uuid
from datetime import datetime
from decimal import Decimal
from typing import Any, get_args

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from pydantic import AfterValidator, PlainValidator, TypeAdapter

from tests.hostile import corpus
from worker.decode import ApiEvent, _fast_api_event, decode_api_event, parse_json, strict_api_event
from worker.errors import InvalidInput
from worker.models import (
    ApiUsageEvent,
    ApiUsageFields,
    RequestCost,
    Timestamp,
    TokenUsage,
    TokenUsageFields,
    check_request_cost,
    check_time,
)
from worker.quarantine import Quarantined, Source

SOURCE = Source("usage", 2, 41, b"k", (("h", b"v"),))
MAX_BYTES = 1 << 20
# The fields the fast path checks in Python instead of through pydantic, with the check it calls.
CHECKED_IN_PYTHON = {"occurred_at", "cost_usd", "organization_id", "project_id", "user_id"}


def _properties(schema: dict[str, Any]) -> dict[str, Any]:
    return {
        name: {k: v for k, v in prop.items() if k not in ("default", "title")}
        for name, prop in schema["properties"].items()
        if name not in CHECKED_IN_PYTHON and name != "token_usage"
    }


def test_the_fast_path_validates_the_fields_of_the_models() -> None:
    for model, fields in ((ApiUsageEvent, ApiUsageFields), (TokenUsage, TokenUsageFields)):
        assert set(fields.__annotations__) == set(model.model_fields), model.__name__
        model_schema = model.model_json_schema(mode="validation")
        fields_schema = TypeAdapter(fields).json_schema(mode="validation")
        assert fields_schema.get("required") == model_schema.get("required"), model.__name__  # as pydantic sees it
        assert _properties(fields_schema) == _properties(model_schema), model.__name__
    # The two checks it calls itself are the models' own validators.
    assert any(isinstance(m, AfterValidator) and m.func is check_time for m in get_args(Timestamp)[1:])
    assert any(isinstance(m, PlainValidator) and m.func is check_request_cost for m in get_args(RequestCost)[1:])


def normal(decoded: ApiEvent | Quarantined) -> tuple[Any, ...]:
    """What must be identical between the paths: every value with its type, Decimals by their digits and
    exponent (1.5 and 1.50 are equal numbers but not the same NUMERIC), instants with their UTC offset."""
    if isinstance(decoded, Quarantined):
        return ("quarantined", decoded.reason, decoded.detail, decoded.organization_id, decoded.source)
    values: list[tuple[Any, ...]] = []
    for value in decoded:
        if isinstance(value, Decimal):
            values.append(("decimal", value.as_tuple()))
        elif isinstance(value, datetime):
            values.append(("instant", value, value.utcoffset()))
        else:
            values.append((type(value), value))
    return ("event", *values)


def reference(payload: bytes) -> ApiEvent | Quarantined:
    try:
        parsed = parse_json(payload, max_bytes=MAX_BYTES)
    except InvalidInput as bad:
        return Quarantined(SOURCE, payload, bad.reason, bad.detail)
    return strict_api_event(parsed, SOURCE, payload)


def assert_same(payload: bytes) -> ApiEvent | Quarantined:
    decoded = decode_api_event(payload, SOURCE, max_bytes=MAX_BYTES)
    assert normal(decoded) == normal(reference(payload)), payload
    return decoded


# --- generated messages: JSON text written by hand, so that keys can repeat and numbers keep their spelling

ORG = "6f1c1d6e-0000-4000-8000-000000000001"
UUIDS = [
    json.dumps(ORG),
    json.dumps(ORG.upper()),
    json.dumps(ORG.replace("-", "")),
    json.dumps("{" + ORG + "}"),
    json.dumps("urn:uuid:" + ORG),
    json.dumps(ORG[:-1]),
    json.dumps(ORG[:8] + ORG[9:13] + "-" + ORG[13:]),  # 36 characters, a hyphen out of place
    '"00000000-0000-0000-0000-000000000000"',
    '"not-a-uuid"',
    "12",
    "null",
    "[]",
]
NUMBERS = [  # where costs go: exact spellings, and every hostile kind of number
    "0.028",
    "0.0280",
    "1.50",
    "0",
    "0.0",
    "-0",
    "-0.0",
    "-0.01",
    "1e-40",
    "1E-34",
    "1e-35",
    "12E3",
    "2.5e+2",
    "999999999.9999",
    "1000000000",
    "5e9",
    "1e400",
    "-1e400",
    "1" + "0" * 5000,
    "0." + "1" * 34,
    "0." + "1" * 35,
    "123456789012345678901234567890.5",
    "NaN",
    "Infinity",
    "-Infinity",
    '"0.1"',
    '"1.50"',
    '"1e3"',
    '"1_000"',
    '"\\u0661\\u0662"',
    '" 1"',
    '"NaN"',
    "true",
    "null",
    "{}",
]
COUNTS = ["0", "1", "150", "999999999999999", "1000000000000000", "-1", "1.0", "1e3", '"5"', "true", "null", "NaN"]
INSTANTS = [
    '"2026-11-21T10:00:00.123Z"',
    '"2026-11-21T10:00:00Z"',
    '"2026-11-21T10:00:00.123456Z"',
    '"2026-11-21T10:00:00.123456789Z"',
    '"2026-11-21T10:00:00+05:30"',
    '"2026-11-21T10:00:00-00:00"',
    '"2026-11-21 10:00:00Z"',
    '"2026-11-21t10:00:00z"',
    '"2026-11-21T10:00:00"',
    '"2026-11-21"',
    '"2014-12-31T23:59:59Z"',
    '"2015-01-01T00:00:00Z"',
    '"2099-01-01T00:00:00Z"',
    '"0001-01-01T00:00:00+14:00"',
    '"2026-02-30T00:00:00Z"',
    '"2026-11-21T10:00:00+25:00"',
    '"yesterday"',
    "1764000000",
    "1764000000.5",
    "1764000000000",
    "-1",
    "null",
]
TEXTS = ['"e-1"', '"/v1/chat"', '""', '"a\\u0000b"', '"\\ud800"', json.dumps("x" * 128), json.dumps("x" * 129)]
TEXTS += [json.dumps("y" * 255), json.dumps("y" * 256), '"caf\\u00e9"', '"\\ud83d\\ude00"', "7", "null", '["e"]']
METHODS = ['"POST"', '"GET"', '"OPTIONS"', '"post"', '"TRACE"', "null", "1"]
STATUSES = ["200", "100", "599", "99", "600", "200.0", '"200"', "true", "null", "2e2"]
LATENCIES = ["840", "0", "86400000", "86400001", "-5", "1.5", "null", '"840"']

FIELD_VALUES: dict[str, list[str]] = {
    "event_id": TEXTS,
    "occurred_at": INSTANTS,
    "organization_id": UUIDS,
    "project_id": UUIDS,
    "user_id": UUIDS,
    "endpoint": TEXTS,
    "method": METHODS,
    "status_code": STATUSES,
    "response_time_ms": LATENCIES,
}
USAGE_VALUES: dict[str, list[str]] = {
    "prompt_tokens": COUNTS,
    "completion_tokens": COUNTS,
    "total_tokens": COUNTS,
    "model": TEXTS,
    "cost_usd": NUMBERS,
}
GOOD: dict[str, str] = {
    "event_id": '"e-1"',
    "occurred_at": '"2026-11-21T10:00:00.123Z"',
    "organization_id": json.dumps(ORG),
    "project_id": "null",
    "user_id": json.dumps(str(uuid.UUID(int=7))),
    "endpoint": '"/v1/chat"',
    "method": '"POST"',
    "status_code": "200",
    "response_time_ms": "840",
    "prompt_tokens": "150",
    "completion_tokens": "800",
    "total_tokens": "950",
    "model": '"gpt-4o"',
    "cost_usd": "0.028",
}


def render(members: list[tuple[str, str]]) -> str:
    return "{" + ",".join(f"{json.dumps(name)}:{value}" for name, value in members) + "}"


@st.composite
def members(draw: st.DrawFn, choices: dict[str, list[str]]) -> list[tuple[str, str]]:
    """An object's members: each field good but a few, changed to one of their other values or left out;
    sometimes an unknown member, and sometimes a member twice (the same or another value)."""
    changed = draw(st.sets(st.sampled_from(sorted(choices)), max_size=3))
    out = []
    for name, values in choices.items():
        if name not in changed:
            out.append((name, GOOD[name]))
        elif draw(st.integers(0, 4)) > 0:
            out.append((name, draw(st.sampled_from(values))))
    if draw(st.booleans()):
        out.append((draw(st.sampled_from(["extra", "tags", "token_usage_v2"])), draw(st.sampled_from(NUMBERS))))
    if out and draw(st.integers(0, 9)) == 0:
        name, value = draw(st.sampled_from(out))
        out.append((name, draw(st.sampled_from([value, "null", '"x"']))))
    return draw(st.permutations(out))


@st.composite
def messages(draw: st.DrawFn) -> bytes:
    top = draw(members(FIELD_VALUES))
    usage = draw(st.sampled_from(["object", "object", "null", "missing", "[]", '"none"']))
    if usage == "object":
        top.insert(draw(st.integers(0, len(top))), ("token_usage", render(draw(members(USAGE_VALUES)))))
    elif usage != "missing":
        top.append(("token_usage", usage))
    return render(top).encode()


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(messages())
@example(render([(n, GOOD[n]) for n in FIELD_VALUES]).encode())
def test_the_fast_and_strict_paths_agree_on_generated_messages(payload: bytes) -> None:
    assert_same(payload)


@given(
    cost=st.decimals(allow_nan=False, allow_infinity=False, min_value=0, max_value=Decimal("999999999")),
    places=st.integers(0, 40),
)
def test_the_fast_path_keeps_costs_exactly(cost: Decimal, places: int) -> None:
    spelled = f"{cost:.{places}f}"
    body = {name: GOOD[name] for name in FIELD_VALUES} | {"token_usage": render([("cost_usd", spelled)])}
    payload = render(list(body.items())).encode()
    decoded = assert_same(payload)
    if isinstance(decoded, ApiEvent):
        assert decoded.cost_usd is not None
        assert str(decoded.cost_usd) == str(Decimal(spelled))


def test_a_good_event_takes_the_fast_path_with_the_models_values() -> None:
    payload = render([*((n, GOOD[n]) for n in FIELD_VALUES), ("token_usage", render([("cost_usd", "1.50")]))])
    fast = _fast_api_event(parse_json(payload.encode(), max_bytes=MAX_BYTES), SOURCE, payload.encode())
    assert fast is not None
    assert normal(fast) == normal(reference(payload.encode()))
    assert (fast.prompt_tokens, fast.completion_tokens, fast.total_tokens, fast.model) == (0, 0, 0, None)
    assert fast.cost_usd is not None
    assert fast.cost_usd.as_tuple().exponent == -2  # 1.50, not 1.5
    assert (fast.source_partition, fast.source_offset, fast.source, fast.payload) == (2, 41, SOURCE, payload.encode())


def test_every_hostile_event_gets_the_strict_paths_reason_and_detail() -> None:
    ids = {name: str(uuid.uuid4()) for name in ("ORG_ID", "PROJECT_ID", "USER_ID", "OTHER_ORG_ID")}
    ids |= {name: str(uuid.uuid4()) for name in ("OTHER_PROJECT_ID", "OTHER_USER_ID", "MISSING_ORG_ID")}
    ids |= {"MISSING_PROJECT_ID": str(uuid.uuid4()), "MISSING_USER_ID": str(uuid.uuid4())}
    ids |= {"OPENAI_ORG": "org-a", "ANTHROPIC_ORG": "org-b", "SHARED_OPENAI_ORG": "org-s"}
    hostile = [m for m in corpus.load(ids) if m.topic == "api_usage"]
    assert len(hostile) > 30
    for message in hostile:
        decoded = assert_same(message.value or b"")
        if isinstance(decoded, Quarantined):
            assert decoded.reason.value == message.reason, message.name
