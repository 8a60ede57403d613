"""The PostgreSQL driver boundary: the one place that knows asyncpg's errors.

Transient ones become ``DatabaseUnavailable`` (the caller retries the batch), data the database refuses becomes
``DataRejected``, anything else is a bug or a misconfiguration and becomes ``FatalError``. Every module that runs
SQL lets driver errors out through ``translated`` (a decorator) or ``translating`` (a block), and drops them in
best-effort cleanup through ``ignoring_driver_errors``, never catching asyncpg's exceptions itself.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable, Iterator
from typing import ParamSpec, TypeVar

import asyncpg

from worker.errors import DatabaseUnavailable, DataRejected, FatalError

P = ParamSpec("P")
T = TypeVar("T")

# SQLSTATE classes worth retrying: connection exception, transaction rollback (serialization failure,
# deadlock), insufficient resources, operator intervention (admin shutdown, statement timeout), system error.
TRANSIENT_SQLSTATE_CLASSES = frozenset({"08", "40", "53", "57", "58"})
TRANSIENT_SQLSTATES = frozenset({"55P03"})  # lock_not_available
DATA_SQLSTATE_CLASSES = frozenset({"22", "23"})  # data exception, integrity constraint violation
# A table or function the code names does not exist: almost always a database `migrate` never ran on.
SCHEMA_MISSING_SQLSTATES = frozenset({"42P01", "42883"})  # undefined_table, undefined_function
NOT_MIGRATED_HINT = " (is the database migrated? run `cost-worker migrate`)"
DRIVER_ERRORS = (asyncpg.PostgresError, OSError, TimeoutError, asyncpg.InterfaceError, asyncpg.InternalClientError)


def translate(exc: BaseException) -> Exception:
    """Map a driver exception to the worker's error families (the caller raises it ``from exc``)."""
    if isinstance(exc, asyncpg.PostgresError):
        sqlstate = exc.sqlstate or ""
        if sqlstate[:2] in TRANSIENT_SQLSTATE_CLASSES or sqlstate in TRANSIENT_SQLSTATES:
            return DatabaseUnavailable(f"database: {type(exc).__name__}: {exc}")
        if sqlstate[:2] in DATA_SQLSTATE_CLASSES:
            return DataRejected(f"database rejected data: {type(exc).__name__} ({sqlstate}): {exc}")
        hint = NOT_MIGRATED_HINT if sqlstate in SCHEMA_MISSING_SQLSTATES else ""
        return FatalError(f"database error {type(exc).__name__} ({sqlstate}): {exc}{hint}")
    if isinstance(exc, asyncpg.ClientConfigurationError) or (
        isinstance(exc, FileNotFoundError) and _raised_reading_settings(exc)
    ):
        # Not an outage: a setting names what does not exist (a CA file for sslmode=verify-full, ...).
        return FatalError(f"database connection settings: {exc}")
    if isinstance(exc, (OSError, TimeoutError, asyncpg.InterfaceError, asyncpg.InternalClientError)):
        return DatabaseUnavailable(f"database unreachable: {type(exc).__name__}: {exc}")
    if isinstance(exc, Exception):
        return exc
    raise exc


# The asyncpg function that reads the connection settings' files (sslrootcert, sslcert, passfile). A missing
# file raised there is a configuration error; the same FileNotFoundError raised while connecting means the
# server's unix socket is gone (PostgreSQL stopped or restarting): an outage, retried like any other.
_SETTINGS_READER = "_parse_connect_dsn_and_args"


def _raised_reading_settings(exc: BaseException) -> bool:
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_name == _SETTINGS_READER:
            return True
        tb = tb.tb_next
    return False


def translated(fn: Callable[P, Awaitable[T]]) -> Callable[P, Awaitable[T]]:
    """Decorator: driver errors raised by ``fn`` come out translated."""

    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return await fn(*args, **kwargs)
        except DRIVER_ERRORS as exc:
            raise translate(exc) from exc

    wrapper.__name__ = fn.__name__
    wrapper.__doc__ = fn.__doc__
    return wrapper


@contextlib.contextmanager
def translating() -> Iterator[None]:
    """Block form of ``translated``: driver errors raised inside the block come out translated."""
    try:
        yield
    except DRIVER_ERRORS as exc:
        raise translate(exc) from exc


@contextlib.contextmanager
def ignoring_driver_errors() -> Iterator[None]:
    """Best-effort cleanup (an unlock, a close): a driver error inside the block is dropped, anything else not."""
    with contextlib.suppress(*DRIVER_ERRORS):
        yield


def unique_violation(exc: BaseException) -> bool:
    """Whether ``exc`` (a ``DataRejected``) was translated from a unique-constraint violation."""
    return isinstance(exc.__cause__, asyncpg.UniqueViolationError)


def foreign_key_violation(exc: BaseException) -> bool:
    """Whether ``exc`` (a ``DataRejected``) was translated from a foreign-key violation."""
    return isinstance(exc.__cause__, asyncpg.ForeignKeyViolationError)
