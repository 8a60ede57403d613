"""Alert messages without servers: the stable alert id, money as exact strings, the resolved message."""

from __future__ import annotations

import json
import uuid
from dataclasses import replace
from datetime import UTC, datetime
from decimal import Decimal
from zoneinfo import ZoneInfo

from tests.currency_model import alert_id as model_alert_id
from worker.alerts import Alert, Resolution, zone
from worker.budgets import Candidate

BUDGET = uuid.uuid4()
ALERT = Alert(
    scope="project",
    budget_id=BUDGET,
    budget_name="team",
    organization_id=uuid.uuid4(),
    project_id=uuid.uuid4(),
    user_id=None,
    period="monthly",
    timezone="Europe/Berlin",
    period_start=datetime(2026, 10, 31, 23, tzinfo=UTC),
    period_end=datetime(2026, 11, 30, 23, tzinfo=UTC),
    threshold=Decimal("80"),
    spend=Decimal("812.50"),
    amount=Decimal("1000"),
    currency="EUR",
    raised_at=datetime(2026, 11, 21, 10, tzinfo=UTC),
)


def test_the_id_is_the_crossing_not_the_publication() -> None:
    assert ALERT.id == replace(ALERT, spend=Decimal("999"), raised_at=datetime.now(UTC)).id
    assert ALERT.id == replace(ALERT, threshold=Decimal("80.0")).id  # the same threshold, written otherwise
    others = [
        replace(ALERT, amount=Decimal("2000")),
        replace(ALERT, currency="USD"),
        replace(ALERT, crossing=2),
        replace(ALERT, threshold=Decimal("100")),
        replace(ALERT, scope="organization"),
        # amounts that differ only beyond the default context's 28 digits are other amounts
        replace(ALERT, amount=Decimal("1000.000000000000000000000000001")),
    ]
    assert len({ALERT.id, *(o.id for o in others)}) == 1 + len(others)
    assert ALERT.id == replace(ALERT, amount=Decimal("1000.000000000000000000000000000")).id


def test_amounts_and_thresholds_differing_beyond_60_digits_are_other_alerts() -> None:
    """The id's amount and threshold were normalized in the 60-digit context, so 1 and 1 + 1e-69 USD gave one id: the
    budget raised to 1 + 1e-69 alerted as crossing 1 at its new amount, with the id of the open alert at 1, and the
    insert's ON CONFLICT DO NOTHING (the primary key) dropped it: the alert was lost. The model spells them exactly."""
    longer = Decimal("1." + "0" * 68 + "1")
    assert replace(ALERT, amount=Decimal(1)).id != replace(ALERT, amount=longer).id
    assert replace(ALERT, threshold=Decimal(80)).id != replace(ALERT, threshold=Decimal("80." + "0" * 68 + "1")).id
    assert replace(ALERT, amount=Decimal(1)).id == replace(ALERT, amount=Decimal("1." + "0" * 80)).id
    for alert in (ALERT, replace(ALERT, amount=longer, threshold=Decimal("33." + "3" * 70), crossing=3)):
        assert alert.id == model_alert_id(
            alert.scope,
            alert.budget_id,
            alert.period_start,
            alert.threshold,
            alert.amount,
            alert.currency,
            alert.crossing,
        )


def test_a_level_is_reached_exactly_beyond_28_digits() -> None:
    """Spend one unit of the 29th decimal place below a 10 USD budget has not reached 100 %; at it, it has."""
    candidate = Candidate(
        scope="organization",
        budget_id=BUDGET,
        name="team",
        organization_id=uuid.uuid4(),
        project_id=None,
        user_id=None,
        amount=Decimal("10"),
        currency="USD",
        period="daily",
        timezone="UTC",
        thresholds=(Decimal("50"), Decimal("100")),
        period_start=datetime(2026, 11, 3, tzinfo=UTC),
        period_end=datetime(2026, 11, 4, tzinfo=UTC),
        history={},
    )
    below = Decimal("9.99999999999999999999999999999")
    assert candidate.crossed(below) == [Decimal("50")]
    assert candidate.crossed(Decimal("10")) == [Decimal("50"), Decimal("100")]
    open_at_100 = replace(candidate, history={Decimal("100"): (1, uuid.uuid4())})
    assert open_at_100.fallen(below) == [Decimal("100")]
    assert open_at_100.fallen(Decimal("10")) == []


def test_a_level_is_reached_exactly_beyond_60_digits() -> None:
    """A budget's amount has as many digits as NUMERIC holds (its CHECK bounds only the value): 1 plus 1e-69 USD.
    Reached was decided on 60-digit products, where 100 % of it rounds to 1 USD: 1 USD of spend, below the level,
    raised the 100 % alert (and fell() kept it open at that spend). The model (tests/currency_model.py) compares
    exact fractions."""
    amount = Decimal("1." + "0" * 68 + "1")
    candidate = Candidate(
        scope="organization",
        budget_id=BUDGET,
        name="team",
        organization_id=uuid.uuid4(),
        project_id=None,
        user_id=None,
        amount=amount,
        currency="USD",
        period="daily",
        timezone="UTC",
        thresholds=(Decimal("50"), Decimal("100")),
        period_start=datetime(2026, 11, 3, tzinfo=UTC),
        period_end=datetime(2026, 11, 4, tzinfo=UTC),
        history={},
    )
    assert candidate.crossed(Decimal(1)) == [Decimal("50")]
    assert candidate.crossed(amount) == [Decimal("50"), Decimal("100")]
    open_at_100 = replace(candidate, history={Decimal("100"): (1, uuid.uuid4())})
    assert open_at_100.fallen(Decimal(1)) == [Decimal("100")]
    assert open_at_100.fallen(amount) == []
    # a threshold with as many digits: 1e-70 % of spend below its level
    third = Decimal("33." + "3" * 70)
    thirds = replace(candidate, amount=Decimal(3), thresholds=(third,))
    assert thirds.crossed(Decimal("0." + "9" * 72)) == [third]  # exactly its level
    assert thirds.crossed(Decimal("0." + "9" * 71 + "8")) == []


def test_the_message_carries_exact_money_in_the_budgets_zone() -> None:
    body = json.loads(ALERT.message())
    assert body["type"] == "budget.alert.triggered"
    assert body["alert_id"] == str(ALERT.id)
    assert (body["spend"], body["amount"], body["percent_used"], body["threshold_percent"]) == (
        "812.50",
        "1000",
        "81.25",
        "80",
    )
    assert body["period_start"] == "2026-11-01T00:00:00+01:00"
    assert body["user_id"] is None
    assert ALERT.key == str(BUDGET).encode()


def test_a_resolution_names_the_alert_it_resolves_and_the_spend_now() -> None:
    stored = uuid.uuid4()
    resolution = Resolution(stored, ALERT, Decimal("700"), datetime(2026, 11, 22, tzinfo=UTC))
    body = json.loads(resolution.message())
    assert body["type"] == "budget.alert.resolved"
    assert (body["alert_id"], body["spend"], body["percent_used"]) == (str(stored), "700", "70.00")
    assert body["raised_at"] == ALERT.raised_at.isoformat()
    assert resolution.delivery_id == f"{stored}:resolved"
    assert (resolution.key, resolution.scope, resolution.threshold) == (ALERT.key, "project", Decimal("80"))


def test_percent_used_is_rounded_once_from_the_exact_quotient() -> None:
    """80.0149999999999999999999999999 of 100 is 80.014999...%: 80.01 at display. Rounded to 28 digits first
    (the default context: 8001.500000000000000000000000), it became 80.02, half a cent of a percent above the
    exact figure."""
    spend = Decimal("80.0149999999999999999999999999")
    alert = replace(ALERT, spend=spend, amount=Decimal("100"))
    assert alert.percent_used == Decimal("80.01")
    assert json.loads(alert.message())["percent_used"] == "80.01"
    resolution = Resolution(uuid.uuid4(), alert, spend, datetime(2026, 11, 22, tzinfo=UTC))
    assert resolution.percent_used == Decimal("80.01")
    # A quotient that does not end (spend / 3) is rounded once as well.
    thirds = replace(ALERT, spend=Decimal("2.40044999999999999999999999999"), amount=Decimal("3"))
    assert thirds.percent_used == Decimal("80.01")


def test_an_open_alert_of_a_removed_threshold_resolves_when_spend_falls_below_it() -> None:
    """Thresholds 50, 80 of 100 USD, spend 85: both alerted. The budget drops the 80 % threshold (50 only), then a
    revision lowers spend to 10: both open alerts are below their level and resolve. The 80 % alert used to stay
    open for good (spend 10, "80 % reached"), since only the budget's current thresholds were looked at."""
    candidate = Candidate(
        scope="project",
        budget_id=BUDGET,
        name="team",
        organization_id=uuid.uuid4(),
        project_id=uuid.uuid4(),
        user_id=None,
        amount=Decimal("100"),
        currency="USD",
        period="monthly",
        timezone="UTC",
        thresholds=(Decimal("50"),),
        period_start=datetime(2026, 11, 1, tzinfo=UTC),
        period_end=datetime(2026, 12, 1, tzinfo=UTC),
        history={Decimal("50"): (1, uuid.uuid4()), Decimal("80"): (1, uuid.uuid4())},
    )
    assert candidate.fallen(Decimal("85")) == []
    assert candidate.fallen(Decimal("60")) == [Decimal("80")]
    assert candidate.fallen(Decimal("10")) == [Decimal("50"), Decimal("80")]
    assert candidate.crossed(Decimal("85")) == []  # a removed threshold is never raised again
    resolved_80 = replace(candidate, history={Decimal("50"): (1, uuid.uuid4()), Decimal("80"): (1, None)})
    assert resolved_80.crossed(Decimal("85")) == []
    assert resolved_80.fallen(Decimal("10")) == [Decimal("50")]


def test_a_time_zone_is_shown_in_its_canonical_zone_or_in_utc_never_an_error() -> None:
    """PostgreSQL accepts zone names in any case, abbreviations and POSIX specs (the budgets' CHECK); the period is
    shown in the zone a name means there when Python knows it, else in UTC."""
    assert zone("Europe/Berlin") == ZoneInfo("Europe/Berlin")
    assert zone("europe/berlin") == ZoneInfo("Europe/Berlin")
    assert zone("AMERICA/LOS_ANGELES") == ZoneInfo("America/Los_Angeles")
    for name in ("PST", "UTC+3", "+03:00", "", "/etc/passwd", "../UTC", "Nowhere/City", "x\x00y", "A" * 300):
        assert zone(name) is UTC, name


def test_budgets_status_labels_a_period_shown_in_utc_as_utc() -> None:
    """README: a PostgreSQL abbreviation that is no IANA zone (`PST`) is shown in UTC. `budgets status` printed the
    UTC times with the budget's name for the zone ("2026-12-03 08:00 .. 2026-12-04 08:00 PST"), 8 hours off for a
    reader; a zone it can show keeps its own name."""
    from worker.admin import _status_row  # noqa: PLC0415
    from worker.store.tx import Spend  # noqa: PLC0415

    candidate = Candidate(
        scope="organization",
        budget_id=BUDGET,
        name="team",
        organization_id=uuid.uuid4(),
        project_id=None,
        user_id=None,
        amount=Decimal("10"),
        currency="USD",
        period="daily",
        timezone="PST",
        thresholds=(Decimal("50"),),
        period_start=datetime(2026, 12, 3, 8, tzinfo=UTC),
        period_end=datetime(2026, 12, 4, 8, tzinfo=UTC),
        history={},
    )
    spend = Spend(amount=Decimal("1"), converted={}, missing_rates={})
    assert _status_row(candidate, spend, 0)[3] == "2026-12-03 08:00 .. 2026-12-04 08:00 UTC (PST)"
    berlin = replace(candidate, timezone="europe/berlin", period_start=datetime(2026, 12, 2, 23, tzinfo=UTC))
    assert _status_row(berlin, spend, 0)[3] == "2026-12-03 00:00 .. 2026-12-04 09:00 europe/berlin"
