"""The input contracts, as pydantic models: API-usage events and provider cost/usage envelopes.

Field validators raise ``PydanticCustomError`` whose *type* is a quarantine ``Reason`` value, so a
validation failure maps to a precise reason code. Unknown extra fields are ignored, never an error.
The JSON Schemas under ``schema/events/`` are generated from these models (``python -m worker.models``).
"""

from __future__ import annotations

import json
import re
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any, Literal, NotRequired
from uuid import UUID

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    PlainValidator,
    Strict,
    TypeAdapter,
    WithJsonSchema,
    model_validator,
)
from pydantic_core import PydanticCustomError
from typing_extensions import TypedDict  # pydantic needs this one before Python 3.12

from worker.errors import InvalidInput
from worker.limits import MAX_LINE_ITEM, MAX_TOKENS
from worker.quarantine import Reason

# --- bounds, with units ---------------------------------------------------------------------------------
EARLIEST_TIMESTAMP = datetime(2015, 1, 1, tzinfo=UTC)  # nothing these providers bill predates it
MAX_FUTURE = timedelta(days=2)  # clock skew plus the provider's current, still-open bucket
MAX_WINDOW = timedelta(days=31)  # longest bucket accepted (providers use 1m, 1h and 1d)
MAX_AMOUNT = Decimal("1e12")  # money, in the currency's unit (matches the database CHECK)
MAX_REQUEST_COST = Decimal("1e9")  # one API request's estimated cost, USD (matches api_usage's CHECK)
MAX_DECIMAL_PLACES = 34  # float noise such as 3.3306690738754696e-16 has 31

_ISO_4217_CODES = """
AED AFN ALL AMD ANG AOA ARS AUD AWG AZN BAM BBD BDT BGN BHD BIF BMD BND BOB BOV BRL BSD BTN BWP BYN
BZD CAD CDF CHE CHF CHW CLF CLP CNY COP COU CRC CUC CUP CVE CZK DJF DKK DOP DZD EGP ERN ETB EUR FJD
FKP GBP GEL GHS GIP GMD GNF GTQ GYD HKD HNL HTG HUF IDR ILS INR IQD IRR ISK JMD JOD JPY KES KGS KHR
KMF KPW KRW KWD KYD KZT LAK LBP LKR LRD LSL LYD MAD MDL MGA MKD MMK MNT MOP MRU MUR MVR MWK MXN MXV
MYR MZN NAD NGN NIO NOK NPR NZD OMR PAB PEN PGK PHP PKR PLN PYG QAR RON RSD RUB RWF SAR SBD SCR SDG
SEK SGD SHP SLE SLL SOS SRD SSP STN SVC SYP SZL THB TJS TMT TND TOP TRY TTD TWD TZS UAH UGX USD USN
UYI UYU UYW UZS VED VES VND VUV WST XAF XAG XAU XBA XBB XBC XBD XCD XCG XDR XOF XPD XPF XPT XSU XUA
YER ZAR ZMW ZWG ZWL
"""
ISO_4217 = frozenset(_ISO_4217_CODES.split())  # active codes, minus XTS (testing) and XXX (none)
# ISO 4217's minor unit (digits after the point) of the codes whose minor unit is not 2; None: the code has none
# (precious metals, bond market and accounting units). Anthropic's cost report gives amounts in the lowest unit.
_MINOR_UNITS = {  # digits -> codes; None: no minor unit
    0: "BIF CLP DJF GNF ISK JPY KMF KRW PYG RWF UGX UYI VND VUV XAF XOF XPF",
    3: "BHD IQD JOD KWD LYD OMR TND",
    4: "CLF UYW",
    None: "XAG XAU XBA XBB XBC XBD XDR XPD XPT XSU XUA",
}
MINOR_UNIT_EXCEPTIONS: dict[str, int | None] = {
    code: digits for digits, codes in _MINOR_UNITS.items() for code in codes.split()
}


def minor_unit_digits(currency: str) -> int:
    """How many digits of a currency's lowest unit make one unit (USD 2: cents; JPY 0; KWD 3). A code without a
    minor unit is ``unknown_currency``: an amount in its lowest unit cannot be read."""
    digits = MINOR_UNIT_EXCEPTIONS.get(currency, 2)
    if digits is None:
        raise InvalidInput(Reason.UNKNOWN_CURRENCY, f"{currency} has no minor unit to read an amount in")
    return digits


def _fail(reason: Reason, message: str, **context: Any) -> PydanticCustomError:
    return PydanticCustomError(reason.value, message, context or None)


# --- scalar types -----------------------------------------------------------------------------------------
# Constraints are pydantic's native ones wherever possible (they run in Rust, on the hot path); the decoder
# maps their error types to reasons (see ``worker.decode.NATIVE_REASONS``).

_NO_NUL = r"^[^\x00]*$"  # PostgreSQL text cannot hold NUL; jiter already rejects lone surrogates
ShortText = Annotated[str, Strict(), Field(max_length=64, pattern=_NO_NUL)]
Name = Annotated[str, Strict(), Field(max_length=255, pattern=_NO_NUL)]
LongText = Annotated[str, Strict(), Field(max_length=MAX_LINE_ITEM, pattern=_NO_NUL)]  # line items and the like
RequiredName = Annotated[str, Strict(), Field(min_length=1, max_length=255, pattern=_NO_NUL)]
EventId = Annotated[str, Strict(), Field(min_length=1, max_length=128, pattern=_NO_NUL)]
Unit = Annotated[str, Strict(), Field(max_length=32, pattern=_NO_NUL)]  # cost_data.unit is varchar(32)

# Token counts and other tallies: JSON integers only (no strings, no 1.0), never negative.
Count = Annotated[int, Strict(), Field(ge=0, lt=MAX_TOKENS)]

_NUMBER_SCHEMA = WithJsonSchema({"anyOf": [{"type": "number"}, {"type": "string", "pattern": r"^-?\d+(\.\d+)?$"}]})
_AS_STR = PlainSerializer(str, return_type=str)


# What a decimal string may look like: ASCII digits, an optional sign, point and exponent. Python's Decimal
# also reads other scripts' digits ("١٢" is 12), digit separators ("1_000") and surrounding whitespace.
_DECIMAL_STRING = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")


def _decimal_check(lower: Decimal, upper: Decimal, *, lower_inclusive: bool) -> Callable[[Any], Decimal]:
    """One check for money: a single Python call per value on the hot path (pydantic's own Decimal
    constraints check decimal places in Python, and chained validators are a call each)."""

    def validate(value: Any) -> Decimal:
        if isinstance(value, Decimal):
            number = value
        elif isinstance(value, int) and not isinstance(value, bool):
            number = Decimal(value)
        elif isinstance(value, str):
            if not _DECIMAL_STRING.fullmatch(value):
                raise _fail(Reason.INVALID_NUMBER, "not a plain decimal number")
            number = Decimal(value)
        else:
            raise PydanticCustomError("decimal_type", "a number or a decimal string is required")
        if not number.is_finite():
            raise _fail(Reason.INVALID_NUMBER, "not a finite number: {value}", value=str(number))
        exponent = number.as_tuple().exponent
        assert isinstance(exponent, int)
        if exponent < -MAX_DECIMAL_PLACES:
            raise _fail(Reason.INVALID_AMOUNT, "more than {places} decimal places", places=MAX_DECIMAL_PLACES)
        if number < lower or (number == lower and not lower_inclusive):
            raise _fail(Reason.INVALID_AMOUNT, "below the allowed range: {value}", value=str(number)[:60])
        if number >= upper:
            raise _fail(Reason.INVALID_NUMBER, "absurd magnitude: {value}", value=str(number)[:60])
        if number.is_zero() and number.is_signed():
            raise _fail(Reason.INVALID_NUMBER, "negative zero (money computed in floats?)")
        return number

    return validate


def _decimal_validator(lower: Decimal, upper: Decimal, *, lower_inclusive: bool) -> PlainValidator:
    return PlainValidator(_decimal_check(lower, upper, lower_inclusive=lower_inclusive))


# A signed amount of money (provider credits can be negative). Numbers arrive as exact Decimals: the JSON
# parser never goes through float.
Money = Annotated[Decimal, _decimal_validator(-MAX_AMOUNT, MAX_AMOUNT, lower_inclusive=False), _NUMBER_SCHEMA, _AS_STR]
# Money that cannot be negative (a provider quantity).
Cost = Annotated[Decimal, _decimal_validator(Decimal(0), MAX_AMOUNT, lower_inclusive=True), _NUMBER_SCHEMA, _AS_STR]
# One API request's estimated cost (api_usage.cost_usd's CHECK).
check_request_cost = _decimal_check(Decimal(0), MAX_REQUEST_COST, lower_inclusive=True)
RequestCost = Annotated[Decimal, PlainValidator(check_request_cost), _NUMBER_SCHEMA, _AS_STR]


_EARLIEST = EARLIEST_TIMESTAMP.timestamp()
_MAX_FUTURE = MAX_FUTURE.total_seconds()


def check_time(value: datetime) -> datetime:
    """Bounds every timestamp must respect (the upper one moves with the clock). On the hot path: compares
    POSIX seconds, which is several times cheaper than aware-datetime arithmetic."""
    seconds = value.timestamp()
    if seconds < _EARLIEST:
        raise _fail(Reason.INVALID_TIMESTAMP, "timestamp before 2015: {value}", value=value.isoformat())
    if seconds > time.time() + _MAX_FUTURE:
        raise _fail(Reason.INVALID_TIMESTAMP, "timestamp in the future: {value}", value=value.isoformat())
    return value


def _from_unix(value: Any) -> Any:
    if isinstance(value, bool) or not isinstance(value, int):
        return value
    try:
        return datetime.fromtimestamp(value, tz=UTC)
    except (OverflowError, ValueError, OSError):
        raise _fail(Reason.INVALID_TIMESTAMP, "unix time out of range: {value}", value=str(value)[:40]) from None


# An ISO 8601 timestamp with a time zone, within sane bounds.
Timestamp = Annotated[AwareDatetime, AfterValidator(check_time)]
# Unix seconds (OpenAI's bucket bounds).
UnixTime = Annotated[
    AwareDatetime, BeforeValidator(_from_unix), AfterValidator(check_time), WithJsonSchema({"type": "integer"})
]


def _currency(value: Any) -> Any:
    if isinstance(value, str):
        code = value.strip().upper()
        if code not in ISO_4217:
            raise _fail(Reason.UNKNOWN_CURRENCY, "not an ISO 4217 currency: {value}", value=value[:12])
        return code
    return value


Currency = Annotated[str, BeforeValidator(_currency), Strict(), WithJsonSchema({"type": "string", "minLength": 3})]


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True, str_strip_whitespace=False)


def _window(start: datetime, end: datetime) -> None:
    if end <= start:
        raise _fail(Reason.INVALID_WINDOW, "bucket ends at or before its start")
    if end - start > MAX_WINDOW:
        raise _fail(Reason.INVALID_WINDOW, "bucket longer than 31 days")


# ============================================================================ API-usage events


class TokenUsage(_Model):
    prompt_tokens: Count = 0
    completion_tokens: Count = 0
    total_tokens: Count = 0
    model: Name | None = None
    cost_usd: RequestCost | None = None


class ApiUsageEvent(_Model):
    """One request through the platform's API (topic ``usage.api-events``)."""

    event_id: EventId
    occurred_at: Timestamp
    organization_id: UUID
    project_id: UUID | None = None
    user_id: UUID | None = None
    endpoint: RequiredName
    method: Literal["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]  # case-sensitive (RFC 9110)
    status_code: Annotated[int, Strict(), Field(ge=100, le=599)]
    response_time_ms: Annotated[Count, Field(le=86_400_000)] | None = None
    token_usage: TokenUsage | None = None


# The same contract as TypedDicts, for the decoder's fast path (``worker.decode``): the same field types, so the
# same rules, but validated into plain dicts, without two model instances per event (half of model_validate's
# time). The two Python validators (the timestamp's bounds, the cost's exact-number rules) are left out here and
# called by the decoder directly (``check_time``, ``check_request_cost``): cheaper than a call from pydantic. So
# are the UUIDs (``UUID_FIELD``, pydantic's own UUID validator), remembered by their text.
# Whatever this path refuses goes through ``ApiUsageEvent``, which names the reason; a unit test checks that the
# fields match the models' and that both paths agree on generated and hostile messages.


class TokenUsageFields(TypedDict, total=False):
    prompt_tokens: Count
    completion_tokens: Count
    total_tokens: Count
    model: Name | None
    cost_usd: Any  # RequestCost: ``check_request_cost``


UuidText = Annotated[str, Strict()]  # UUID: the decoder's ``to_uuid`` (pydantic's UUID rules, remembered)


class ApiUsageFields(TypedDict):
    event_id: EventId
    occurred_at: AwareDatetime  # Timestamp: ``check_time``
    organization_id: UuidText
    project_id: NotRequired[UuidText | None]
    user_id: NotRequired[UuidText | None]
    endpoint: RequiredName
    method: Literal["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]
    status_code: Annotated[int, Strict(), Field(ge=100, le=599)]
    response_time_ms: NotRequired[Annotated[Count, Field(le=86_400_000)] | None]
    token_usage: NotRequired[TokenUsageFields | None]


API_USAGE_FIELDS: TypeAdapter[ApiUsageFields] = TypeAdapter(ApiUsageFields)
UUID_FIELD: TypeAdapter[UUID] = TypeAdapter(UUID)  # what ApiUsageEvent's UUID fields run


# ============================================================================ provider envelopes


class ProviderEnvelope(_Model):
    """What producers publish to ``cost.provider-buckets``: a provider's response, verbatim, wrapped.

    ``page`` is the provider's page object (``data`` = list of buckets); ``bucket`` is one bucket object.
    Exactly one of them is present.
    """

    provider: Literal["openai", "anthropic"]
    ai_organization_id: RequiredName
    api_version: Literal["usage_v1", "costs_v1"]
    collected_at: Timestamp
    # OpenAI usage_v1: the Usage API endpoint (``completions``, ``images``, ...); absent, it follows from the
    # results' ``object`` (and a bucket without results is ``completions``).
    endpoint: ShortText | None = None
    page: dict[str, Any] | None = None
    bucket: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _one_body(self) -> ProviderEnvelope:
        if (self.page is None) == (self.bucket is None):
            raise _fail(Reason.SCHEMA_VIOLATION, "exactly one of 'page' and 'bucket' is required")
        return self

    def buckets(self) -> list[Any]:
        if self.bucket is not None:
            return [self.bucket]
        assert self.page is not None
        data = self.page.get("data")
        if not isinstance(data, list):
            raise InvalidInput(Reason.SCHEMA_VIOLATION, "page.data must be a list of buckets")
        return data


# --- OpenAI ---------------------------------------------------------------------------------------------


class OpenAIAmount(_Model):
    value: Money
    currency: Currency


class OpenAICostResult(_Model):
    object: ShortText | None = None
    amount: OpenAIAmount
    line_item: LongText | None = None
    project_id: Name | None = None
    api_key_id: Name | None = None
    quantity: Cost | None = None
    quantity_unit: Unit | None = None


class OpenAIUsageResult(_Model):
    """One result of any Usage API endpoint; ``object`` says which (``organization.usage.<name>.result``).

    The fields are the union of the endpoints' documented fields (openai/openai-openapi, ``openapi.json``,
    ``components.schemas.Usage*Result``); ``worker.providers`` reads the ones of the result's endpoint. Counts
    are optional, so that a missing breakdown can be told from a reported zero. Only the grouping fields are
    null unless grouped by.
    """

    model_config = ConfigDict(extra="allow", frozen=True)  # newer fields are ignored, never priced twice

    object: ShortText | None = None
    # completions (input_tokens also: embeddings, moderations)
    input_tokens: Count | None = None
    output_tokens: Count | None = None
    input_cached_tokens: Count | None = None
    input_cache_write_tokens: Count | None = None
    input_uncached_tokens: Count | None = None
    input_text_tokens: Count | None = None
    input_audio_tokens: Count | None = None
    input_image_tokens: Count | None = None
    input_cached_text_tokens: Count | None = None
    input_cached_audio_tokens: Count | None = None
    input_cached_image_tokens: Count | None = None
    output_text_tokens: Count | None = None
    output_audio_tokens: Count | None = None
    output_image_tokens: Count | None = None
    # images, audio speeches and transcriptions, vector stores, code interpreter, file search, web search
    images: Count | None = None
    characters: Count | None = None
    seconds: Count | None = None
    usage_bytes: Count | None = None
    num_sessions: Count | None = None
    num_requests: Count | None = None
    num_model_requests: Count = 0
    # grouping fields
    project_id: Name | None = None
    user_id: Name | None = None
    api_key_id: Name | None = None
    model: Name | None = None
    batch: Annotated[bool, Strict()] | None = None
    service_tier: ShortText | None = None
    size: ShortText | None = None
    source: ShortText | None = None
    vector_store_id: Name | None = None
    context_level: ShortText | None = None


class _OpenAIBucket(_Model):
    object: ShortText | None = None
    start_time: UnixTime
    end_time: UnixTime

    @model_validator(mode="after")
    def _check_window(self) -> _OpenAIBucket:
        _window(self.start_time, self.end_time)
        return self


class OpenAICostBucket(_OpenAIBucket):
    results: list[OpenAICostResult]


class OpenAIUsageBucket(_OpenAIBucket):
    results: list[OpenAIUsageResult]


# --- Anthropic ------------------------------------------------------------------------------------------


class AnthropicCostResult(_Model):
    amount: Money  # a decimal string, in the lowest unit of ``currency`` (cents of USD: ``minor_unit_digits``)
    currency: Currency
    cost_type: ShortText | None = None
    description: LongText | None = None
    model: Name | None = None
    service_tier: ShortText | None = None
    token_type: ShortText | None = None
    context_window: ShortText | None = None
    workspace_id: Name | None = None
    inference_geo: ShortText | None = None
    speed: ShortText | None = None


class AnthropicCacheCreation(_Model):
    ephemeral_1h_input_tokens: Count = 0
    ephemeral_5m_input_tokens: Count = 0


class AnthropicServerToolUse(_Model):
    model_config = ConfigDict(extra="allow", frozen=True)

    web_search_requests: Count = 0


class AnthropicUsageResult(_Model):
    model_config = ConfigDict(extra="allow", frozen=True)

    uncached_input_tokens: Count = 0
    cache_read_input_tokens: Count = 0
    cache_creation: AnthropicCacheCreation | None = None
    output_tokens: Count = 0
    server_tool_use: AnthropicServerToolUse | None = None
    model: Name | None = None
    workspace_id: Name | None = None
    api_key_id: Name | None = None
    service_tier: ShortText | None = None
    context_window: ShortText | None = None
    inference_geo: ShortText | None = None
    speed: ShortText | None = None
    account_id: Name | None = None
    service_account_id: Name | None = None

    @model_validator(mode="after")
    def _some_usage(self) -> AnthropicUsageResult:
        # Each count has a default (a result may leave one out), but a result with none of them is no usage result
        # (a cost report result sent as usage_v1): read as zero tokens, it would retire the window's real usage.
        if not self.model_fields_set & ANTHROPIC_USAGE_COUNTS:
            raise _fail(Reason.SCHEMA_VIOLATION, "a usage result without any usage count (a cost report result?)")
        return self


ANTHROPIC_USAGE_COUNTS = frozenset(
    {"uncached_input_tokens", "cache_read_input_tokens", "cache_creation", "output_tokens", "server_tool_use"}
)


class _AnthropicBucket(_Model):
    starting_at: Timestamp
    ending_at: Timestamp

    @model_validator(mode="after")
    def _check_window(self) -> _AnthropicBucket:
        _window(self.starting_at, self.ending_at)
        return self


class AnthropicCostBucket(_AnthropicBucket):
    results: list[AnthropicCostResult]


class AnthropicUsageBucket(_AnthropicBucket):
    results: list[AnthropicUsageResult]


BUCKET_MODELS: dict[tuple[str, str], type[_Model]] = {
    ("openai", "costs_v1"): OpenAICostBucket,
    ("openai", "usage_v1"): OpenAIUsageBucket,
    ("anthropic", "costs_v1"): AnthropicCostBucket,
    ("anthropic", "usage_v1"): AnthropicUsageBucket,
}


# ============================================================================ JSON Schema export

SCHEMA_FILES: dict[str, type[BaseModel]] = {
    "api-usage-event.schema.json": ApiUsageEvent,
    "provider-envelope.schema.json": ProviderEnvelope,
    "openai-costs-bucket.schema.json": OpenAICostBucket,
    "openai-usage-bucket.schema.json": OpenAIUsageBucket,
    "anthropic-costs-bucket.schema.json": AnthropicCostBucket,
    "anthropic-usage-bucket.schema.json": AnthropicUsageBucket,
}


def json_schemas() -> dict[str, str]:
    """File name -> JSON Schema text, generated from the models (what producers validate against)."""
    rendered = {}
    for name, model in SCHEMA_FILES.items():
        schema = model.model_json_schema(mode="validation")
        schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
        schema["$id"] = f"https://cost-worker.invalid/schema/events/{name}"
        rendered[name] = json.dumps(schema, indent=2, sort_keys=True) + "\n"
    return rendered


def write_json_schemas(directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in json_schemas().items():
        path = directory / name
        path.write_text(text, encoding="utf-8")
        written.append(path)
    return written


if __name__ == "__main__":  # pragma: no cover - `python -m worker.models schema/events`
    for path in write_json_schemas(Path(sys.argv[1] if len(sys.argv) > 1 else "schema/events")):
        print(path)
