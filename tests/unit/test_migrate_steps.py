"""How a migration file splits into online steps (plain and generated) and its transaction: pure parsing."""

from __future__ import annotations

from worker.migrate import Migration, OnlineStep, load_migrations

FILE = """-- a header comment, before any step: not a step
-- migrate:online
CREATE INDEX CONCURRENTLY IF NOT EXISTS a ON t (x);

-- migrate:online-each
SELECT format('CREATE INDEX CONCURRENTLY IF NOT EXISTS %I ON %I (x)', c.relname || '_x', c.relname) FROM parts c;
-- migrate:online

-- migrate:transaction
ALTER TABLE t ADD CONSTRAINT t_key UNIQUE USING INDEX a;
"""


def test_online_steps_plain_and_generated_in_order_empty_ones_dropped() -> None:
    migration = Migration(99, "x", FILE)
    assert migration.online_steps == [
        OnlineStep("CREATE INDEX CONCURRENTLY IF NOT EXISTS a ON t (x);"),
        OnlineStep(
            "SELECT format('CREATE INDEX CONCURRENTLY IF NOT EXISTS %I ON %I (x)', c.relname || '_x', c.relname) "
            "FROM parts c;",
            generated=True,
        ),
    ]
    assert migration.transactional_sql.strip() == "ALTER TABLE t ADD CONSTRAINT t_key UNIQUE USING INDEX a;"


def test_a_file_without_a_transaction_marker_is_one_transaction() -> None:
    migration = Migration(99, "x", "-- migrate:online\nCREATE TABLE t ();\n")
    assert migration.online_steps == []
    assert migration.transactional_sql == migration.sql


def test_the_shipped_time_key_migration_generates_its_index_builds() -> None:
    (migration,) = [m for m in load_migrations() if m.label == "0014_api_usage_time_key"]
    steps = migration.online_steps
    assert [step.generated for step in steps] == [True, True]
    assert "DROP INDEX CONCURRENTLY" in steps[0].sql
    assert "CREATE UNIQUE INDEX CONCURRENTLY" in steps[1].sql
