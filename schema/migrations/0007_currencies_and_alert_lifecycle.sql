-- Budgets in any currency (exchange rates, converted spend), and alerts that follow the budget: an alert is
-- raised against an (amount, currency), re-armed when the budget changes, resolved when spend falls back.

-- ================================================================================================ rates

-- Reference exchange rates: 1 `base` = `rate` `quote`, effective from 00:00 UTC of `effective_date`.
-- Loaded by `cost-worker rates import` (the ECB's euro reference rates by default: base EUR). Not tenant data.
CREATE TABLE exchange_rates (
    base           char(3)     NOT NULL CHECK (base ~ '^[A-Z]{3}$'),
    quote          char(3)     NOT NULL CHECK (quote ~ '^[A-Z]{3}$' AND quote <> base),
    effective_date date        NOT NULL,
    rate           numeric     NOT NULL CHECK (rate > 0 AND rate < 1e12),
    source         text        NOT NULL CHECK (source <> ''),
    imported_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (base, quote, effective_date)
);

-- The factor that turns an amount in `from_code` into `to_code` on `on_date`: amount * num / den.
-- A rate is effective on its date and the 6 days after it (weekends and holidays have no reference rate;
-- an older rate is missing, not used). Preference: a direct pair (from -> to), then the inverse pair
-- (to -> from), then the cross rate through EUR (EUR -> to over EUR -> from), each at its newest
-- effective rate. No row when no rate applies.
CREATE FUNCTION cost_worker_rate_factor(from_code text, to_code text, on_date date, OUT num numeric, OUT den numeric)
RETURNS SETOF record
LANGUAGE sql STABLE PARALLEL SAFE
AS $$
    WITH pair AS (
        SELECT r.base::text AS base, r.quote::text AS quote,
               (SELECT x.rate FROM exchange_rates x
                WHERE x.base = r.base AND x.quote = r.quote
                  AND x.effective_date <= on_date AND x.effective_date > on_date - 7
                ORDER BY x.effective_date DESC LIMIT 1) AS rate
        FROM (VALUES (from_code, to_code), (to_code, from_code), ('EUR', to_code), ('EUR', from_code))
            AS r(base, quote)
        WHERE r.base <> r.quote
    )
    SELECT f.num, f.den
    FROM (
        SELECT 1 AS preference, 1::numeric AS num, 1::numeric AS den WHERE from_code = to_code
        UNION ALL
        SELECT 2, rate, 1 FROM pair WHERE base = from_code AND quote = to_code AND rate IS NOT NULL
        UNION ALL
        SELECT 3, 1, rate FROM pair WHERE base = to_code AND quote = from_code AND rate IS NOT NULL
        UNION ALL
        SELECT 4, t.rate, f.rate
        FROM pair t, pair f
        WHERE from_code <> 'EUR' AND to_code <> 'EUR'
          AND t.base = 'EUR' AND t.quote = to_code AND t.rate IS NOT NULL
          AND f.base = 'EUR' AND f.quote = from_code AND f.rate IS NOT NULL
    ) f
    ORDER BY f.preference
    LIMIT 1
$$;

-- amount * num / den, exact, truncated toward zero at 20 decimal places (1e-20 of a currency unit; only a
-- quotient can have more), without trailing zeros. Rounding for people happens at display, nowhere else.
CREATE FUNCTION cost_worker_convert(amount numeric, num numeric, den numeric) RETURNS numeric
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    SELECT CASE WHEN num = 1 AND den = 1 THEN amount
                ELSE trim_scale(div(amount * num * 100000000000000000000, den) * 0.00000000000000000001) END
$$;

GRANT SELECT, INSERT, UPDATE ON exchange_rates TO cost_worker_writer;
GRANT SELECT ON exchange_rates TO cost_worker_reader;
GRANT EXECUTE ON FUNCTION cost_worker_rate_factor(text, text, date), cost_worker_convert(numeric, numeric, numeric)
    TO cost_worker_writer, cost_worker_reader;

-- ================================================================================================ spend

-- Spend in the budget's currency: every row of cost_worker_spend_rows (0006), each converted at the rate
-- effective on the UTC date of its rate_at (a provider row's window start, an estimate's hour) by
-- cost_worker_rate_factor / cost_worker_convert, then summed exactly. Rows already in the budget's currency
-- are taken as they are (no rate needed: USD budgets on USD rows are unaffected, to the digit). A converted
-- sum is given without trailing zeros.
-- A budget whose rows need a rate that is missing is unconvertible: spend is NULL (never 0, never a partial
-- sum) and missing_rates says what is missing ({currency: {"rows": n, "first": day, "last": day}}).
-- foreign_rows counts the rows that were converted ({currency: rows}).
DROP FUNCTION cost_worker_spend(text, uuid, uuid, uuid, timestamptz, timestamptz, text);

CREATE FUNCTION cost_worker_spend(
    scope text, org uuid, project uuid, usr uuid, period_start timestamptz, period_end timestamptz,
    currency_code text, OUT spend numeric, OUT foreign_rows jsonb, OUT missing_rates jsonb
)
LANGUAGE sql STABLE
AS $$
    WITH r AS MATERIALIZED (
        SELECT s.currency::text AS currency, (s.rate_at AT TIME ZONE 'UTC')::date AS day, s.amount
        FROM cost_worker_spend_rows(scope, org, project, usr, period_start, period_end) s
        WHERE s.amount IS NOT NULL
    ),
    factors AS MATERIALIZED (  -- one rate lookup per (currency, day), not per row
        SELECT d.currency, d.day, f.num, f.den
        FROM (SELECT DISTINCT currency, day FROM r WHERE currency <> currency_code) d
        LEFT JOIN LATERAL cost_worker_rate_factor(d.currency, currency_code, d.day) f ON true
    ),
    missing AS (
        SELECT r.currency, count(*) AS n, min(r.day) AS first, max(r.day) AS last
        FROM r JOIN factors f USING (currency, day)
        WHERE f.num IS NULL
        GROUP BY r.currency
    )
    SELECT
        CASE WHEN EXISTS (SELECT FROM missing) THEN NULL
             WHEN NOT EXISTS (SELECT FROM factors) THEN coalesce((SELECT sum(r.amount) FROM r), 0)
             ELSE trim_scale((SELECT sum(CASE WHEN r.currency = currency_code THEN r.amount
                                              ELSE cost_worker_convert(r.amount, f.num, f.den) END)
                              FROM r LEFT JOIN factors f USING (currency, day)))
        END,
        coalesce((SELECT jsonb_object_agg(c.currency, c.n) FROM (
            SELECT r.currency, count(*) AS n FROM r WHERE r.currency <> currency_code GROUP BY r.currency
        ) c), '{}'),
        coalesce((SELECT jsonb_object_agg(m.currency, jsonb_build_object('rows', m.n, 'first', m.first,
                                                                        'last', m.last))
                  FROM missing m), '{}')
$$;

GRANT EXECUTE ON FUNCTION cost_worker_spend(text, uuid, uuid, uuid, timestamptz, timestamptz, text)
    TO cost_worker_writer, cost_worker_reader;

-- ================================================================================================ alerts

-- An alert is raised against what the budget was at the time (amount, currency: already stored) and is the
-- n-th crossing of that threshold at that amount in that period (`crossing`, 1 for every alert raised before
-- this migration). It is resolved (once) when spend falls back below its level in the same period.
-- Alerts raised before this migration keep their ids; they count as the first crossing at their amount, so
-- they are not raised again, and a revision that lowers spend resolves them like any other.
ALTER TABLE budget_alerts
    ADD COLUMN crossing integer NOT NULL DEFAULT 1 CHECK (crossing >= 1),
    ADD COLUMN resolved_at timestamptz,
    ADD COLUMN resolved_spend numeric,
    DROP CONSTRAINT budget_alerts_key,
    ADD CONSTRAINT budget_alerts_key UNIQUE (scope, budget_id, period_start, threshold, amount, currency, crossing);

GRANT UPDATE (resolved_at, resolved_spend) ON budget_alerts TO cost_worker_writer;
