"""The hostile messages too big (or too odd) to keep as files: the manifest names them under "generate".

Each generator returns the record as a producer would send it, with the same ``{{PLACEHOLDERS}}`` as the
files (``tests/hostile/corpus.py`` fills them in). ``python -m tests.hostile.generate DIR`` writes them to
DIR for inspection.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MIB = 1024 * 1024
RESULTS = 100_000
NOV1 = 1761955200  # 2025-11-01T00:00:00Z, Unix seconds
DAY = 86400
NEARLY_1E15 = 999_999_999_999_999  # the largest token count a single field accepts


@dataclass(frozen=True)
class Generated:
    value: bytes | None  # None: a tombstone
    key: bytes | None = None


def _compact(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def _page(provider: str, version: str, buckets: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "provider": provider,
        "ai_organization_id": "{{OPENAI_ORG}}" if provider == "openai" else "{{ANTHROPIC_ORG}}",
        "api_version": version,
        "collected_at": "2025-11-20T06:00:00Z",
        "page": {"object": "page", "data": buckets, "has_more": False, "next_page": None},
    }


def api_event_5_mib() -> Generated:
    """A valid API-usage event padded to 5 MiB by an extra field (extra fields are ignored)."""
    event = {
        "event_id": "hostile-5-mib",
        "occurred_at": "2025-11-21T10:00:00Z",
        "organization_id": "{{ORG_ID}}",
        "endpoint": "/v1/chat/completions",
        "method": "POST",
        "status_code": 200,
        "padding": "",
    }
    head = _compact(event)
    return Generated(head.replace(b'"padding":""', b'"padding":"' + b"x" * (5 * MIB - len(head)) + b'"'))


def tombstone() -> Generated:
    return Generated(None, key=b"tombstone")


def openai_costs_100k_results() -> Generated:
    results = [{"amount": {"value": 1, "currency": "usd"}} for _ in range(RESULTS)]
    bucket = {"object": "bucket", "start_time": NOV1, "end_time": NOV1 + DAY, "results": results}
    return Generated(_compact(_page("openai", "costs_v1", [bucket])))


def openai_usage_100k_results() -> Generated:
    bucket = {"object": "bucket", "start_time": NOV1, "end_time": NOV1 + DAY, "results": [{}] * RESULTS}
    return Generated(_compact(_page("openai", "usage_v1", [bucket])))


def anthropic_usage_100k_results() -> Generated:
    bucket = {"starting_at": "2025-11-01T00:00:00Z", "ending_at": "2025-11-02T00:00:00Z", "results": [{}] * RESULTS}
    return Generated(_compact(_page("anthropic", "usage_v1", [bucket])))


def openai_usage_tokens_sum_beyond_bound() -> Generated:
    """1,001 results of one model and project: the summed ledger line would exceed 1e18 tokens."""
    result = {"model": "gpt-4o", "project_id": "proj_a", "input_tokens": NEARLY_1E15}
    bucket = {"object": "bucket", "start_time": NOV1, "end_time": NOV1 + DAY, "results": [result] * 1001}
    return Generated(_compact(_page("openai", "usage_v1", [bucket])))


GENERATORS: dict[str, Callable[[], Generated]] = {
    "api_event_5_mib": api_event_5_mib,
    "tombstone": tombstone,
    "openai_costs_100k_results": openai_costs_100k_results,
    "openai_usage_100k_results": openai_usage_100k_results,
    "anthropic_usage_100k_results": anthropic_usage_100k_results,
    "openai_usage_tokens_sum_beyond_bound": openai_usage_tokens_sum_beyond_bound,
}


if __name__ == "__main__":  # pragma: no cover - a developer's tool
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "hostile-generated")
    out.mkdir(parents=True, exist_ok=True)
    for name, generate in GENERATORS.items():
        generated = generate()
        (out / f"{name}.bin").write_bytes(generated.value or b"")
        print(out / f"{name}.bin", len(generated.value or b""), "bytes")
