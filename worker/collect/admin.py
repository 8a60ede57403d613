"""``cost-worker keys add|rotate|rewrap|deactivate|list``: the operator's view of provider accounts and admin keys.

A key is read from standard input (never from the command line, where ``ps`` shows it) and stored sealed, or
stored as a reference to a secret file (``--secret-file``). Output shows a fingerprint, never the key.
"""

from __future__ import annotations

import getpass
import sys
from pathlib import Path
from typing import TextIO
from uuid import UUID

from worker.admin import printable
from worker.collect import keys as keystore
from worker.collect import store
from worker.collect.errors import KeyStoreError
from worker.config import Settings
from worker.errors import ConfigError, DataRejected
from worker.store import connect, foreign_key_violation, unique_violation

EXIT_OK, EXIT_FAILURE = 0, 1


def read_key(stream: TextIO | None = None) -> str:
    stream = stream or sys.stdin
    # One line, read up to the limit only: an endless stream (`< /dev/zero`) never fills the memory.
    text = getpass.getpass("admin key: ") if stream.isatty() else stream.readline(keystore.MAX_KEY_FILE_BYTES + 1)
    if len(text) > keystore.MAX_KEY_FILE_BYTES and not text.endswith("\n"):
        raise ConfigError(
            [f"admin key: more than {keystore.MAX_KEY_FILE_BYTES // 1024} KiB on standard input: no admin key is"]
        )
    key = text.strip()
    if not key:
        raise ConfigError(["admin key: nothing on standard input (pipe the key in, or use --secret-file)"])
    if not keystore.is_admin_key(key):
        raise ConfigError([f"admin key: {keystore.NOT_A_KEY}"])
    return key


def _material(
    settings: Settings, provider: str, account: str, secret_file: Path | None, stdin: TextIO | None
) -> tuple[bytes | None, bytes | None, str | None, str | None, str]:
    """(ciphertext, wrapped key, KEK id, secret file, fingerprint) for a new or rotated key."""
    if secret_file is not None:
        path = secret_file.resolve()
        # The file is this command's input, as a key on standard input is: a problem with it is a config error
        # (exit 2) that names the file and why, not the collector's run-time "cannot read the admin key file".
        try:
            with path.open("rb") as stream:
                stream.read(1)
        except OSError as exc:
            raise ConfigError([f"--secret-file: cannot read {path}: {exc.strerror or exc}"]) from None
        try:
            key = keystore.read_secret_file(path, provider, account)
        except KeyStoreError as exc:
            raise ConfigError([f"--secret-file {path}: {exc}"]) from None
        return None, None, None, str(path), keystore.fingerprint(key.reveal())
    plain = read_key(stdin)
    sealed = keystore.seal(keystore.load_kek(settings.collect_key_encryption_key_file), provider, account, plain)
    return sealed.ciphertext, sealed.wrapped_key, sealed.kek_id, None, keystore.fingerprint(plain)


async def add(
    settings: Settings,
    *,
    organization: UUID,
    provider: str,
    account: str,
    name: str,
    secret_file: Path | None,
    stdin: TextIO | None = None,
) -> int:
    ciphertext, wrapped, kek, path, fingerprint = _material(settings, provider, account, secret_file, stdin)
    conn = await connect(settings.dsn(), role=settings.database_role, timeout=settings.database_connect_timeout)
    try:
        key_id = await store.keys_insert(
            conn, organization, provider, account, name, ciphertext, wrapped, kek, path, fingerprint
        )
    except DataRejected as exc:
        # One line, and never the row (a DETAIL would list it): the usual causes are named.
        if unique_violation(exc):
            raise KeyStoreError(
                f"{provider} account {account} already has a key for organization {organization}: "
                "use `cost-worker keys rotate KEY_ID` (see `cost-worker keys list`)"
            ) from None
        if foreign_key_violation(exc):
            raise KeyStoreError(f"no organization {organization}") from None
        raise KeyStoreError(f"the database refused the key of {provider} account {account}") from None
    finally:
        await conn.close()
    print(f"added {provider} account {account}: key {key_id} ({fingerprint})")
    return EXIT_OK


async def rotate(settings: Settings, *, key_id: UUID, secret_file: Path | None, stdin: TextIO | None = None) -> int:
    conn = await connect(settings.dsn(), role=settings.database_role, timeout=settings.database_connect_timeout)
    try:
        row = await store.keys_get(conn, key_id)
        if row is None:
            raise KeyStoreError(f"no key {key_id} (see `cost-worker keys list`)")
        ciphertext, wrapped, kek, path, fingerprint = _material(
            settings, row["provider"], row["ai_organization_id"], secret_file, stdin
        )
        await store.keys_rotate(conn, key_id, ciphertext, wrapped, kek, path, fingerprint)
    finally:
        await conn.close()
    print(f"rotated key {key_id} of {row['provider']} account {row['ai_organization_id']} ({fingerprint})")
    return EXIT_OK


async def rewrap(settings: Settings) -> int:
    """Every sealed key's data key wrapped under the current KEK, in one transaction; the admin keys unchanged.

    Keys the current KEK already wraps are left alone, so a second run changes nothing. A key neither the
    current nor the previous KEK opens is named and left as it is; the others are still rewrapped.
    """
    keys = keystore.Keyring.load(
        settings.collect_key_encryption_key_file, settings.collect_previous_key_encryption_key_file
    )
    current = keystore.kek_id(keys.current)
    conn = await connect(settings.dsn(), role=settings.database_role, timeout=settings.database_connect_timeout)
    problems: list[str] = []
    done = 0
    try:
        async with conn.transaction():
            for row in await store.keys_sealed(conn, current):
                sealed = keystore.Sealed(row["key_ciphertext"], row["wrapped_key"], row["kek_id"])
                try:
                    again = keystore.rewrap(keys, row["provider"], row["ai_organization_id"], sealed)
                except KeyStoreError as exc:
                    problems.append(f"key {row['id']}: {exc}")
                    continue
                await store.keys_rewrap(conn, row["id"], again.wrapped_key, again.kek_id)
                done += 1
    finally:
        await conn.close()
    print(f"rewrapped {done} admin key(s) under key-encryption key {current}")
    if problems:
        raise KeyStoreError(
            f"{len(problems)} admin key(s) left as they were: "
            + "; ".join(problems)
            + " (set COST_WORKER_COLLECT_PREVIOUS_KEY_ENCRYPTION_KEY_FILE to their key-encryption key, or "
            "`keys rotate` them)"
        )
    return EXIT_OK


async def deactivate(settings: Settings, *, key_id: UUID) -> int:
    conn = await connect(settings.dsn(), role=settings.database_role, timeout=settings.database_connect_timeout)
    try:
        changed = await store.keys_deactivate(conn, key_id)
    finally:
        await conn.close()
    if not changed:
        raise KeyStoreError(f"no active key {key_id} (see `cost-worker keys list`)")
    print(f"deactivated key {key_id}: its account is no longer polled")
    return EXIT_OK


async def list_keys(settings: Settings) -> int:
    conn = await connect(settings.dsn(), role=settings.database_role, timeout=settings.database_connect_timeout)
    try:
        rows = await store.keys_list(conn)
    finally:
        await conn.close()
    print(
        f"{'id':<36}  {'provider':<9}  {'account':<25}  {'active':<6}  "
        f"{'fingerprint':<23}  {'source':<11}  last success"
    )
    for r in rows:
        source = "secret file" if r["in_secret_file"] else "sealed"
        last = r["last_success_at"].isoformat(timespec="seconds") if r["last_success_at"] else "never"
        account = printable(r["ai_organization_id"])  # stored before `keys add` refused control characters
        print(
            f"{r['id']}  {r['provider']:<9}  {account:<25}  {'yes' if r['is_active'] else 'no':<6}  "
            f"{r['fingerprint']:<23}  {source:<11}  {last}"
        )
    return EXIT_OK
