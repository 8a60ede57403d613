"""Operator commands and the dev stack, run as a user runs them: the real CLI in a subprocess."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from decimal import Decimal
from pathlib import Path

import asyncpg

from tests.factories import api_event, envelope, make_org, openai_cost_bucket, openai_usage_bucket
from tests.feeding import Feeder
from tests.kafka_helpers import worker_env
from worker.config import Settings


def cli(settings: Settings, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "worker", *args],
        env=worker_env(settings),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


async def test_quarantine_list_and_replay_after_the_mapping_exists(
    db: asyncpg.Connection, feeder: Feeder, settings: Settings
) -> None:
    org = await make_org(db, project_ids=("proj_a",))
    page = envelope(
        "openai",
        org.ai_org,
        "costs_v1",
        [openai_cost_bucket("2026-11-01", "2026-11-02", [("proj_a", "x", 1), ("proj_new", "x", 2)])],
    )
    await feeder.buckets(page)
    await feeder.apply([feeder.record(settings.topic_api_usage, b"{broken")])
    assert await db.fetchval("SELECT sum(amount) FROM cost_data") == Decimal(1)

    listed = await asyncio.to_thread(cli, settings, "quarantine", "list")
    assert listed.returncode == 0, listed.stderr
    assert "unattributed" in listed.stdout
    assert "not_json" in listed.stdout
    assert "2 row(s)" in listed.stdout
    only = await asyncio.to_thread(cli, settings, "quarantine", "list", "--reason", "not_json")
    assert "1 row(s)" in only.stdout

    # The platform adds the missing project mapping; replaying applies the message once.
    new_project = await db.fetchval(
        "INSERT INTO projects (organization_id, name, ai_provider, ai_organization_id, ai_project_id) "
        "VALUES ($1, 'new', 'openai', $2, 'proj_new') RETURNING id",
        org.id,
        org.ai_org,
    )
    replay = await asyncio.to_thread(cli, settings, "quarantine", "replay", "--reason", "unattributed")
    assert replay.returncode == 0, replay.stderr
    assert "replayed 1 message(s); 0 still quarantined" in replay.stdout
    rows = {r["project_id"]: r["amount"] for r in await db.fetch("SELECT project_id, amount FROM cost_data")}
    assert rows == {org.projects["proj_a"]: Decimal(1), new_project: Decimal(2)}
    assert await db.fetchval("SELECT status FROM quarantine WHERE reason = 'unattributed'") == "replayed"
    # A message that is still bad stays, and replaying again changes nothing.
    again = await asyncio.to_thread(cli, settings, "quarantine", "replay")
    assert "replayed 0 message(s); 1 still quarantined" in again.stdout
    assert await db.fetchval("SELECT replay_count FROM quarantine WHERE reason = 'not_json'") == 1
    assert await db.fetchval("SELECT sum(amount) FROM cost_data") == Decimal(3)
    assert await db.fetchval("SELECT count(*) FROM outbox") == 2  # the two dead letters; replay adds none

    wrong = await asyncio.to_thread(cli, settings, "quarantine", "replay", "--reason", "nonsense")
    assert wrong.returncode == 2
    assert "unknown reason 'nonsense'" in wrong.stderr


async def test_replay_leaves_messages_of_a_topic_no_longer_consumed_as_they_were(
    db: asyncpg.Connection, feeder: Feeder, settings: Settings
) -> None:
    """Decoding picks the message kind by topic: an API-usage event replayed after COST_WORKER_TOPIC_API_USAGE was
    renamed was decoded as a provider message and its replayable `unknown_project` row overwritten with
    `schema_violation` (not replayable): its cost (1.25) would never count. It is left as it was, and said so."""
    org = await make_org(db)
    missing = uuid.uuid4()
    await feeder.events(api_event(org, project=missing, occurred_at="2026-11-21T10:00:00Z", cost="1.25"))
    await db.execute("INSERT INTO projects (id, organization_id, name) VALUES ($1, $2, 'x')", missing, org.id)

    renamed = settings.model_copy(update={"topic_api_usage": f"{settings.topic_api_usage}-v2"})
    replay = await asyncio.to_thread(cli, renamed, "quarantine", "replay")
    assert replay.returncode == 0, replay.stderr
    assert "nothing to replay" in replay.stdout
    assert f"left 1 pending message(s) of {settings.topic_api_usage}: not an input topic" in replay.stdout
    row = await db.fetchrow("SELECT reason, status, replay_count FROM quarantine")
    assert row is not None
    assert (row["reason"], row["status"], row["replay_count"]) == ("unknown_project", "pending", 0)

    replay = await asyncio.to_thread(cli, settings, "quarantine", "replay")
    assert "replayed 1 message(s); 0 still quarantined" in replay.stdout
    assert await db.fetchval("SELECT sum(estimated_cost_usd) FROM project_metrics") == Decimal("1.25")


async def test_replaying_a_bucket_whose_window_has_a_newer_revision_changes_nothing(
    db: asyncpg.Connection, feeder: Feeder, settings: Settings
) -> None:
    """A message quarantined in part (an unmapped project) whose window then got a newer snapshot: once the mapping
    exists, replaying it is a stale revision (marked replayed), and only the newer snapshot counts."""
    org = await make_org(db, project_ids=("proj_a",))
    old = openai_cost_bucket("2026-11-01", "2026-11-02", [("proj_a", "x", 1), ("proj_new", "x", 2)])
    await feeder.buckets(envelope("openai", org.ai_org, "costs_v1", [old], collected_at="2026-11-03T00:00:00Z"))
    new = openai_cost_bucket("2026-11-01", "2026-11-02", [("proj_a", "x", 5)])
    await feeder.buckets(envelope("openai", org.ai_org, "costs_v1", [new], collected_at="2026-11-04T00:00:00Z"))
    await db.execute(
        "INSERT INTO projects (organization_id, name, ai_provider, ai_organization_id, ai_project_id) "
        "VALUES ($1, 'new', 'openai', $2, 'proj_new')",
        org.id,
        org.ai_org,
    )
    replay = await asyncio.to_thread(cli, settings, "quarantine", "replay")
    assert replay.returncode == 0, replay.stderr
    assert "replayed 1 message(s); 0 still quarantined" in replay.stdout
    assert "1 stale_revision" in replay.stdout
    assert await db.fetchval("SELECT sum(amount) FROM cost_data WHERE superseded_at IS NULL") == Decimal(5)


async def test_budgets_status_prints_period_spend_and_alerts(
    db: asyncpg.Connection, feeder: Feeder, settings: Settings
) -> None:
    org = await make_org(db)
    await db.execute(
        "INSERT INTO ai_organization_budgets (organization_id, name, amount, period, timezone, thresholds) "
        "VALUES ($1, 'Team monthly', 10, 'monthly', 'Europe/Berlin', '{50,80,100}')",
        org.id,
    )
    from datetime import UTC, datetime, timedelta  # noqa: PLC0415

    await feeder.events(api_event(org, cost="6.5", occurred_at=datetime.now(UTC).isoformat()))
    # A usage line with no price, this hour: it counts nothing, and the status says it is there.
    hour = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    await feeder.buckets(
        envelope(
            "openai",
            org.ai_org,
            "usage_v1",
            [
                openai_usage_bucket(
                    hour.strftime("%Y-%m-%dT%H:%M:%S"),
                    (hour + timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%S"),
                    [{"project_id": "proj_a", "model": "model-without-price", "input_tokens": 10}],
                )
            ],
            collected_at=datetime.now(UTC).isoformat(),
        )
    )
    result = await asyncio.to_thread(cli, settings, "budgets", "status", "--organization", str(org.id))
    assert result.returncode == 0, result.stderr
    assert "unpriced" in result.stdout.splitlines()[0]
    line = next(line for line in result.stdout.splitlines() if "Team monthly" in line)
    assert line.rstrip().endswith(" 1")  # one unpriced usage line counts in this period
    assert "6.50 / 10 USD" in line  # shown rounded to cents (exact in the database)
    assert "65.0%" in line
    assert "Europe/Berlin" in line
    assert " 50 " in f" {line} ".replace(",", " ")  # the alerted column
    bad = await asyncio.to_thread(cli, settings, "budgets", "status", "--organization", "not-a-uuid")
    assert bad.returncode == 2
    assert "not a uuid" in bad.stderr


async def test_replay_prints_only_the_outcomes_that_happened(
    db: asyncpg.Connection, feeder: Feeder, settings: Settings
) -> None:
    # Replaying an API-usage event once its project exists printed "usage.api-events: 0 duplicate" beside
    # "1 inserted": an outcome of no message is no line.
    org = await make_org(db)
    project = uuid.uuid4()
    await feeder.events(api_event(org, project=project))
    await db.execute("INSERT INTO projects (id, organization_id, name) VALUES ($1, $2, 'late')", project, org.id)
    replay = await asyncio.to_thread(cli, settings, "quarantine", "replay", "--reason", "unknown_project")
    assert replay.returncode == 0, replay.stderr
    assert "replayed 1 message(s); 0 still quarantined" in replay.stdout
    assert "1 inserted" in replay.stdout
    assert not [line for line in replay.stdout.splitlines() if ": 0 " in line], replay.stdout


def test_dev_runs_the_demo_end_to_end(tmp_path: Path) -> None:
    """README's first command, minus the venv: embedded servers, migrate, demo, worker, summary."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("COST_WORKER_")}
    env["COST_WORKER_METRICS_PORT"] = "0"
    result = subprocess.run(
        [sys.executable, "-m", "worker", "dev", "--once", "--state-dir", str(tmp_path / "dev")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:] + result.stdout[-3000:]
    out = result.stdout
    for section in (
        "== rows per table",
        "== spend per project",
        "== quarantined, by reason",
        "== budget alerts raised",
        "== budgets now",
        "== connect",
    ):
        assert section in out, section
    alerts = out[out.index("== budget alerts raised") : out.index("== budgets now")]
    assert "Assistant monthly" in alerts
    assert "Alice daily" in alerts
    assert "unattributed" in out
    assert "not_json" in out
    # The connect section's URLs name servers that `--once` stops as it exits: it says so.
    assert "the embedded servers stop" in out[out.index("== connect") :]
