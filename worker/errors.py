"""Every error the worker raises on purpose.

One root class whose docstring is its default message. Three families decide what happens next:

- ``InvalidInput``: the message is bad. It becomes a quarantine row with a reason; the stream goes on.
- ``TransientError``: the infrastructure hiccuped (database or broker unreachable, serialization failure,
  deadlock). The whole batch is retried with backoff; nothing is skipped, nothing is quarantined.
- ``FatalError``: continuing would be wrong (bad configuration, a schema from the future, a producer that
  sends only garbage). The worker stops with a one-line message and a non-zero exit code.

Driver errors are wrapped at one boundary per driver with ``raise ... from exc``: asyncpg's in ``worker.store.errors``,
aiokafka's in ``worker.kafka``. Nothing else sees them.
"""

from __future__ import annotations

from worker.quarantine import Reason


class CostWorkerError(Exception):
    """Cost worker error."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (self.__doc__ or "").strip())


# --- invalid input ------------------------------------------------------------------------------------


class InvalidInput(CostWorkerError):
    """Invalid input: the message is quarantined with this reason and detail (``worker.decode`` turns it into a
    ``Quarantined`` outcome; it never leaves the decoder)."""

    def __init__(self, reason: Reason, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


# --- transient ----------------------------------------------------------------------------------------


class TransientError(CostWorkerError):
    """A transient infrastructure failure; the batch will be retried."""

    def __init__(self, message: str | None = None, *, kind: str | None = None) -> None:
        super().__init__(message)
        self.kind = kind or type(self).__name__  # what failed, for metrics: the driver's error name, if any


class DatabaseUnavailable(TransientError):
    """The database is unreachable or refused the work for a transient reason."""


class BrokerUnavailable(TransientError):
    """The Kafka broker is unreachable."""


class StaleOffsets(CostWorkerError):
    """The stored offsets moved under this worker: another consumer owns the partition now.

    Not transient in the retry sense: the batch is dropped (rolled back) and the partitions are re-sought
    to the offsets stored in the database.
    """


# --- fatal --------------------------------------------------------------------------------------------


class FatalError(CostWorkerError):
    """The worker cannot continue."""


class ConfigError(FatalError):
    """Invalid configuration."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("invalid configuration: " + "; ".join(problems))


class UsageError(ConfigError):
    """Invalid command-line arguments: a flag's or argument's value, not a setting (printed as ``usage error``)."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__(problems)
        self.args = ("invalid arguments: " + "; ".join(problems),)


class MigrationError(FatalError):
    """The database schema cannot be migrated."""


class SchemaMismatch(FatalError):
    """The database schema does not match this version of the worker."""


class CircuitOpen(FatalError):
    """Too many invalid messages: the producer looks broken, so the worker stopped."""


class DataRejected(FatalError):
    """The database rejected data that passed validation."""
