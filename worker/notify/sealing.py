"""Credentials at rest: destination URLs and signing secrets, sealed with AES-256-GCM.

The key is ``COST_WORKER_NOTIFY_SECRETS_KEY`` (base64 of 32 bytes), never stored in the database. Each value
is bound to its destination id (associated data), so a sealed value copied onto another row does not open.
Stored form: 12-byte random nonce || ciphertext with tag. While the key rotates, the one being retired
(``COST_WORKER_NOTIFY_PREVIOUS_SECRETS_KEY``) still opens what it sealed; ``notify reseal`` seals it all again
under the current key (``reseal``), after which the previous one can go.
"""

from __future__ import annotations

import base64
import os
from uuid import UUID

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from worker.config import Settings, env_name
from worker.errors import ConfigError, CostWorkerError

NONCE_BYTES = 12


class SealBroken(CostWorkerError):
    """A sealed value does not open with the configured key (wrong key, or the row was tampered with)."""


class Sealer:
    def __init__(self, key: bytes, previous: bytes | None = None) -> None:
        self._aead = AESGCM(key)
        self._previous = None if previous is None else AESGCM(previous)

    @classmethod
    def from_settings(cls, settings: Settings) -> Sealer:
        if settings.notify_secrets_key is None:
            raise ConfigError([f"{env_name('notify_secrets_key')}: required by notify"])
        previous = settings.notify_previous_secrets_key
        return cls(
            base64.b64decode(settings.notify_secrets_key.get_secret_value()),
            None if previous is None else base64.b64decode(previous.get_secret_value()),
        )

    def seal(self, value: str, owner: UUID) -> bytes:
        nonce = os.urandom(NONCE_BYTES)
        return nonce + self._aead.encrypt(nonce, value.encode(), owner.bytes)

    def open(self, sealed: bytes, owner: UUID) -> str:
        return self._open(sealed, owner)[0]

    def reseal(self, sealed: bytes, owner: UUID) -> bytes | None:
        """The value sealed again under the current key, or None when the current key sealed it already."""
        value, current = self._open(sealed, owner)
        return None if current else self.seal(value, owner)

    def _open(self, sealed: bytes, owner: UUID) -> tuple[str, bool]:
        """(value, whether the current key opened it)."""
        for aead, current in ((self._aead, True), (self._previous, False)):
            if aead is None:
                continue
            try:
                return aead.decrypt(sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], owner.bytes).decode(), current
            except (InvalidTag, ValueError):
                continue
        keys = "this key" if self._previous is None else "the current or the previous key"
        raise SealBroken(f"sealed value of destination {owner} does not open with {keys}")
