"""Pricing usage lines from ``model_prices``: the price effective at the bucket start applies.

Arithmetic is exact: quantity x price-per-million, then the decimal point moves six places. A usage line
with no price keeps amount NULL (it is stored and counted, never dropped); a line with zero quantity costs
zero whatever the price.
"""

from __future__ import annotations

import bisect
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal, localcontext

from worker.providers import LedgerLine


@dataclass(frozen=True, slots=True)
class Price:
    provider: str
    model: str
    token_type: str
    price_per_million: Decimal
    currency: str
    effective_from: datetime


class PriceBook:
    """Prices by (provider, model, token_type), each list ordered by effective_from."""

    def __init__(self, prices: Iterable[Price]) -> None:
        self._prices: dict[tuple[str, str, str], list[Price]] = defaultdict(list)
        for price in prices:
            self._prices[(price.provider, price.model, price.token_type)].append(price)
        for versions in self._prices.values():
            versions.sort(key=lambda p: p.effective_from)
        self._starts = {key: [p.effective_from for p in versions] for key, versions in self._prices.items()}

    def lookup(self, provider: str, model: str, token_type: str, at: datetime) -> Price | None:
        key = (provider, model, token_type)
        starts = self._starts.get(key)
        if not starts:
            return None
        index = bisect.bisect_right(starts, at) - 1
        return self._prices[key][index] if index >= 0 else None

    def price(self, line: LedgerLine) -> bool:
        """Fill in the line's amount and currency; returns False when the line stays unpriced."""
        assert line.quantity is not None, "usage lines carry a quantity"
        assert line.price_model is not None, "usage lines carry a price key"
        assert line.price_token_type is not None, "usage lines carry a price key"
        found = self.lookup(line.provider, line.price_model, line.price_token_type, line.bucket_start)
        if found is None:
            if line.quantity == 0:
                line.amount = Decimal(0)
                return True
            line.amount = None
            return False
        with localcontext() as exact:
            exact.prec = 60  # wide enough that no product of bounded inputs is ever rounded
            line.amount = (line.quantity * found.price_per_million).scaleb(-6)
        line.currency = found.currency
        return True


def price_keys(lines: Iterable[LedgerLine]) -> set[tuple[str, str]]:
    """(provider, model) pairs a set of usage lines needs prices for."""
    return {(line.provider, line.price_model) for line in lines if line.price_model is not None}
