"""Credentials at rest: destination URLs and signing secrets, sealed with AES-256-GCM.

The key is ``COST_WORKER_NOTIFY_SECRETS_KEY`` (base64 of 32 bytes), never stored in the database. Each value
is bound to its destination id (associated data), so a sealed value copied onto another row does not open.
Stored form: 12-byte random nonce || ciphertext with tag.
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
    def __init__(self, key: bytes) -> None:
        self._aead = AESGCM(key)

    @classmethod
    def from_settings(cls, settings: Settings) -> Sealer:
        if settings.notify_secrets_key is None:
            raise ConfigError([f"{env_name('notify_secrets_key')}: required by notify"])
        return cls(base64.b64decode(settings.notify_secrets_key.get_secret_value()))

    def seal(self, value: str, owner: UUID) -> bytes:
        nonce = os.urandom(NONCE_BYTES)
        return nonce + self._aead.encrypt(nonce, value.encode(), owner.bytes)

    def open(self, sealed: bytes, owner: UUID) -> str:
        try:
            return self._aead.decrypt(sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], owner.bytes).decode()
        except (InvalidTag, ValueError) as exc:
            raise SealBroken(f"sealed value of destination {owner} does not open with this key") from exc
