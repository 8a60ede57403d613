"""``cost-worker`` command line: one subcommand per job an operator or developer has.

Every failure ends as one line on stderr and a non-zero exit code, never a traceback:
2 for usage and configuration errors, 1 for everything else (and 3 for a ``collect --once`` whose poll missed
something: it ran, but did not collect everything).
"""

from __future__ import annotations

import argparse
import asyncio
import difflib
import math
import os
import sys
import traceback
from collections.abc import Callable, Coroutine, Iterable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from worker import __version__
from worker.collect import cli as collect_cli
from worker.config import (
    ENV_PREFIX,
    NOTIFY_MAX_SECRET_OVERLAP,
    NOTIFY_SECRET_OVERLAP,
    Settings,
    env_name,
    load_settings,
)
from worker.errors import ConfigError, CostWorkerError, UsageError

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one ``usage error:`` line instead of the usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: usage error: {message} (see {self.prog} --help)\n")


MAX_LIMIT = 2**63 - 1  # rows: PostgreSQL's bigint, the type a LIMIT is compared as


def _positive_int(text: str) -> int:
    """An argparse type: a whole number from 1 to ``MAX_LIMIT`` (a count or a limit)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, not {value}")
    if value > MAX_LIMIT:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_LIMIT}, not {value}")
    return value


def _positive_seconds(text: str) -> float:
    """An argparse type: a finite number of seconds above 0 (``nan`` and ``inf`` would make a wait endless)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number of seconds above 0, not {text!r}")
    return value


def _state_dir(text: str) -> str:
    """An argparse type: a directory path, not empty (an unset shell variable would mean the current directory)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty (it would be the current directory)")
    return text


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="cost-worker",
        description="Turns AI-provider cost and usage events from Kafka into a cost ledger and budget alerts. "
        "Configuration comes from COST_WORKER_* environment variables (see README.md).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    sub.add_parser(
        "migrate",
        help="apply pending database migrations",
        description="Create the roles if missing and apply every pending migration from schema/, each in its "
        "own transaction under an advisory lock. Refuses edited migrations and databases newer than the code.",
    )

    run = sub.add_parser(
        "run",
        help="consume Kafka and write the ledger until SIGTERM",
        description="Consume the provider-bucket and API-usage topics, write the ledger exactly once in "
        "effect, evaluate budgets and publish alerts. Runs until SIGTERM/SIGINT.",
    )
    run.add_argument(
        "--exit-when-idle",
        type=_positive_seconds,
        metavar="SECONDS",
        help="exit 0 once every assigned partition is caught up and nothing arrived for SECONDS (not before the"
        " assignment is 1.5 session timeouts old)",
    )

    dev = sub.add_parser(
        "dev",
        help="run the worker on an embedded PostgreSQL and broker with demo data",
        description="Start (or reuse) an embedded PostgreSQL server and Kafka-protocol broker under a local "
        "state directory, migrate, seed a demo organization, publish a demo stream, run the worker until "
        "idle and print a summary. URLs set in the environment are used instead of the embedded servers.",
    )
    dev.add_argument(
        "--state-dir", type=_state_dir, default=".dev", help="where the embedded servers keep their data (.dev)"
    )
    dev.add_argument("--once", action="store_true", help="exit after the demo summary instead of running on")

    sub.add_parser(
        "check-config",
        help="validate the configuration and print it with secrets redacted",
        description="Validate every COST_WORKER_* setting, report every problem at once and exit 2 if there "
        "is any; otherwise print the effective configuration with secrets redacted and exit 0.",
    )

    quarantine = sub.add_parser(
        "quarantine",
        help="inspect and replay quarantined messages",
        description="Quarantined messages keep their raw payload, reason and source offset.",
    )
    qsub = quarantine.add_subparsers(dest="quarantine_command", metavar="ACTION", parser_class=_Parser)
    qsub.required = True
    qlist = qsub.add_parser(
        "list", help="list quarantined messages", description="List quarantined messages, newest first."
    )
    qlist.add_argument("--reason", help="only this reason")
    qlist.add_argument(
        "--status", choices=["pending", "replayed", "all"], default="pending", help="which rows (pending)"
    )
    qlist.add_argument("--limit", type=_positive_int, default=50, help="at most this many rows (50)")
    qreplay = qsub.add_parser(
        "replay",
        help="reprocess pending quarantined messages",
        description="Run pending quarantined messages through validation and attribution again (for example "
        "after adding a missing project mapping). Those that pass are applied exactly as if consumed; the "
        "rest stay quarantined with their new reason.",
    )
    qreplay.add_argument("--reason", help="only messages quarantined for this reason")
    qreplay.add_argument("--limit", type=_positive_int, default=10_000, help="at most this many messages (10000)")

    budgets = sub.add_parser("budgets", help="budget reports", description="Budget reports.")
    bsub = budgets.add_subparsers(dest="budgets_command", metavar="ACTION", parser_class=_Parser)
    bsub.required = True
    bstatus = bsub.add_parser(
        "status",
        help="each active budget's current period, spend and crossed thresholds",
        description="Print each active budget's current period, spend, percent used and the thresholds "
        "already alerted, as a table.",
    )
    bstatus.add_argument("--organization", metavar="ID", help="only this organization (uuid)")
    brebuild = bsub.add_parser(
        "rebuild-spend",
        help="rebuild the spend aggregate budgets read, from the ledger and the rollups",
        description="Rebuild the spend aggregate (spend_hourly, spend_daily, spend_cover) of one organization, or "
        "of every organization with an active budget, from its ledger lines and rollups. The triggers keep it on "
        "every write; this is for rows loaded with triggers off (pg_restore --disable-triggers, "
        "session_replication_role = replica, logical replication).",
    )
    brebuild.add_argument("--organization", metavar="ID", help="only this organization (uuid)")
    _prices_parser(sub)
    _notify_parser(sub)

    collect_cli.add_parsers(sub)  # `collect` and `keys` (issue 14)
    _retention_parser(sub)  # issue 18

    rates = sub.add_parser(
        "rates",
        help="load and list exchange rates",
        description="Exchange rates convert spend into a budget's currency (loaded from files, never fetched).",
    )
    rsub = rates.add_subparsers(dest="rates_command", metavar="ACTION", parser_class=_Parser)
    rsub.required = True
    rimport = rsub.add_parser(
        "import",
        help="load rates from a CSV file (the ECB reference-rate format by default)",
        description="Load exchange rates from FILE: the ECB euro reference rates CSV (eurofxref.csv or "
        "eurofxref-hist.csv, 1 EUR = x CUR) by default, or date,base,quote,rate rows with --format pairs. "
        "Every problem is reported at once and nothing is loaded from a file with a problem.",
    )
    rimport.add_argument("file", metavar="FILE", help="the CSV file")
    rimport.add_argument("--format", choices=["ecb", "pairs"], default="ecb", help="file format (ecb)")
    rimport.add_argument("--source", help="label stored with the rates (ECB, or the file name)")
    rlist = rsub.add_parser("list", help="the loaded currency pairs", description="Each loaded pair's dates and rate.")
    rlist.add_argument("--base", metavar="CUR", help="only this base currency")
    rlist.add_argument("--quote", metavar="CUR", help="only this quote currency")
    return parser


def _prices_parser(sub: Any) -> None:
    """``prices``: the logic is in worker/prices.py."""
    prices = sub.add_parser(
        "prices",
        help="prices of usage: effective price and source, overrides, unpriced models",
        description="Usage is priced from the operator's overrides (model_prices), else the genai-prices "
        "catalogue installed with the worker.",
    )
    psub = prices.add_subparsers(dest="prices_command", metavar="ACTION", parser_class=_Parser)
    psub.required = True
    show = psub.add_parser("show", help="a model's effective price per token type at a date, and its source")
    show.add_argument("model")
    show.add_argument("--provider", choices=["openai", "anthropic"], help="(default: the catalogue's)")
    show.add_argument("--token-type", help="only this token type, e.g. output_tokens/service_tier=batch")
    show.add_argument("--at", help="the date or time (ISO 8601 with zone; default: now)")
    overrides = psub.add_parser("overrides", help="list the overrides in model_prices")
    overrides.add_argument("--provider", choices=["openai", "anthropic"])
    overrides.add_argument("--model")
    importer = psub.add_parser(
        "import",
        help="add overrides from a CSV file",
        description="CSV columns: provider, model, token_type, price_per_million, effective_from (a date or a "
        "time with zone), optional currency (USD) and note. All rows or none; runs as the login role.",
    )
    importer.add_argument("file")
    missing = psub.add_parser("unpriced", help="models and token types of ledger lines that have no price")
    missing.add_argument("--since", help="only buckets starting at or after this date or time")


def _retention_parser(sub: Any) -> None:
    """``retention``: the logic is in worker/retention.py."""
    retention = sub.add_parser(
        "retention",
        help="drop API-usage detail older than the kept months (a dry run unless --execute)",
        description="Per-request API-usage detail is kept in one partition per UTC month. Retention drops the "
        "partitions wholly older than the kept months (never one an open budget period needs; rollups and the "
        "ledger stay), deletes replayed quarantine rows and finished notify deliveries past their age and creates the "
        "coming months' partitions.",
    )
    retention.add_argument(
        "--months",
        type=int,
        help="whole months kept before the current one (default: COST_WORKER_API_USAGE_RETENTION_MONTHS)",
    )
    retention.add_argument(
        "--quarantine-days",
        type=int,
        help="days a replayed quarantine row is kept (default: COST_WORKER_QUARANTINE_RETENTION_DAYS)",
    )
    retention.add_argument(
        "--deliveries-days",
        type=int,
        help="days a finished notify delivery is kept (default: COST_WORKER_NOTIFY_RETENTION_DAYS)",
    )
    mode = retention.add_mutually_exclusive_group()
    mode.add_argument("--execute", action="store_true", help="drop and delete (default: only show the plan)")
    mode.add_argument("--dry-run", action="store_true", help="only show what would be done (the default)")


def cmd_retention(args: argparse.Namespace) -> int:
    from worker import retention  # noqa: PLC0415

    return retention.command(args.months, args.quarantine_days, args.deliveries_days, execute_plan=args.execute)


def _notify_parser(sub: Any) -> None:
    """``notify``: deliver budget alerts to webhooks and Slack (worker/notify/)."""
    notify = sub.add_parser(
        "notify",
        help="deliver budget alerts to signed webhooks and Slack",
        description="Consume the alerts topic and deliver each alert to the matching destinations of its "
        "organization: Standard Webhooks (signed) or Slack incoming webhooks, retried with backoff.",
    )
    nsub = notify.add_subparsers(dest="notify_command", metavar="ACTION", parser_class=_Parser)
    nsub.required = True
    nsub.add_parser("run", help="consume alerts and deliver them until SIGTERM")
    nstatus = nsub.add_parser("status", help="deliveries per destination: pending, delivered, failed, last error")
    nstatus.add_argument("--organization", metavar="ID", help="only this organization (uuid)")
    nsub.add_parser(
        "reseal",
        help="seal every destination's URL and secret under the current secrets key (after rotating it)",
        description="Every destination of every organization sealed under COST_WORKER_NOTIFY_SECRETS_KEY; what "
        "COST_WORKER_NOTIFY_PREVIOUS_SECRETS_KEY sealed opens with it. Exit 1 names any destination neither opens.",
    )
    dest = nsub.add_parser("destinations", help="add, list, test and remove destinations")
    dsub = dest.add_subparsers(dest="destinations_command", metavar="ACTION", parser_class=_Parser)
    dsub.required = True
    add = dsub.add_parser(
        "add",
        help="add a destination (a webhook's signing secret is printed once)",
        description="Add a destination. The URL must be https and resolve to public addresses only; "
        "--url - reads it from stdin (keeps a token-bearing URL out of shell history).",
    )
    add.add_argument("--organization", metavar="ID", required=True)
    add.add_argument("--name", required=True)
    add.add_argument("--kind", choices=["webhook", "slack"], default="webhook")
    add.add_argument("--url", required=True)
    add.add_argument("--scope", action="append", default=[], help="deliver only this scope (repeatable; default all)")
    add.add_argument(
        "--min-threshold", default="0", help="deliver only thresholds at or above this percent, 0 to 1000 (0)"
    )
    add.add_argument("--no-resolved", action="store_true", help="do not deliver resolved messages")
    dlist = dsub.add_parser("list", help="list an organization's destinations")
    dlist.add_argument("--organization", metavar="ID", required=True)
    rotate = dsub.add_parser(
        "rotate-secret",
        help="issue a webhook's new signing secret (printed once); the old one also signs during --overlap",
        description="A new signing secret for a webhook destination, printed once. Until the overlap ends every "
        "delivery carries two signatures (Standard Webhooks), so the receiver accepts either secret meanwhile.",
    )
    rotate.add_argument("destination", metavar="DESTINATION", help="destination id (uuid)")
    rotate.add_argument("--organization", metavar="ID", required=True)
    rotate.add_argument(
        "--overlap",
        default=f"{NOTIFY_SECRET_OVERLAP:.0f}",
        metavar="SECONDS",
        help=f"seconds the old secret also signs, 0 to {NOTIFY_MAX_SECRET_OVERLAP:.0f} ({NOTIFY_SECRET_OVERLAP:.0f})",
    )
    for action in ("test", "remove"):
        cmd = dsub.add_parser(action, help="send a signed sample alert" if action == "test" else "remove a destination")
        cmd.add_argument("destination", metavar="DESTINATION", help="destination id (uuid)")
        cmd.add_argument("--organization", metavar="ID", required=True)


def _settings(*, require: tuple[str, ...] = ()) -> Settings:
    return load_settings(require=require)


def _run(coro_fn: Callable[[], Coroutine[Any, Any, int]]) -> int:
    return asyncio.run(coro_fn())


# The settings that are optional for check-config and dev but required by other commands (the require= of
# each command below and in worker/collect/cli.py; the keys by worker/notify/sealing.py, worker/collect/keys.py).
NEEDED_BY = {
    "database_url": "every command but `check-config`, `dev` and `prices show`",
    "kafka_bootstrap_servers": "`run`, `collect` and `notify run`",
    "notify_secrets_key": "`notify run`, `notify reseal`, `notify destinations add` and `notify destinations test`",
    "collect_key_encryption_key_file": (
        "`collect`, `keys rewrap`, and `keys add` and `keys rotate` with a key on standard input"
    ),
}


def cmd_check_config(args: argparse.Namespace) -> int:
    settings = _settings()
    width = max(len(name) for name in settings.redacted())
    for name, value in settings.redacted().items():
        print(f"{name:<{width}}  {value}")
    # Not fatal for check-config itself (dev fills them in), but the commands named need them.
    for name, commands in NEEDED_BY.items():
        if getattr(settings, name) is None:
            print(f"note: COST_WORKER_{name.upper()} is not set: needed by {commands}")
    for variable, likely in _unknown_variables(os.environ):
        guess = f" (did you mean {likely}?)" if likely else ""
        print(f"note: {variable} is not a setting and is ignored{guess}")
    for path, likely in _unknown_secret_files(settings):
        from worker.admin import printable  # noqa: PLC0415 - keep `--help` fast

        guess = f" (did you mean {likely}?)" if likely else ""
        print(f"note: {printable(str(path))} is not a setting and is ignored{guess}")
    print("configuration OK")
    return EXIT_OK


# COST_WORKER_ variables read outside the settings, and the prefix of the test suite's own (tests/conftest.py).
OTHER_VARIABLES = frozenset({"COST_WORKER_SECRETS_DIR", "COST_WORKER_SCHEMA_DIR", "COST_WORKER_FAULT_POINTS"})
NOT_SETTINGS_PREFIX = "COST_WORKER_TEST_"


def _unknown_secret_files(settings: Settings) -> list[tuple[Path, str | None]]:
    """Files of COST_WORKER_SECRETS_DIR named like a variable that no setting reads (a Secret's key misspelt)."""
    if settings.secrets_dir is None:
        return []
    try:
        files = {entry.name: entry for entry in settings.secrets_dir.iterdir()}
    except OSError:  # load_settings reads it; if listing it fails now, there is nothing more to say
        return []
    return [(files[name], likely) for name, likely in _unknown_variables(files)]


def _unknown_variables(environ: Iterable[str]) -> list[tuple[str, str | None]]:
    """COST_WORKER_ variables that no setting reads (a misspelt name is otherwise ignored in silence), each with the
    closest setting's name, if one is close."""
    known = {env_name(field) for field in Settings.model_fields} | OTHER_VARIABLES
    unknown = sorted(
        name
        for name in environ
        if name.startswith(ENV_PREFIX) and name not in known and not name.startswith(NOT_SETTINGS_PREFIX)
    )
    return [(name, next(iter(difflib.get_close_matches(name, known, n=1, cutoff=0.8)), None)) for name in unknown]


def cmd_migrate(args: argparse.Namespace) -> int:
    from worker import logs  # noqa: PLC0415 - keep `--help` fast
    from worker.migrate import migrate  # noqa: PLC0415

    settings = _settings(require=("database_url",))
    logs.configure(level=settings.log_level, fmt=settings.log_format, secrets=settings.secrets())
    return _run(lambda: _migrate(settings, migrate))


async def _migrate(settings: Settings, migrate: Any) -> int:
    report = await migrate(settings.dsn())
    if report.ahead:
        print(f"database is ahead of this code by expand migration(s) {', '.join(report.ahead)}: nothing to do")
    elif report.applied:
        print(f"applied {len(report.applied)} migration(s): {', '.join(report.applied)}")
    else:
        print(f"database is up to date ({report.already_applied} migration(s) applied)")
    if not report.as_owner:
        print("note: this login cannot act as cost_worker_owner; objects are owned by the login role")
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    from worker import app  # noqa: PLC0415

    settings = _settings(require=("database_url", "kafka_bootstrap_servers"))
    return app.run(settings, exit_when_idle=args.exit_when_idle)


def cmd_dev(args: argparse.Namespace) -> int:
    from worker import dev  # noqa: PLC0415

    return dev.main(_settings(), state_dir=Path(args.state_dir), once=args.once)


def cmd_quarantine(args: argparse.Namespace) -> int:
    from worker import admin  # noqa: PLC0415

    settings = _settings(require=("database_url",))
    if args.quarantine_command == "list":
        return _run(lambda: admin.quarantine_list(settings, reason=args.reason, status=args.status, limit=args.limit))
    return _run(lambda: admin.quarantine_replay(settings, reason=args.reason, limit=args.limit))


def cmd_budgets(args: argparse.Namespace) -> int:
    from worker import admin  # noqa: PLC0415

    settings = _settings(require=("database_url",))
    if args.budgets_command == "rebuild-spend":
        return _run(lambda: admin.budgets_rebuild_spend(settings, organization=args.organization))
    return _run(lambda: admin.budgets_status(settings, organization=args.organization))


def cmd_prices(args: argparse.Namespace) -> int:
    from worker import prices  # noqa: PLC0415

    def when(text: str | None, flag: str) -> Any:
        instant = None if text is None else prices.parse_instant(text)
        if text is not None and instant is None:
            raise UsageError([f"{flag}: not a date or a time with zone: {text!r}"])
        return instant

    if args.prices_command == "show":
        at = when(args.at, "--at")
        settings = _settings()
        return _run(
            lambda: prices.show(settings, args.model, provider=args.provider, token_type=args.token_type, at=at)
        )
    settings = _settings(require=("database_url",))
    if args.prices_command == "overrides":
        return _run(lambda: prices.list_overrides(settings, provider=args.provider, model=args.model))
    if args.prices_command == "import":
        return _run(lambda: prices.import_csv(settings, Path(args.file)))
    since = when(args.since, "--since")
    return _run(lambda: prices.unpriced(settings, since=since))


def cmd_notify(args: argparse.Namespace) -> int:
    from worker.notify import admin  # noqa: PLC0415

    if args.notify_command == "run":
        from worker.notify import service  # noqa: PLC0415

        return service.run(_settings(require=("database_url", "kafka_bootstrap_servers", "notify_secrets_key")))
    settings = _settings(require=("database_url",))
    if args.notify_command == "status":
        return _run(lambda: admin.status(settings, organization=args.organization))
    if args.notify_command == "reseal":
        return _run(lambda: admin.reseal(_settings(require=("database_url", "notify_secrets_key"))))
    action, org = args.destinations_command, args.organization
    if action == "add":
        return _run(
            lambda: admin.add(
                settings,
                organization=org,
                name=args.name,
                kind=args.kind,
                url=args.url,
                scopes=args.scope,
                min_threshold=args.min_threshold,
                include_resolved=not args.no_resolved,
            )
        )
    if action == "list":
        return _run(lambda: admin.list_(settings, organization=org))
    if action == "test":
        return _run(lambda: admin.test(settings, organization=org, destination=args.destination))
    if action == "rotate-secret":
        return _run(
            lambda: admin.rotate_secret(
                _settings(require=("database_url", "notify_secrets_key")),
                organization=org,
                destination=args.destination,
                overlap=args.overlap,
            )
        )
    return _run(lambda: admin.remove(settings, organization=org, destination=args.destination))


def cmd_rates(args: argparse.Namespace) -> int:
    from worker import rates  # noqa: PLC0415

    settings = _settings(require=("database_url",))
    if args.rates_command == "import":
        return _run(lambda: rates.import_rates(settings, Path(args.file), fmt=args.format, source=args.source))
    return _run(lambda: rates.list_rates(settings, base=args.base, quote=args.quote))


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "check-config": cmd_check_config,
    "migrate": cmd_migrate,
    "run": cmd_run,
    "dev": cmd_dev,
    "quarantine": cmd_quarantine,
    "budgets": cmd_budgets,
    "prices": cmd_prices,
    "notify": cmd_notify,
    **collect_cli.COMMANDS,
    "rates": cmd_rates,
    "retention": cmd_retention,
}


def _one_line(text: str) -> str:
    """A message as one line: a database error's DETAIL and HINT lines follow its message, joined with " | "."""
    return " | ".join(line.strip() for line in text.splitlines() if line.strip())


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        code = COMMANDS[args.command](args)
        sys.stdout.flush()  # here, not at exit, so that a reader gone away is caught below
        return code
    except BrokenPipeError:  # the reader went away (`| head`): nothing to report, and nothing more to print
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILURE
    except ConfigError as exc:  # a bad argument (UsageError) or a bad setting: both exit 2
        kind = "usage error" if isinstance(exc, UsageError) else "config error"
        for problem in exc.problems:
            print(f"cost-worker: {kind}: {problem}", file=sys.stderr)
        return EXIT_USAGE
    except CostWorkerError as exc:
        print(f"cost-worker: error: {_one_line(str(exc))}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except Exception as exc:  # a bug: still one line, the traceback only when asked for
        if os.environ.get("COST_WORKER_LOG_LEVEL", "").upper() == "DEBUG":
            traceback.print_exc()
        print(
            f"cost-worker: internal error: {type(exc).__name__}: {_one_line(str(exc))} "
            "(set COST_WORKER_LOG_LEVEL=DEBUG for the traceback)",
            file=sys.stderr,
        )
        return EXIT_FAILURE
