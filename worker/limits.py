"""Limits that more than one module enforces, defined once (with their units) and imported everywhere else."""

from __future__ import annotations

from decimal import Context, Decimal

MAX_MAGNITUDE = Decimal("1e15")  # any number beyond is absurd for costs, tokens or latencies
MAX_TOKENS = int(MAX_MAGNITUDE)  # counts (tokens, requests, latencies): integers below MAX_MAGNITUDE
MAX_LINE_ITEM = 512  # characters of a ledger line item (cost_data's CHECK)
MAX_DETAIL = 500  # characters of detail kept with a quarantined message
# Decimal arithmetic rounds to the context's precision (28 digits by default); money has up to 46 (12 whole
# digits, 34 decimal places), so exact operations on it get a context wide enough never to round.
DECIMAL_PRECISION = 60  # significant digits
EXACT = Context(prec=DECIMAL_PRECISION)
