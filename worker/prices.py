"""``cost-worker prices``: what a usage line costs and why, the operator's overrides, and what has no price.

- ``show MODEL``: the effective price of each token type of a model at a date, and its source (an override in
  ``model_prices``, or the genai-prices catalogue with its version);
- ``overrides``: the rows of ``model_prices``;
- ``import FILE``: new overrides from a CSV file (checked as a whole: every problem is reported, nothing is
  written unless every row is good);
- ``unpriced``: the models and token types of ledger lines stored without a price.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from datetime import UTC, date, datetime
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from worker.admin import table
from worker.config import Settings
from worker.errors import ConfigError, UsageError
from worker.files import read_input_file
from worker.models import ISO_4217
from worker.pricing import PER_MILLION, Overrides, Price, Quote, catalogue_model, catalogue_quote
from worker.providers import PRICE_DIMENSIONS, TOKEN_TYPE_UNITS
from worker.store import Database

PROVIDERS = tuple(TOKEN_TYPE_UNITS)
CSV_COLUMNS = ("provider", "model", "token_type", "price_per_million", "effective_from")
CSV_OPTIONAL = ("currency", "note")
MAX_PRICE = Decimal("1e9")  # per million units (model_prices' CHECK)
MAX_NAME = 255  # model and token_type (model_prices' columns)
MAX_NOTE = 500
MAX_CSV_PROBLEMS = 50  # reported at once; the rest are counted


@dataclass(frozen=True, slots=True)
class Effective:
    token_type: str
    quote: Quote | None
    effective_from: datetime | None = None


def parse_token_type(token_type: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    """``uncached_input_tokens/service_tier=batch`` -> the token type and its price dimensions."""
    base, *qualifiers = token_type.split("/")
    dimensions = []
    for qualifier in qualifiers:
        name, sep, value = qualifier.partition("=")
        if not sep or name not in PRICE_DIMENSIONS or not value:
            raise UsageError([f"token type {token_type!r}: {qualifier!r} is not name=value of {PRICE_DIMENSIONS}"])
        dimensions.append((name, value))
    dimensions.sort(key=lambda item: PRICE_DIMENSIONS.index(item[0]))
    return base, tuple(dimensions)


def canonical_token_type(token_type: str) -> str:
    """The token type with its dimensions in the order lines carry them (``PRICE_DIMENSIONS``): the only form an
    override is looked up by."""
    base, dimensions = parse_token_type(token_type)
    return base + "".join(f"/{name}={value}" for name, value in dimensions)


def effective_prices(
    provider: str, model: str, token_types: list[str], at: datetime, overrides: Overrides
) -> list[Effective]:
    """Each token type's price at ``at``, as the worker would apply it (overrides first, then the catalogue)."""
    found = []
    for token_type in token_types:
        base, dimensions = parse_token_type(token_type)
        override = overrides.lookup(provider, model, token_type, at)
        if override is not None:
            quote = Quote(override.price_per_million, PER_MILLION, override.currency, f"override:{override.id}")
            found.append(Effective(token_type, quote, override.effective_from))
            continue
        unit = TOKEN_TYPE_UNITS[provider].get(base)
        found.append(Effective(token_type, catalogue_quote(provider, model, unit, dimensions, at) if unit else None))
    return found


async def show(
    settings: Settings, model: str, *, provider: str | None, token_type: str | None, at: datetime | None
) -> int:
    if provider is None:
        provider = next((p for p in PROVIDERS if catalogue_model(p, model) is not None), None)
        if provider is None:
            raise UsageError([f"the catalogue does not know {model!r}: name its provider with --provider"])
    if token_type is not None:
        token_type = canonical_token_type(token_type)  # a usage error before any connection
        if token_type.split("/")[0] not in TOKEN_TYPE_UNITS[provider]:
            known = ", ".join(TOKEN_TYPE_UNITS[provider])
            raise UsageError([f"{provider} has no token type {token_type.split('/')[0]!r} (known: {known})"])
    when = at or datetime.now(UTC)
    rows: list[Price] = []
    if settings.database_url is not None:
        db = await Database.open(settings.dsn(), role=settings.database_role, max_size=1)
        try:
            async with db.transaction() as tx:
                rows = [_price(r) for r in await tx.report("report_price_overrides", provider, model)]
        finally:
            await db.close()
    token_types = [token_type] if token_type else list(TOKEN_TYPE_UNITS[provider])
    prices = effective_prices(provider, model, token_types, when, Overrides(rows))
    print(f"{provider} {model} at {when.isoformat(timespec='seconds')}")
    print(
        table(
            ["token type", "price", "per", "currency", "source", "since"],
            [
                (
                    p.token_type,
                    p.quote.unit_price if p.quote else None,
                    p.quote.per if p.quote else None,
                    p.quote.currency if p.quote else None,
                    p.quote.source if p.quote else "no price",
                    p.effective_from,
                )
                for p in prices
            ],
        )
    )
    if settings.database_url is None:
        print("(no COST_WORKER_DATABASE_URL: overrides not consulted)")
    return 0


def _price(row: Any) -> Price:
    return Price(
        row["provider"],
        row["model"],
        row["token_type"],
        row["price_per_million"],
        row["currency"],
        row["effective_from"],
        row["id"],
    )


async def list_overrides(settings: Settings, *, provider: str | None, model: str | None) -> int:
    db = await Database.open(settings.dsn(), role=settings.database_role, max_size=1)
    try:
        async with db.transaction() as tx:
            rows = await tx.report("report_price_overrides", provider, model)
    finally:
        await db.close()
    if not rows:
        print("no overrides: every price comes from the catalogue")
        return 0
    headers = ["id", "provider", "model", "token type", "per million", "currency", "effective from", "note"]
    print(table(headers, [tuple(r) for r in rows]))
    return 0


def read_csv(path: Path) -> list[tuple[str, str, str, Decimal, str, datetime, str | None]]:
    """The rows of an overrides CSV file, every problem reported at once (``ConfigError``)."""
    # newline="": a quoted field's line break reaches the csv module (and is refused below), not dropped.
    reader = csv.DictReader(io.StringIO(read_input_file(path), newline=""))
    try:
        header = reader.fieldnames or []
        records = list(reader)
    except csv.Error as exc:  # a field over the csv module's limit, a NUL byte, ...
        raise ConfigError([f"{path}:{reader.line_num}: not CSV: {exc}"]) from None
    missing = [column for column in CSV_COLUMNS if column not in header]
    unknown = [column for column in header if column not in CSV_COLUMNS + CSV_OPTIONAL]
    if missing or unknown:
        raise ConfigError(
            [f"{path}: the header needs {', '.join(CSV_COLUMNS)} (optional: {', '.join(CSV_OPTIONAL)})"]
            + [f"{path}: missing column {c!r}" for c in missing]
            + [f"{path}: unknown column {c!r}" for c in unknown]
        )
    rows = []
    problems: list[str] = []
    seen: dict[tuple[str, str, str, datetime], int] = {}
    for number, record in enumerate(records, start=2):
        where = f"{path}:{number}"
        row, trouble = _row(record, where)
        problems += trouble
        if row is not None:
            key = (row[0], row[1], row[2], row[5])
            if key in seen:
                problems.append(f"{where}: the same key as line {seen[key]}")
            seen[key] = number
            rows.append(row)
    if problems:
        extra = len(problems) - MAX_CSV_PROBLEMS
        raise ConfigError(problems[:MAX_CSV_PROBLEMS] + ([f"... and {extra} more problems"] if extra > 0 else []))
    if not rows:
        raise ConfigError([f"{path}: no rows"])
    return rows


def _row(
    record: dict[str, str | None], where: str
) -> tuple[tuple[str, str, str, Decimal, str, datetime, str | None] | None, list[str]]:
    problems = []
    values = {key: (value or "").strip() for key, value in record.items() if key is not None}
    if None in record:
        problems.append(f"{where}: more fields than columns")
    provider = values.get("provider", "")
    if provider not in PROVIDERS:
        problems.append(f"{where}: provider {provider!r} is not one of {', '.join(PROVIDERS)}")
    model, token_type = values.get("model", ""), values.get("token_type", "")
    for name, value in (("model", model), ("token_type", token_type)):
        if not value or len(value) > MAX_NAME or not value.isprintable():
            problems.append(f"{where}: {name} must be 1 to {MAX_NAME} printable characters (no line break)")
    if token_type:
        try:
            token_type = canonical_token_type(token_type)  # stored as lines name it, else it would never match
        except ConfigError as exc:
            problems += [f"{where}: {p}" for p in exc.problems]
    price: Decimal | None = None
    try:
        price = Decimal(values.get("price_per_million", ""))
        if not price.is_finite() or price < 0 or price >= MAX_PRICE:
            raise InvalidOperation
    except InvalidOperation:
        problems.append(f"{where}: price_per_million must be a decimal number from 0 to below {MAX_PRICE}")
    currency = (values.get("currency") or "USD").upper()
    if currency not in ISO_4217:
        problems.append(f"{where}: currency {currency!r} is not an ISO 4217 code")
    effective = parse_instant(values.get("effective_from", ""))
    if effective is None:
        problems.append(f"{where}: effective_from must be a date (2026-01-01) or a time with its zone")
    note = values.get("note") or None
    if note is not None and len(note) > MAX_NOTE:
        problems.append(f"{where}: note longer than {MAX_NOTE} characters")
    if problems or price is None or effective is None:
        return None, problems
    return (provider, model, token_type, price, currency, effective, note), []


def parse_instant(text: str) -> datetime | None:
    try:
        if len(text) == len("2026-01-01"):
            day = date.fromisoformat(text)
            return datetime(day.year, day.month, day.day, tzinfo=UTC)
        instant = datetime.fromisoformat(text)
    except ValueError:
        return None
    return instant if instant.tzinfo is not None else None


async def import_csv(settings: Settings, path: Path) -> int:
    """Insert the file's overrides in one transaction. A key already stored with the same price is skipped;
    with another price it is an error (a new price gets a new effective_from). Runs as the login role: the
    worker's role may only read model_prices."""
    rows = read_csv(path)
    db = await Database.open(settings.dsn(), role=None, max_size=1)
    try:
        async with db.transaction() as tx:
            existing = {
                (r["provider"], r["model"], r["token_type"], r["effective_from"]): (
                    r["price_per_million"],
                    r["currency"],
                )
                for r in await tx.prices_existing([(r[0], r[1], r[2], r[5]) for r in rows])
            }
            clashes = [
                f"{r[0]} {r[1]} {r[2]} from {r[5].isoformat()}: stored as {existing[k][0]} {existing[k][1]}, "
                f"the file says {r[3]} {r[4]} (give the new price a new effective_from)"
                for r in rows
                if (k := (r[0], r[1], r[2], r[5])) in existing and existing[k] != (r[3], r[4])
            ]
            if clashes:
                raise ConfigError(clashes)
            inserted = await tx.prices_import([list(column) for column in zip(*rows, strict=True)])
    finally:
        await db.close()
    print(f"imported {len(inserted)} overrides, {len(rows) - len(inserted)} already there")
    return 0


async def unpriced(settings: Settings, *, since: datetime | None) -> int:
    db = await Database.open(settings.dsn(), role=settings.database_role, max_size=1)
    try:
        async with db.transaction() as tx:
            organizations = {r["id"] for r in await tx.report("report_organizations", None)}
            if not organizations:
                print("no organizations")
                return 0
            await tx.set_tenants(organizations)
            rows = await tx.report("report_unpriced_models", since)
    finally:
        await db.close()
    if not rows:
        print("every usage line has a price")
        return 0
    known = [(r, catalogue_model(r["provider"], r["model"] or "") is not None) for r in rows]
    headers = ["provider", "model", "token type", "unit", "lines", "quantity", "first", "last", "catalogue knows model"]
    print(table(headers, [(*tuple(r), "yes" if k else "no") for r, k in known]))
    return 0
