"""Every Prometheus metric the worker exports, in one place.

Names carry the ``cost_worker_`` prefix and base units; counters end in ``_total``.
"""

from __future__ import annotations

import platform

from prometheus_client import Counter, Gauge, Histogram

from worker import __version__

BATCH_SIZE_BUCKETS = (1, 10, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000)
DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

BUILD_INFO = Gauge("cost_worker_build_info", "Always 1; labels say which build is running.", ["version", "python"])
BUILD_INFO.labels(version=__version__, python=platform.python_version()).set(1)

# --- ingestion ------------------------------------------------------------------------------------------
MESSAGES = Counter(
    "cost_worker_messages_total",
    "Messages consumed, by input topic and outcome "
    "(inserted, updated, unchanged, stale_revision, duplicate, quarantined).",
    ["topic", "outcome"],
)
QUARANTINED = Counter(
    "cost_worker_quarantined_total", "Messages quarantined, by input topic and reason.", ["topic", "reason"]
)
LEDGER_LINES = Counter(
    "cost_worker_ledger_lines_total",
    "Ledger lines written to cost_data, by api_version and outcome (inserted, updated, unchanged, stale_revision, "
    "superseded: a stored line a newer snapshot of its window no longer has).",
    ["api_version", "outcome"],
)
UNPRICED_LINES = Counter(
    "cost_worker_unpriced_usage_lines_total",
    "Usage ledger lines stored without an amount: neither an override (model_prices) nor the catalogue priced them.",
    ["provider"],
)
BATCH_SIZE = Histogram("cost_worker_batch_size_messages", "Messages per batch.", buckets=BATCH_SIZE_BUCKETS)
BATCH_DURATION = Histogram(
    "cost_worker_batch_duration_seconds",
    "Time spent per batch, by stage (fetch, decode, wait, database, kafka_commit, total).",
    ["stage"],
    buckets=DURATION_BUCKETS,
)
BATCHES = Counter(
    "cost_worker_batches_total",
    "Batches by result (committed, retried, fenced, abandoned).",
    ["result"],
)
DATABASE_RETRIES = Counter(
    "cost_worker_database_retries_total",
    "Batch attempts that failed transiently and were retried.",
    ["error"],
)

# --- consumer position ----------------------------------------------------------------------------------
CONSUMER_LAG = Gauge(
    "cost_worker_consumer_lag_messages",
    "Messages between the partition's high watermark (from fetch responses) and the offset stored in the database.",
    ["topic", "partition"],
)
LAST_COMMIT = Gauge(
    "cost_worker_last_commit_timestamp_seconds",
    "Unix time of the last database commit that advanced the partition's stored offset "
    "(or of the partition's assignment to this worker, when that is later).",
    ["topic", "partition"],
)
INPUT_LOST_TO_RETENTION = Counter(
    "cost_worker_input_lost_to_retention_messages_total",
    "Offsets the topic's retention deleted before the worker consumed them (stored position below the partition's "
    "first offset at assignment): messages that can never be counted.",
    ["topic"],
)
ASSIGNED_PARTITIONS = Gauge("cost_worker_assigned_partitions", "Partitions currently assigned to this worker.")
REBALANCES = Counter("cost_worker_rebalances_total", "Partition assignments and revocations.", ["event"])
CIRCUIT_INVALID_RATIO = Gauge(
    "cost_worker_circuit_breaker_invalid_ratio", "Share of invalid messages among the most recent window."
)
READY = Gauge("cost_worker_ready", "1 when /readyz answers ready, else 0.")

# --- outbox ---------------------------------------------------------------------------------------------
OUTBOX_BACKLOG = Gauge("cost_worker_outbox_backlog_messages", "Rows waiting in the outbox.")
OUTBOX_OLDEST_AGE = Gauge("cost_worker_outbox_oldest_age_seconds", "Age of the oldest outbox row (0 when empty).")
OUTBOX_PUBLISHED = Counter(
    "cost_worker_outbox_published_total", "Outbox messages acknowledged by the broker, by topic.", ["topic"]
)
OUTBOX_FAILURES = Counter(
    "cost_worker_outbox_failures_total", "Outbox publish attempts that failed, by error.", ["error"]
)

# --- budgets --------------------------------------------------------------------------------------------
ALERTS_RAISED = Counter(
    "cost_worker_alerts_raised_total",
    "Budget alerts raised, by scope and threshold percent.",
    ["scope", "threshold"],
)
BUDGET_EVALUATIONS = Counter(
    "cost_worker_budget_evaluations_total",
    "Budget periods evaluated, by trigger (batch, sweep).",
    ["trigger"],
)
BUDGET_EVALUATION_DURATION = Histogram(
    "cost_worker_budget_evaluation_duration_seconds",
    "Time spent evaluating budgets, per batch or sweep round.",
    ["trigger"],
    buckets=DURATION_BUCKETS,
)
SPEND_REBUILDS_QUEUED = Gauge(
    "cost_worker_spend_rebuilds_queued",
    "Organizations whose spend aggregate a migration queued for a rebuild and the budget sweep has not rebuilt yet.",
)
# --- budgets: currencies and the alert lifecycle (issue 12) -------------------------------------------------
ALERTS_RESOLVED = Counter(
    "cost_worker_alerts_resolved_total",
    "Budget alerts resolved (spend fell back below their level in the same period), by scope and threshold percent.",
    ["scope", "threshold"],
)
CONVERTED_ROWS = Counter(
    "cost_worker_budget_converted_rows_total",
    "Spend rows converted into a budget's currency at an exchange rate, per evaluation.",
    ["budget_currency", "row_currency"],
)
UNCONVERTIBLE = Counter(
    "cost_worker_budget_unconvertible_total",
    "Budget evaluations skipped because spend rows need an exchange rate that exchange_rates lacks "
    "(no alert is raised or resolved from a partial sum).",
    ["budget_currency", "row_currency"],
)

# --- prices (issue 13)
CATALOGUE_ESTIMATES = Counter(
    "cost_worker_catalogue_estimated_events_total",
    "API-usage events without cost_usd whose cost the price catalogue estimated (per delivery).",
)

# --- notify (issue 15) ----------------------------------------------------------------------------------
NOTIFY_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 21600.0)
NOTIFY_ALERTS = Counter(
    "cost_worker_notify_alerts_total",
    "Alert messages consumed by notify, by outcome (matched: at least one delivery created, unmatched, invalid).",
    ["outcome"],
)
NOTIFY_DELIVERIES_CREATED = Counter(
    "cost_worker_notify_deliveries_created_total", "Deliveries created (one per alert and matching destination)."
)
NOTIFY_ATTEMPTS = Counter(
    "cost_worker_notify_attempts_total",
    "Delivery attempts by destination kind and outcome (delivered, retried, failed, disabled, refused, fenced, "
    "key_mismatch: the secrets key does not open the destination, retried).",
    ["kind", "outcome"],
)
NOTIFY_ATTEMPT_DURATION = Histogram(
    "cost_worker_notify_attempt_duration_seconds",
    "Duration of one HTTP delivery attempt, by destination kind.",
    ["kind"],
    buckets=DURATION_BUCKETS,
)
NOTIFY_DELIVERY_LATENCY = Histogram(
    "cost_worker_notify_delivery_latency_seconds",
    "Time from a delivery's creation to the receiver's 2xx answer, by destination kind.",
    ["kind"],
    buckets=NOTIFY_LATENCY_BUCKETS,
)
NOTIFY_BACKLOG = Gauge("cost_worker_notify_backlog_deliveries", "Deliveries pending (due now or waiting to retry).")
NOTIFY_OLDEST_PENDING_AGE = Gauge(
    "cost_worker_notify_oldest_pending_age_seconds", "Age of the oldest pending delivery (0 when none)."
)

# --- collector (issue 14: `cost-worker collect`) ------------------------------------------------------------
# Accounts are labelled by the provider's organization id (never by a key or its fingerprint).
COLLECT_REQUESTS = Counter(
    "cost_worker_collect_requests_total",
    "Provider admin API requests, by provider, report and HTTP status (or timeout, connection_error, "
    "invalid_response).",
    ["provider", "report", "status"],
)
COLLECT_PAGES = Counter(
    "cost_worker_collect_pages_total", "Provider pages fetched in complete windows, by report.", ["provider", "report"]
)
COLLECT_BUCKETS = Counter(
    "cost_worker_collect_buckets_published_total",
    "Provider buckets acknowledged by the broker, by report.",
    ["provider", "report"],
)
COLLECT_POLLS = Counter(
    "cost_worker_collect_polls_total",
    "Endpoint polls by result (ok, failed, auth_failed).",
    ["provider", "report", "result"],
)
COLLECT_AUTH_FAILURES = Counter(
    "cost_worker_collect_auth_failures_total",
    "Requests the provider answered 401 (the account's admin key refused), each stopping that account's poll.",
    ["provider", "account"],
)
COLLECT_ACCOUNT_REFUSED = Gauge(
    "cost_worker_collect_account_refused",
    "1 while the provider refuses the account's admin key (401): tried again every "
    "COST_WORKER_COLLECT_AUTH_RETRY_INTERVAL; no series otherwise.",
    ["provider", "account"],
)
COLLECT_ENDPOINT_REFUSALS = Counter(
    "cost_worker_collect_endpoint_refusals_total",
    "Requests the provider answered 403 (the admin key lacks the permission for this report), each stopping that "
    "endpoint only; the account's other endpoints go on.",
    ["provider", "account", "report"],
)
COLLECT_ENDPOINT_REFUSED = Gauge(
    "cost_worker_collect_endpoint_refused",
    "1 while the provider refuses the account's admin key for this report (403): tried again every "
    "COST_WORKER_COLLECT_AUTH_RETRY_INTERVAL; no series otherwise.",
    ["provider", "account", "report"],
)
COLLECT_LAST_SUCCESS = Gauge(
    "cost_worker_collect_last_success_timestamp_seconds",
    "Unix time of the last successful poll, per account and report.",
    ["provider", "account", "report"],
)
COLLECT_SINCE_SUCCESS = Gauge(
    "cost_worker_collect_seconds_since_last_success",
    "Seconds since the last successful poll, per account and report (updated every poll round).",
    ["provider", "account", "report"],
)
COLLECT_DATA_FRESHNESS = Gauge(
    "cost_worker_collect_newest_bucket_end_timestamp_seconds",
    "Unix time of the end of the newest bucket collected, per account and report (data freshness).",
    ["provider", "account", "report"],
)
COLLECT_ACTIVE = Gauge("cost_worker_collect_active", "1 when this replica holds the poller lock, else 0.")
COLLECT_OUTBOX_BACKLOG = Gauge(
    "cost_worker_collect_outbox_backlog_messages", "Staged collector messages not yet acknowledged by the broker."
)

# --- spend rules (issue 11)
UNKNOWN_MODEL_EVENTS = Counter(
    "cost_worker_unknown_model_events_total",
    "API-usage events whose model has no provider in the price catalogue (their estimate is never replaced).",
)

# --- partitions and retention (issue 18)
RETENTION_DURATION_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 1_800.0)
RETENTION_RUNS = Counter(
    "cost_worker_retention_runs_total",
    "Retention runs of this process (partitions ahead, expired ones dropped), by result (ok, failed, skipped: "
    "another replica held the lock).",
    ["result"],
)
for _result in ("ok", "failed", "skipped"):
    RETENTION_RUNS.labels(result=_result)
RETENTION_DURATION = Histogram(
    "cost_worker_retention_duration_seconds",
    "Time one retention run took (waiting for batches in flight included).",
    buckets=RETENTION_DURATION_BUCKETS,
)
RETENTION_PARTITIONS_DROPPED = Counter(
    "cost_worker_retention_partitions_dropped_total", "api_usage partitions retention detached and dropped."
)
RETENTION_PARTITIONS_CREATED = Counter(
    "cost_worker_retention_partitions_created_total", "api_usage partitions retention created ahead of their month."
)
RETENTION_QUARANTINE_DELETED = Counter(
    "cost_worker_retention_quarantine_rows_deleted_total", "Replayed quarantine rows retention deleted."
)
RETENTION_DELIVERIES_DELETED = Counter(
    "cost_worker_retention_deliveries_deleted_total", "Finished notify deliveries retention deleted."
)
RETENTION_RESUMED = Counter(
    "cost_worker_retention_resumed_total",
    "api_usage partitions an interrupted retention run left that a later run dropped, by the state it was left in "
    "(detach_pending; detached: detached, not dropped).",
    ["state"],
)
for _state in ("detach_pending", "detached"):
    RETENTION_RESUMED.labels(state=_state)
RETENTION_LEFT_ALONE = Gauge(
    "cost_worker_retention_tables_left_alone",
    "Tables named like api_usage partitions that retention will not drop (not detached by it, or detach pending "
    "but not started by it), at the last run: for a human to decide.",
)
RETENTION_KEPT_BY_BUDGETS = Gauge(
    "cost_worker_retention_partitions_kept_for_budgets",
    "api_usage partitions older than the retention period kept because an open budget period starts before their end.",
)
API_USAGE_PARTITIONS = Gauge("cost_worker_api_usage_partitions", "Partitions of api_usage (at the last retention run).")
API_USAGE_OLDEST_KEPT = Gauge(
    "cost_worker_api_usage_kept_from_timestamp_seconds",
    "Unix time of the first month whose API-usage detail is kept (0: nothing was ever dropped).",
)
