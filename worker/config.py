"""Settings: every knob, read from ``COST_WORKER_*`` environment variables.

Defaults are named constants with their units. ``load_settings`` validates everything and reports every
problem at once (``cost-worker check-config`` prints them); secrets never leave this module unredacted.
"""

from __future__ import annotations

import base64
import ipaddress
import os
import ssl
from datetime import date
from pathlib import Path
from typing import Any, Literal
from urllib.parse import SplitResult, parse_qs, unquote, unquote_plus, urlsplit, urlunsplit

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from worker.errors import ConfigError

ENV_PREFIX = "COST_WORKER_"
SECRETS_DIR_ENV = ENV_PREFIX + "SECRETS_DIR"  # files named like the variables (Kubernetes Secret volumes)

# --- defaults, with units -----------------------------------------------------------------------------
KAFKA_GROUP_ID = "cost-ingestion-worker"
TOPIC_PROVIDER_BUCKETS = "cost.provider-buckets"
TOPIC_API_USAGE = "usage.api-events"
TOPIC_BUDGET_ALERTS = "cost.budget-alerts"
TOPIC_DEAD_LETTER = "cost.dead-letter"

BATCH_MAX_RECORDS = 5_000  # messages per database transaction
BATCH_MAX_WAIT = 0.5  # seconds to wait for a batch to fill
MAX_MESSAGE_BYTES = 1_048_576  # bytes; larger messages are quarantined as oversized
MAX_RESULTS_PER_MESSAGE = 50_000  # provider results in one message; more is quarantined
DEAD_LETTER_MAX_BYTES = 524_288  # bytes of the raw payload mirrored to the dead-letter topic

DATABASE_POOL_MIN = 1  # connections
DATABASE_POOL_MAX = 4  # connections
DATABASE_CONNECT_TIMEOUT = 10.0  # seconds
DATABASE_STATEMENT_TIMEOUT = 30.0  # seconds

KAFKA_SESSION_TIMEOUT = 30.0  # seconds before the group coordinator declares a silent member dead
KAFKA_HEARTBEAT_INTERVAL = 3.0  # seconds
KAFKA_MAX_POLL_INTERVAL = 300.0  # seconds between polls before the member is evicted
KAFKA_REQUEST_TIMEOUT = 40.0  # seconds
KAFKA_FETCH_MAX_WAIT = 0.1  # seconds a fetch may wait at the broker for data (bounds latency when caught up)

RETRY_INITIAL_BACKOFF = 0.1  # seconds before the first retry of a failed batch
RETRY_MAX_BACKOFF = 30.0  # seconds; backoff is exponential with jitter up to this
READY_MAX_RETRYING = 60.0  # seconds stuck in retries before /readyz says not ready

OUTBOX_POLL_INTERVAL = 1.0  # seconds between outbox scans when nothing woke the publisher
OUTBOX_BATCH = 500  # outbox rows published per round
BUDGET_SWEEP_INTERVAL = 300.0  # seconds between sweeps of every active budget
API_USAGE_RETENTION_MONTHS = 0  # whole months of API-usage detail kept before the current one; 0 keeps everything
QUARANTINE_RETENTION_DAYS = 30  # days a replayed quarantine row is kept; 0 keeps them
NOTIFY_RETENTION_DAYS = 90  # days a finished notify delivery (delivered, failed for good) is kept; 0 keeps them
MAX_RETENTION_MONTHS = 1_200  # 100 years: further back than any month a partition can hold (2015 on)
MAX_RETENTION_DAYS = 36_500  # 100 years: `now - days` stays a date (800,000 days overflowed, stopping the worker)
RETENTION_INTERVAL = 3_600.0  # seconds between the worker's retention runs (partitions ahead, expired ones dropped)
SHUTDOWN_GRACE = 20.0  # seconds to finish the in-flight batch and flush the outbox after SIGTERM

BREAKER_WINDOW = 1_000  # most recent messages the circuit breaker looks at
BREAKER_MIN_MESSAGES = 200  # messages seen before the breaker may open
BREAKER_INVALID_RATIO = 0.9  # share of invalid messages in the window that stops the worker

METRICS_HOST = "0.0.0.0"  # noqa: S104 - the metrics port must be reachable by Prometheus in a pod
METRICS_PORT = 9108

VERIFYING_SSLMODES = ("verify-ca", "verify-full")  # libpq modes that check the server's certificate
# URL query parameters whose values are secrets (asyncpg reads ?password= and ?sslpassword=; a proxy may take
# ?token= or ?key=): a name containing one of these words, or ending in "key", except the parameters that name files.
SECRET_PARAM_WORDS = ("password", "passwd", "pwd", "token", "secret", "signature")
NOT_SECRET_PARAMS = frozenset({"passfile", "sslkey", "sslcert", "sslrootcert", "sslcrl", "sslcrldir"})
MASK = "***"
PERCENT_ENCODE = "percent-encode '/', '?', '#' and '@' in the user name and password (e.g. '/' as %2F, '@' as %40)"
# --- notify (issue 15) ---
NOTIFY_GROUP_ID = "cost-worker-notify"  # consumer group of the alerts topic (offsets stored in PostgreSQL)
NOTIFY_TIMEOUT = 5.0  # seconds one HTTP attempt may take, connecting included
NOTIFY_MAX_AGE = 86_400.0  # seconds after its creation a delivery is given up as failed
NOTIFY_SECRET_OVERLAP = 86_400.0  # seconds a rotated-out signing secret still signs (`rotate-secret --overlap`)
NOTIFY_MAX_SECRET_OVERLAP = 30 * 86_400.0  # seconds; a longer overlap is a secret that is not really retired
NOTIFY_BACKOFF_INITIAL = 2.0  # seconds before the first retry of a failed attempt
NOTIFY_BACKOFF_MAX = 900.0  # seconds; exponential backoff with jitter up to this
NOTIFY_PER_DESTINATION = 2  # concurrent attempts per destination
NOTIFY_MAX_IN_FLIGHT = 64  # concurrent attempts in all
NOTIFY_POLL_INTERVAL = 1.0  # seconds between scans for due deliveries when nothing woke the dispatcher
NOTIFY_SECRETS_KEY_BYTES = 32  # AES-256-GCM key of destination URLs and signing secrets

# --- collector (issue 14) ---
COLLECT_OPENAI_BASE_URL = "https://api.openai.com"
COLLECT_ANTHROPIC_BASE_URL = "https://api.anthropic.com"
COLLECT_INTERVAL = 900.0  # seconds between polls of every account
COLLECT_TRAILING_DAYS = 3  # days re-read on every poll (providers finalise costs late)
COLLECT_BACKFILL_DAYS = 30  # days collected on the first poll when no start date is set
COLLECT_REQUEST_TIMEOUT = 60.0  # seconds one provider request may take
COLLECT_MAX_ATTEMPTS = 6  # attempts per provider request (429, 5xx, timeouts, connection errors)
COLLECT_MAX_RETRY_AFTER = 120.0  # seconds; a longer Retry-After fails the request (the next poll retries)
COLLECT_RETRY_INITIAL_BACKOFF = 1.0  # seconds before the first retry of a provider request (5xx, timeout, ...)
COLLECT_RETRY_MAX_BACKOFF = 60.0  # seconds; the longest backoff between two attempts of a provider request
COLLECT_STALE_AFTER = 7200.0  # seconds without a successful poll before /readyz of the collector says not ready
COLLECT_AUTH_RETRY_INTERVAL = 1800.0  # seconds before a refused account (401) or endpoint (403) is tried again
COLLECT_ONCE_MAX_WAIT = 300.0  # seconds `collect --once` waits for an unreachable database or broker, then gives up


SecurityProtocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
SaslMechanism = Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"]
IsolationLevel = Literal["read_committed", "read_uncommitted"]


class Settings(BaseSettings):
    """The worker's configuration. Field names map to ``COST_WORKER_<NAME>`` variables."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", validate_default=True)

    # secret files (issue 16): read first, so that every setting below may come from a file
    secrets_dir: Path | None = Field(
        default=None,
        description="Directory of files named like these variables (e.g. COST_WORKER_DATABASE_URL), "
        "each holding one value; a variable that is also set in the environment wins",
    )

    # database
    database_url: SecretStr | None = Field(
        default=None, description="PostgreSQL URL, e.g. postgresql://user:pass@host:5432/db"
    )
    database_role: str | None = Field(
        default=None, description="Role to SET after connecting (e.g. cost_worker_writer); empty: login role"
    )
    database_pool_min: int = Field(default=DATABASE_POOL_MIN, ge=1, description="Connections the pool keeps open")
    database_pool_max: int = Field(
        default=DATABASE_POOL_MAX,
        ge=1,
        description="Connections the pool may open (batches use one; outbox, sweep and probes share the rest)",
    )
    database_connect_timeout: float = Field(
        default=DATABASE_CONNECT_TIMEOUT, gt=0, description="Seconds to wait for a database connection"
    )
    database_statement_timeout: float = Field(
        default=DATABASE_STATEMENT_TIMEOUT,
        gt=0,
        description="Seconds a statement may run (server side; the client waits 5 s longer)",
    )

    # kafka
    kafka_bootstrap_servers: str | None = Field(default=None, description="Kafka brokers, host:port[,host:port...]")
    kafka_group_id: str = Field(default=KAFKA_GROUP_ID, min_length=1, description="Consumer group of the input topics")
    kafka_client_id: str = Field(default="cost-worker", min_length=1, description="Client id sent to brokers")
    kafka_security_protocol: SecurityProtocol = Field(
        default="PLAINTEXT", description="PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL"
    )
    kafka_sasl_mechanism: SaslMechanism | None = Field(
        default=None, description="PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512 (SASL protocols only)"
    )
    kafka_sasl_username: str | None = Field(default=None, description="SASL username")
    kafka_sasl_password: SecretStr | None = Field(default=None, description="SASL password")
    kafka_ssl_cafile: Path | None = Field(default=None, description="CA bundle to verify the brokers (SSL protocols)")
    kafka_ssl_certfile: Path | None = Field(default=None, description="Client certificate for mutual TLS")
    kafka_ssl_keyfile: Path | None = Field(default=None, description="Client key for mutual TLS")
    kafka_producer_idempotence: bool = Field(
        default=True, description="Idempotent producer for the outbox (turn off only for the development broker)"
    )
    kafka_session_timeout: float = Field(
        default=KAFKA_SESSION_TIMEOUT,
        gt=0,
        description="Seconds before the group coordinator declares a silent member dead",
    )
    kafka_heartbeat_interval: float = Field(
        default=KAFKA_HEARTBEAT_INTERVAL,
        gt=0,
        description="Seconds between heartbeats (at most a third of the session timeout)",
    )
    kafka_max_poll_interval: float = Field(
        default=KAFKA_MAX_POLL_INTERVAL,
        gt=0,
        description="Seconds between polls before the member is evicted from the group",
    )
    kafka_isolation_level: IsolationLevel = Field(
        default="read_committed",
        description="read_committed: messages of an aborted producer transaction are never read, so never counted",
    )
    kafka_fetch_max_wait: float = Field(
        default=KAFKA_FETCH_MAX_WAIT,
        gt=0,
        le=10,
        description="Seconds a fetch may wait at the broker for new data (latency when caught up vs idle polls)",
    )
    kafka_request_timeout: float = Field(
        default=KAFKA_REQUEST_TIMEOUT, gt=0, description="Seconds a Kafka request may take"
    )

    topic_provider_buckets: str = Field(
        default=TOPIC_PROVIDER_BUCKETS, min_length=1, description="Input: provider cost/usage buckets"
    )
    topic_api_usage: str = Field(
        default=TOPIC_API_USAGE, min_length=1, description="Input: per-request API-usage events"
    )
    topic_budget_alerts: str = Field(
        default=TOPIC_BUDGET_ALERTS, min_length=1, description="Output: budget alerts (key = budget id)"
    )
    topic_dead_letter: str = Field(
        default=TOPIC_DEAD_LETTER,
        min_length=1,
        description="Output: copies of quarantined messages (key = source topic:partition:offset)",
    )

    # batching and limits
    batch_max_records: int = Field(
        default=BATCH_MAX_RECORDS, ge=1, le=100_000, description="Messages per batch, i.e. per database transaction"
    )
    batch_max_wait: float = Field(
        default=BATCH_MAX_WAIT, gt=0, le=60, description="Seconds to wait for a batch to fill"
    )
    max_message_bytes: int = Field(
        default=MAX_MESSAGE_BYTES, ge=1_024, description="Larger messages are quarantined as `oversized`"
    )
    max_results_per_message: int = Field(
        default=MAX_RESULTS_PER_MESSAGE,
        ge=1,
        description="Provider results in one message beyond which it is quarantined as `too_many_results`",
    )
    dead_letter_max_bytes: int = Field(
        default=DEAD_LETTER_MAX_BYTES,
        ge=1_024,
        description="Bytes of a quarantined payload copied to the dead-letter topic (the database keeps it whole)",
    )

    # retries, readiness, background work
    retry_initial_backoff: float = Field(
        default=RETRY_INITIAL_BACKOFF,
        gt=0,
        description="Seconds before the first retry of a failed batch (exponential, with jitter)",
    )
    retry_max_backoff: float = Field(
        default=RETRY_MAX_BACKOFF, gt=0, description="Longest wait between retries, in seconds"
    )
    ready_max_retrying: float = Field(
        default=READY_MAX_RETRYING, gt=0, description="Seconds a batch may keep failing before /readyz says not ready"
    )
    outbox_poll_interval: float = Field(
        default=OUTBOX_POLL_INTERVAL, gt=0, description="Seconds between outbox scans when no batch woke the publisher"
    )
    outbox_batch: int = Field(default=OUTBOX_BATCH, ge=1, description="Outbox rows published per round")
    budget_sweep_interval: float = Field(
        default=BUDGET_SWEEP_INTERVAL,
        gt=0,
        description="Seconds between sweeps of every active budget (one replica sweeps at a time)",
    )
    api_usage_retention_months: int = Field(
        default=API_USAGE_RETENTION_MONTHS,
        ge=0,
        le=MAX_RETENTION_MONTHS,
        description="Whole months of per-request API-usage detail kept before the current month: older monthly "
        "partitions are dropped by `cost-worker retention --execute` and the worker's periodic run (rollups and the "
        "ledger stay; months an open budget period needs are kept); 0: keep everything",
    )
    quarantine_retention_days: int = Field(
        default=QUARANTINE_RETENTION_DAYS,
        ge=0,
        le=MAX_RETENTION_DAYS,
        description="Days a replayed quarantine row is kept before retention deletes it (pending rows are never "
        "deleted); 0: keep them; at most 36500",
    )
    notify_retention_days: int = Field(
        default=NOTIFY_RETENTION_DAYS,
        ge=0,
        le=MAX_RETENTION_DAYS,
        description="Days a finished notify delivery (delivered, or failed for good) is kept after it finished before "
        "retention deletes it (pending deliveries are never deleted); 0: keep them; at most 36500",
    )
    retention_interval: float = Field(
        default=RETENTION_INTERVAL,
        ge=0,
        description="Seconds between the worker's retention runs (api_usage partitions created ahead, expired ones "
        "dropped, replayed quarantine rows and finished notify deliveries aged out; one replica at a time); 0: off",
    )
    shutdown_grace: float = Field(
        default=SHUTDOWN_GRACE,
        gt=0,
        description="Seconds to drain after SIGTERM (in-flight batch, then outbox); keep below the pod's grace period",
    )

    # circuit breaker
    breaker_window: int = Field(
        default=BREAKER_WINDOW, ge=10, description="Most recent messages the circuit breaker looks at"
    )
    breaker_min_messages: int = Field(
        default=BREAKER_MIN_MESSAGES, ge=1, description="Messages seen before the breaker may open"
    )
    breaker_invalid_ratio: float = Field(
        default=BREAKER_INVALID_RATIO,
        gt=0,
        le=1,
        description="Share of invalid messages in the window that stops the worker (0..1)",
    )

    # observability
    metrics_host: str = Field(
        default=METRICS_HOST, description="Address of the HTTP server (/metrics, /healthz, /readyz)"
    )
    metrics_port: int = Field(
        default=METRICS_PORT, ge=0, le=65_535, description="Port of the HTTP server; 0 picks a free one"
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        default="INFO", description="DEBUG, INFO, WARNING or ERROR"
    )
    log_format: Literal["auto", "json", "console"] = Field(
        default="auto", description="auto, json or console; auto: console on a terminal, JSON lines otherwise"
    )

    # notify (issue 15)
    notify_group_id: str = Field(
        default=NOTIFY_GROUP_ID, min_length=1, description="Consumer group of `notify run` on the alerts topic"
    )
    notify_secrets_key: SecretStr | None = Field(
        default=None,
        description="Base64 of 32 random bytes: the AES-GCM key of destination URLs and signing secrets "
        "(required by `notify`)",
    )
    notify_previous_secrets_key: SecretStr | None = Field(
        default=None,
        description="While the secrets key rotates: the one being retired (base64 of 32 bytes); destinations it "
        "sealed still open, and `notify reseal` seals them under the current one",
    )
    notify_allow_http: bool = Field(
        default=False, description="Allow http:// destination URLs (tests and development only)"
    )
    notify_allowed_networks: str = Field(
        default="",
        description="CIDRs a destination may resolve to although private, loopback or link-local, "
        "comma-separated (e.g. 127.0.0.0/8 in tests)",
    )
    notify_timeout: float = Field(
        default=NOTIFY_TIMEOUT, gt=0, le=60, description="Seconds one delivery attempt may take, connecting included"
    )
    notify_max_age: float = Field(
        default=NOTIFY_MAX_AGE, gt=0, description="Seconds after which an undelivered delivery is marked failed"
    )
    notify_backoff_initial: float = Field(
        default=NOTIFY_BACKOFF_INITIAL, gt=0, description="Seconds before the first retry of a destination"
    )
    notify_backoff_max: float = Field(
        default=NOTIFY_BACKOFF_MAX, gt=0, description="Longest wait between attempts (exponential, with jitter)"
    )
    notify_per_destination: int = Field(
        default=NOTIFY_PER_DESTINATION, ge=1, le=32, description="Concurrent delivery attempts per destination"
    )
    notify_max_in_flight: int = Field(
        default=NOTIFY_MAX_IN_FLIGHT, ge=1, description="Concurrent delivery attempts in all"
    )
    notify_poll_interval: float = Field(
        default=NOTIFY_POLL_INTERVAL, gt=0, description="Seconds between scans for due deliveries"
    )
    notify_link_template: str = Field(
        default="",
        description="Link shown in Slack messages, with {organization_id} {budget_id} {alert_id} {scope} "
        "{project_id} {user_id} placeholders; empty: no link",
    )
    # collector (issue 14: `cost-worker collect`)
    collect_openai_base_url: str = Field(
        default=COLLECT_OPENAI_BASE_URL, min_length=1, description="OpenAI Admin API base URL (data residency, proxy)"
    )
    collect_anthropic_base_url: str = Field(
        default=COLLECT_ANTHROPIC_BASE_URL, min_length=1, description="Anthropic Admin API base URL"
    )
    collect_key_encryption_key_file: Path | None = Field(
        default=None,
        description="File with the 32-byte key-encryption key (raw, hex or base64) that wraps stored admin keys",
    )
    collect_previous_key_encryption_key_file: Path | None = Field(
        default=None,
        description="While the key-encryption key rotates: file with the one being retired; keys it wrapped still "
        "open, and `keys rewrap` wraps them under the current one",
    )
    collect_interval: float = Field(
        default=COLLECT_INTERVAL, gt=0, description="Seconds between polls of every provider account"
    )
    collect_trailing_days: int = Field(
        default=COLLECT_TRAILING_DAYS,
        ge=0,
        le=31,
        description="Days re-read on every poll, before the open bucket (providers finalise costs late)",
    )
    collect_backfill_start: date | None = Field(
        default=None,
        description="First day (UTC, YYYY-MM-DD) collected on an account's first poll; empty: 30 days back",
    )
    collect_request_timeout: float = Field(
        default=COLLECT_REQUEST_TIMEOUT, gt=0, description="Seconds one provider API request may take"
    )
    collect_max_attempts: int = Field(
        default=COLLECT_MAX_ATTEMPTS,
        ge=1,
        le=20,
        description="Attempts per provider request on 429, 5xx, timeouts and connection errors",
    )
    collect_max_retry_after: float = Field(
        default=COLLECT_MAX_RETRY_AFTER,
        gt=0,
        description="Longest Retry-After honoured, in seconds; longer fails the endpoint until the next poll",
    )
    collect_retry_initial_backoff: float = Field(
        default=COLLECT_RETRY_INITIAL_BACKOFF,
        gt=0,
        description="Seconds before the first retry of a provider request on 5xx, timeouts and connection errors "
        "(exponential, with jitter)",
    )
    collect_retry_max_backoff: float = Field(
        default=COLLECT_RETRY_MAX_BACKOFF, gt=0, description="Longest wait between two provider attempts, in seconds"
    )
    collect_stale_after: float = Field(
        default=COLLECT_STALE_AFTER,
        gt=0,
        description="Seconds without a successful poll of an endpoint before the collector's /readyz fails",
    )
    collect_auth_retry_interval: float = Field(
        default=COLLECT_AUTH_RETRY_INTERVAL,
        gt=0,
        description="Seconds before an account whose admin key the provider refused (401), or an endpoint it "
        "refused to that key (403), is tried again, with one request (a changed key is tried at once)",
    )
    collect_once_max_wait: float = Field(
        default=COLLECT_ONCE_MAX_WAIT,
        gt=0,
        description="`collect --once` only: seconds it waits for an unreachable database or broker (at its start, "
        "a poll failing on them, publishing) before it gives up (exit 1 before the poll, 3 after it started); the "
        "long-running collector waits as long as it takes",
    )

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @field_validator(
        "database_role",
        "kafka_sasl_username",
        "kafka_bootstrap_servers",
        "collect_key_encryption_key_file",
        "collect_previous_key_encryption_key_file",
        "collect_backfill_start",
        mode="before",
    )
    @classmethod
    def _empty_is_none(cls, value: Any) -> Any:
        return None if value == "" else value

    # --- cross-field checks, all reported together ----------------------------------------------------

    def problems(self, *, require: tuple[str, ...] = ()) -> list[str]:
        """Everything wrong with these settings beyond single-field validation."""
        found: list[str] = []
        for name in require:
            if getattr(self, name) is None:
                found.append(f"{env_name(name)}: required")
        if self.database_url is not None:
            url_found = database_url_problems(self.database_url.get_secret_value())
            found += url_found or database_ca_problems(self.database_url.get_secret_value())
        if self.database_pool_min > self.database_pool_max:
            found.append(f"{env_name('database_pool_min')}: larger than {env_name('database_pool_max')}")
        if self.kafka_bootstrap_servers is not None:
            for server in self.kafka_bootstrap_servers.split(","):
                host, _, port = server.strip().rpartition(":")
                if not host or not port.isdigit():
                    found.append(f"{env_name('kafka_bootstrap_servers')}: {server.strip()!r} is not host:port")
                elif not valid_port(port):
                    found.append(f"{env_name('kafka_bootstrap_servers')}: {server.strip()!r}: {PORT_RANGE}")
        sasl = self.kafka_security_protocol.startswith("SASL")
        if sasl:
            for name in ("kafka_sasl_mechanism", "kafka_sasl_username", "kafka_sasl_password"):
                if getattr(self, name) is None:
                    found.append(f"{env_name(name)}: required when security protocol is {self.kafka_security_protocol}")
        elif self.kafka_sasl_mechanism is not None:
            found.append(f"{env_name('kafka_sasl_mechanism')}: set, but the security protocol uses no SASL")
        for name in ("kafka_ssl_cafile", "kafka_ssl_certfile", "kafka_ssl_keyfile"):
            path = getattr(self, name)
            if path is not None and not path.is_file():
                found.append(f"{env_name(name)}: no such file: {path}")
        for name in ("collect_openai_base_url", "collect_anthropic_base_url"):
            found += [f"{env_name(name)}: {problem}" for problem in base_url_problems(getattr(self, name))]
        for name in ("collect_key_encryption_key_file", "collect_previous_key_encryption_key_file"):
            path = getattr(self, name)
            if path is not None and not path.is_file():
                found.append(f"{env_name(name)}: no such file")
        if (self.kafka_ssl_certfile is None) != (self.kafka_ssl_keyfile is None):
            found.append(f"{env_name('kafka_ssl_certfile')}/{env_name('kafka_ssl_keyfile')}: set both or neither")
        if self.kafka_heartbeat_interval * 3 > self.kafka_session_timeout:
            found.append(f"{env_name('kafka_heartbeat_interval')}: must be at most a third of the session timeout")
        if self.retry_initial_backoff > self.retry_max_backoff:
            found.append(f"{env_name('retry_initial_backoff')}: larger than {env_name('retry_max_backoff')}")
        if self.collect_retry_initial_backoff > self.collect_retry_max_backoff:
            found.append(
                f"{env_name('collect_retry_initial_backoff')}: larger than {env_name('collect_retry_max_backoff')}"
            )
        topics = [
            self.topic_provider_buckets,
            self.topic_api_usage,
            self.topic_budget_alerts,
            self.topic_dead_letter,
        ]
        if len(set(topics)) != len(topics):
            found.append("COST_WORKER_TOPIC_*: the four topics must be distinct")
        found += self._notify_problems()
        return found

    def _notify_problems(self) -> list[str]:
        found: list[str] = []
        for name in ("notify_secrets_key", "notify_previous_secrets_key"):
            secret = getattr(self, name)
            if secret is None:
                continue
            try:
                key = base64.b64decode(secret.get_secret_value(), validate=True)
            except ValueError:
                key = b""
            if len(key) != NOTIFY_SECRETS_KEY_BYTES:
                found.append(f"{env_name(name)}: must be base64 of {NOTIFY_SECRETS_KEY_BYTES} bytes")
        for network in split_list(self.notify_allowed_networks):
            try:
                ipaddress.ip_network(network, strict=False)
            except ValueError:
                found.append(f"{env_name('notify_allowed_networks')}: {network!r} is not a network (CIDR)")
        if self.notify_backoff_initial > self.notify_backoff_max:
            found.append(f"{env_name('notify_backoff_initial')}: larger than {env_name('notify_backoff_max')}")
        if self.notify_group_id == self.kafka_group_id:
            found.append(f"{env_name('notify_group_id')}: must differ from {env_name('kafka_group_id')}")
        return found

    # --- derived ----------------------------------------------------------------------------------------

    @property
    def input_topics(self) -> tuple[str, str]:
        return (self.topic_provider_buckets, self.topic_api_usage)

    def dsn(self) -> str:
        assert self.database_url is not None, "database_url is required here"
        return self.database_url.get_secret_value()

    def kafka_options(self) -> dict[str, Any]:
        """Connection options shared by every aiokafka client."""
        assert self.kafka_bootstrap_servers is not None, "kafka_bootstrap_servers is required here"
        options: dict[str, Any] = {
            "bootstrap_servers": self.kafka_bootstrap_servers,
            "client_id": self.kafka_client_id,
            "security_protocol": self.kafka_security_protocol,
            "request_timeout_ms": int(self.kafka_request_timeout * 1000),
        }
        if self.kafka_security_protocol in ("SSL", "SASL_SSL"):
            context = ssl.create_default_context(cafile=str(self.kafka_ssl_cafile) if self.kafka_ssl_cafile else None)
            if self.kafka_ssl_certfile and self.kafka_ssl_keyfile:
                context.load_cert_chain(str(self.kafka_ssl_certfile), str(self.kafka_ssl_keyfile))
            options["ssl_context"] = context
        if self.kafka_sasl_mechanism is not None:
            options["sasl_mechanism"] = self.kafka_sasl_mechanism
            options["sasl_plain_username"] = self.kafka_sasl_username
            options["sasl_plain_password"] = (
                self.kafka_sasl_password.get_secret_value() if self.kafka_sasl_password else None
            )
        return options

    def redacted(self) -> dict[str, str]:
        """Every setting as ``COST_WORKER_NAME -> value`` with secrets masked, for display."""
        shown: dict[str, str] = {}
        for name in type(self).model_fields:
            value = getattr(self, name)
            if name == "database_url" and value is not None:
                text = redact_url(value.get_secret_value())
            elif name in ("collect_openai_base_url", "collect_anthropic_base_url"):
                text = redact_url(value, user_is_secret=True)  # an egress proxy URL may carry a token as its user
            elif isinstance(value, SecretStr):
                text = "**********"
            elif value is None:
                text = ""
            else:
                text = str(value)
            shown[env_name(name)] = text
        return shown

    def secrets(self) -> list[str]:
        """Secret values that must never appear in logs (the log redactor scrubs them)."""
        values: list[str] = []
        if self.database_url is not None:
            values += url_secrets(self.database_url.get_secret_value(), user_is_secret=False)
        if self.kafka_sasl_password is not None and self.kafka_sasl_password.get_secret_value():
            values.append(self.kafka_sasl_password.get_secret_value())
        for key in (self.notify_secrets_key, self.notify_previous_secrets_key):
            if key is not None and key.get_secret_value():
                values.append(key.get_secret_value())
        for url in (self.collect_openai_base_url, self.collect_anthropic_base_url):
            values += url_secrets(url, user_is_secret=True)
        return list(dict.fromkeys(values))


def database_ca_problems(url: str) -> list[str]:
    """``sslmode=verify-full`` (or ``verify-ca``) without a readable CA file: say so once, before connecting.

    The CA file is, as in libpq and asyncpg: ``sslrootcert`` in the URL, else ``PGSSLROOTCERT``, else
    ``~/.postgresql/root.crt`` (which does not exist in the image: its user has no home directory).
    """
    try:
        query = parse_qs(urlsplit(url).query)
    except ValueError:
        return []
    sslmode = (query.get("sslmode") or [os.environ.get("PGSSLMODE", "")])[-1]
    if sslmode not in VERIFYING_SSLMODES:
        return []
    root = (query.get("sslrootcert") or [os.environ.get("PGSSLROOTCERT", "")])[-1]
    if not root:
        try:
            root = str(Path.home() / ".postgresql" / "root.crt")
        except RuntimeError:
            root = "~/.postgresql/root.crt"
    if Path(root).is_file():
        return []
    return [
        f"{env_name('database_url')}: sslmode={sslmode} needs the CA certificate of the PostgreSQL server, but "
        f"{root} does not exist: mount the CA bundle and name it with sslrootcert= in the URL or PGSSLROOTCERT "
        '(deploy/README.md "TLS")'
    ]


def split_list(value: str) -> list[str]:
    return [part.strip() for part in value.split(",") if part.strip()]


def env_name(field: str) -> str:
    return ENV_PREFIX + field.upper()


def redact_url(url: str, *, user_is_secret: bool = False) -> str:
    """``postgresql://user:secret@host/db?sslpassword=x`` -> ``postgresql://user:***@host/db?sslpassword=***``.

    With ``user_is_secret`` (a proxy's base URL: ``https://TOKEN@proxy/``) a user without a password is masked. A URL
    whose user part cannot be told from its host (an unencoded '/', '?', '#' or '@' in a password) is not shown.
    """
    parts = _split(url)
    if parts is None or _cut_credentials(parts):
        return "<unparseable URL: not shown>"
    userinfo, at, hostinfo = parts.netloc.rpartition("@")
    netloc = parts.netloc
    if at:
        user, colon, _ = userinfo.partition(":")
        if colon:
            netloc = f"{user}:{MASK}@{hostinfo}"
        elif user_is_secret:
            netloc = f"{MASK}@{hostinfo}"
    query = "&".join(
        f"{name}={MASK}" if eq and is_secret_param(name) else f"{name}{eq}{value}"
        for name, eq, value in (pair.partition("=") for pair in parts.query.split("&"))
    )
    if netloc == parts.netloc and query == parts.query:
        return url  # nothing to hide: shown as written (urlunsplit would drop an empty host: postgresql:///db)
    return urlunsplit(parts._replace(netloc=netloc, query=query))


def url_secrets(url: str, *, user_is_secret: bool) -> list[str]:
    """The secret values in a URL (password, secret query parameters; with ``user_is_secret`` a user without a
    password too), as written and decoded, for the log redactor."""
    parts = _split(url)
    if parts is None:
        return []
    found: list[str] = []
    userinfo, at, _ = parts.netloc.rpartition("@")
    if at:
        user, colon, password = userinfo.partition(":")
        found += [password] if colon else []
        found += [user] if user_is_secret and not colon else []  # https://TOKEN@proxy/: the user is the secret
    for name, eq, value in (pair.partition("=") for pair in parts.query.split("&")):
        if eq and is_secret_param(name):
            found.append(value)
    decoded = [unquote(value) for value in found] + [unquote_plus(value) for value in found]
    return [value for value in dict.fromkeys(found + decoded) if value]


def is_secret_param(name: str) -> bool:
    key = unquote_plus(name).strip().lower().replace("-", "_")
    if key in NOT_SECRET_PARAMS:
        return False
    return any(word in key for word in SECRET_PARAM_WORDS) or key.endswith("key")


PORT_RANGE = "the port must be a number from 1 to 65535"


def valid_port(text: str) -> bool:
    return text.isascii() and text.isdigit() and 1 <= int(text) <= 65_535


def _split(url: str) -> SplitResult | None:
    try:
        return urlsplit(url)
    except ValueError:  # an unclosed '[', or characters that change under NFKC normalization in the host
        return None


def _cut_credentials(parts: SplitResult) -> bool:
    """An unencoded '/', '?' or '#' in a password ends the host part early (``user:pa/ss@host`` reads as host
    ``user``, port ``pa``); an unencoded '@' leaves two '@' (asyncpg splits at the first, urllib at the last)."""
    if parts.netloc.count("@") > 1:
        return True
    after = parts.path + parts.fragment + ("" if "@" in parts.netloc else parts.query)
    return "@" in after


def _url_shape_problems(url: str) -> tuple[SplitResult | None, list[str]]:
    """Problems every URL setting shares; they never quote the URL, which may hold a password."""
    parts = _split(url)
    if parts is None:
        return None, [f"not a valid URL (an unclosed '[' of an IPv6 address, or invalid characters); {PERCENT_ENCODE}"]
    if _cut_credentials(parts):
        return None, [f"cannot tell the password from the host: {PERCENT_ENCODE}"]
    return parts, []


def database_url_problems(url: str) -> list[str]:
    """What asyncpg would fail on later (with a message that may quote the password), said now without it."""
    name = env_name("database_url")
    parts, found = _url_shape_problems(url)
    if parts is None:
        return [f"{name}: {problem}" for problem in found]
    if parts.scheme not in ("postgres", "postgresql"):
        return [f"{name}: must be a postgresql:// URL, got {parts.scheme or 'none'}://"]
    found += _hostlist_problems(parts.netloc.rpartition("@")[2], f"{name}: ", after_password=True)
    try:
        query = parse_qs(parts.query, strict_parsing=True) if parts.query else {}
    except ValueError:
        found.append(f"{name}: the query string must be name=value pairs joined by '&'")
        query = {}
    if "host" in query:  # asyncpg: the last host=, a list like the one before the path
        found += _hostlist_problems(query["host"][-1], f"{name}: host= in the query, ", after_password=False)
    for port in query["port"][-1].split(",") if "port" in query else []:  # asyncpg: the last port=, a list
        if not valid_port(port.strip()):
            found.append(f"{name}: port= in the query: {PORT_RANGE}")
    return found


def _hostlist_problems(hostlist: str, prefix: str, *, after_password: bool) -> list[str]:
    """asyncpg's host list: ``host[:port]``, ``[IPv6][:port]`` or a socket directory, comma-separated."""
    found: list[str] = []
    specs = hostlist.split(",") if hostlist else []
    for number, spec in enumerate(specs, start=1):
        which = f"host {number} of {len(specs)}" if len(specs) > 1 else "the host"
        if not spec:
            found.append(f"{prefix}{which} is empty")
            continue
        if spec.startswith("/"):
            continue  # a Unix socket directory (host=/var/run/postgresql)
        if spec.startswith("["):
            bracketed = spec.partition("]")
            if not bracketed[1] or len(bracketed[0]) < 2 or (bracketed[2] and not bracketed[2].startswith(":")):
                found.append(f"{prefix}{which}: an IPv6 address is written [address] or [address]:port")
                continue
            port = bracketed[2][1:]
        else:
            port = spec.partition(":")[2]
        if port and not valid_port(unquote(port)):
            hint = f" ({PERCENT_ENCODE})" if after_password and not port.isdigit() else ""
            found.append(f"{prefix}{which}: {PORT_RANGE}{hint}")
    return found


def base_url_problems(url: str) -> list[str]:
    parts, found = _url_shape_problems(url)
    if parts is None:
        return found
    if parts.scheme not in ("http", "https") or not parts.netloc:
        return ["must be an http(s):// URL"]
    hostinfo = parts.netloc.rpartition("@")[2]
    if hostinfo.startswith("["):
        port = hostinfo.partition("]")[2].removeprefix(":")
    else:
        port = hostinfo.rpartition(":")[2] if ":" in hostinfo else ""
    if not parts.hostname:
        return ["the URL has no host"]
    if port and not valid_port(port):
        hint = "" if port.isdigit() else f" ({PERCENT_ENCODE})"
        return [f"{PORT_RANGE}{hint}"]
    return []


def load_settings(*, require: tuple[str, ...] = (), **overrides: Any) -> Settings:
    """Read the environment, validate, and raise ``ConfigError`` listing every problem at once."""
    secrets_dir = overrides.get("secrets_dir") or os.environ.get(SECRETS_DIR_ENV) or None
    if secrets_dir is not None and not Path(secrets_dir).is_dir():
        raise ConfigError([f"{SECRETS_DIR_ENV}: no such directory: {secrets_dir}"])
    try:
        settings = Settings(**overrides, _secrets_dir=secrets_dir)
    except ValidationError as exc:
        problems = []
        bad: set[str] = set()
        for error in exc.errors(include_url=False, include_input=False):
            field = ".".join(str(part) for part in error["loc"])
            bad.add(str(error["loc"][0]) if error["loc"] else field)
            problems.append(f"{env_name(field)}: {error['msg']}")
        # Cross-field checks too: re-read with the broken fields at their defaults (arguments win over the
        # environment) and keep the problems that do not involve them.
        defaults = {name: Settings.model_fields[name].default for name in bad if name in Settings.model_fields}
        try:
            partial = Settings(**{**overrides, **defaults}, _secrets_dir=secrets_dir)
        except ValidationError:
            pass
        else:
            problems += [p for p in partial.problems(require=require) if not any(env_name(b) in p for b in bad)]
        raise ConfigError(problems) from None
    problems = settings.problems(require=require)
    if problems:
        raise ConfigError(problems)
    return settings


def settings_table() -> str:
    """The configuration reference as a Markdown table (README.md embeds it; a test keeps them in sync)."""
    rows = ["| variable | default | description |", "| --- | --- | --- |"]
    for name, field in Settings.model_fields.items():
        shown = "" if field.default is None else str(field.default)
        rows.append(f"| `{env_name(name)}` | `{shown}` | {field.description or ''} |")
    return "\n".join(rows)


if __name__ == "__main__":  # pragma: no cover - `python -m worker.config` prints the README table
    print(settings_table())
