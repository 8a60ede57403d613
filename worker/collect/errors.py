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
    """The provider refused the admin key: 401, the key itself (that account stops), or 403, the key lacks the
    permission for this endpoint (that endpoint stops, the account's others go on); either until a retry after
    ``collect_auth_retry_interval`` is accepted, or the key changes (``keys rotate``)."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status  # 401 or 403

    @property
    def endpoint_only(self) -> bool:
        """403 Forbidden: the key is valid (other endpoints may answer it) but not allowed this endpoint."""
        return self.status == 403


class ProviderRejected(CollectError):
    """The provider refused the request or answered something that is not a documented page."""


class KeyStoreError(FatalError):
    """The admin keys cannot be read or written (no key-encryption key, wrong key-encryption key, ...)."""
