"""``python -m bench.tenant_policy [organizations]``: a tenant policy as ``= ANY (array)`` (searched element by
element for each row) against ``IN (SELECT unnest(array))`` (a hashed subplan), on a scratch server.

Two tables of 100,000 rows spread over ``organizations`` (default 1,000) organizations, one per policy form, both
forced on a role without BYPASSRLS and with every organization in the setting; each figure is the best of three:
reading every row, and upserting 10,000 of them. The figures are migration 0018's and README's.
"""

from __future__ import annotations

import asyncio
import sys
import time
import uuid

import asyncpg

from bench.services import scratch_postgres

DEFAULT_ORGANIZATIONS = 1_000
ROWS = 100_000
UPSERTED = 10_000
ROUNDS = 3
FORMS = {
    "any_array": "organization_id = ANY ((SELECT tenant_ids())::uuid[])",
    "hashed_in": "organization_id IN (SELECT unnest(tenant_ids()))",
}


async def _best(conn: asyncpg.Connection, statement: str, *args: object) -> float:
    best = float("inf")
    for _ in range(ROUNDS):
        started = time.perf_counter()
        await conn.execute(statement, *args)
        best = min(best, time.perf_counter() - started)
    return best * 1000


async def _run(organizations: int) -> None:
    async with scratch_postgres("tenant-policy-") as server_url:
        conn = await asyncpg.connect(server_url)
        await conn.execute(
            "CREATE ROLE tenant_reader; CREATE FUNCTION tenant_ids() RETURNS uuid[] LANGUAGE sql STABLE AS "
            "$$ SELECT string_to_array(nullif(current_setting('bench.ids', true), ''), ',')::uuid[] $$"
        )
        ids = [uuid.uuid4() for _ in range(organizations)]
        for table, policy in FORMS.items():
            await conn.execute(
                f"CREATE TABLE {table} (organization_id uuid NOT NULL, k integer PRIMARY KEY, v integer NOT NULL);"
                f"ALTER TABLE {table} ENABLE ROW LEVEL SECURITY; ALTER TABLE {table} FORCE ROW LEVEL SECURITY;"
                f"CREATE POLICY tenant ON {table} USING ({policy}) WITH CHECK ({policy});"
                f"GRANT ALL ON {table} TO tenant_reader"
            )
            await conn.execute(
                f"INSERT INTO {table} SELECT ($1::uuid[])[1 + g % {organizations}], g, 0"
                f" FROM generate_series(1, {ROWS}) g",
                ids,
            )
        await conn.execute("SELECT set_config('bench.ids', $1, false)", ",".join(map(str, ids)))
        await conn.execute("SET ROLE tenant_reader")
        for table in FORMS:
            read = await _best(conn, f"SELECT count(*) FROM {table}")
            upsert = await _best(
                conn,
                f"INSERT INTO {table} SELECT ($1::uuid[])[1 + g % {organizations}], g, 1"
                f" FROM generate_series(1, {UPSERTED}) g ON CONFLICT (k) DO UPDATE SET v = {table}.v + 1",
                ids,
            )
            print(
                f"{table:10} {organizations:,} organizations: read {ROWS:,} rows {read:7.1f} ms,"
                f" upsert {UPSERTED:,} {upsert:7.1f} ms"
            )
        await conn.close()


if __name__ == "__main__":
    asyncio.run(_run(int(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_ORGANIZATIONS))
