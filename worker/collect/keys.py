"""Admin keys at rest: AES-256-GCM envelope encryption (``cryptography``), or a reference to a secret file.

Each stored key gets its own random data key; the admin key is encrypted under the data key and the data key
under the key-encryption key (KEK) read from ``COST_WORKER_COLLECT_KEY_ENCRYPTION_KEY_FILE``. Both encryptions
bind the account (provider and provider organization id) as associated data, so a ciphertext copied onto
another account's row does not decrypt. Each row records which KEK wrapped its data key (``kek_id``), so the KEK
rotates without touching an admin key: with the retiring KEK in ``COST_WORKER_COLLECT_PREVIOUS_KEY_ENCRYPTION_KEY_FILE``
both open, and ``keys rewrap`` wraps every data key again under the current one (``rewrap``).

An ``AdminKey`` never shows its value in ``repr``/``str``: only ``reveal()`` gives it, for the request header.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from worker.collect.errors import KeyStoreError

KEK_BYTES = 32  # AES-256
NONCE_BYTES = 12  # the GCM nonce size NIST SP 800-38D recommends
MAX_KEY_FILE_BYTES = 64 * 1024  # bytes; a key file larger than this is a mistake
MAX_ADMIN_KEY_LENGTH = 4096  # characters; longer input is not an admin key
NOT_A_KEY = f"not a single token of at most {MAX_ADMIN_KEY_LENGTH} printable ASCII characters"


class AdminKey:
    """A provider admin key held in memory. Its text form is always masked."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "AdminKey('***')"

    __str__ = __repr__


def is_admin_key(key: str) -> bool:
    """An admin key is one token of visible ASCII: no whitespace or line break inside (a second line of a secret
    file, a pasted note) and nothing an HTTP header cannot carry. Both providers' keys are such tokens."""
    return 0 < len(key) <= MAX_ADMIN_KEY_LENGTH and all("!" <= ch <= "~" for ch in key)


def fingerprint(key: str) -> str:
    """What operators see instead of the key: a short SHA-256 prefix (not reversible for a random key)."""
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()[:16]


def _aad(provider: str, organization_id: str) -> bytes:
    return f"cost-worker/admin-key/{provider}/{organization_id}".encode()


def load_kek(path: Path | None) -> bytes:
    """The key-encryption key: 32 bytes in the file, raw, hex or base64 (surrounding whitespace ignored)."""
    if path is None:
        raise KeyStoreError("no key-encryption key: set COST_WORKER_COLLECT_KEY_ENCRYPTION_KEY_FILE")
    try:
        with path.open("rb") as stream:
            raw = stream.read(MAX_KEY_FILE_BYTES + 1)  # bounded: /dev/zero named by mistake never fills the memory
    except OSError as exc:
        raise KeyStoreError(f"cannot read the key-encryption key file {path}: {exc.strerror}") from None
    if len(raw) > MAX_KEY_FILE_BYTES:
        raise KeyStoreError(
            f"the key-encryption key file {path} is larger than {MAX_KEY_FILE_BYTES // 1024} KiB: it must hold 32 bytes"
        )
    if len(raw) == KEK_BYTES:
        return raw
    text = raw.strip()
    for decode in (bytes.fromhex, base64.b64decode):
        try:
            key = decode(text.decode("ascii"))
        except (ValueError, binascii.Error, UnicodeDecodeError):
            continue
        if len(key) == KEK_BYTES:
            return key
    raise KeyStoreError(f"the key-encryption key file {path} must hold 32 bytes (raw, hex or base64)")


def kek_id(kek: bytes) -> str:
    return hashlib.sha256(b"cost-worker-kek" + kek).hexdigest()[:16]


@dataclass(frozen=True)
class Sealed:
    ciphertext: bytes  # nonce + AES-GCM(data key, admin key)
    wrapped_key: bytes  # nonce + AES-GCM(KEK, data key)
    kek_id: str


def seal(kek: bytes, provider: str, organization_id: str, key: str) -> Sealed:
    aad = _aad(provider, organization_id)
    data_key = AESGCM.generate_key(bit_length=256)
    nonce = os.urandom(NONCE_BYTES)
    ciphertext = nonce + AESGCM(data_key).encrypt(nonce, key.encode(), aad)
    wrap_nonce = os.urandom(NONCE_BYTES)
    wrapped = wrap_nonce + AESGCM(kek).encrypt(wrap_nonce, data_key, aad)
    return Sealed(ciphertext=ciphertext, wrapped_key=wrapped, kek_id=kek_id(kek))


@dataclass(frozen=True)
class Keyring:
    """The KEK that seals (``current``) and, while it is being retired, the one before it: both open."""

    current: bytes
    previous: bytes | None = None

    @classmethod
    def load(cls, current: Path | None, previous: Path | None) -> Keyring:
        return cls(load_kek(current), None if previous is None else load_kek(previous))

    def kek(self, wanted: str) -> bytes | None:
        """The KEK whose id is ``wanted``, if this keyring holds it."""
        return next((k for k in (self.current, self.previous) if k is not None and kek_id(k) == wanted), None)


def _open(
    keys: bytes | Keyring, aad: bytes, sealed: Sealed, provider: str, organization_id: str
) -> tuple[bytes, bytes]:
    """(data key, admin key bytes): a rewrap opens the whole row too, so it never carries a broken row along."""
    kek = (keys if isinstance(keys, Keyring) else Keyring(keys)).kek(sealed.kek_id)
    if kek is None:
        raise KeyStoreError(
            f"the admin key of {provider} account {organization_id} was sealed with another key-encryption key "
            f"({sealed.kek_id})"
        )
    try:
        data_key = AESGCM(kek).decrypt(sealed.wrapped_key[:NONCE_BYTES], sealed.wrapped_key[NONCE_BYTES:], aad)
        plain = AESGCM(data_key).decrypt(sealed.ciphertext[:NONCE_BYTES], sealed.ciphertext[NONCE_BYTES:], aad)
    except (InvalidTag, ValueError):
        raise KeyStoreError(f"the admin key of {provider} account {organization_id} does not decrypt") from None
    return data_key, plain


def rewrap(keys: Keyring, provider: str, organization_id: str, sealed: Sealed) -> Sealed:
    """The same admin key and data key, the data key wrapped again under the current KEK (a new nonce)."""
    aad = _aad(provider, organization_id)
    data_key, _ = _open(keys, aad, sealed, provider, organization_id)
    wrap_nonce = os.urandom(NONCE_BYTES)
    wrapped = wrap_nonce + AESGCM(keys.current).encrypt(wrap_nonce, data_key, aad)
    return Sealed(ciphertext=sealed.ciphertext, wrapped_key=wrapped, kek_id=kek_id(keys.current))


def unseal(keys: bytes | Keyring, provider: str, organization_id: str, sealed: Sealed) -> AdminKey:
    aad = _aad(provider, organization_id)
    _, plain = _open(keys, aad, sealed, provider, organization_id)
    key = plain.decode("utf-8", errors="replace")
    if not is_admin_key(key):  # sealed by an older version that let it in: refused here, for this account only
        raise KeyStoreError(f"the stored admin key of {provider} account {organization_id} is {NOT_A_KEY}")
    return AdminKey(key)


def read_secret_file(path: Path, provider: str, organization_id: str) -> AdminKey:
    """A key kept in a mounted secret file (read on every poll, so a rotated secret is picked up)."""
    try:
        with path.open("rb") as stream:
            raw = stream.read(MAX_KEY_FILE_BYTES + 1)  # bounded: /dev/zero named by mistake never fills the memory
    except OSError:
        raise KeyStoreError(f"cannot read the admin key file of {provider} account {organization_id}") from None
    if len(raw) > MAX_KEY_FILE_BYTES:
        raise KeyStoreError(
            f"the admin key file of {provider} account {organization_id} is larger than "
            f"{MAX_KEY_FILE_BYTES // 1024} KiB: no admin key is"
        )
    try:
        text = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise KeyStoreError(f"cannot read the admin key file of {provider} account {organization_id}") from None
    if not text:
        raise KeyStoreError(f"the admin key file of {provider} account {organization_id} is empty")
    if not is_admin_key(text):  # surrounding whitespace (a trailing newline) is fine; whitespace inside is not
        raise KeyStoreError(f"the admin key file of {provider} account {organization_id} is {NOT_A_KEY}")
    return AdminKey(text)
