"""The PostgreSQL boundary: every statement of ``worker/sql/queries.sql`` runs in this package.

- ``errors``: the one place that knows asyncpg's errors (``translate``, ``translated``, ``translating``).
- ``pool``: the connection pool (``Database``), single connections (``connect``, ``close``), the session settings.
- ``tx``: the batch transaction's statements (``Tx``); ``columns``: typed rows -> the statements' column arrays.
- ``migrations``: the statements the migration runner uses.

Callers import from ``worker.store``; the names below are the package's interface.
"""

from worker.store.errors import (
    DATA_SQLSTATE_CLASSES,
    DRIVER_ERRORS,
    TRANSIENT_SQLSTATE_CLASSES,
    TRANSIENT_SQLSTATES,
    foreign_key_violation,
    ignoring_driver_errors,
    translate,
    translated,
    translating,
    unique_violation,
)
from worker.store.migrations import (
    AppliedMigration,
    applied_migrations,
    apply_migration,
    become_owner,
    generated_statements,
    migration_lock,
    migration_try_lock,
    migration_unlock,
    run_script,
)
from worker.store.pool import (
    APPLICATION_NAME,
    CLIENT_TIMEOUT_MARGIN,
    Database,
    StoredOffset,
    close,
    connect,
    recreate_database,
    server_settings,
)
from worker.store.tx import Spend, Tx

__all__ = [
    "APPLICATION_NAME",
    "CLIENT_TIMEOUT_MARGIN",
    "DATA_SQLSTATE_CLASSES",
    "DRIVER_ERRORS",
    "TRANSIENT_SQLSTATES",
    "TRANSIENT_SQLSTATE_CLASSES",
    "AppliedMigration",
    "Database",
    "Spend",
    "StoredOffset",
    "Tx",
    "applied_migrations",
    "apply_migration",
    "become_owner",
    "close",
    "connect",
    "foreign_key_violation",
    "generated_statements",
    "ignoring_driver_errors",
    "migration_lock",
    "migration_try_lock",
    "migration_unlock",
    "recreate_database",
    "run_script",
    "server_settings",
    "translate",
    "translated",
    "translating",
    "unique_violation",
]
