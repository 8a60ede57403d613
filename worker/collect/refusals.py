"""Refused admin keys (401: an account) and endpoints (403: one report of an account), and when to try again."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Refusals:
    """The accounts whose admin key the provider refused (401), or the endpoints (403, one instance each): which
    key, and when (monotonic seconds). Keys are ``(provider, account)`` or ``(provider, account, report)``.

    A refused key is not sent again until ``retry_interval`` seconds have passed; then it is tried once more (the
    poll of an account stops at its first refusal: one request per interval, never the retry ladder of a 5xx). A
    changed key (``keys rotate``, a new secret file) is tried at once. Before, a refusal lasted until the key
    changed or the process restarted: one 401 during a provider's incident stopped the account for good."""

    retry_interval: float
    refused: dict[tuple[str, ...], tuple[str, float]] = field(default_factory=dict)  # key -> (fingerprint, when)

    def waiting(self, account: tuple[str, ...], fingerprint: str, now: float) -> float | None:
        """Seconds before ``account`` is tried again with this key; None when it is to be polled now."""
        refused = self.refused.get(account)
        if refused is None or refused[0] != fingerprint:
            return None
        left = refused[1] + self.retry_interval - now
        return left if left > 0 else None

    def refuse(self, account: tuple[str, ...], fingerprint: str, now: float) -> None:
        self.refused[account] = (fingerprint, now)

    def accept(self, account: tuple[str, ...]) -> bool:
        """The account was polled without a refusal; True when it had been refused."""
        return self.refused.pop(account, None) is not None

    def forget_all_but(self, active: set[tuple[str, str]]) -> list[tuple[str, ...]]:
        """Drop the refusals of accounts (and their endpoints) no longer polled (deactivated); returns them."""
        gone = [key for key in self.refused if key[:2] not in active]
        for account in gone:
            del self.refused[account]
        return gone
