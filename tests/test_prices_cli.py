"""``cost-worker prices`` as an operator runs it: a real process against the test's database."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import asyncpg

from tests.factories import envelope, make_org, openai_usage_bucket
from tests.feeding import Feeder
from tests.test_admin import cli
from worker.config import Settings

GOOD = """provider,model,token_type,price_per_million,effective_from,currency,note
openai,gpt-4o,input_text_tokens,2.00,2026-01-01,USD,negotiated
anthropic,claude-sonnet-4,uncached_input_tokens/service_tier=batch,1.40,2026-01-01T00:00:00Z,,
"""


async def test_import_list_and_show_overrides(db: asyncpg.Connection, settings: Settings, tmp_path: Path) -> None:
    path = tmp_path / "prices.csv"
    path.write_text(GOOD, encoding="utf-8")
    done = cli(settings, "prices", "import", str(path))
    assert done.returncode == 0, done.stderr
    assert "imported 2 overrides, 0 already there" in done.stdout
    again = cli(settings, "prices", "import", str(path))
    assert "imported 0 overrides, 2 already there" in again.stdout
    stored = await db.fetch("SELECT provider, model, token_type, price_per_million, note FROM model_prices ORDER BY 1")
    assert [tuple(r) for r in stored] == [
        ("anthropic", "claude-sonnet-4", "uncached_input_tokens/service_tier=batch", Decimal("1.40"), None),
        ("openai", "gpt-4o", "input_text_tokens", Decimal("2.00"), "negotiated"),
    ]

    listed = cli(settings, "prices", "overrides", "--provider", "openai")
    assert "gpt-4o" in listed.stdout
    assert "claude" not in listed.stdout

    shown = cli(settings, "prices", "show", "gpt-4o", "--at", "2026-02-01")
    lines = {line.split()[0]: line for line in shown.stdout.splitlines()[3:]}
    override_id = await db.fetchval("SELECT id FROM model_prices WHERE model = 'gpt-4o'")
    assert lines["input_text_tokens"].split()[1:5] == ["2.00", "1000000", "USD", f"override:{override_id}"]
    assert "genai-prices" in lines["output_text_tokens"]
    before = cli(settings, "prices", "show", "gpt-4o", "--token-type", "input_text_tokens", "--at", "2025-06-01")
    assert "genai-prices" in before.stdout  # the override starts later

    clash = tmp_path / "clash.csv"
    clash.write_text(GOOD.replace("2.00", "2.10"), encoding="utf-8")
    refused = cli(settings, "prices", "import", str(clash))
    assert refused.returncode == 2
    assert "stored as 2.00 USD, the file says 2.10 USD" in refused.stderr


async def test_a_bad_file_reports_every_problem_and_writes_nothing(
    db: asyncpg.Connection, settings: Settings, tmp_path: Path
) -> None:
    path = tmp_path / "bad.csv"
    path.write_text(
        "provider,model,token_type,price_per_million,effective_from\n"
        "azure,gpt-4o,input_text_tokens,1,2026-01-01\n"
        "openai,gpt-4o,input_text_tokens,-1,2026-01-01\n"
        "openai,gpt-4o,output_text_tokens/tier=x,1,2026-01-01T00:00:00\n"
        "openai,gpt-4o,output_text_tokens,1,2026-01-01\n",
        encoding="utf-8",
    )
    done = cli(settings, "prices", "import", str(path))
    assert done.returncode == 2
    assert f"{path}:2: provider 'azure'" in done.stderr
    assert f"{path}:3: price_per_million" in done.stderr
    assert f"{path}:4: token type" in done.stderr
    assert f"{path}:4: effective_from" in done.stderr
    assert "Traceback" not in done.stderr
    assert await db.fetchval("SELECT count(*) FROM model_prices") == 0


async def test_unpriced_lists_the_models_the_ledger_could_not_price(
    db: asyncpg.Connection, feeder: Feeder, settings: Settings
) -> None:
    org = await make_org(db)
    page = envelope(
        "openai",
        org.ai_org,
        "usage_v1",
        [
            openai_usage_bucket(
                "2026-11-01",
                "2026-11-02",
                [
                    {"model": "acme-private-llm", "project_id": "proj_a", "input_tokens": 70, "output_tokens": 5},
                    {"model": "gpt-4o", "project_id": "proj_a", "input_tokens": 70, "output_tokens": 5},
                ],
            )
        ],
    )
    await feeder.buckets(page)
    done = cli(settings, "prices", "unpriced")
    assert done.returncode == 0, done.stderr
    rows = [line.split() for line in done.stdout.splitlines()[2:]]
    assert [row[:6] for row in rows] == [
        ["openai", "acme-private-llm", "input_text_tokens", "tokens", "1", "70"],
        ["openai", "acme-private-llm", "output_text_tokens", "tokens", "1", "5"],
    ]
    assert all(row[-1] == "no" for row in rows)
