"""The collector's errors, under the worker's one root (``worker.errors``).

Messages name the provider, account and endpoint, never an admin key: no request header and no response body
goes into them (a provider's 401 body may echo part of the key).
"""

from __future__ import annotations

from worker.errors import CostWorkerError, FatalError, TransientError


class CollectError(CostWorkerError):
    """The collector failed."""


class ProviderUnavailable(TransientError):
    """The provider answered 5xx, timed out or could not be reached; retried after its Retry-After (a 503 may
    send one) or with backoff."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after  # seconds the provider asked to wait, when it said


class RateLimited(ProviderUnavailable):
    """The provider answered 429; retried after its Retry-After."""


class ProviderAuthFailed(CollectError):
    """The provider refused the admin key (401/403): that account stops until a retry after
    ``collect_auth_retry_interval`` is accepted, or its key changes (``keys rotate``)."""


class ProviderRejected(CollectError):
    """The provider refused the request or answered something that is not a documented page."""


class KeyStoreError(FatalError):
    """The admin keys cannot be read or written (no key-encryption key, wrong key-encryption key, ...)."""
