"""Why a message was quarantined: the closed set of reason codes, and the quarantine record.

A bad message is an outcome, not a crash: decoding and attribution return ``Quarantined`` instead of
raising, the row is written in the batch's transaction, and the outbox mirrors it to the dead-letter topic.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import NamedTuple
from uuid import UUID


class Reason(StrEnum):
    # the bytes
    OVERSIZED = "oversized"  # larger than COST_WORKER_MAX_MESSAGE_BYTES
    NOT_UTF8 = "not_utf8"
    NOT_JSON = "not_json"  # malformed, truncated, too deeply nested
    DUPLICATE_KEY = "duplicate_key"  # a JSON object names the same key twice
    # the contract
    SCHEMA_VIOLATION = "schema_violation"  # wrong types, missing fields, unexpected nesting
    UNSUPPORTED_SOURCE = "unsupported_source"  # unknown provider, api_version, usage result object or endpoint
    INVALID_NUMBER = "invalid_number"  # NaN, Infinity, negative zero, absurd magnitude
    INVALID_AMOUNT = "invalid_amount"  # negative where not allowed, too many decimal places
    UNKNOWN_CURRENCY = "unknown_currency"  # not an ISO 4217 code
    INVALID_TIMESTAMP = "invalid_timestamp"  # no time zone, before 2015, far in the future
    INVALID_WINDOW = "invalid_window"  # bucket end not after start, or longer than 31 days
    INVALID_TEXT = "invalid_text"  # NUL bytes or unencodable characters
    TOO_MANY_RESULTS = "too_many_results"  # more than COST_WORKER_MAX_RESULTS_PER_MESSAGE
    INCONSISTENT_DATA = "inconsistent_data"  # e.g. token breakdowns beyond their totals, two currencies for a key
    OVERLAPPING_WINDOW = "overlapping_window"  # a bucket overlapping another window of its report (another width)
    # references (replayable once the platform has them)
    UNKNOWN_ORGANIZATION = "unknown_organization"
    UNKNOWN_PROJECT = "unknown_project"  # missing, or belongs to another organization
    UNKNOWN_USER = "unknown_user"  # missing, or belongs to another organization
    UNATTRIBUTED = "unattributed"  # provider ids that map to no project or organization
    AMBIGUOUS_ATTRIBUTION = "ambiguous_attribution"  # provider ids that map to more than one
    # history
    CONFLICTING_DUPLICATE = "conflicting_duplicate"  # an event id reused with different content


class Source(NamedTuple):
    """Where a message came from. (A NamedTuple: one is built per message, on the hot path.)"""

    topic: str
    partition: int
    offset: int
    key: bytes | None = None
    headers: tuple[tuple[str, bytes | None], ...] = ()


@dataclass(frozen=True, slots=True)
class Quarantined:
    source: Source
    payload: bytes
    reason: Reason
    detail: str
    organization_id: UUID | None = None
