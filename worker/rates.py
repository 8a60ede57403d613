"""Exchange rates: ``cost-worker rates import FILE`` and ``rates list``.

Budgets in a currency other than their spend rows' are converted with the rates in ``exchange_rates``
(rule in ``schema/migrations/0007_currencies_and_alert_lifecycle.sql``). Rates are loaded by an operator
from a file, never fetched at run time. Formats:

- ``ecb`` (default): the European Central Bank's euro foreign exchange reference rates CSV, as downloaded from
  https://www.ecb.europa.eu/stats/policy_and_exchange_rates/euro_reference_exchange_rates/html/index.en.html
  (``eurofxref.csv`` or ``eurofxref-hist.csv``): a ``Date`` column, then one column per currency, each value
  the units of that currency for 1 EUR; ``N/A`` or an empty cell where the ECB has no rate that day. Dates as
  ``2026-11-27`` (history file) or ``27 November 2026`` (daily file).
- ``pairs``: ``date,base,quote,rate`` rows (1 base = rate quote), for rates from any other source.

Lines starting with ``#`` are comments. Every problem in a file is reported at once, and nothing is loaded
from a file with a problem. Loading the same file again changes nothing; a corrected rate replaces the old one.
"""

from __future__ import annotations

import asyncio
import csv
import re
from datetime import date, datetime
from decimal import Decimal, InvalidOperation
from pathlib import Path

from worker.config import Settings
from worker.errors import ConfigError, UsageError
from worker.files import read_input_file
from worker.rows import Rate
from worker.store import Database

FORMATS = ("ecb", "pairs")
DEFAULT_FORMAT = "ecb"
ECB_BASE = "EUR"
ECB_SOURCE = "ECB"
MAX_RATE = Decimal("1e12")  # exclusive (matches the database CHECK)
MAX_PROBLEMS_SHOWN = 20
MAX_SOURCE_CHARS = 200  # characters of a --source label (a name such as ECB, not a note)
_CODE = re.compile(r"^[A-Z]{3}$")
_MISSING = {"", "N/A", "NA", "-"}


def _date(text: str) -> date:
    for fmt in ("%Y-%m-%d", "%d %B %Y"):
        try:
            return datetime.strptime(text, fmt).date()
        except ValueError:
            continue
    raise ValueError(f"not a date: {text!r} (expected 2026-11-27 or 27 November 2026)")


def _rate(text: str) -> Decimal:
    try:
        value = Decimal(text)
    except InvalidOperation:
        raise ValueError(f"not a number: {text!r}") from None
    if not value.is_finite() or not Decimal(0) < value < MAX_RATE:
        raise ValueError(f"rate out of range: {text!r} (must be > 0 and < 1e12)")
    return value


def _rows(text: str) -> list[tuple[int, list[str]]]:
    lines = [(n, line) for n, line in enumerate(text.splitlines(), start=1) if line.strip()]
    lines = [(n, line) for n, line in lines if not line.lstrip().startswith("#")]
    # One record per line, each read on its own: an unclosed quote (which would swallow the next lines) or a
    # field over the csv module's limit is a problem of its line, not an internal error.
    rows, problems = [], []
    for n, line in lines:
        try:
            row = next(csv.reader([line], skipinitialspace=True, strict=True))
        except csv.Error as exc:
            problems.append(f"line {n}: not CSV: {exc}")
            continue
        rows.append((n, [cell.strip() for cell in row]))
    if problems:
        raise ConfigError(problems[:MAX_PROBLEMS_SHOWN])
    return rows


def parse(text: str, fmt: str = DEFAULT_FORMAT) -> list[Rate]:
    """Rates of a file; raises ``ConfigError`` listing every problem (with line numbers)."""
    if fmt not in FORMATS:
        raise UsageError([f"--format: unknown format {fmt!r}; known: {', '.join(FORMATS)}"])
    rows = _rows(text)
    if not rows:
        raise ConfigError(["the file has no rows"])
    problems: list[str] = []
    rates: dict[tuple[str, str, date], Rate] = {}
    (_, header), body = rows[0], rows[1:]
    if fmt == "ecb":
        if not header or header[0].lower() != "date":
            raise ConfigError([f"line {rows[0][0]}: an ECB file starts with a 'Date' column, found {header[:1]}"])
        terminated = bool(header) and header[-1] == ""  # the ECB ends every line with a comma
        while header and header[-1] == "":
            header = header[:-1]
        quotes = header[1:]
        problems += [f"line {rows[0][0]}: not a currency code: {code!r}" for code in quotes if not _CODE.match(code)]
        for number, row in body:
            cells = list(row)
            # The trailing comma ends the line: one empty cell, not more (an empty cell before it is a currency's
            # missing rate, like N/A; dropping every trailing empty cell rejected the file when the last was empty).
            if terminated and cells and cells[-1] == "":
                cells.pop()
            if len(cells) != len(header):
                problems.append(f"line {number}: {len(cells)} cells, the header has {len(header)}")
                continue
            try:
                day = _date(cells[0])
            except ValueError as exc:
                problems.append(f"line {number}: {exc}")
                continue
            for quote, cell in zip(quotes, cells[1:], strict=True):
                if cell.upper() in _MISSING or not _CODE.match(quote):
                    continue
                try:
                    _add(rates, Rate(ECB_BASE, quote, day, _rate(cell)), number, problems)
                except ValueError as exc:
                    problems.append(f"line {number}, {quote}: {exc}")
    else:
        if [h.lower() for h in header] != ["date", "base", "quote", "rate"]:
            raise ConfigError([f"line {rows[0][0]}: a pairs file has the header date,base,quote,rate"])
        for number, row in body:
            if len(row) != 4:
                problems.append(f"line {number}: {len(row)} cells, expected 4")
                continue
            try:
                day, base, quote, value = _date(row[0]), row[1].upper(), row[2].upper(), _rate(row[3])
            except ValueError as exc:
                problems.append(f"line {number}: {exc}")
                continue
            if not _CODE.match(base) or not _CODE.match(quote) or base == quote:
                problems.append(f"line {number}: not a currency pair: {row[1]!r} -> {row[2]!r}")
                continue
            _add(rates, Rate(base, quote, day, value), number, problems)
    if problems:
        shown = problems[:MAX_PROBLEMS_SHOWN]
        if len(problems) > len(shown):
            shown.append(f"... and {len(problems) - len(shown)} more problem(s)")
        raise ConfigError(shown)
    if not rates:
        raise ConfigError(["the file has no rates"])
    return sorted(rates.values(), key=lambda r: (r.base, r.quote, r.effective_date))


def _add(rates: dict[tuple[str, str, date], Rate], rate: Rate, number: int, problems: list[str]) -> None:
    key = (rate.base, rate.quote, rate.effective_date)
    seen = rates.get(key)
    if seen is not None and seen.rate != rate.rate:
        problems.append(f"line {number}: {rate.base}/{rate.quote} on {rate.effective_date} given twice, differently")
    rates[key] = rate


def _read(path: Path) -> str:
    return read_input_file(path)


async def import_rates(settings: Settings, path: Path, *, fmt: str, source: str | None) -> int:
    if source is not None and (not source.strip() or len(source) > MAX_SOURCE_CHARS or not source.isprintable()):
        raise UsageError(
            [f"--source: 1 to {MAX_SOURCE_CHARS} printable characters (no line break), got {source[:40]!r}"]
        )
    rates = parse(await asyncio.to_thread(_read, path), fmt)
    label = source or (ECB_SOURCE if fmt == "ecb" else path.name)
    db = await Database.open(settings.dsn(), role=settings.database_role, max_size=1)
    try:
        async with db.transaction() as tx:
            counts = await tx.upsert_exchange_rates(rates, source=label)
    finally:
        await db.close()
    days = sorted({r.effective_date for r in rates})
    pairs = sorted({f"{r.base}/{r.quote}" for r in rates})
    print(
        f"{len(rates)} rate(s) of {len(pairs)} pair(s), {days[0]} .. {days[-1]}, source {label}: "
        f"{counts.get('inserted', 0)} new, {counts.get('updated', 0)} changed, {counts.get('unchanged', 0)} unchanged"
    )
    return 0


async def list_rates(settings: Settings, *, base: str | None, quote: str | None) -> int:
    from worker.admin import table  # noqa: PLC0415 - admin imports the pipeline; keep this module light

    for name, code in (("--base", base), ("--quote", quote)):
        if code is not None and not _CODE.match(code.upper()):
            raise UsageError([f"{name}: not a currency code: {code!r}"])
    # Codes in any case, as `rates import` reads them from a file (`usd` is USD).
    base, quote = (None if code is None else code.upper() for code in (base, quote))
    db = await Database.open(settings.dsn(), role=settings.database_role, max_size=1)
    try:
        rows = await db.exchange_rate_pairs(base, quote)
    finally:
        await db.close()
    if not rows:
        print("no exchange rates (load some with `cost-worker rates import FILE`)")
        return 0
    print(
        table(
            ["base", "quote", "first", "latest", "days", "latest rate", "source"],
            [
                (r["base"], r["quote"], r["first_date"], r["latest_date"], r["days"], r["latest_rate"], r["source"])
                for r in rows
            ],
        )
    )
    return 0
