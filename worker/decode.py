"""Bytes -> a validated message or a quarantine outcome. Pure: no I/O, never raises for bad input.

Parsing uses jiter directly on the bytes: numbers become exact ``Decimal``s (never floats), a repeated key
in an object is an error, and NaN/Infinity are let through the parser so that validation can name them.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal, localcontext
from typing import Any, NamedTuple
from uuid import UUID

import jiter
from pydantic import BaseModel, ValidationError

from worker.errors import InvalidInput
from worker.limits import EXACT, MAX_DETAIL, MAX_LINE_ITEM, MAX_MAGNITUDE
from worker.models import (
    API_USAGE_FIELDS,
    BUCKET_MODELS,
    MAX_AMOUNT,
    UUID_FIELD,
    ApiUsageEvent,
    ProviderEnvelope,
    check_request_cost,
    check_time,
)
from worker.providers import LedgerLine, bucket_reports, lines_for, window_of
from worker.quarantine import Quarantined, Reason, Source

# pydantic's own error types, mapped to reasons (custom errors raised in the models' validators carry a reason as
# their type). Every other check raises ``InvalidInput(reason, detail)``.
NATIVE_REASONS: dict[str, Reason] = {
    "finite_number": Reason.INVALID_NUMBER,
    "decimal_max_places": Reason.INVALID_AMOUNT,
    "decimal_max_digits": Reason.INVALID_AMOUNT,
    "decimal_whole_digits": Reason.INVALID_AMOUNT,
    "timezone_aware": Reason.INVALID_TIMESTAMP,
    "datetime_parsing": Reason.INVALID_TIMESTAMP,
    "datetime_from_date_parsing": Reason.INVALID_TIMESTAMP,
    "datetime_object_invalid": Reason.INVALID_TIMESTAMP,
    "string_pattern_mismatch": Reason.INVALID_TEXT,
    "greater_than": Reason.INVALID_AMOUNT,  # the lower bounds of money and counts: negative values
    "greater_than_equal": Reason.INVALID_AMOUNT,
    "less_than": Reason.INVALID_NUMBER,  # the upper bounds: absurd magnitudes
    "less_than_equal": Reason.INVALID_NUMBER,
}
SOURCE_FIELDS = frozenset({"provider", "api_version"})
PLAIN_RANGE_FIELDS = frozenset({"status_code"})  # out of range there is a contract violation, not a number
_CUSTOM_REASONS = {reason.value: reason for reason in Reason}
# jiter's errors for numbers it cannot represent: an integer of thousands of digits, an exponent beyond Decimal's.
_OUT_OF_RANGE = ("number out of range", "InvalidOperation")


class ApiEvent(NamedTuple):
    """A validated API-usage event (a NamedTuple: one is built per event, on the hot path)."""

    organization_id: UUID
    event_id: str
    project_id: UUID | None
    user_id: UUID | None
    endpoint: str
    method: str
    status_code: int
    response_time_ms: int | None
    occurred_at: datetime
    prompt_tokens: int | None
    completion_tokens: int | None
    total_tokens: int | None
    model: str | None
    cost_usd: Decimal | None
    source_partition: int
    source_offset: int
    source: Source
    payload: bytes

    def content(self) -> tuple[Any, ...]:
        """Everything that makes two deliveries of one event id the same event."""
        return (
            self.project_id,
            self.user_id,
            self.endpoint,
            self.method,
            self.status_code,
            self.response_time_ms,
            self.occurred_at,
            self.prompt_tokens,
            self.completion_tokens,
            self.total_tokens,
            self.model,
            self.cost_usd,
        )


@dataclass(slots=True)
class ProviderMessage:
    """A validated provider envelope and its ledger lines (provider ids, not yet attributed or priced)."""

    source: Source
    payload: bytes
    provider: str
    ai_organization_id: str
    api_version: str
    collected_at: datetime
    lines: list[LedgerLine] = field(default_factory=list)
    # Every bucket's (report, start, end), empty ones too: an empty snapshot retires the window's earlier lines.
    windows: list[tuple[str, datetime, datetime]] = field(default_factory=list)


# Confluent Schema Registry's wire format, as its JSON Schema serializer writes it: a zero magic byte and a 4-byte
# schema id before the JSON. JSON never starts with a zero byte, so the frame is unambiguous. The id is not looked
# up (nothing is fetched at run time): the message is validated against the worker's own models, as any other.
SCHEMA_REGISTRY_MAGIC = b"\x00"
SCHEMA_REGISTRY_HEADER = 5  # bytes: the magic byte and the big-endian schema id


def parse_json(payload: bytes, *, max_bytes: int) -> dict[str, Any]:
    if len(payload) > max_bytes:
        raise InvalidInput(Reason.OVERSIZED, f"{len(payload)} bytes, more than the limit of {max_bytes}")
    if payload[:1] == SCHEMA_REGISTRY_MAGIC and len(payload) > SCHEMA_REGISTRY_HEADER:
        payload = payload[SCHEMA_REGISTRY_HEADER:]
    try:
        parsed = jiter.from_json(
            payload, float_mode="decimal", catch_duplicate_keys=True, allow_inf_nan=True, cache_mode="keys"
        )
    except ValueError as exc:
        message = str(exc)
        try:
            payload.decode("utf-8")
        except UnicodeDecodeError as utf8:
            raise InvalidInput(Reason.NOT_UTF8, f"not UTF-8 at byte {utf8.start}") from None
        if "duplicate key" in message:
            raise InvalidInput(Reason.DUPLICATE_KEY, message) from None
        if any(marker in message for marker in _OUT_OF_RANGE):  # valid JSON, absurd magnitude
            raise InvalidInput(
                Reason.INVALID_NUMBER, f"number out of range ({message.rpartition(' at ')[2]})"
            ) from None
        raise InvalidInput(Reason.NOT_JSON, message) from None
    if not isinstance(parsed, dict):
        raise InvalidInput(Reason.SCHEMA_VIOLATION, f"the message must be a JSON object, not {type(parsed).__name__}")
    return parsed


def _absurd_number(value: Any) -> bool:
    """A non-integer JSON number that is not finite, or too large for any count."""
    if not isinstance(value, (Decimal, float)):
        return False
    number = Decimal(value)
    return not number.is_finite() or abs(number) >= MAX_MAGNITUDE


def reason_for(error: ValidationError) -> tuple[Reason, str]:
    """The most specific reason among a validation error's details, and a short readable detail."""
    chosen = Reason.SCHEMA_VIOLATION
    parts = []
    for item in error.errors(include_url=False):
        loc = item["loc"]
        last = str(loc[-1]) if loc else ""
        reason = _CUSTOM_REASONS.get(item["type"]) or NATIVE_REASONS.get(item["type"], Reason.SCHEMA_VIOLATION)
        message = item["msg"]
        if item["type"] == "int_type" and _absurd_number(item.get("input")):  # NaN or 1e400 where a count goes
            reason, message = Reason.INVALID_NUMBER, "Input should be an integer, not NaN, Infinity or beyond 1e15"
        if item["type"] == "literal_error" and last in SOURCE_FIELDS and len(loc) == 1:
            reason = Reason.UNSUPPORTED_SOURCE
        if last in PLAIN_RANGE_FIELDS:
            reason = Reason.SCHEMA_VIOLATION
        if chosen is Reason.SCHEMA_VIOLATION and reason is not Reason.SCHEMA_VIOLATION:
            chosen = reason
        parts.append(f"{'.'.join(str(p) for p in loc) or '<message>'}: {message}")
    detail = "; ".join(parts[:5]) + (f"; and {len(parts) - 5} more" if len(parts) > 5 else "")
    return chosen, detail[:MAX_DETAIL]


def _clean(detail: str) -> str:
    """Detail as PostgreSQL text can hold it: messages may echo input (a currency code), NUL included."""
    return detail.replace("\x00", "\\x00")[:MAX_DETAIL]


def _organization_hint(parsed: dict[str, Any]) -> UUID | None:
    value = parsed.get("organization_id")
    if isinstance(value, str):
        try:
            return UUID(value)
        except ValueError:
            return None
    return None


def decode_api_event(payload: bytes, source: Source, *, max_bytes: int) -> ApiEvent | Quarantined:
    """An API-usage event, or its quarantine outcome. The fast path validates the parsed object into plain dicts
    (``ApiUsageFields``); anything it refuses takes the strict path (``ApiUsageEvent``), which names the reason,
    so a bad message is quarantined exactly as before and a good one the fast path missed still lands."""
    try:
        parsed = parse_json(payload, max_bytes=max_bytes)
    except InvalidInput as bad:
        return Quarantined(source, payload, bad.reason, _clean(bad.detail))
    event = _fast_api_event(parsed, source, payload)
    return event if event is not None else strict_api_event(parsed, source, payload)


# The organizations, projects and users of a stream recur in every batch: their UUIDs are parsed once and
# remembered by their text (pydantic's own UUID validator, as the model's fields; the same value for the same
# text), up to this many, then forgotten and parsed again.
UUID_MEMO_SIZE = 65_536  # distinct UUID texts
_uuids: dict[str, UUID] = {}


def to_uuid(text: str) -> UUID:
    """A UUID field's value, as ``ApiUsageEvent`` reads it; raises ``ValidationError`` as it does."""
    found = _uuids.get(text)
    if found is None:
        found = UUID_FIELD.validate_python(text)
        if len(_uuids) >= UUID_MEMO_SIZE:
            _uuids.clear()
        _uuids[text] = found
    return found


def _fast_api_event(parsed: dict[str, Any], source: Source, payload: bytes) -> ApiEvent | None:
    """The event if ``ApiUsageFields`` and the models' two Python checks accept it, else None. The same field
    types as ``ApiUsageEvent``, so what this accepts the model accepts, with the same values."""
    try:
        fields = API_USAGE_FIELDS.validate_python(parsed)
        organization_id = to_uuid(fields["organization_id"])
        project = fields.get("project_id")
        project_id = None if project is None else to_uuid(project)
        user = fields.get("user_id")
        user_id = None if user is None else to_uuid(user)
        occurred_at = check_time(fields["occurred_at"])
        usage = fields.get("token_usage")
        cost = None if usage is None else usage.get("cost_usd")
        if cost is not None:
            cost = check_request_cost(cost)
    except (ValueError, ArithmeticError):  # ValidationError, PydanticCustomError, and whatever else: the strict
        return None  # path decides (and raises, if the models do)
    return ApiEvent(
        organization_id,
        fields["event_id"],
        project_id,
        user_id,
        fields["endpoint"],
        fields["method"],
        fields["status_code"],
        fields.get("response_time_ms"),
        occurred_at,
        None if usage is None else usage.get("prompt_tokens", 0),
        None if usage is None else usage.get("completion_tokens", 0),
        None if usage is None else usage.get("total_tokens", 0),
        None if usage is None else usage.get("model"),
        cost,
        source.partition,
        source.offset,
        source,
        payload,
    )


def strict_api_event(parsed: dict[str, Any], source: Source, payload: bytes) -> ApiEvent | Quarantined:
    """The reference path: the contract's model, and the reason of whatever it refuses."""
    try:
        event = ApiUsageEvent.model_validate(parsed)
    except ValidationError as exc:
        reason, detail = reason_for(exc)
        return Quarantined(source, payload, reason, _clean(detail), _organization_hint(parsed))
    usage = event.token_usage
    return ApiEvent(
        event.organization_id,
        event.event_id,
        event.project_id,
        event.user_id,
        event.endpoint,
        event.method,
        event.status_code,
        event.response_time_ms,
        event.occurred_at,
        None if usage is None else usage.prompt_tokens,
        None if usage is None else usage.completion_tokens,
        None if usage is None else usage.total_tokens,
        None if usage is None else usage.model,
        None if usage is None else usage.cost_usd,
        source.partition,
        source.offset,
        source,
        payload,
    )


def _check_lines(lines: list[LedgerLine]) -> None:
    """What the ledger's constraints need beyond each field's own bounds: a line item built from several
    fields (or named by a new *_tokens field) fits cost_data.line_item, and lines the pipeline may sum into
    one row (same key in one message) stay within the amount and quantity bounds. Amounts are checked over the
    whole message, quantities over each bucket window (a row never holds lines of two windows): a documented
    page of 1,440 one-minute buckets of a vector store holding 700 GB adds up to 1.008e15 bytes, and is read.
    Both bound every such sum."""
    amounts = Decimal(0)
    quantities: dict[tuple[datetime, datetime], Decimal] = defaultdict(Decimal)
    with localcontext(EXACT):  # rounding could carry a total just below a bound across it (one context per message)
        for line in lines:
            if "\x00" in line.line_item:
                raise InvalidInput(Reason.INVALID_TEXT, "a line item holds a NUL character")
            if len(line.line_item) > MAX_LINE_ITEM:
                raise InvalidInput(
                    Reason.SCHEMA_VIOLATION,
                    f"a line item of {len(line.line_item)} characters, more than {MAX_LINE_ITEM}",
                )
            if line.amount is not None:
                amounts += abs(line.amount)
            if line.quantity is not None:
                quantities[(line.bucket_start, line.bucket_end)] += line.quantity
    if amounts >= MAX_AMOUNT:
        raise InvalidInput(
            Reason.INVALID_NUMBER, f"the message's amounts add up to {amounts:.3E}, {MAX_AMOUNT} or more"
        )
    largest = max(quantities.values(), default=Decimal(0))
    if largest >= MAX_MAGNITUDE:
        raise InvalidInput(
            Reason.INVALID_NUMBER,
            f"the quantities of one bucket of the message add up to {largest:.3E}, {MAX_MAGNITUDE} or more",
        )


def decode_provider_message(
    payload: bytes, source: Source, *, max_bytes: int, max_results: int
) -> ProviderMessage | Quarantined:
    try:
        parsed = parse_json(payload, max_bytes=max_bytes)
        envelope = ProviderEnvelope.model_validate(parsed)
        raw_buckets = envelope.buckets()
        total = sum(
            len(b["results"]) for b in raw_buckets if isinstance(b, dict) and isinstance(b.get("results"), list)
        )
        if total > max_results:
            raise InvalidInput(Reason.TOO_MANY_RESULTS, f"{total} results, more than the limit of {max_results}")
        model = BUCKET_MODELS[(envelope.provider, envelope.api_version)]
        message = ProviderMessage(
            source=source,
            payload=payload,
            provider=envelope.provider,
            ai_organization_id=envelope.ai_organization_id,
            api_version=envelope.api_version,
            collected_at=envelope.collected_at,
        )
        for index, raw in enumerate(raw_buckets):
            try:
                bucket: BaseModel = model.model_validate(raw)
                bucket_lines = list(
                    lines_for(
                        envelope.provider, envelope.api_version, envelope.ai_organization_id, bucket, envelope.endpoint
                    )
                )
                window = window_of(bucket)
                message.windows.extend(
                    (report, *window)
                    for report in bucket_reports(
                        envelope.provider, envelope.api_version, bucket_lines, envelope.endpoint
                    )
                )
                message.lines.extend(bucket_lines)
            except ValidationError as exc:
                reason, detail = reason_for(exc)
                raise InvalidInput(reason, f"bucket {index}: {detail}") from None
            except InvalidInput as bad:
                raise InvalidInput(bad.reason, f"bucket {index}: {bad.detail}") from None
        _check_lines(message.lines)
    except InvalidInput as bad:
        return Quarantined(source, payload, bad.reason, _clean(bad.detail))
    except ValidationError as exc:
        reason, detail = reason_for(exc)
        return Quarantined(source, payload, reason, _clean(detail))
    return message
