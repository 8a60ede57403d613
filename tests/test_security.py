"""Security beyond row-level security (tests/test_rls.py): secrets never reach the output, on any path, and
text from messages only ever reaches SQL as a parameter."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import quote

import asyncpg
import pytest
from aiokafka import AIOKafkaProducer

from tests.conftest import Topics, create_database
from tests.factories import anthropic_cost_bucket, anthropic_usage_bucket, api_event, dumps, envelope, make_org
from tests.kafka_helpers import consume_all, create_topics, produce, run_worker, worker_env
from worker import devstack
from worker.config import Settings
from worker.migrate import migrate
from worker.providers import COMPLETION_TOKEN_TYPES

PROCESS_TIMEOUT = 120.0  # seconds; a bound against hangs, not a speed claim

# ------------------------------------------------------------------------------------------- secrets in logs


@dataclass(frozen=True)
class PasswordServer:
    """A PostgreSQL server that checks passwords (the suite's servers trust every local connection)."""

    superuser_url: str
    socket_dir: str


@pytest.fixture(scope="module")
async def password_server() -> AsyncIterator[PasswordServer]:
    data_dir = Path(tempfile.mkdtemp(prefix="cw-pw-"))
    server = devstack.start_postgres(data_dir / "pg", stop_at_exit=True)
    (data_dir / "pg" / "pg_hba.conf").write_text(
        "local all postgres trust\nlocal all all scram-sha-256\nhost all all 127.0.0.1/32 scram-sha-256\n"
    )
    url = server.url("postgres")
    conn = await asyncpg.connect(url)
    try:
        assert await conn.fetchval("SELECT pg_reload_conf()")
    finally:
        await conn.close()
    yield PasswordServer(url, str(data_dir / "pg"))
    server.server.cleanup()
    devstack.remove_tree(data_dir)


@dataclass(frozen=True)
class Login:
    role: str
    password: str
    database: str
    socket_dir: str

    def url(self, password: str | None = None) -> str:
        secret = quote(self.password if password is None else password, safe="")
        return f"postgresql://{self.role}:{secret}@/{self.database}?host={self.socket_dir}"


@pytest.fixture
async def login(password_server: PasswordServer) -> Login:
    """A migrated database and a login role with a password, a member of the worker's writer role."""
    name = f"cw_pw_{uuid.uuid4().hex[:10]}"
    await migrate(await create_database(password_server.superuser_url, name))
    role = f"cw_app_{uuid.uuid4().hex[:8]}"
    password = f"Pw:{uuid.uuid4().hex}/@#%?+ "  # characters a URL must encode, and one it may leave
    conn = await asyncpg.connect(password_server.superuser_url)
    try:
        await conn.execute(f"CREATE ROLE {role} LOGIN PASSWORD '{password}' IN ROLE cost_worker_writer")
    finally:
        await conn.close()
    return Login(role, password, name, password_server.socket_dir)


def secret_forms(*secrets: str) -> list[str]:
    """Every way a secret may be spelled in output: as is, URL-encoded, and the distinctive part alone."""
    forms = []
    for secret in secrets:
        forms += [secret, quote(secret, safe=""), quote(secret)]
    forms += [s.split(":", 1)[1].split("/", 1)[0] for s in secrets if s.startswith("Pw:")]  # the uuid
    return forms


async def run_process(env: dict[str, str], *args: str, stop_after: float | None = None) -> tuple[int, str]:
    """``cost-worker ...`` as a process; stdout and stderr together. ``stop_after``: SIGTERM after so long."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "worker", *args, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    if stop_after is not None:
        await asyncio.sleep(stop_after)
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
    try:
        out, _ = await asyncio.wait_for(process.communicate(), PROCESS_TIMEOUT)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode is not None
    return process.returncode, out.decode(errors="replace")


def assert_no_secret(output: str, secrets: list[str]) -> None:
    for secret in secrets:
        assert secret not in output, f"a secret ({secret[:6]}...) appears in the output:\n{output[-3000:]}"


async def test_secrets_never_reach_the_output_on_any_path(login: Login, kafka_bootstrap: str, topics: Topics) -> None:
    sasl_password = f"sasl-{uuid.uuid4().hex}"
    wrong_password = f"Pw:{uuid.uuid4().hex}/wrong"
    secrets = secret_forms(login.password, sasl_password, wrong_password)
    settings = Settings(
        database_url=login.url(),
        database_role="cost_worker_writer",
        kafka_bootstrap_servers=kafka_bootstrap,
        kafka_group_id=topics.group_id,
        kafka_producer_idempotence=False,
        topic_provider_buckets=topics.provider_buckets,
        topic_api_usage=topics.api_usage,
        topic_budget_alerts=topics.budget_alerts,
        topic_dead_letter=topics.dead_letter,
        metrics_port=0,
        log_format="json",
        log_level="DEBUG",
        batch_max_wait=0.1,
    )
    # PLAINTEXT with SASL credentials set is a valid configuration: the password is carried, never sent.
    sasl = {"COST_WORKER_KAFKA_SASL_USERNAME": "svc", "COST_WORKER_KAFKA_SASL_PASSWORD": sasl_password}
    env = worker_env(settings, **sasl)
    await create_topics(settings)
    await produce(settings, settings.topic_api_usage, [b"{not json", dumps({"event_id": "x"})])

    # 1. A working run, at DEBUG: connects with the password (the server checks it), consumes, exits 0.
    code, output = await run_process(env, "run", "--exit-when-idle", "2")
    assert code == 0, output[-3000:]
    conn = await asyncpg.connect(login.url())
    try:
        assert await conn.fetchval("SELECT current_user") == login.role
    finally:
        await conn.close()
    assert '"event": "batch"' in output
    assert_no_secret(output, secrets)

    # 2. check-config shows the configuration, secrets masked.
    code, output = await run_process(env, "check-config")
    assert code == 0, output
    assert f"postgresql://{login.role}:***@" in output
    assert_no_secret(output, secrets)

    # 3. A wrong password: the server refuses it, the worker stops with one line.
    code, output = await run_process({**env, "COST_WORKER_DATABASE_URL": login.url(wrong_password)}, "run")
    assert code == 1, output
    assert "password authentication failed" in output
    assert_no_secret(output, secrets)

    # 4. An unreachable database: the worker waits for it until told to stop.
    port = devstack.free_port()
    unreachable = f"postgresql://{login.role}:{quote(login.password, safe='')}@127.0.0.1:{port}/{login.database}"
    code, output = await run_process({**env, "COST_WORKER_DATABASE_URL": unreachable}, "run", stop_after=3.0)
    assert code == 1, output
    assert '"event": "waiting_for"' in output
    assert_no_secret(output, secrets)

    # 5. A URL the driver cannot parse, with tracebacks on: refused by the configuration checks (it used to pass
    # them and end as the driver's error), one line that does not quote the URL.
    broken = f"postgresql://{login.role}:{quote(login.password, safe='')}@127.0.0.1:notaport/{login.database}"
    code, output = await run_process({**env, "COST_WORKER_DATABASE_URL": broken}, "run")
    assert code == 2, output
    assert "COST_WORKER_DATABASE_URL: the host: the port must be a number from 1 to 65535" in output
    assert "Traceback" not in output
    assert "notaport" not in output
    assert_no_secret(output, secrets)

    # 6. Configuration errors, the URL and the SASL password among them.
    bad = {**env, "COST_WORKER_KAFKA_SECURITY_PROTOCOL": "SASL_SSL"}
    bad["COST_WORKER_DATABASE_URL"] = "mysql" + login.url().removeprefix("postgresql")
    code, output = await run_process(bad, "run")
    assert code == 2, output
    assert "COST_WORKER_KAFKA_SASL_MECHANISM: required" in output
    assert "must be a postgresql:// URL" in output
    assert_no_secret(output, secrets)

    # 7. SASL for real: the broker refuses the mechanism, so the worker waits for Kafka until told to stop.
    sasl_env = {
        **env,
        "COST_WORKER_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
        "COST_WORKER_KAFKA_SASL_MECHANISM": "PLAIN",
    }
    code, output = await run_process(sasl_env, "run", stop_after=4.0)
    assert code == 1, output
    assert "UnsupportedSaslMechanismError" in output
    assert_no_secret(output, secrets)


# ------------------------------------------------------------------------------------------- SQL-looking text

NOV1 = 1761955200  # 2025-11-01T00:00:00Z

# Each at most 32 characters, so that it fits every text field (the shortest, a quantity unit, holds 32).
SQL_TEXT = [
    "'); DROP TABLE cost_data; --",
    "$$; DROP TABLE api_usage; $$",
    "\\'; DELETE FROM quarantine; --",
    '" OR 1=1; --',
    "$q$ TRUNCATE outbox $q$",
    "%s %(x)s {0} $1 ? :name",
    "E'\\\\x41' || chr(65) /* */",
    "\u02bc; \uff24\uff32\uff2f\uff30 TABLE cost_data \u2014",
    "\u202eevil\u202c \U0001f4b8 \u00bd \ufb01 e\u0301",
    "\\\\ \\n \\t \\0 \\x00 \\u0000",
    "'' ''' \"\" ` ; -- #",
    "\t tab\r\nnew line; SELECT 1;",
]


class Texts:
    """Hands out a distinct SQL-looking string per field; ``used`` remembers which field got which."""

    def __init__(self) -> None:
        self.used: dict[str, str] = {}

    def __call__(self, field: str, limit: int = 64) -> str:
        n = len(self.used)
        value = f"{SQL_TEXT[n % len(SQL_TEXT)]} #{n}"
        assert len(value) <= limit, (field, value)
        self.used[field] = value
        return value


async def catalog(db: asyncpg.Connection) -> dict[str, Any]:
    """What SQL injected anywhere would most likely change: schema objects, roles, grants, platform rows."""
    return {
        "relations": await db.fetch(
            "SELECT relname, relkind, relrowsecurity, relforcerowsecurity FROM pg_class "
            "WHERE relnamespace = 'public'::regnamespace ORDER BY 1"
        ),
        "functions": await db.fetch(
            "SELECT proname, prosrc FROM pg_proc WHERE pronamespace = 'public'::regnamespace ORDER BY 1, 2"
        ),
        "roles": await db.fetch("SELECT rolname, rolsuper, rolbypassrls, rolcanlogin FROM pg_roles ORDER BY 1"),
        "policies": await db.fetch("SELECT tablename, policyname, roles, qual FROM pg_policies ORDER BY 1, 2"),
        "grants": await db.fetch(
            "SELECT grantee, table_name, privilege_type FROM information_schema.role_table_grants "
            "WHERE table_schema = 'public' ORDER BY 1, 2, 3"
        ),
        "migrations": await db.fetch("SELECT version, checksum FROM schema_migrations ORDER BY 1"),
        "platform": [
            tuple(row)
            for table in ("organizations", "users", "projects", "model_prices", "ai_organization_budgets")
            for row in await db.fetch(f"SELECT * FROM {table} ORDER BY 1")
        ],
    }


async def produce_with_headers(settings: Settings, topic: str, value: bytes, headers: list[tuple[str, bytes]]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap_servers)
    await producer.start()
    try:
        await (await producer.send(topic, value=value, headers=headers))
    finally:
        await producer.stop()


async def test_sql_looking_text_in_every_field_is_stored_verbatim(db: asyncpg.Connection, settings: Settings) -> None:
    text = Texts()
    openai = await make_org(db, ai_org=text("openai org"), project_ids=(text("openai project"),))
    anthropic = await make_org(db, provider="anthropic", ai_org=text("anthropic org"), project_ids=(text("workspace"),))
    u = text.used
    before = await catalog(db)

    # API-usage events: event_id, endpoint, model.
    events = []
    for i in range(3):
        event = api_event(openai, event_id=text(f"event_id {i}"), project=openai.projects[u["openai project"]])
        event["endpoint"] = text(f"endpoint {i}")
        event["token_usage"]["model"] = text(f"model {i}")
        events.append(event)
    # Provider pages, all four formats: every text field a result has.
    day = {"start_time": NOV1, "end_time": NOV1 + 86400}
    cost = {
        "object": text("result object"),
        "amount": {"value": 1.25, "currency": "usd"},
        "line_item": text("line_item"),
        "project_id": u["openai project"],
        "api_key_id": text("cost api_key_id"),
        "quantity": 3,
        "quantity_unit": text("quantity_unit", 32),
    }
    openai_costs = envelope("openai", openai.ai_org, "costs_v1", [{**day, "object": text("bucket"), "results": [cost]}])
    usage = {
        "model": text("usage model"),
        "project_id": u["openai project"],
        "user_id": text("usage user_id"),
        "api_key_id": text("usage api_key_id"),
        "service_tier": text("usage service_tier"),
        "input_tokens": 10,
        "output_tokens": 5,
        text("new token field") + "_tokens": 7,  # a field the worker does not know: ignored (part of the totals)
    }
    openai_usage = envelope("openai", openai.ai_org, "usage_v1", [{**day, "results": [usage]}])
    described = {"amount": "250", "currency": "USD", "workspace_id": u["workspace"], "description": text("description")}
    joined: dict[str, Any] = {"amount": "0.5", "currency": "USD", "workspace_id": u["workspace"]}
    for name in ("model", "cost_type", "token_type", "context_window", "service_tier", "inference_geo"):
        joined[name] = text(f"anthropic {name}")
    anthropic_costs = envelope(
        "anthropic",
        anthropic.ai_org,
        "costs_v1",
        [anthropic_cost_bucket("2025-11-01T00:00:00Z", "2025-11-02T00:00:00Z", [described, joined])],
    )
    tally: dict[str, Any] = {"uncached_input_tokens": 100, "output_tokens": 10, "workspace_id": u["workspace"]}
    for name in ("model", "api_key_id", "service_tier", "context_window", "inference_geo"):
        tally[name] = text(f"tally {name}")
    anthropic_usage = envelope(
        "anthropic",
        anthropic.ai_org,
        "usage_v1",
        [anthropic_usage_bucket("2025-11-01T00:00:00Z", "2025-11-01T01:00:00Z", [tally])],
    )
    # Quarantine: a provider project nobody maps (named in the detail), a key and headers of bad messages.
    unmapped = [{"amount": {"value": 1, "currency": "usd"}, "project_id": text("unmapped project")}]
    unattributed = envelope("openai", openai.ai_org, "costs_v1", [{**day, "results": unmapped}])
    bad_key = text("dead letter key").encode()
    bad_header = (text("header name"), text("header value").encode())

    await create_topics(settings)
    await produce(settings, settings.topic_api_usage, [dumps(e) for e in events])
    await produce(settings, settings.topic_api_usage, [b"{not json"], keys=[bad_key])
    pages = (openai_costs, openai_usage, anthropic_costs, anthropic_usage, unattributed)
    await produce(settings, settings.topic_provider_buckets, [dumps(p) for p in pages])
    await produce_with_headers(settings, settings.topic_provider_buckets, b"[]", [bad_header])
    assert await run_worker(settings) == 0

    # API usage: every text field as sent.
    stored = {r["event_id"]: r for r in await db.fetch("SELECT event_id, endpoint, model FROM api_usage")}
    assert set(stored) == {e["event_id"] for e in events}
    for event in events:
        assert stored[event["event_id"]]["endpoint"] == event["endpoint"]
        assert stored[event["event_id"]]["model"] == event["token_usage"]["model"]

    # The ledger: provider ids, line items built from the texts, units and metadata, all as sent.
    rows = await db.fetch(
        "SELECT provider, ai_organization_id, ai_project_id, line_item, unit, metadata, amount FROM cost_data"
    )
    assert {(r["provider"], r["ai_organization_id"], r["ai_project_id"]) for r in rows} == {
        ("openai", u["openai org"], u["openai project"]),
        ("anthropic", u["anthropic org"], u["workspace"]),
    }
    usage_items = {f"{u['usage model']}:{token}:{u['usage service_tier']}" for token, _ in COMPLETION_TOKEN_TYPES}
    anthropic_tokens = ("uncached_input_tokens", "cache_read_input_tokens", "cache_creation_1h_input_tokens")
    tally_items = {
        f"{u['tally model']}:{token}:{u['tally service_tier']}:{u['tally context_window']}:{u['tally inference_geo']}"
        for token in (*anthropic_tokens, "cache_creation_5m_input_tokens", "output_tokens")
    }
    joined_item = " / ".join(
        u[f"anthropic {name}"]
        for name in ("model", "cost_type", "token_type", "context_window", "service_tier", "inference_geo")
    )
    items = {r["line_item"]: r for r in rows}
    assert len(items) == len(rows)
    assert set(items) == {u["line_item"], u["description"], joined_item} | usage_items | tally_items
    assert items[u["line_item"]]["unit"] == u["quantity_unit"]
    assert json.loads(items[u["line_item"]]["metadata"]) == {"api_key_id": u["cost api_key_id"]}
    usage_metadata = json.loads(items[min(usage_items)]["metadata"])
    assert (usage_metadata["user_id"], usage_metadata["api_key_id"]) == (u["usage user_id"], u["usage api_key_id"])
    assert json.loads(items[joined_item]["metadata"])["cost_type"] == u["anthropic cost_type"]
    assert json.loads(items[min(tally_items)]["metadata"])["inference_geo"] == u["tally inference_geo"]
    assert sum(r["amount"] for r in rows if r["amount"] is not None) == Decimal("1.25") + Decimal("2.505")

    # Quarantine and dead letters: the key, the headers and the provider id named in the detail, as sent.
    quarantined = {
        r["reason"]: r for r in await db.fetch("SELECT reason, detail, message_key, headers FROM quarantine")
    }
    assert set(quarantined) == {"not_json", "unattributed", "schema_violation"}
    assert bytes(quarantined["not_json"]["message_key"]) == bad_key
    assert json.loads(quarantined["schema_violation"]["headers"]) == {bad_header[0]: bad_header[1].decode()}
    assert repr(u["unmapped project"]) in quarantined["unattributed"]["detail"]
    dead = await consume_all(settings, settings.topic_dead_letter, expect=3)
    assert sorted(dict(record.headers)["reason"] for record in dead) == [
        b"not_json",
        b"schema_violation",
        b"unattributed",
    ]

    # And nothing else changed.
    assert await catalog(db) == before
    assert await db.fetchval("SELECT count(*) FROM api_usage") == len(events)
