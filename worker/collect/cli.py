"""The ``collect`` and ``keys`` subcommands (wired into ``worker.cli`` with two lines)."""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any
from uuid import UUID

from worker.config import Settings, load_settings
from worker.errors import UsageError


def add_parsers(sub: Any) -> None:
    collect = sub.add_parser(
        "collect",
        help="poll the OpenAI and Anthropic admin APIs and publish their buckets",
        description="Poll every active account of organization_api_keys (OpenAI costs and usage, Anthropic cost "
        "and usage reports), re-reading the trailing window, and publish each complete window's buckets to the "
        "provider-bucket topic. One replica polls at a time. Runs until SIGTERM.",
    )
    collect.add_argument(
        "--once",
        action="store_true",
        help="poll every account once, publish, and exit: 0 when everything was collected, 3 when an endpoint "
        "failed or a key was refused (named on stderr), 1 when another replica holds the poller lock or the "
        "database or broker stayed unreachable for COST_WORKER_COLLECT_ONCE_MAX_WAIT",
    )

    keys = sub.add_parser(
        "keys",
        help="manage the provider admin keys the collector uses",
        description="Admin keys are read from standard input (never the command line) and stored encrypted "
        "(AES-256-GCM, key-encryption key from COST_WORKER_COLLECT_KEY_ENCRYPTION_KEY_FILE), or as a reference "
        "to a secret file. Listings show a fingerprint only. Run with COST_WORKER_DATABASE_ROLE=cost_worker_collector.",
    )
    ksub = keys.add_subparsers(dest="keys_command", metavar="ACTION", parser_class=sub._parser_class)
    ksub.required = True
    add = ksub.add_parser("add", help="add a provider account and its admin key (key on stdin)")
    add.add_argument("--organization", required=True, type=UUID, metavar="UUID", help="the owning organization")
    add.add_argument("--provider", required=True, choices=["openai", "anthropic"])
    add.add_argument("--account", required=True, metavar="ID", help="the provider's organization id")
    add.add_argument("--name", default="", help="a label for operators")
    add.add_argument("--secret-file", type=Path, help="store a reference to this file instead of the key")
    rotate = ksub.add_parser("rotate", help="replace an account's admin key (key on stdin) and reactivate it")
    rotate.add_argument("key_id", type=UUID, metavar="KEY_ID")
    rotate.add_argument("--secret-file", type=Path, help="store a reference to this file instead of the key")
    ksub.add_parser(
        "rewrap",
        help="wrap every stored admin key under the current key-encryption key (after rotating it)",
        description="Every sealed admin key's data key is wrapped again under "
        "COST_WORKER_COLLECT_KEY_ENCRYPTION_KEY_FILE; those the previous key-encryption key wrapped "
        "(COST_WORKER_COLLECT_PREVIOUS_KEY_ENCRYPTION_KEY_FILE) open with it. The admin keys themselves do not "
        "change. Exit 1 names any key neither opens.",
    )
    deactivate = ksub.add_parser("deactivate", help="stop polling an account")
    deactivate.add_argument("key_id", type=UUID, metavar="KEY_ID")
    ksub.add_parser("list", help="accounts, fingerprints and last successful poll")


MAX_ACCOUNT_CHARS = 255  # organization_api_keys.ai_organization_id and .name are varchar(255)


def _account_problems(account: str) -> list[str]:
    """A provider organization id is one token (OpenAI's ``org-...``, Anthropic's uuid): a line break, a control
    character or a space inside would be stored, break ``keys list`` and name an account that cannot exist."""
    if not account:
        return ["--account: must not be empty"]
    if len(account) > MAX_ACCOUNT_CHARS or not all(ch.isprintable() and not ch.isspace() for ch in account):
        return [f"--account: 1 to {MAX_ACCOUNT_CHARS} printable characters without spaces, got {account[:40]!r}"]
    return []


def _name_problems(name: str) -> list[str]:
    if len(name) > MAX_ACCOUNT_CHARS or not name.isprintable():
        return [f"--name: at most {MAX_ACCOUNT_CHARS} printable characters (no line break), got {name[:40]!r}"]
    return []


def cmd_collect(args: argparse.Namespace) -> int:
    from worker.collect import runner  # noqa: PLC0415 - keep `--help` fast

    settings = load_settings(require=("database_url", "kafka_bootstrap_servers"))
    return runner.run(settings, once=args.once)


def cmd_keys(args: argparse.Namespace) -> int:
    from worker.collect import admin  # noqa: PLC0415

    settings = load_settings(require=("database_url",))
    action: Callable[[Settings], Any]
    if args.keys_command == "add":
        problems = _account_problems(args.account.strip()) + _name_problems(args.name)
        if problems:
            raise UsageError(problems)

        def action(s: Settings) -> Any:
            return admin.add(
                s,
                organization=args.organization,
                provider=args.provider,
                account=args.account.strip(),
                name=args.name,
                secret_file=args.secret_file,
            )
    elif args.keys_command == "rotate":

        def action(s: Settings) -> Any:
            return admin.rotate(s, key_id=args.key_id, secret_file=args.secret_file)
    elif args.keys_command == "rewrap":

        def action(s: Settings) -> Any:
            return admin.rewrap(s)
    elif args.keys_command == "deactivate":

        def action(s: Settings) -> Any:
            return admin.deactivate(s, key_id=args.key_id)
    else:

        def action(s: Settings) -> Any:
            return admin.list_keys(s)

    return int(asyncio.run(action(settings)))


COMMANDS = {"collect": cmd_collect, "keys": cmd_keys}
