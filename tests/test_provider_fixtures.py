"""Every documented provider result shape through the real pipeline, into the database, with the exact ledger
lines and amounts it must produce.

The fixtures (tests/fixtures/providers/*.json) name their documentation pages. The OpenAI ones are the example
responses of openai/openai-openapi's ``openapi.json`` for each Usage API endpoint and for the Costs API, plus
results grouped as the collector asks for them; the expected amounts were worked out by hand from the catalogue's
published prices (or the fixture's overrides), not by the code under test.
"""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from tests.factories import add_price, make_org
from tests.feeding import Feeder
from worker.providers import ENDPOINT_OBJECTS

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "providers"
FILES = sorted(FIXTURES.glob("*.json"))


def _key(*values: Any) -> tuple[Any, ...]:
    """Sortable, with None first."""
    return tuple((value is not None, value if value is not None else 0) for value in values)


def _load(path: Path) -> dict[str, Any]:
    fixture: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return fixture


def test_every_usage_endpoint_has_a_fixture_and_every_fixture_names_its_documentation() -> None:
    names = {path.name for path in FILES}
    assert {f"openai-usage-{endpoint}.json" for endpoint in ENDPOINT_OBJECTS} <= names
    assert {"openai-costs.json", "anthropic-cost-report.json", "anthropic-usage-messages.json"} <= names
    for path in FILES:
        documentation = _load(path)["documentation"]
        assert documentation, path.name
        assert all(isinstance(page, str) for page in documentation), path.name


@pytest.mark.parametrize("path", FILES, ids=[path.stem for path in FILES])
async def test_documented_shape_lands_exactly(path: Path, db: asyncpg.Connection, feeder: Feeder) -> None:
    fixture = _load(path)
    provider = fixture.get("provider", "openai")
    api_version = fixture.get("api_version", "usage_v1")
    org = await make_org(db, provider=provider, project_ids=("wrkspc_01",) if provider == "anthropic" else ("proj_a",))
    for price in fixture["overrides"]:
        await add_price(db, provider, price["model"], price["token_type"], price["price_per_million"])
    envelope: dict[str, Any] = {
        "provider": provider,
        "ai_organization_id": org.ai_org,
        "api_version": api_version,
        "collected_at": "2026-11-20T06:00:00Z",
        "page": fixture["page"],
    }
    if "endpoint" in fixture:
        envelope["endpoint"] = fixture["endpoint"]
    outcome = await feeder.buckets(envelope)
    assert not outcome.quarantine, outcome.quarantine

    rows = await db.fetch("SELECT project_id, line_item, quantity, unit, amount, metadata FROM cost_data")
    projects = {value: key for key, value in org.projects.items()}
    got = sorted(
        _key(
            projects.get(row["project_id"]),
            row["line_item"],
            row["quantity"],
            row["unit"],
            row["amount"],
        )
        for row in rows
    )

    def number(value: str | None) -> Decimal | None:
        return None if value is None else Decimal(value)

    want = sorted(
        _key(e["project"], e["line_item"], number(e["quantity"]), e["unit"], number(e["amount"]))
        for e in fixture["expected"]
    )
    assert got == want
    unpriced = sum(1 for e in fixture["expected"] if e["amount"] is None and e["quantity"] not in (None, "0"))
    assert sum(outcome.unpriced.values()) == unpriced
    for row in rows:  # every priced usage line explains its price
        if api_version == "usage_v1" and row["amount"] is not None and row["quantity"]:
            source = json.loads(row["metadata"])["price_source"]
            assert source.startswith(("override:", "genai-prices ")), source
